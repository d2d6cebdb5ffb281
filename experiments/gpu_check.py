"""The GPU check: what a short loan of an accelerator must tell us, in one command of under 10 minutes.

  python experiments/gpu_check.py --out runs/gpu_check              # WRN-28-4, the paper preset's shapes
  python experiments/gpu_check.py --tiny --out /tmp/gpu_check       # the same checks at toy sizes (any CPU)

Parts, in order (each one's failure is recorded and the next part still runs):
1. ``tests``: the device-independent core of the test suite (top-k, schedules, controllers, train step, MACs)
   run by pytest on this device.
2. ``bench``: experiments/bench.py's step, topk (radix, bisect, sort, with lax.top_k and lax.approx_max_k as
   references) and pipeline sections, as a subprocess.
3. ``cost``: FLOPs per image of the train step and of an evaluation, from XLA's cost analysis of the compiled
   programs, and the achieved FLOP/s with the step time of part 2.
4. ``epochs``: one paper-preset epoch trained dense and one at keep 0.3 (what adaptive_b's sparse epochs cost)
   through ``train_and_evaluate`` on generated CIFAR-shaped data, with images/s and the projected hours of the
   paper's table (dense, adaptive_a and adaptive_b, 200 epochs each).
Writes report.json and report.md into --out, naming the device.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxsparse import config as config_lib
from jaxsparse import loop, parallel, provenance
from jaxsparse import train as train_lib

ROOT = Path(__file__).resolve().parents[1]
CORE_TESTS = (
  "tests/test_topk.py",
  "tests/test_schedules.py",
  "tests/test_controllers.py",
  "tests/test_train.py",
  "tests/test_macs.py",
)
PAPER_RUNS = 3  # the paper's table: dense, Strategy 1 (adaptive_a), Strategy 2 (adaptive_b)


def run_tests(paths, timeout_s: float) -> dict:
  """pytest over `paths` in a subprocess: its exit code, closing line and seconds."""
  t0 = time.perf_counter()
  cmd = [
    sys.executable,
    "-m",
    "pytest",
    "-p",
    "no:cacheprovider",
    "-m",
    "not slow",
    "-n",
    "0",  # one process: pytest-xdist workers would each take the accelerator's memory
    *paths,
  ]  # -q comes from pyproject.toml
  try:
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    rc, out = done.returncode, done.stdout + done.stderr
  except subprocess.TimeoutExpired as e:
    rc, out = "timeout", (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
  lines = [line for line in out.splitlines() if line.strip()]
  return {"paths": list(paths), "returncode": rc, "result": lines[-1] if lines else "", "seconds": _since(t0)}


def run_bench(model: str, batch_size: int, repeats: int, timeout_s: float) -> dict:
  """experiments/bench.py's step, topk and pipeline sections in a subprocess; its JSON."""
  cmd = [
    sys.executable,
    str(ROOT / "experiments" / "bench.py"),
    f"--model={model}",
    f"--batch-size={batch_size}",
    f"--repeats={repeats}",
    "--sections=step,topk,pipeline",
    "--other-convs=",
  ]
  done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
  if done.returncode:
    raise RuntimeError(f"bench.py exited {done.returncode}: {done.stderr[-1500:]}")
  return json.loads(done.stdout)


def step_flops(config: config_lib.Config) -> dict:
  """FLOPs per image of one train step (at keep 1) and of one evaluation forward, from XLA's cost analysis."""
  state = loop.initial_state(config, 1, parallel.make_mesh())
  batch = {
    "image": jnp.zeros((config.batch_size, 32, 32, 3), jnp.float32),
    "label": jnp.zeros((config.batch_size,), jnp.int32),
    "mask": jnp.ones((config.batch_size,), jnp.float32),
  }
  keep = jnp.float32(1.0)

  def flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan")))

  train = flops(lambda s, b, k: train_lib.train_step(s, b, k), state, batch, keep)
  evaluate = flops(train_lib.eval_step, state, batch, keep)
  return {
    "batch_size": config.batch_size,
    "train_step_flops_per_image": train / config.batch_size,
    "eval_flops_per_image": evaluate / config.batch_size,
  }


