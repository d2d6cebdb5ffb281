"""Performance benchmarks of jaxsparse; prints one JSON object to stdout.

Sections (``--sections``, comma-separated; default all):

* ``step``: the WRN train step (``jaxsparse.train.train_step`` jitted like ``jaxsparse.loop``: shardings on a 1-D
  mesh and buffer donation) at keep 0.3 and keep 1.0 (one compiled program), the same model without top-k sites
  (``WideResNet(sites=False)``), at keep 0.3 with the step-level controller ``tighten_relax`` updated inside the
  step (``controller_over_none``: what the controller adds to a step) and, at keep 1.0, with each of ``--other-convs`` (``step.conv_<main>_over_<other>``;
  ``auto_over_best_conv``: the main step over the fastest of them), timed in interleaved rounds (A B C A B C ...)
  so load changes hit every variant; ratios are medians of per-round ratios. Also the compile time, and proof that
  changing keep does not recompile (``jax.no_tracing``, backend compilations, the jit cache size).
* ``torch``: the same step in PyTorch (experiments/torch_wrn.py), interleaved with the JAX keep-1.0 steps;
  ``jax_over_torch`` uses the fastest JAX convolution implementation timed (each reported); null with the reason
  when torch is not installed.
* ``conv``: one stride-1 3x3 convolution, forward + backward, at each WRN group's shape, per implementation and in
  PyTorch; XLA's split into forward, input gradient and kernel gradient, and `kernel_gradient` alone.
* ``layers``: every distinct convolution layer of the WRNs (``--layer-models``, ``--layer-batches``), forward +
  backward, with XLA's convolution and with ``wgrad_matmul``, beside what ``conv="auto"`` picks for it
  (``jaxsparse.models.conv.choose_conv``): the crossover behind "auto".
* ``topk``: ``topk_threshold`` by method (radix, bisect, sort) and ``topk_mask`` (forward and forward+backward) at
  the model's site shapes, beside ``lax.top_k`` and ``lax.approx_max_k`` (static k), with the per-step cost summed
  over the sites, plus the (128, 65536) row case quoted in jaxsparse/topk.py.
* ``pipeline``: batches/s of ``jaxsparse.data.train_batches`` over 50,000 random uint8 images against steps/s.

  .venv/bin/python experiments/bench.py --quick     # WRN-16-2, 3 rounds, every section
  .venv/bin/python experiments/bench.py             # WRN-28-4, batch 128, every section
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import resource
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from torch_wrn import make_conv_step, make_torch_step, one_thread

from jaxsparse import controllers, data, parallel
from jaxsparse import train as train_lib
from jaxsparse.models import conv as conv_lib
from jaxsparse.models.wrn import CONVS, MODELS, WideResNet, resolve_conv
from jaxsparse.provenance import provenance
from jaxsparse.topk import topk_mask, topk_threshold

SECTIONS = ("step", "torch", "conv", "layers", "topk", "pipeline")
GOALS = {"sparse_over_dense": 1.05, "keep1_over_plain": 1.01, "auto_over_best_conv": 1.02, "jax_over_torch": 1.0}
SPARSE_KEEP = 0.3
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
DN = ("NHWC", "HWIO", "NHWC")


def _timed(fn) -> float:
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


def _best_ms(fn, *args, reps: int) -> float:
  """Best of `reps` calls of fn(*args) in ms, after one untimed call (compilation, warm-up)."""
  call = lambda: jax.block_until_ready(fn(*args))
  call()
  return round(min(_timed(call) for _ in range(reps)) * 1e3, 2)


def interleaved(fns: dict, rounds: int) -> tuple[dict[str, list[float]], dict[str, dict]]:
  """Calls each fn once per round, in order, `rounds` times.

  Returns:
    (seconds per call by name, {name: median and min seconds, every time, median minor page faults and system
    seconds per call}).
  """
  times, faults, sys_s = ({name: [] for name in fns} for _ in range(3))
  for _ in range(rounds):
    for name, fn in fns.items():
      r0 = resource.getrusage(resource.RUSAGE_SELF)
      times[name].append(_timed(fn))
      r1 = resource.getrusage(resource.RUSAGE_SELF)
      faults[name].append(r1.ru_minflt - r0.ru_minflt)
      sys_s[name].append(r1.ru_stime - r0.ru_stime)
  report = {
    name: {
      "median_s": round(statistics.median(t), 4),
      "min_s": round(min(t), 4),
      "all_s": [round(s, 4) for s in t],
      "minor_page_faults": int(statistics.median(faults[name])),
      "system_s": round(statistics.median(sys_s[name]), 3),
    }
    for name, t in times.items()
  }
  return times, report


def ratio(times: dict, num: str, den: str) -> dict:
  """Median and min of per-round ratios num/den, and the ratio of best times."""
  per_round = [a / b for a, b in zip(times[num], times[den])]
  return {
    "median": round(statistics.median(per_round), 4),
    "min": round(min(per_round), 4),
    "best_over_best": round(min(times[num]) / min(times[den]), 4),
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


class JaxStep:
  """One WRN train state and its jitted train step, as jaxsparse.loop builds them."""

  def __init__(
    self, model: str, batch_size: int, *, sites: bool, conv: str, counter: CompileCounter, controller: str = "dense"
  ):
    mesh = parallel.make_mesh()
    rep, bat = parallel.replicated(mesh), parallel.batch_sharded(mesh)
    wrn = WideResNet(*MODELS[model], sites=sites, conv=conv)
    tx = train_lib.make_optimizer(train_lib.lr_schedule(0.1, total_steps=351 * 200, warmup_steps=5 * 351))
    ctrl = controllers.get(controller)
    init_fn = jax.jit(lambda rng: train_lib.create_train_state(rng, wrn, tx, ctrl), out_shardings=rep)
    self.state = init_fn(jax.random.PRNGKey(0))
    step = functools.partial(train_lib.train_step, controller_step=ctrl.step)
    self.fn = jax.jit(step, in_shardings=(rep, bat, rep), out_shardings=(rep, rep), donate_argnums=0)
    self.eval_fn = jax.jit(train_lib.eval_step, in_shardings=(rep, bat, rep), out_shardings=rep)
    rng = np.random.default_rng(0)

    def batch(n, **extra):
      image, label = rng.standard_normal((n, 32, 32, 3), np.float32), rng.integers(0, 10, n).astype(np.int32)
      return parallel.to_global({"image": image, "label": label, **extra}, mesh)

    self.batch = batch(batch_size)
    self.eval_batch = batch(2 * batch_size, mask=np.ones(2 * batch_size, np.float32))
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
  make = lambda sites, conv, **kw: JaxStep(args.model, args.batch_size, sites=sites, conv=conv, counter=counter, **kw)
  sparse, plain = make(True, args.conv), make(False, args.conv)
  stepped = make(True, args.conv, controller="tighten_relax")
  others = {conv: make(True, conv) for conv in args.convs}
  fns = {"keep0.3": lambda: sparse.step(SPARSE_KEEP), "keep1.0": lambda: sparse.step(1.0)}
  fns["plain"] = lambda: plain.step(1.0)
  fns["keep0.3_tighten_relax"] = lambda: stepped.step(SPARSE_KEEP)
  # the other convolution implementations at keep 1.0 only: the top-k cost does not depend on the conv
  fns.update({f"{conv}_keep1.0": functools.partial(st.step, 1.0) for conv, st in others.items()})
  torch_step, torch_info = make_torch_step(*MODELS[args.model], args.batch_size) if with_torch else (None, None)
  if torch_step is not None:
    fns["torch"] = torch_step
    if torch_info["device"] == "cpu":
      fns["torch_1thread"] = one_thread(torch_step)
  fns["eval_2x_batch"] = sparse.eval
  for fn in fns.values():  # warm-up: every variant once, keep 0.3 included
    fn()
  cache_before = sparse.fn._cache_size()  # shared by both jit objects: one entry per model
  with counter:
    times, report = interleaved(fns, args.repeats)
  compiles, cache_after = counter.count, sparse.fn._cache_size()
  # A retrace (hence a recompile) for a new keep value would raise under no_tracing.
  with jax.no_tracing(True):
    sparse.step(0.05)
  model = f"{args.model} batch {args.batch_size} conv {args.conv}"
  results = {
    "model": model,
    "rounds": args.repeats,
    "order": list(fns),
    "times": report,
    "compile": {
      "sites_first_call_s": round(sparse.first_call_s, 2),
      "sites_backend_compile_s": round(sparse.compile_s, 2),
      "sites_backend_compiles": sparse.compiles,
      "plain_first_call_s": round(plain.first_call_s, 2),
      "plain_backend_compile_s": round(plain.compile_s, 2),
      **{f"{conv}_first_call_s": round(st.first_call_s, 2) for conv, st in others.items()},
    },
    "no_recompile": {
      "keeps_called": [1.0, SPARSE_KEEP, 0.05],
      "backend_compiles_in_timed_rounds": compiles,
      "train_step_jit_cache_entries_before_after": [cache_before, cache_after],
      "keep_0.05_step_under_jax_no_tracing": "ok",
    },
    "paper_epoch_estimate": epoch_estimate(times, args.batch_size),
  }
  ratios = {
    "sparse_over_dense": dict(ratio(times, "keep0.3", "keep1.0"), model=model),
    "keep1_over_plain": dict(ratio(times, "keep1.0", "plain"), model=model),
    "controller_over_none": dict(ratio(times, "keep0.3_tighten_relax", "keep0.3"), model=model),
  }
  fastest = lambda names: min((k for k in names if k in times), key=lambda k: statistics.median(times[k]))
  if others:  # the main convolution against the fastest other implementation timed beside it
    best = fastest(f"{c}_keep1.0" for c in others)
    ratios["auto_over_best_conv" if args.conv == "auto" else f"{args.conv}_over_best_conv"] = dict(
      ratio(times, "keep1.0", best), model=model, best_other_conv=best.removesuffix("_keep1.0")
    )
  for conv in others:  # > 1: the main model (args.conv) is slower than this one
    results[f"conv_{args.conv}_over_{conv}"] = {"keep1.0": ratio(times, "keep1.0", f"{conv}_keep1.0")}
  if torch_step is not None:  # the faster torch thread setting against the fastest JAX convolution (each reported)
    best, jax_best = fastest(("torch", "torch_1thread")), fastest(["keep1.0"] + [f"{c}_keep1.0" for c in others])
    ratios["jax_over_torch"] = dict(
      ratio(times, jax_best, best),
      model=model,
      torch_variant=best,
      jax_variant=jax_best,
      by_conv={args.conv: ratio(times, "keep1.0", best)["median"]}
      | {conv: ratio(times, f"{conv}_keep1.0", best)["median"] for conv in others},
      plain_over_torch=ratio(times, "plain", best)["median"],
    )
    results["torch"] = torch_info
  elif with_torch:
    ratios["jax_over_torch"] = {"median": None, "reason": torch_info, "model": model}
  return results, ratios


def model_shapes(model: str, batch: int) -> tuple[collections.Counter, collections.Counter]:
  """The convolutions and top-k sites of WideResNet `model` at batch size `batch`, traced from the model.

  Returns:
    (convs, sites), with multiplicity: convs as (H=W of the input, C_in, C_out, kernel size, stride), sites as
    (B, H, W, C), the input shape of a layer that reads the site (`WideResNet.layer_inputs`).
  """
  wrn, inputs, convs = WideResNet(*MODELS[model]), {}, collections.Counter()

  def record(next_fun, args, kwargs, ctx):
    out = next_fun(*args, **kwargs)
    if ctx.method_name == "__call__" and isinstance(ctx.module, (nn.Conv, nn.Dense)):
      x = inputs["/".join(ctx.module.path)] = args[0].shape
      if isinstance(ctx.module, nn.Conv):
        convs[(x[1], x[3], out.shape[3], ctx.module.kernel_size[0], x[1] // out.shape[1])] += 1
    return out

  with nn.intercept_methods(record):
    jax.eval_shape(wrn.init, jax.random.key(0), jax.ShapeDtypeStruct((batch, 32, 32, 3), jnp.float32))
  sites = {site: inputs[layer] for layer, site in wrn.layer_inputs().items() if site}
  return convs, collections.Counter(sites.values())


def _conv_case(batch: int, hw: int, cin: int, cout: int, k: int, stride: int) -> tuple[jax.Array, ...]:
  """(input, He-scaled kernel, output gradient) of one convolution layer, random."""
  kx, kw, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (batch, hw, hw, cin))
  w = jax.random.normal(kw, (k, k, cin, cout)) * (2 / (k * k * cin)) ** 0.5
  return x, w, jax.random.normal(kg, (batch, hw // stride, hw // stride, cout))


def _conv(fn, stride: int = 1):
  return functools.partial(fn, window_strides=(stride, stride), padding="SAME", dimension_numbers=DN)


def _fwd_bwd_ms(fn, x, w, g, *, stride: int = 1, reps: int) -> float:
  """Best ms of convolution `fn`'s forward + backward (input and kernel gradients)."""
  return _best_ms(jax.jit(lambda x, w, g, conv=_conv(fn, stride): jax.vjp(conv, x, w)[1](g)), x, w, g, reps=reps)


