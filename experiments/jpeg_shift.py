"""How much does the JPEG copy of CIFAR-10 shift a trained model's accuracy?

  python experiments/jpeg_shift.py runs/study/*_s* --genuine ../shared/data/cifar10-genuine-subset.npz \\
      --out docs/study/jpeg_shift.md

For each trained run (trained on a JPEG image-folder copy), evaluates its newest checkpoint on the genuine,
bit-exact CIFAR-10 test images of the subset file and on the JPEG versions of the very same images, taken from
the run's own test split, at each --keeps ratio; writes one markdown table (per run, and mean ± std per variant
of the difference genuine - JPEG). The JPEG copy numbers each class's files in the original dataset order, so
the r-th genuine test image of class c is the r-th test image of class c in the copy; the pixel difference of
every matched pair is checked (JPEG loss is ~6/255 on average) before anything is evaluated.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

MAX_MEAN_ABS_DIFF = 20.0  # per image, in 0..255 pixel units; JPEG q75 stays below ~13


def match_jpeg(genuine_labels: np.ndarray, copy_labels: np.ndarray) -> np.ndarray:
  """Index into the copy's test split of each genuine image: the r-th image of class c maps to the copy's r-th.

  >>> match_jpeg(np.array([1, 0, 1]), np.array([0, 0, 1, 1]))
  array([2, 0, 3])
  """
  out = np.empty(len(genuine_labels), np.int64)
  for c in np.unique(genuine_labels):
    where = np.flatnonzero(genuine_labels == c)
    pool = np.flatnonzero(copy_labels == c)
    if len(pool) < len(where):
      raise ValueError(f"class {c}: {len(where)} genuine images but only {len(pool)} in the copy")
    out[where] = pool[: len(where)]
  return out


def check_pairs(genuine: np.ndarray, jpeg: np.ndarray) -> float:
  """Mean absolute pixel difference of matched pairs; raises if any pair is not the same picture."""
  diff = np.abs(genuine.astype(np.float32) - jpeg.astype(np.float32)).reshape(len(genuine), -1).mean(1)
  bad = np.flatnonzero(diff > MAX_MEAN_ABS_DIFF)
  if len(bad):
    raise ValueError(
      f"{len(bad)} genuine test images do not match their JPEG partner (first: #{bad[0]}, mean |diff| "
      f"{diff[bad[0]]:.1f}/255): is the run's data the CIFAR-10 JPEG image-folder copy?"
    )
  return float(diff.mean())


def evaluate_run(workdir: str, genuine_path: str, keeps) -> dict:
  from jaxsparse import data as data_lib
  from jaxsparse import evaluate, loop, parallel, report

  config, state, ds = loop.load_trained(workdir)
  with np.load(genuine_path) as f:
    x, y = f["x_test"], f["y_test"].astype(np.int32)
  index = match_jpeg(y, ds.test.labels)
  if not np.array_equal(ds.test.labels[index], y):
    raise ValueError("labels of matched pairs differ")
  pixel_diff = check_pairs(x, ds.test.images[index])
  mesh = parallel.make_mesh()
  eval_fn = evaluate.make_eval_fn(mesh)
  kw = dict(batch_size=2 * config.batch_size, mean=ds.mean, std=ds.std, mesh=mesh)
  splits = {"genuine": data_lib.Split(x, y), "jpeg": data_lib.Split(ds.test.images[index], y)}
  acc = {
    name: {k: evaluate.evaluate(eval_fn, state, split, keep=k, **kw)["accuracy"] for k in keeps}
    for name, split in splits.items()
  }
  label = report.run_label(config.to_dict())
  return {"run": workdir, "label": label, "seed": config.seed, "n": len(y), "pixel_diff": pixel_diff, **acc}


def markdown(results, keeps) -> str:
  from jaxsparse import report

  lines = [
    f"Accuracy on the {results[0]['n']} genuine CIFAR-10 test images of the subset file and on their JPEG "
    f"versions (same images, same model); Δ = genuine - JPEG, in accuracy points (x100).",
    "",
    "| variant | seed | " + " | ".join(f"genuine @{k:g} | JPEG @{k:g} | Δ @{k:g}" for k in keeps) + " |",
    "|---|---:|" + "---:|" * (3 * len(keeps)),
  ]
  for r in sorted(results, key=lambda r: (r["label"], r["seed"])):
    cells = [
      f"{r['genuine'][k]:.4f} | {r['jpeg'][k]:.4f} | {100 * (r['genuine'][k] - r['jpeg'][k]):+.2f}" for k in keeps
    ]
    lines.append(f"| {r['label']} | {r['seed']} | " + " | ".join(cells) + " |")
  lines += [
    "",
    "Mean ± std over seeds of Δ (points):",
    "",
    "| variant | runs | " + " | ".join(f"Δ @{k:g}" for k in keeps) + " |",
    "|---|---:|" + "---:|" * len(keeps),
  ]
  labels = sorted({r["label"] for r in results})
  for group in labels + ["all runs"]:
    rs = [r for r in results if group in ("all runs", r["label"])]
    stats = [report.mean_std([100 * (r["genuine"][k] - r["jpeg"][k]) for r in rs]) for k in keeps]
    lines.append(f"| {group} | {len(rs)} | " + " | ".join(f"{m:+.2f} ± {s:.2f}" for m, s in stats) + " |")
  diffs = [r["pixel_diff"] for r in results]
  lines += ["", f"Matched pairs differ by {np.mean(diffs):.2f}/255 per pixel on average (JPEG loss)."]
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("runs", nargs="+", help="trained run directories (config.json + checkpoints)")
  p.add_argument("--genuine", required=True, help="npz with genuine x_test, y_test (the subset file)")
  p.add_argument("--keeps", default="1.0,0.3,0.1", help="test-time keep ratios (default: %(default)s)")
  p.add_argument("--out", help="write the markdown table here too")
  args = p.parse_args(argv)
  try:
    keeps = [float(k) for k in args.keeps.split(",")]
  except ValueError:
    p.error(f"--keeps must be comma-separated numbers, got {args.keeps!r}")
  if not all(0 < k <= 1 for k in keeps):
    p.error(f"--keeps must lie in (0, 1], got {keeps}")
  results = []
  for i, run in enumerate(args.runs, 1):
    try:
      results.append(evaluate_run(run, args.genuine, keeps))
    except (FileNotFoundError, ValueError, KeyError) as e:
      print(f"error: {run}: {e}", file=sys.stderr)
      return 1
    r = results[-1]
    print(
      f"[{i}/{len(args.runs)}] {run}: genuine {r['genuine'][keeps[0]]:.4f}  JPEG {r['jpeg'][keeps[0]]:.4f} "
      f"at keep {keeps[0]:g}",
      file=sys.stderr,
    )
  text = markdown(results, keeps)
  if args.out:
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