def synthetic_npz(directory: Path, n_train: int, n_test: int) -> Path:
  """A CIFAR-shaped .npz of random uint8 images and labels (`Config.data` reads it like the real copies)."""
  rng = np.random.default_rng(0)
  path = directory / "synthetic_cifar.npz"
  np.savez(
    path,
    x_train=rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8),
    y_train=rng.integers(0, 10, n_train).astype(np.int64),
    x_test=rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8),
    y_test=rng.integers(0, 10, n_test).astype(np.int64),
  )
  return path


def one_epoch(config: config_lib.Config, workdir: Path) -> dict:
  """One epoch through train_and_evaluate; its training images/s and seconds (train, evaluation, compile included)."""
  t0 = time.perf_counter()
  summary = loop.train_and_evaluate(config, workdir, progress=False)
  (record,) = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  train_images = summary["steps"] * config.batch_size
  return {
    "keep": record["keep"],
    "epoch_s": round(record["epoch_time_s"], 1),
    "eval_s": round(record["eval_time_s"], 1),
    "train_images_per_s": round(train_images / (record["epoch_time_s"] - record["eval_time_s"]), 1),
    "total_s": _since(t0),
  }


def check(args) -> dict:
  """Runs the four parts; returns the report."""
  report = {"device": _device(), "provenance": provenance.provenance(), "args": vars(args), "errors": {}}
  base = config_lib.preset("smoke" if args.tiny else "paper")
  parts = {
    "tests": lambda: run_tests(args.tests, args.tests_timeout),
    "bench": lambda: run_bench(base.model, base.batch_size, 2 if args.tiny else 3, args.bench_timeout),
    "cost": lambda: step_flops(base),
  }
  for name, fn in parts.items():
    try:
      report[name] = fn()
    except Exception as e:  # a part that fails is reported, and the check goes on
      report["errors"][name] = f"{type(e).__name__}: {e}"[:2000]
  if "cost" in report and "bench" in report:
    step_s = report["bench"]["step"]["times"]["keep1.0"]["median_s"]
    report["cost"]["achieved_train_flop_per_s"] = (
      report["cost"]["train_step_flops_per_image"] * base.batch_size / step_s
    )
  with tempfile.TemporaryDirectory() as tmp:
    n_train, n_test = (640, 256) if args.tiny else (50_000, 10_000)
    data = synthetic_npz(Path(tmp), n_train, n_test)
    sizes = dict(data=str(data), epochs=1, eval_keeps=(1.0,), cache_dir=str(Path(tmp) / "cache"))
    if args.tiny:
      sizes.update(train_size=512, val_size=128)
    report["epochs"] = {}
    for name, overrides in (("dense", {"schedule": "dense"}), ("keep0.3", {"schedule": "constant"})):
      config = base.replace(**sizes, **overrides)
      if name == "keep0.3":
        config = config.replace(controller_options={"keep": 0.3})
      try:
        report["epochs"][name] = one_epoch(config, Path(tmp) / name)
      except Exception as e:
        report["errors"][f"epoch {name}"] = f"{type(e).__name__}: {e}"[:2000]
  report["paper_projection"] = _projection(report, base)
  return report