def bench_conv(args) -> dict:
  """One stride-1 3x3 conv, fwd + bwd, per implementation (and PyTorch), at each WRN group's shape.

  XLA's conv is also split into forward, input gradient and kernel gradient: the kernel gradient is
  what `conv_lib.wgrad_matmul_conv` replaces.
  """
  reps, rows, per_step, groups = max(2, args.repeats), [], collections.defaultdict(float), collections.Counter()
  for (hw, cin, cout, k, stride), count in model_shapes(args.model, args.batch_size)[0].items():
    if (k, stride, cin) == (3, 1, cout):
      groups[(hw, cin)] += count
  impls = {name: fn or lax.conv_general_dilated for name, fn in CONVS.items()}  # None: flax's default
  conv = _conv(lax.conv_general_dilated)
  for (hw, c), count in sorted(groups.items(), reverse=True):
    x, w, g = _conv_case(args.batch_size, hw, c, c, 3, 1)
    row = {"shape": [args.batch_size, hw, hw, c], "convs_per_step": count}
    row.update({f"{name}_fwd_bwd_ms": _fwd_bwd_ms(fn, x, w, g, reps=reps) for name, fn in impls.items()})
    row["xla_fwd_ms"] = _best_ms(jax.jit(conv), x, w, reps=reps)
    input_grad = lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)
    kernel_grad = lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)
    matmul_kernel_grad = lambda x, g: conv_lib.kernel_gradient(x, g, (3, 3), (1, 1), ((1, 1), (1, 1)))
    row["xla_input_grad_ms"] = _best_ms(jax.jit(input_grad), x, w, g, reps=reps)
    row["xla_kernel_grad_ms"] = _best_ms(jax.jit(kernel_grad), x, w, g, reps=reps)
    row["matmul_kernel_grad_ms"] = _best_ms(jax.jit(matmul_kernel_grad), x, g, reps=reps)
    torch_step, info = make_conv_step(*(np.asarray(a) for a in (x, w, g)))
    if torch_step is not None:
      row["torch_fwd_bwd_ms"] = _best_ms(torch_step, reps=reps)
    for key, ms in row.items():
      if key.endswith("_fwd_bwd_ms"):
        per_step[key.removesuffix("_fwd_bwd_ms")] += count * ms
    rows.append(row)
  return {
    "model": args.model,
    "dtype": "float32",
    "reps": reps,
    "shapes": rows,
    "torch": info,
    "per_step_sum_over_stride1_3x3_convs_ms": {k: round(v, 1) for k, v in per_step.items()},
  }


