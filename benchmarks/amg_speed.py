"""Speed of "segment everything" after the image embedding: segany vs the official generator.

Same model and image as ``benchmarks/amg_parity.py`` (random ViT-B at 1024 in the official layout, with
the decoder edited so that random weights give masks; ``examples/cat.jpg`` resized to 512 pixels).

How the embedding is taken out of the timing: the image embedding is computed once, before any timing,
and each generator's predictor gets a ``set_image`` that installs that same tensor (plus the original
and input sizes) instead of running the image encoder. So both sides time exactly the rest of
``generate``: prompt encoding, the mask decoder over the whole point grid, upsampling, filtering, NMS,
RLE encoding and the records, on identical inputs. (Subtracting a separately timed ``set_image`` would
instead add the noise of two ViT-B runs - seconds on a shared CPU - to each difference.) Both sides see
the same embedding, so the records are also compared (counts and worst match), to show that the timed
work gives the same answer.

The default generator settings are used (``points_per_side=32``: 1024 prompts, 3072 candidates,
``pred_iou_thresh=0.88``, ``stability_score_thresh=0.95``); ``--low-thresholds`` uses the parity
script's thresholds instead. segany is timed ``--repeats`` times (median; half of the runs before the
reference's, half after), the reference ``--ref-repeats`` times (default 1: it takes minutes on a laptop
CPU). On a shared, busy machine use ``--threads 1``: with two threads each parallel operation waits for
the slower thread, and when other processes hold the cores both sides slow down by several times, in
bursts (segany, which runs many smaller operations, more so).

``--with-embedding`` also times whole ``generate`` calls, each side computing its own image embedding (the
user's view: one image in, its masks out). ``--json FILE`` appends the results for ``run_all.py``.

    python benchmarks/amg_speed.py [--repeats 3] [--ref-repeats 1] [--threads N] [--low-thresholds] [--profile]
        [--with-embedding] [--quick] [--json results.jsonl]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import print_machine, row, save_results, set_threads  # noqa: E402
from amg_parity import setup  # noqa: E402

from segany.automatic.generator import SamAutomaticMaskGenerator  # noqa: E402
from tests.test_amg import LOW_THRESHOLDS, match  # noqa: E402


def inject_embedding(predictor, embedding: torch.Tensor, original_size, input_size) -> None:
    """Replace ``predictor.set_image`` (either package's) by one that installs a precomputed embedding."""

    def set_image(image, image_format: str = "RGB") -> None:
        assert tuple(image.shape[:2]) == tuple(original_size), "the benchmark only handles the whole image"
        predictor.reset_image()
        predictor.original_size = tuple(original_size)
        predictor.input_size = tuple(input_size)
        predictor.features = embedding
        predictor.is_image_set = True

    predictor.set_image = set_image


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="segany timings (median reported)")
    ap.add_argument("--ref-repeats", type=int, default=1, help="reference timings (0: segany alone, nothing compared)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--low-thresholds", action="store_true", help="the parity script's thresholds")
    ap.add_argument("--profile", action="store_true", help="cProfile one segany run, print the top 25")
    ap.add_argument("--with-embedding", action="store_true", help="also time whole generate calls")
    ap.add_argument("--quick", action="store_true", help="8 x 8 points, one run each: a smoke test")
    ap.add_argument("--json", help="append the results to this JSON-lines file")
    args = ap.parse_args()
    set_threads(args.threads)
    meta = print_machine()
    kwargs = {**LOW_THRESHOLDS} if args.low_thresholds else {}
    if args.quick:
        kwargs["points_per_side"] = 8
        args.repeats = args.ref_repeats = 1
    print(f"settings: {kwargs or 'all defaults (points_per_side=32)'}")

    with tempfile.TemporaryDirectory() as tmp:
        ref, ours, image, sa = setup(Path(tmp))
    ref_gen = sa.SamAutomaticMaskGenerator(ref, **kwargs)
    our_gen = SamAutomaticMaskGenerator(ours, **kwargs)
    rows = []
    if args.with_embedding:
        rows.append(whole_generate(sa, ref, ours, image, kwargs, args.ref_repeats))

    t = time.perf_counter()
    with torch.no_grad():
        ref_gen.predictor.set_image(image)
    print(f"embedding (once, not timed below): {time.perf_counter() - t:.1f}s")
    emb = ref_gen.predictor.features
    sizes = (ref_gen.predictor.original_size, ref_gen.predictor.input_size)
    inject_embedding(ref_gen.predictor, emb, *sizes)
    inject_embedding(our_gen.predictor, emb, *sizes)

    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        our_gen.generate(image)
        prof.disable()
        pstats.Stats(prof).sort_stats("cumulative").print_stats(25)

    ours_t, ref_t = [], []
    our_records = ref_records = None

    def time_ours() -> None:
        nonlocal our_records
        t = time.perf_counter()
        our_records = our_gen.generate(image)
        ours_t.append(time.perf_counter() - t)
        print(f"  segany generate: {ours_t[-1]:.2f}s ({len(our_records)} masks)", flush=True)

    # segany's runs are split around the reference's, so that a change in the machine's load (it is
    # shared) shows up on both sides rather than on one.
    before = (args.repeats + 1) // 2
    for _ in range(before):
        time_ours()
    for _ in range(args.ref_repeats):
        t = time.perf_counter()
        with torch.no_grad():
            ref_records = ref_gen.generate(image)
        ref_t.append(time.perf_counter() - t)
        print(f"  reference generate: {ref_t[-1]:.2f}s ({len(ref_records)} masks)", flush=True)
    for _ in range(args.repeats - before):
        time_ours()

    m_ours = statistics.median(ours_t)
    if ref_records is None:  # --ref-repeats 0: segany alone, nothing to compare
        print(f"generate after the embedding, median: segany {m_ours:.2f}s (of {len(ours_t)}); reference not run")
        return 0
    _pairs, worst = match(ref_records, our_records, "binary_mask")
    m_ref = statistics.median(ref_t)
    print(f"masks: reference {len(ref_records)}, segany {len(our_records)}; worst best-match IoU {worst:.5f}")
    print(
        f"generate after the embedding, median: segany {m_ours:.2f}s (of {len(ours_t)}), "
        f"reference {m_ref:.2f}s (of {len(ref_t)}); segany is {m_ref / m_ours:.1f}x faster"
    )
    label = f"generate after the embedding ({image.shape[1]}x{image.shape[0]}, {len(our_records)} masks)"
    rows.append(row(label, ref_t, ours_t, worst_mask_iou=worst, masks_reference=len(ref_records)))
    save_results(args.json, "generate", meta, rows)
    return 0


def whole_generate(sa, ref, ours, image, kwargs: dict, ref_repeats: int) -> dict:
    """One image in, its masks out: each side computes its own embedding (fresh generators)."""
    ours_t, ref_t = [], []
    for _ in range(ref_repeats):
        for name, fn in (
            ("segany", lambda: SamAutomaticMaskGenerator(ours, **kwargs).generate(image)),
            ("reference", lambda: sa.SamAutomaticMaskGenerator(ref, **kwargs).generate(image)),
        ):
            t = time.perf_counter()
            with torch.no_grad():
                records = fn()
            (ours_t if name == "segany" else ref_t).append(time.perf_counter() - t)
            print(f"  {name} whole generate: {time.perf_counter() - t:.2f}s ({len(records)} masks)", flush=True)
    return row(f"generate, embedding included ({image.shape[1]}x{image.shape[0]})", ref_t, ours_t)


if __name__ == "__main__":
    raise SystemExit(main())
