"""Quality of text prompts: held-out COCO categories (vs prompt-blind references) and synthetic phrases.

    python benchmarks/eval_text.py [--model default] [--text-head PATH] [--max-images N] [--scenes 200] [--no-coco]
        [--no-blind]

* coco_panoptic200 val2017: for each image and each category present (things and stuff), the category's
  clean name as the text -> one mask; mIoU against the union of that category's segments. References on
  the same images: "blind" = the automatic generator's top-ranked mask (chosen without the text) and
  "oracle" = the automatic mask closest to the target.
* held-out synthetic scenes (seeds from 1,000,000, never trained on): canonical colour / shape /
  position phrases, mIoU against the union of the shapes each phrase names, per kind of phrase.
Prints JSON and a Markdown table (pasted into MODELS.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from segany import SamPredictor, load_model
from segany.evaluation.text import eval_categories, eval_synthetic
from segany.training.text_data import CategoryTargets, SyntheticTargets

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--text-head", default="auto", help="text head file (default: the model's own)")
    ap.add_argument("--max-images", type=int, default=None, help="COCO val images (default: all 100)")
    ap.add_argument("--scenes", type=int, default=200, help="held-out synthetic scenes (0: none)")
    ap.add_argument("--no-coco", action="store_true", help="synthetic scenes only")
    ap.add_argument(
        "--no-blind", action="store_true", help="COCO: text mIoU only (the prompt-blind references do not depend "
        "on the text head: compare a new head with the last full run's)"
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="write the JSON here too")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    predictor = SamPredictor(load_model(args.model, text_head=args.text_head))
    results = {}
    if not args.no_coco and (DATA / "coco_panoptic200").is_dir():
        results["coco_panoptic_val2017"] = eval_categories(
            predictor, CategoryTargets(DATA / "coco_panoptic200", "val2017"), max_images=args.max_images,
            blind=not args.no_blind,
        )
    elif not args.no_coco:
        print(f"{DATA / 'coco_panoptic200'} not found: COCO part skipped")
    if args.scenes:
        # seeds from 1,000,000 on: never used in training
        held_out = SyntheticTargets(args.scenes, image_size=256, seed=1_000_000)
        results["synthetic_heldout"] = eval_synthetic(predictor, held_out)
    print(json.dumps(results, indent=2))
    if "coco_panoptic_val2017" in results and not args.no_blind:
        c = results["coco_panoptic_val2017"]
        print(
            "\n| set | queries | text mIoU | blind: top-ranked | blind: largest | text / stronger blind "
            "| oracle |\n|---|---:|---:|---:|---:|---:|---:|"
        )
        print(
            f"| COCO panoptic val2017 ({c['images']} images) | {c['queries']} | {c['text_miou']:.3f} | "
            f"{c['blind_miou']:.3f} | {c['blind_largest_miou']:.3f} | {c['ratio_text_over_blind']:.2f}x | "
            f"{c['oracle_miou']:.3f} |"
        )
    if "synthetic_heldout" in results:
        s = results["synthetic_heldout"]
        print(f"\n| synthetic phrase kind ({s['scenes']} held-out scenes) | queries | mIoU |\n|---|---:|---:|")
        for kind, r in s["by_kind"].items():
            print(f"| {kind} | {r['queries']} | {r['miou']:.3f} |")
        print(f"| all | {s['queries']} | {s['miou']:.3f} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