def bench_layers(args) -> dict:
  """Every distinct conv layer of the WRNs in --layer-models at each --layer-batches size: forward + backward
  (input and kernel gradients) per implementation, and the one ``conv="auto"`` picks (`conv_lib.choose_conv`).

  The table in docs/performance.md ("Which convolution auto picks") comes from this section.
  """
  reps, rows = max(3, args.repeats), []
  impls = {"xla": lax.conv_general_dilated, "wgrad_matmul": conv_lib.wgrad_matmul_conv}
  layers = dict.fromkeys(
    (b, *layer) for b in args.layer_batches for m in args.layer_models for layer in sorted(model_shapes(m, b)[0])
  )
  for batch, hw, cin, cout, k, stride in layers:
    x, w, g = _conv_case(batch, hw, cin, cout, k, stride)
    auto = conv_lib.choose_conv(x.shape, w.shape, (stride, stride), backend=jax.default_backend())
    row = {"batch": batch, "hw": hw, "c_in": cin, "c_out": cout, "kernel": k, "stride": stride, "auto": auto}
    row.update({f"{name}_ms": _fwd_bwd_ms(fn, x, w, g, stride=stride, reps=reps) for name, fn in impls.items()})
    row["fastest"] = min(impls, key=lambda n: row[f"{n}_ms"])
    row["auto_over_fastest"] = round(row[f"{auto}_ms"] / row[f"{row['fastest']}_ms"], 3)
    rows.append(row)
  return {
    "reps": reps,
    "dtype": "float32",
    "backend": jax.default_backend(),
    "layers": rows,
    "auto_not_fastest": [r for r in rows if r["auto"] != r["fastest"]],
  }