def _projection(report: dict, base: config_lib.Config) -> dict | None:
  """Hours of the paper's table on this device, from the measured dense and keep-0.3 epochs."""
  epochs = report.get("epochs", {})
  if "dense" not in epochs or "keep0.3" not in epochs:
    return None
  steps = -(-45_000 // base.batch_size)
  hours = {}
  for name, e in epochs.items():
    train_s = steps * base.batch_size / e["train_images_per_s"]
    hours[name] = (train_s + e["eval_s"]) * base.epochs / 3600
  # adaptive runs mix dense and sparse epochs: bounded by the two.
  return {
    "epochs_per_run": base.epochs,
    "dense_run_hours": round(hours["dense"], 2),
    "sparse_run_hours": round(hours["keep0.3"], 2),
    "paper_table_hours": round(hours["dense"] + (PAPER_RUNS - 1) * max(hours.values()), 2),
    "how": f"{steps} steps of batch {base.batch_size} at the measured images/s plus the measured evaluation, "
    f"x {base.epochs} epochs; the table: one dense run and {PAPER_RUNS - 1} adaptive runs at the slower epoch",
  }


def markdown(report: dict) -> str:
  """The report as a page for docs/performance.md."""
  lines = [f"# GPU check on {report['device']}", ""]
  tests = report.get("tests")
  if tests:
    lines += [f"- tests ({', '.join(tests['paths'])}): exit {tests['returncode']}, `{tests['result']}`"]
  bench = report.get("bench")
  if bench:
    t = bench["step"]["times"]
    lines += [
      f"- train step ({bench['step']['model']}): keep 1 {t['keep1.0']['median_s'] * 1e3:.1f} ms, keep 0.3 "
      f"{t['keep0.3']['median_s'] * 1e3:.1f} ms, no sites {t['plain']['median_s'] * 1e3:.1f} ms; "
      f"sparse/dense {bench['sparse_over_dense']}, keep1/plain {bench['keep1_over_plain']}",
      f"- input pipeline: {bench['pipeline']}",
      "",
      "| site shape | radix ms | bisect ms | sort ms | lax.top_k ms | lax.approx_max_k ms | mask fwd+bwd ms |",
      "|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
      f"| {r['shape']} | {r['threshold_radix_ms']} | {r['threshold_bisect_ms']} | {r['threshold_sort_ms']} | "
      f"{r['lax_top_k_ms']} | {r['lax_approx_max_k_ms']} | {r['mask_fwd_bwd_ms']} |"
      for r in bench["topk"]["shapes"]
    ]
  cost = report.get("cost")
  if cost:
    lines += [
      "",
      f"- XLA cost analysis: train step {cost['train_step_flops_per_image'] / 1e9:.2f} GFLOP per image, evaluation "
      f"{cost['eval_flops_per_image'] / 1e9:.2f} GFLOP per image"
      + (
        f"; achieved {cost['achieved_train_flop_per_s'] / 1e12:.2f} TFLOP/s in the train step"
        if "achieved_train_flop_per_s" in cost
        else ""
      ),
    ]
  for name, e in report.get("epochs", {}).items():
    lines.append(f"- one epoch, {name}: {e['train_images_per_s']} images/s, {e['epoch_s']} s ({e['eval_s']} s eval)")
  if report.get("paper_projection"):
    p = report["paper_projection"]
    lines.append(f"- the paper's table: {p['paper_table_hours']} hours on this device ({p['how']})")
  for name, error in report["errors"].items():
    lines.append(f"- **{name} failed**: {error}")
  return "\n".join(lines) + "\n"


def _device() -> str:
  d = jax.devices()
  return f"{len(d)} x {d[0].device_kind} ({d[0].platform})"


def _since(t0: float) -> float:
  return round(time.perf_counter() - t0, 1)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default="runs/gpu_check", help="where report.json and report.md go (default: %(default)s)")
  p.add_argument("--tiny", action="store_true", help="the smoke preset's model and a few hundred images")
  p.add_argument("--tests", nargs="*", default=list(CORE_TESTS), help="test files or ids (default: the core)")
  p.add_argument("--tests-timeout", type=float, default=240, help="seconds for the tests (default: %(default)s)")
  p.add_argument("--bench-timeout", type=float, default=240, help="seconds for bench.py (default: %(default)s)")
  args = p.parse_args(argv)
  report = check(args)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
  (out / "report.md").write_text(markdown(report))
  print(markdown(report))
  return 1 if report["errors"] else 0


if __name__ == "__main__":
  from malloc_env import reexec_with_tunables

  reexec_with_tunables()  # CPU: glibc keeps XLA's temp buffers (as run.py and bench.py do)
  sys.exit(main())
