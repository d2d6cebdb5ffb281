"""Benchmarks jaxsparse.topk methods; prints one JSON object to stdout.

Times topk_threshold per method (best of --reps after a warm-up, plus the first
call's compile+run time) at (128, 65536), (128, 16384) and WRN-28-4's top-k site
shapes for batch 128, in float32 and bfloat16, for keep 0.05 / 0.3 / 0.7 (one
compilation serves all three), then topk_mask at keep 1.0 against the identity.

  .venv/bin/python experiments/bench_topk.py --quick   # < ~2 min on 2 cores
  .venv/bin/python experiments/bench_topk.py           # every shape and method
"""
import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp

from jaxsparse.topk import topk_mask, topk_threshold

KEEPS = (0.05, 0.3, 0.7)
ROWS = [(128, 65536), (128, 16384)]
SITES = [(128, 32, 32, 64), (128, 16, 16, 128), (128, 8, 8, 256)]  # WRN-28-4 NHWC


def _time(fn, *args, reps):
  """Returns (first call ms, best of reps ms)."""
  t = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - t
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t)
  return first * 1e3, best * 1e3


def _input(shape, dtype, relu):
  x = jax.random.normal(jax.random.key(0), shape, jnp.float32)
  return (jax.nn.relu(x) if relu else x).astype(dtype)


def bench_threshold(shape, dtype, method, reps, relu):
  x = _input(shape, dtype, relu)
  fn = jax.jit(lambda x, keep: topk_threshold(x, keep, method=method))
  rows = []
  for i, keep in enumerate(KEEPS):
    first, best = _time(fn, x, jnp.float32(keep), reps=reps)
    rows.append({"op": "topk_threshold", "shape": list(shape), "dtype": jnp.dtype(dtype).name,
                 "data": "relu(normal)" if relu else "normal", "method": method,
                 "keep": keep, "best_ms": round(best, 2),
                 "first_call_ms": round(first, 1) if i == 0 else None})
  return rows


def bench_mask_identity(shape, dtype, reps):
  """topk_mask at keep 1.0 (lax.cond skip) and 0.3 against the identity."""
  x = _input(shape, dtype, relu=True)
  mask = jax.jit(lambda x, keep: topk_mask(x, keep))
  ident = jax.jit(lambda x, keep: x * 1)  # a real pass over x, as a jitted layer would do
  out = {"op": "topk_mask_vs_identity", "shape": list(shape), "dtype": jnp.dtype(dtype).name}
  out["identity_ms"] = round(_time(ident, x, jnp.float32(1.0), reps=reps)[1], 2)
  out["mask_keep1_ms"] = round(_time(mask, x, jnp.float32(1.0), reps=reps)[1], 2)
  out["mask_keep0.3_ms"] = round(_time(mask, x, jnp.float32(0.3), reps=reps)[1], 2)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="fewer cases, < ~2 minutes")
  parser.add_argument("--reps", type=int, default=None, help="timed calls per case")
  args = parser.parse_args()
  reps = args.reps or (3 if args.quick else 5)
  load_before = os.getloadavg()
  t0 = time.perf_counter()
  results = []
  cases = [(s, jnp.float32, False) for s in ROWS]
  cases += [(s, d, True) for s in SITES for d in (jnp.float32, jnp.bfloat16)]
  for shape, dtype, relu in cases:
    methods = ["radix", "bisect", "sort"]
    if args.quick and (shape != (128, 16384) or dtype != jnp.float32):
      methods = ["radix"] if shape in SITES[1:] else ["radix", "bisect"]
    for method in methods:
      results += bench_threshold(shape, dtype, method, reps, relu)
  for shape in SITES if not args.quick else SITES[:1]:
    for dtype in (jnp.float32, jnp.bfloat16):
      results.append(bench_mask_identity(shape, dtype, reps))
  print(json.dumps({
      "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                  "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
                  "jax": jax.__version__, "loadavg_before": load_before,
                  "loadavg_after": os.getloadavg()},
      "quick": args.quick, "reps": reps, "total_s": round(time.perf_counter() - t0, 1),
      "results": results}, indent=1))


if __name__ == "__main__":
  main()