def bench_topk(args) -> dict:
  """Threshold per method and mask fwd / fwd+bwd at each distinct site shape."""
  shapes, reps, rows, per_step = model_shapes(args.model, args.batch_size)[1], max(2, args.repeats), [], {}
  cases = [(s, shapes[s]) for s in sorted(shapes, key=lambda s: -np.prod(s))]
  if not args.quick:
    cases.append(((128, 65536), 0))  # the row case quoted in jaxsparse/topk.py
  keep, fns = jnp.float32(SPARSE_KEEP), {}  # {name: (fn(x, keep), keep)}; keep is traced
  for method in ("radix", "bisect", "sort"):
    fns[f"threshold_{method}_ms"] = (lambda x, k, m=method: topk_threshold(x, k, method=m), keep)
  fns["identity_ms"] = (lambda x, k: x * 1, keep)  # one real pass over x, as a fused layer would do
  fns["mask_keep1_ms"] = (topk_mask, jnp.float32(1.0))
  fns["mask_ms"] = (topk_mask, keep)
  fns["mask_relative_ms"] = (lambda x, k: topk_mask(x, k, relative=True), keep)
  fns["mask_fwd_bwd_ms"] = (jax.grad(lambda x, k: jnp.sum(topk_mask(x, k) * x)), keep)
  for shape, count in cases:
    x = jax.nn.relu(jax.random.normal(jax.random.key(0), shape, jnp.float32))
    row = {"shape": list(shape), "sites": count}
    row.update({name: _best_ms(jax.jit(fn), x, k, reps=reps) for name, (fn, k) in fns.items()})
    # References with a static k (one compilation per keep): XLA's exact top_k and its approximate max_k.
    rows_x, k = x.reshape(x.shape[0], -1), max(1, int(np.ceil(SPARSE_KEEP * np.prod(x.shape[1:]))))
    row["lax_top_k_ms"] = _best_ms(jax.jit(lambda r: lax.top_k(r, k)[0][:, -1]), rows_x, reps=reps)
    row["lax_approx_max_k_ms"] = _best_ms(jax.jit(lambda r: lax.approx_max_k(r, k)[0][:, -1]), rows_x, reps=reps)
    for key in ("mask_ms", "mask_fwd_bwd_ms", "mask_keep1_ms"):
      per_step[key] = per_step.get(key, 0.0) + count * row[key]
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

  host, device = (max(run(to_device) for _ in range(2)) for to_device in (False, True))
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


