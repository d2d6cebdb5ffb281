"""Aggregate run directories (schedule x seed) into one markdown table and figures.

  python experiments/compare.py runs/cpu_* --out docs/study --title "CPU study"

Reads each run's summary.json and metrics.jsonl; writes <out>/results.md (mean ± std per schedule and per
seed, difference to each --baseline group with a 95% t-interval, epochs spent sparse, the keep curve with its
effective MACs and the paired differences of joint networks to per-keep and fine-tuned ones, the reset shock, the
fit and the evaluation timing within the keep cycle) and <out>/*.png (accuracy vs epoch, keep trajectories, keep
curves, generalisation gap, and pareto.png: accuracy against effective MACs).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jaxsparse import report


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("runs", nargs="+", help="run directories (each with summary.json and metrics.jsonl)")
  p.add_argument("--out", required=True, help="output directory for results.md and figures")
  p.add_argument("--title", default="Comparison")
  p.add_argument(
    "--baseline",
    default="dense",
    help="group(s) the others are compared with, comma-separated (e.g. dense,dense+dropout0.3)",
  )
  p.add_argument(
    "--partial",
    action="store_true",
    help="skip run directories without a summary.json (a study still running) and list them",
  )
  args = p.parse_args(argv)
  paths, unfinished = args.runs, []
  if args.partial:
    unfinished = [d for d in paths if not (Path(d) / "summary.json").exists()]
    paths = [d for d in paths if d not in unfinished]
  try:
    runs = report.load_runs(paths)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  figures = report.plot_comparison(runs, out)
  text = report.comparison_markdown(
    runs, title=args.title, baseline=args.baseline.split(","), figures=[f.name for f in figures]
  )
  if unfinished:
    text += f"\nNot finished yet, left out: {', '.join(f'`{d}`' for d in unfinished)}.\n"
  (out / "results.md").write_text(text)
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
