"""Run every side-by-side benchmark and write their results as one markdown table.

Runs ``bench_encoder.py``, ``bench_prompts.py`` and ``amg_speed.py --with-embedding`` one after the other
(each in its own process, each timing segany and the reference in that process), collects their JSON
results and prints a markdown table; ``--readme`` also writes it into ``benchmarks/README.md`` between
the ``results`` markers.

    python benchmarks/run_all.py [--threads 2] [--quick] [--readme] [--results results.jsonl]
        [--only encoder prompts generate] [--note "text"]

``--render FILE`` only renders the table of an earlier results file. A full run takes about half an hour
on a 2-core CPU (the reference's "segment everything" alone takes minutes).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
README = HERE / "README.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"
SCRIPTS = {
    "encoder": ["bench_encoder.py"],
    "prompts": ["bench_prompts.py"],
    "generate": ["amg_speed.py", "--with-embedding"],
}
# Extra fields shown in the notes column, with their labels.
NOTES = {
    "fraction_of_fp32_peak": "{:.0%} of the fp32 matmul peak",
    "reference_fraction_of_fp32_peak": "reference {:.0%}",
    "fraction_of_bf16_peak": "{:.0%} of the bf16 peak",
    "max_abs_diff_vs_reference": "max diff {:.1e}",
    "max_low_res_diff": "max low-res logit diff {:.1e}",
    "mask_iou_mean": "mask IoU vs fp32: mean {:.4f}",
    "mask_iou_min": "min {:.4f}",
    "worst_mask_iou": "worst mask IoU {:.4f}",
    "first_call_s": "first call {:.1f} s",
    "gflop": "{:.0f} GFLOP",
}


def fmt(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.2f} s" if seconds >= 1 else f"{seconds * 1e3:.1f} ms"


def render(results: list[dict]) -> str:
    """A markdown table (with the machine line above it) of the results of one or more benchmarks."""
    if not results:
        return "(no results)"
    m = results[0]["machine"]
    load = ", ".join(str(r["machine"]["load_average_1m"]) for r in results)
    lines = [
        f"Measured {m['date']} on {m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['threads']} threads "
        f"(load average at the start of each script: {load}).",
    ]
    peaks = [r["machine"] for r in results if "fp32_peak_gflops" in r["machine"]]
    if peaks:
        p = peaks[0]
        lines[0] += (
            f" Large matmul peak on these threads: fp32 {p['fp32_peak_gflops']:.0f} GFLOP/s, "
            f"bf16 {p['bf16_peak_gflops']:.0f} GFLOP/s."
        )
    lines += ["", "| path | reference | segany | speed-up | notes |", "|---|---|---|---|---|"]
    for res in results:
        for r in res["rows"]:
            notes = [NOTES[k].format(r[k]) for k in NOTES if isinstance(r.get(k), (int, float))]
            if "mask_iou_min" in r and "mask_iou_mean" not in r:  # a comparison with the reference
                notes = [n.replace("min ", "smallest mask IoU vs the reference ") for n in notes]
            speed = f"{r['speedup']:.2f}x" if "speedup" in r else "-"
            n = f" (n={r['n']}" + (f", ref n={r['n_ref']})" if "n_ref" in r else ")")
            ours = fmt(r["segany_s"]) + n
            lines.append(f"| {r['path']} | {fmt(r.get('reference_s'))} | {ours} | {speed} | {'; '.join(notes)} |")
    return "\n".join(lines)


def write_readme(table: str, note: str) -> None:
    text = README.read_text(encoding="utf-8")
    if START not in text or END not in text:
        raise SystemExit(f"{README}: no {START} / {END} markers")
    head, rest = text.split(START, 1)
    _old, tail = rest.split(END, 1)
    body = f"{START}\n{note}\n\n{table}\n{END}" if note else f"{START}\n{table}\n{END}"
    README.write_text(head + body + tail, encoding="utf-8")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=0, help="torch threads for every script (0: torch's default)")
    ap.add_argument("--quick", action="store_true", help="smoke-test sizes (not measurements)")
    ap.add_argument("--only", nargs="+", choices=list(SCRIPTS), default=list(SCRIPTS))
    ap.add_argument("--results", default="benchmark_results.jsonl", help="JSON-lines file the scripts append to")
    ap.add_argument("--render", metavar="FILE", help="only render the table of an earlier results file")
    ap.add_argument("--readme", action="store_true", help="write the table into benchmarks/README.md")
    ap.add_argument("--note", default="", help="a sentence put above the table (e.g. the machine's state)")
    args = ap.parse_args()
    path = Path(args.render or args.results)
    if not args.render:
        path.unlink(missing_ok=True)
        for name in args.only:
            cmd = [sys.executable, str(HERE / SCRIPTS[name][0]), *SCRIPTS[name][1:], "--json", str(path)]
            cmd += ["--threads", str(args.threads)] + (["--quick"] if args.quick else [])
            print("$", " ".join(cmd), flush=True)
            if subprocess.run(cmd).returncode:
                print(f"{name}: failed", file=sys.stderr)
                return 1
    results = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    table = render(results)
    print("\n" + table)
    if args.readme:
        write_readme(table, args.note)
        print(f"\nwritten to {README}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