def parse(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="WRN-16-2 and 3 rounds")
  parser.add_argument("--model", choices=sorted(MODELS), help="default wrn28_4 (quick: wrn16_2)")
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--repeats", type=int, help="timed rounds (default 5; quick: 3)")
  parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
  parser.add_argument("--conv", choices=sorted(CONVS), help="the step section's main convolution (default: auto)")
  parser.add_argument("--other-convs", help="comma-separated, timed at keep 1.0 (default: auto's choices; '' none)")
  parser.add_argument("--layer-models", help="layers section: comma-separated WRNs (default: all; quick: --model)")
  parser.add_argument("--layer-batches", help="layers section: batch sizes (default 64,128; quick: --batch-size)")
  args = parser.parse_args(argv)
  args.model = args.model or ("wrn16_2" if args.quick else "wrn28_4")
  args.layer_models = (args.layer_models or (args.model if args.quick else ",".join(MODELS))).split(",")
  batches = args.layer_batches or (str(args.batch_size) if args.quick else "64,128")
  args.layer_batches = [int(b) for b in batches.split(",")]
  if set(args.layer_models) - set(MODELS):
    parser.error(f"--layer-models: choose from {sorted(MODELS)}, got {args.layer_models}")
  args.conv = args.conv or resolve_conv("auto")
  # Default: what "auto" chooses between ("matmul" only when asked: its memory); "auto" is "xla" off the CPU.
  auto = [c for c in ("auto", "xla", "wgrad_matmul") if c != args.conv and (c != "auto" or resolve_conv(c) == "auto")]
  args.convs = auto if args.other_convs is None else [c for c in args.other_convs.split(",") if c]
  if set(args.convs) - set(CONVS) or args.conv in args.convs:
    parser.error(f"--other-convs: choose from {sorted(set(CONVS) - {args.conv})}, got {args.convs}")
  args.repeats = args.repeats or (3 if args.quick else 5)
  args.sections = [s for s in args.sections.split(",") if s]
  if set(args.sections) - set(SECTIONS):
    parser.error(f"unknown sections {sorted(set(args.sections) - set(SECTIONS))}; choose from {SECTIONS}")
  return args


def main(argv=None):
  args = parse(argv)
  t0, load_start = time.perf_counter(), os.getloadavg()
  out = {"machine": provenance(), "args": vars(args), "goals": GOALS, "notes": []}
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
  benches = {"conv": bench_conv, "layers": bench_layers, "topk": bench_topk}
  benches["pipeline"] = functools.partial(bench_pipeline, steps_per_s=steps_per_s)
  out.update({name: bench(args) for name, bench in benches.items() if name in args.sections})
  out["machine"].update(loadavg_start=load_start, loadavg_end=os.getloadavg())
  out["total_s"] = round(time.perf_counter() - t0, 1)
  json.dump(out, sys.stdout, indent=1)
  print()


if __name__ == "__main__":
  from malloc_env import reexec_with_tunables

  reexec_with_tunables()  # CPU: glibc keeps XLA's temp buffers (GLIBC_TUNABLES set by you: left as it is)
  main()
