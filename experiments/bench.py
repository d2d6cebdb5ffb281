"""Performance benchmarks of jaxsparse; prints one JSON object to stdout.

Sections (``--sections``, comma-separated; default all):

* ``step``: the WRN train step (``jaxsparse.train.train_step`` jitted like ``jaxsparse.loop``:
  shardings on a 1-D mesh and buffer donation) at keep 0.3 and keep 1.0 (one compiled program) and
  the same model without top-k sites (``WideResNet(sites=False)``), timed in interleaved rounds
  (A B C A B C ...) so load changes hit every variant; ratios are medians of per-round ratios.
  ``auto_over_best_conv``: the main step (conv "auto") over the fastest other implementation's.
  Also the compile time, and proof that changing keep does not recompile (``jax.no_tracing`` around
  the keep changes, the count of backend compilations, and the jit cache size). The main models use
  ``--conv``; the same step with each of ``--other-convs`` (default: every other implementation in
  jaxsparse/models/conv.py but ``matmul``, which is timed only on request) joins the rounds at keep 1.0:
  ``step.conv_<main>_over_<other>``.
* ``torch``: the same step in PyTorch (pre-activation WRN, RMSNorm over channels, SGD Nesterov 0.9,
  weight decay 5e-4 on kernels, channels_last, float32), interleaved with the JAX keep-1.0 steps;
  ``jax_over_torch`` uses the fastest JAX convolution implementation timed (each reported).
  Skipped with a reason (ratio null) when torch is not installed.
* ``conv``: one stride-1 3x3 convolution, forward + backward, at each WRN group's shape, per
  implementation (``xla``, ``matmul``, ``wgrad_matmul``) and in PyTorch; XLA's split into forward,
  input gradient and kernel gradient, and `kernel_gradient` alone.
* ``layers``: every distinct convolution layer of the WRNs (``--layer-models``, ``--layer-batches``),
  forward + backward, with XLA's convolution and with ``wgrad_matmul``, beside what ``conv="auto"``
  picks for it (``jaxsparse.models.conv.choose_conv``): the crossover behind "auto".
* ``topk``: ``topk_threshold`` by method (radix, bisect, sort) and ``topk_mask`` (forward and
  forward+backward) at the model's real site shapes, beside ``lax.top_k`` and ``lax.approx_max_k`` (static k), with the per-step selection cost summed over
  the model's sites, plus the (128, 65536) row case quoted in jaxsparse/topk.py.
* ``pipeline``: host batches/s of ``jaxsparse.data.train_batches`` over 50,000 random uint8
  images against train steps/s.

  .venv/bin/python experiments/bench.py --quick     # WRN-16-2, every section, <= 5 minutes on 2 CPU cores
  .venv/bin/python experiments/bench.py             # WRN-28-4, ~15 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import platform
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from torch_wrn import make_conv_step, make_torch_step, one_thread

from jaxsparse import controllers, data, parallel
from jaxsparse import train as train_lib
from jaxsparse.models import conv as conv_lib
from jaxsparse.models.wrn import CONVS, MODELS, WideResNet, resolve_conv
from jaxsparse.topk import topk_mask, topk_threshold

SECTIONS = ("step", "torch", "conv", "layers", "topk", "pipeline")
GOALS = {"sparse_over_dense": 1.05, "keep1_over_plain": 1.01, "auto_over_best_conv": 1.02, "jax_over_torch": 1.0}
SPARSE_KEEP = 0.3
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


# ----------------------------------------------------------------------------- timing


def _timed(fn) -> float:
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


def _rusage() -> tuple[int, float]:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_minflt, r.ru_stime


def interleaved(fns: dict, rounds: int) -> tuple[dict[str, list[float]], dict[str, dict]]:
  """Calls each fn once per round, in order, `rounds` times.

  Returns:
    (seconds per call by name, {name: median minor page faults and system seconds per call}).
  """
  times = {name: [] for name in fns}
  faults, sys_s = {name: [] for name in fns}, {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      flt, st = _rusage()
      times[name].append(_timed(fn))
      flt2, st2 = _rusage()
      faults[name].append(flt2 - flt)
      sys_s[name].append(st2 - st)
  os_cost = {
    name: {
      "minor_page_faults": int(statistics.median(faults[name])),
      "system_s": round(statistics.median(sys_s[name]), 3),
    }
    for name in fns
  }
  return times, os_cost


def ratio(times: dict, num: str, den: str) -> dict:
  """Median and min of per-round ratios num/den, and the ratio of best times."""
  per_round = [a / b for a, b in zip(times[num], times[den])]
  return {
    "median": round(statistics.median(per_round), 4),
    "min": round(min(per_round), 4),
    "best_over_best": round(min(times[num]) / min(times[den]), 4),
  }


def summary(seconds: list[float]) -> dict:
  return {
    "median_s": round(statistics.median(seconds), 4),
    "min_s": round(min(seconds), 4),
    "all_s": [round(s, 4) for s in seconds],
  }


class CompileCounter:
  """Counts XLA backend compilations (and their seconds) while active."""

  def __init__(self):
    self.count, self.seconds, self._on = 0, 0.0, False
    jax.monitoring.register_event_duration_secs_listener(self._listen)

  def _listen(self, event, duration, **_):
    if self._on and event == _COMPILE_EVENT:
      self.count, self.seconds = self.count + 1, self.seconds + duration

  def __enter__(self):
    self.count, self.seconds, self._on = 0, 0.0, True
    return self

  def __exit__(self, *exc):
    self._on = False


# ----------------------------------------------------------------------------- JAX step


class JaxStep:
  """One WRN train state and its jitted train step, as jaxsparse.loop builds them."""

  def __init__(
    self, depth: int, widen: int, batch_size: int, *, sites: bool, counter: CompileCounter, conv: str = "xla"
  ):
    mesh = parallel.make_mesh()
    rep, bat = parallel.replicated(mesh), parallel.batch_sharded(mesh)
    model = WideResNet(depth=depth, widen=widen, sites=sites, conv=conv)
    tx = train_lib.make_optimizer(train_lib.lr_schedule(0.1, total_steps=351 * 200, warmup_steps=5 * 351))
    init_fn = jax.jit(
      lambda rng: train_lib.create_train_state(rng, model, tx, controllers.get("dense")), out_shardings=rep
    )
    self.state = init_fn(jax.random.PRNGKey(0))
    self.fn = jax.jit(train_lib.train_step, in_shardings=(rep, bat, rep), out_shardings=(rep, rep), donate_argnums=0)
    self.eval_fn = jax.jit(train_lib.eval_step, in_shardings=(rep, bat, rep), out_shardings=rep)
    rng = np.random.default_rng(0)
    self.batch = parallel.to_global(
      {
        "image": rng.standard_normal((batch_size, 32, 32, 3), np.float32),
        "label": rng.integers(0, 10, batch_size).astype(np.int32),
      },
      mesh,
    )
    self.eval_batch = parallel.to_global(
      {
        "image": rng.standard_normal((2 * batch_size, 32, 32, 3), np.float32),
        "label": rng.integers(0, 10, 2 * batch_size).astype(np.int32),
        "mask": np.ones(2 * batch_size, np.float32),
      },
      mesh,
    )
    self._rep = rep
    with counter:
      self.first_call_s = _timed(lambda: self.step(1.0))
    self.compile_s, self.compiles = counter.seconds, counter.count

  def keep(self, value: float) -> jax.Array:
    return jax.device_put(jnp.float32(value), self._rep)

  def eval(self) -> None:
    jax.block_until_ready(self.eval_fn(self.state, self.eval_batch, self.keep(1.0)))

  def step(self, keep: float) -> None:
    self.state, metrics = self.fn(self.state, self.batch, self.keep(keep))
    jax.block_until_ready((self.state, metrics))


def epoch_estimate(times: dict, batch_size: int) -> dict:
  """Images/s and one paper-preset epoch: 351 train steps + eval of 15,000 images (val + test)."""
  step_s = statistics.median(times["keep1.0"])
  eval_s = statistics.median(times["eval_2x_batch"])
  eval_batches = -(-15_000 // (2 * batch_size))
  return {
    "train_images_per_s": round(batch_size / step_s, 1),
    "epoch_s": round(351 * step_s + eval_batches * eval_s, 1),
    "formula": f"351 x keep1.0 step + {eval_batches} x eval step (batch {2 * batch_size})",
  }


def bench_step(args, counter: CompileCounter, with_torch: bool) -> tuple[dict, dict]:
  """The step section (and the torch comparison when asked); returns (results, ratios)."""
  depth, widen = MODELS[args.model]
  sparse = JaxStep(depth, widen, args.batch_size, sites=True, counter=counter, conv=args.conv)
  plain = JaxStep(depth, widen, args.batch_size, sites=False, counter=counter, conv=args.conv)
  fns = {
    "keep0.3": lambda: sparse.step(SPARSE_KEEP),
    "keep1.0": lambda: sparse.step(1.0),
    "plain": lambda: plain.step(1.0),
  }
  others = {}  # the same model with other convolution implementations (jaxsparse.models.conv)
  for conv in args.convs:
    others[conv] = JaxStep(depth, widen, args.batch_size, sites=True, counter=counter, conv=conv)
    fns[f"{conv}_keep1.0"] = functools.partial(others[conv].step, 1.0)  # the top-k cost does not depend on the conv
  torch_step, torch_info = make_torch_step(depth, widen, args.batch_size) if with_torch else (None, None)
  if torch_step is not None:
    fns["torch"] = torch_step
    if torch_info["device"] == "cpu":
      fns["torch_1thread"] = one_thread(torch_step)
  fns["eval_2x_batch"] = sparse.eval
  for fn in fns.values():  # warm-up: every variant once, keep 0.3 included
    fn()
  cache_before = sparse.fn._cache_size()  # shared by both jit objects: one entry per model
  with counter:
    times, os_cost = interleaved(fns, args.repeats)
  compiles, cache_after = counter.count, sparse.fn._cache_size()
  # A retrace (hence a recompile) for a new keep value would raise under no_tracing.
  with jax.no_tracing(True):
    sparse.step(0.05)
  recompile = {
    "keeps_called": [1.0, SPARSE_KEEP, 0.05],
    "backend_compiles_in_timed_rounds": compiles,
    "train_step_jit_cache_entries_before_after": [cache_before, cache_after],
    "keep_0.05_step_under_jax_no_tracing": "ok",
  }
  model = f"{args.model} batch {args.batch_size} conv {args.conv}"
  results = {
    "model": model,
    "rounds": args.repeats,
    "order": list(fns),
    "times": {name: dict(summary(t), **os_cost[name]) for name, t in times.items()},
    "compile": {
      "sites_first_call_s": round(sparse.first_call_s, 2),
      "sites_backend_compile_s": round(sparse.compile_s, 2),
      "sites_backend_compiles": sparse.compiles,
      "plain_first_call_s": round(plain.first_call_s, 2),
      "plain_backend_compile_s": round(plain.compile_s, 2),
      **{f"{conv}_first_call_s": round(st.first_call_s, 2) for conv, st in others.items()},
    },
    "no_recompile": recompile,
    "paper_epoch_estimate": epoch_estimate(times, args.batch_size),
  }
  ratios = {
    "sparse_over_dense": dict(ratio(times, "keep0.3", "keep1.0"), model=model),
    "keep1_over_plain": dict(ratio(times, "keep1.0", "plain"), model=model),
  }
  if others:  # the main convolution against the fastest implementation timed beside it (the goal for "auto": <= 1.02)
    best = min(others, key=lambda c: statistics.median(times[f"{c}_keep1.0"]))
    ratios["auto_over_best_conv" if args.conv == "auto" else f"{args.conv}_over_best_conv"] = dict(
      ratio(times, "keep1.0", f"{best}_keep1.0"), model=model, best_other_conv=best
    )
  for conv in others:  # > 1: the main model (args.conv) is slower than this one
    results[f"conv_{args.conv}_over_{conv}"] = {"keep1.0": ratio(times, "keep1.0", f"{conv}_keep1.0")}
  if torch_step is not None:
    # Against the faster torch thread setting of this run (OpenMP suffers most from shared cores), and with the
    # fastest of the convolution implementations timed (each reported).
    fastest = lambda names: min((k for k in names if k in times), key=lambda k: statistics.median(times[k]))  # noqa: E731
    best = fastest(("torch", "torch_1thread"))
    jax_best = fastest(["keep1.0"] + [f"{conv}_keep1.0" for conv in others])
    per_conv = {
      args.conv: ratio(times, "keep1.0", best)["median"],
      **{conv: ratio(times, f"{conv}_keep1.0", best)["median"] for conv in others},
    }
    ratios["jax_over_torch"] = dict(
      ratio(times, jax_best, best),
      model=model,
      torch_variant=best,
      jax_variant=jax_best,
      by_conv=per_conv,
      plain_over_torch=ratio(times, "plain", best)["median"],
    )
    results["torch"] = torch_info
  elif with_torch:
    ratios["jax_over_torch"] = {"median": None, "reason": torch_info, "model": model}
  return results, ratios


# ----------------------------------------------------------------------------- convolutions


def conv_shapes(depth: int, widen: int) -> list[tuple[int, int, int]]:
  """(H=W, channels, count) of the stride-1 3x3 convs of each WRN group (conv2 of every block, conv1 of the rest)."""
  n = (depth - 4) // 6
  return [(32 >> g, 16 * widen << g, 2 * n - 1) for g in range(3)]


def bench_conv(args) -> dict:
  """One stride-1 3x3 conv, fwd + bwd, per implementation (and PyTorch), at each WRN group's shape.

  XLA's conv is also split into forward, input gradient and kernel gradient: the kernel gradient is
  what `conv_lib.wgrad_matmul_conv` replaces.
  """
  depth, widen = MODELS[args.model]
  reps, rows, per_step = max(2, args.repeats), [], collections.defaultdict(float)
  dn = ("NHWC", "HWIO", "NHWC")
  impls = {name: fn or lax.conv_general_dilated for name, fn in CONVS.items()}  # None: flax's default
  for hw, c, count in conv_shapes(depth, widen):
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (args.batch_size, hw, hw, c))
    w = jax.random.normal(kw, (3, 3, c, c)) * (2 / (9 * c)) ** 0.5
    g = jax.random.normal(kg, x.shape)
    row = {"shape": [args.batch_size, hw, hw, c], "convs_per_step": count}
    for name, fn in impls.items():
      conv = functools.partial(fn, window_strides=(1, 1), padding="SAME", dimension_numbers=dn)
      fwd_bwd = jax.jit(lambda x, w, g, conv=conv: jax.vjp(lambda x, w: conv(x, w), x, w)[1](g))
      row[f"{name}_fwd_bwd_ms"] = _best_ms(fwd_bwd, x, w, g, reps=reps)[1]
      per_step[name] += count * row[f"{name}_fwd_bwd_ms"]
    conv = functools.partial(lax.conv_general_dilated, window_strides=(1, 1), padding="SAME", dimension_numbers=dn)
    row["xla_fwd_ms"] = _best_ms(jax.jit(conv), x, w, reps=reps)[1]
    row["xla_input_grad_ms"] = _best_ms(
      jax.jit(lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)), x, w, g, reps=reps
    )[1]
    row["xla_kernel_grad_ms"] = _best_ms(
      jax.jit(lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)), x, w, g, reps=reps
    )[1]
    padding = ((1, 1), (1, 1))
    row["matmul_kernel_grad_ms"] = _best_ms(
      jax.jit(lambda x, g: conv_lib.kernel_gradient(x, g, (3, 3), (1, 1), padding)), x, g, reps=reps
    )[1]
    torch_step, info = make_conv_step(*(np.asarray(a) for a in (x, w, g)))
    if torch_step is not None:
      torch_step()
      row["torch_fwd_bwd_ms"] = round(min(_timed(torch_step) for _ in range(reps)) * 1e3, 2)
      per_step["torch"] += count * row["torch_fwd_bwd_ms"]
    rows.append(row)
  return {
    "model": args.model,
    "dtype": "float32",
    "reps": reps,
    "shapes": rows,
    "torch": info,
    "per_step_sum_over_stride1_3x3_convs_ms": {k: round(v, 1) for k, v in per_step.items()},
  }


def conv_layers(depth: int, widen: int) -> collections.Counter:
  """(H=W of the input, C_in, C_out, kernel size, stride) of every conv of WideResNet(depth, widen), with multiplicity."""
  layers, hw, c = collections.Counter({(32, 3, 16, 3, 1): 1}), 32, 16  # the stem
  for g, stride in enumerate((1, 2, 2)):
    out = 16 * widen * 2**g
    for b in range((depth - 4) // 6):
      s = stride if b == 0 else 1
      layers[(hw, c, out, 3, s)] += 1  # conv1
      if c != out or s != 1:
        layers[(hw, c, out, 1, s)] += 1  # projection shortcut
      hw, c = hw // s, out
      layers[(hw, c, c, 3, 1)] += 1  # conv2
  return layers


def bench_layers(args) -> dict:
  """Every distinct conv layer of the WRNs in --layer-models at each --layer-batches size: forward + backward
  (input and kernel gradients) per implementation, and the one ``conv="auto"`` picks (`conv_lib.choose_conv`).

  The table in docs/performance.md ("Which convolution auto picks") comes from this section.
  """
  reps, rows, seen = max(3, args.repeats), [], set()
  dn = ("NHWC", "HWIO", "NHWC")
  impls = {"xla": lax.conv_general_dilated, "wgrad_matmul": conv_lib.wgrad_matmul_conv}
  for batch in args.layer_batches:
    for model in args.layer_models:
      for (hw, cin, cout, k, stride), count in sorted(conv_layers(*MODELS[model]).items()):
        key = (batch, hw, cin, cout, k, stride)
        if key in seen:
          continue
        seen.add(key)
        kx, kw, kg = jax.random.split(jax.random.key(0), 3)
        x = jax.random.normal(kx, (batch, hw, hw, cin))
        w = jax.random.normal(kw, (k, k, cin, cout)) * (2 / (k * k * cin)) ** 0.5
        g = jax.random.normal(kg, (batch, hw // stride, hw // stride, cout))
        row = {
          "batch": batch,
          "hw": hw,
          "c_in": cin,
          "c_out": cout,
          "kernel": k,
          "stride": stride,
          "auto": conv_lib.choose_conv(x.shape, w.shape, (stride, stride), backend=jax.default_backend()),
        }
        for name, fn in impls.items():
          conv = functools.partial(fn, window_strides=(stride, stride), padding="SAME", dimension_numbers=dn)
          fwd_bwd = jax.jit(lambda x, w, g, conv=conv: jax.vjp(conv, x, w)[1](g))
          row[f"{name}_ms"] = _best_ms(fwd_bwd, x, w, g, reps=reps)[1]
        row["fastest"] = min(impls, key=lambda n: row[f"{n}_ms"])
        row["auto_over_fastest"] = round(row[f"{row['auto']}_ms"] / row[f"{row['fastest']}_ms"], 3)
        rows.append(row)
  return {
    "reps": reps,
    "dtype": "float32",
    "backend": jax.default_backend(),
    "layers": rows,
    "auto_not_fastest": [r for r in rows if r["auto"] != r["fastest"]],
  }


# ----------------------------------------------------------------------------- top-k


def site_shapes(depth: int, widen: int, batch: int) -> collections.Counter:
  """(B, H, W, C) of every top-k site of WideResNet(depth, widen), with multiplicity."""
  shapes, hw, c = collections.Counter(), 32, 16
  for g, stride in enumerate((1, 2, 2)):
    for b in range((depth - 4) // 6):
      out = 16 * widen * 2**g
      shapes[(batch, hw, hw, c)] += 1  # act1: the block's (pre-stride) input
      hw = hw // stride if b == 0 else hw
      shapes[(batch, hw, hw, out)] += 1  # act2: conv1's output
      c = out
  shapes[(batch, hw, hw, c)] += 1  # final_act
  return shapes


def _best_ms(fn, *args, reps: int) -> tuple[float, float]:
  """(first call ms incl. compile, best of reps ms)."""
  first = _timed(lambda: jax.block_until_ready(fn(*args)))
  best = min(_timed(lambda: jax.block_until_ready(fn(*args))) for _ in range(reps))
  return round(first * 1e3, 1), round(best * 1e3, 2)


def bench_topk(args) -> dict:
  """Threshold per method and mask fwd / fwd+bwd at each distinct site shape."""
  depth, widen = MODELS[args.model]
  shapes = site_shapes(depth, widen, args.batch_size)
  reps = max(2, args.repeats)
  methods = ("radix", "bisect", "sort")
  rows, per_step = [], collections.defaultdict(float)
  cases = [(s, shapes[s]) for s in sorted(shapes, key=lambda s: -np.prod(s))]
  if not args.quick:
    cases.append(((128, 65536), 0))  # the row case quoted in jaxsparse/topk.py
  keep = jnp.float32(SPARSE_KEEP)
  for shape, count in cases:
    x = jax.nn.relu(jax.random.normal(jax.random.key(0), shape, jnp.float32))
    row = {"shape": list(shape), "sites": count}
    for method in methods:
      fn = jax.jit(lambda x, k, m=method: topk_threshold(x, k, method=m))
      row[f"threshold_{method}_ms"] = _best_ms(fn, x, keep, reps=reps)[1]
    mask = jax.jit(topk_mask)
    grad = jax.jit(jax.grad(lambda x, k: jnp.sum(topk_mask(x, k) * x)))
    ident = jax.jit(lambda x, k: x * 1)  # one real pass over x, as a fused layer would do
    row["identity_ms"] = _best_ms(ident, x, keep, reps=reps)[1]
    row["mask_keep1_ms"] = _best_ms(mask, x, jnp.float32(1.0), reps=reps)[1]
    row["mask_ms"] = _best_ms(mask, x, keep, reps=reps)[1]
    row["mask_relative_ms"] = _best_ms(jax.jit(lambda x, k: topk_mask(x, k, relative=True)), x, keep, reps=reps)[1]
    row["mask_fwd_bwd_ms"] = _best_ms(grad, x, keep, reps=reps)[1]
    # References with a static k (one compilation per keep): XLA's exact top_k and its approximate max_k.
    rows_x, k = x.reshape(x.shape[0], -1), max(1, int(np.ceil(SPARSE_KEEP * np.prod(x.shape[1:]))))
    row["lax_top_k_ms"] = _best_ms(jax.jit(lambda r: lax.top_k(r, k)[0][:, -1]), rows_x, reps=reps)[1]
    row["lax_approx_max_k_ms"] = _best_ms(jax.jit(lambda r: lax.approx_max_k(r, k)[0][:, -1]), rows_x, reps=reps)[1]
    for key in ("mask_ms", "mask_fwd_bwd_ms", "mask_keep1_ms"):
      per_step[key] += count * row[key]
    rows.append(row)
  return {
    "keep": SPARSE_KEEP,
    "dtype": "float32",
    "data": "relu(normal)",
    "reps": reps,
    "shapes": rows,
    "model": args.model,
    "per_step_sum_over_sites_ms": {k: round(v, 1) for k, v in per_step.items()},
  }


# ----------------------------------------------------------------------------- pipeline


def bench_pipeline(args, steps_per_s: float | None) -> dict:
  """train_batches (normalise + gather) over 50,000 random uint8 images; optionally device-put too."""
  rng = np.random.default_rng(0)
  split = data.Split(
    images=rng.integers(0, 256, (50_000, 32, 32, 3), dtype=np.uint8),
    labels=rng.integers(0, 10, 50_000).astype(np.int32),
  )
  mean, std = data.channel_stats(split.images[:5000])
  n = 60 if args.quick else 200
  mesh = parallel.make_mesh()

  def run(to_device: bool) -> float:
    batches = data.train_batches(split, args.batch_size, mean=mean, std=std, seed=0, epoch=0)
    t = time.perf_counter()
    for _, batch in zip(range(n), batches):
      if to_device:
        jax.block_until_ready(parallel.to_global(batch, mesh))
    return n / (time.perf_counter() - t)

  host = max(run(False) for _ in range(2))
  device = max(run(True) for _ in range(2))
  out = {
    "batches": n,
    "batch_size": args.batch_size,
    "host_batches_per_s": round(host, 1),
    "host_and_device_put_batches_per_s": round(device, 1),
  }
  if steps_per_s:
    out["train_steps_per_s"] = round(steps_per_s, 3)
    out["pipeline_headroom"] = round(device / steps_per_s, 1)
  return out


# ----------------------------------------------------------------------------- main


def machine() -> dict:
  from jaxsparse import provenance  # imported here so that only this function changes

  dev = jax.devices()[0]
  basic = {
    "platform": platform.platform(),
    "python": platform.python_version(),
    "jax": jax.__version__,
    "backend": jax.default_backend(),
    "device_kind": dev.device_kind,
    "device_count": jax.device_count(),
    "cpu_count": os.cpu_count(),
    "env": {k: os.environ[k] for k in ("GLIBC_TUNABLES", "XLA_FLAGS", "OMP_NUM_THREADS") if k in os.environ},
  }
  # adds hostname, os, cpu, devices, driver, versions, git; its "env" has the same variables and more (None: unset)
  return {**basic, **provenance.provenance()}


def parse(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="WRN-16-2 and 3 rounds (a few minutes on CPU)")
  parser.add_argument("--model", choices=sorted(MODELS), default=None, help="default wrn28_4 (quick: wrn16_2)")
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5; quick: 3)")
  parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
  parser.add_argument(
    "--conv",
    choices=sorted(CONVS),
    default=None,
    help="convolution of the step section's main models (keep 0.3, keep 1.0, plain); default: "
    "what conv='auto' means on this backend (per layer on CPU, xla on GPU)",
  )
  parser.add_argument(
    "--other-convs",
    default=None,
    help="comma-separated convolutions also timed at keep 1.0 (default: xla, wgrad_matmul and auto "
    "minus --conv; '' none; 'matmul' on request)",
  )
  parser.add_argument(
    "--layer-models",
    default=None,
    help="layers section: comma-separated WRNs whose conv layers are timed (default: all five; quick: --model)",
  )
  parser.add_argument(
    "--layer-batches", default=None, help="layers section: batch sizes (default 64,128; quick: --batch-size)"
  )
  args = parser.parse_args(argv)
  args.model = args.model or ("wrn16_2" if args.quick else "wrn28_4")
  args.layer_models = (
    args.layer_models.split(",") if args.layer_models else [args.model] if args.quick else list(MODELS)
  )
  args.layer_batches = (
    [int(b) for b in args.layer_batches.split(",")]
    if args.layer_batches
    else [args.batch_size]
    if args.quick
    else [64, 128]
  )
  if set(args.layer_models) - set(MODELS):
    parser.error(f"--layer-models: choose from {sorted(MODELS)}, got {args.layer_models}")
  args.conv = args.conv or resolve_conv("auto")
  # Default: the implementations "auto" chooses between ("matmul" only when asked: one more WRN-28-4 model at batch
  # 128 needs more than 24 GiB with the allocator tunables). "auto" is xla off the CPU: never time it twice there.
  others = (
    [c for c in ("auto", "xla", "wgrad_matmul") if c != args.conv and (c != "auto" or resolve_conv(c) == "auto")]
    if args.other_convs is None
    else [c for c in args.other_convs.split(",") if c]
  )
  if set(others) - set(CONVS) or args.conv in others:
    parser.error(f"--other-convs: choose from {sorted(set(CONVS) - {args.conv})}, got {others}")
  args.convs = others
  args.repeats = args.repeats or (3 if args.quick else 5)
  args.sections = [s for s in args.sections.split(",") if s]
  unknown = set(args.sections) - set(SECTIONS)
  if unknown:
    parser.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
  return args


def main(argv=None):
  args = parse(argv)
  t0, load_start = time.perf_counter(), os.getloadavg()
  out = {"machine": machine(), "args": vars(args), "goals": GOALS, "notes": []}
  out.update({key: None for key in GOALS})
  counter = CompileCounter()
  steps_per_s = None
  if "step" in args.sections or "torch" in args.sections:
    out["step"], ratios = bench_step(args, counter, with_torch="torch" in args.sections)
    if "step" not in args.sections:
      ratios = {k: v for k, v in ratios.items() if k == "jax_over_torch"}
    for key, r in ratios.items():
      out[key] = r["median"]
      goal = GOALS.get(key)
      out.setdefault("ratio_details", {})[key] = dict(
        r, goal=goal, met=None if r["median"] is None or goal is None else r["median"] <= goal
      )
      if r["median"] is None:
        out["notes"].append(f"{key} is null: {r['reason']}")
    steps_per_s = 1 / out["step"]["times"]["keep1.0"]["median_s"]
  if "conv" in args.sections:
    out["conv"] = bench_conv(args)
  if "layers" in args.sections:
    out["layers"] = bench_layers(args)
  if "topk" in args.sections:
    out["topk"] = bench_topk(args)
  if "pipeline" in args.sections:
    out["pipeline"] = bench_pipeline(args, steps_per_s)
  out["machine"].update(loadavg_start=load_start, loadavg_end=os.getloadavg())
  out["total_s"] = round(time.perf_counter() - t0, 1)
  json.dump(out, sys.stdout, indent=1)
  print()


if __name__ == "__main__":
  from malloc_env import reexec_with_tunables

  reexec_with_tunables()  # CPU: glibc keeps XLA's temp buffers (GLIBC_TUNABLES set by you: left as it is)
  main()
