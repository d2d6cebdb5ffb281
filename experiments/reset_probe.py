"""Why a reset shocks: probes a finished run at each of its kept cycle-end checkpoints (the state right before keep
jumps back to 1).

  python experiments/reset_probe.py runs/cpu_adaptive_b_s0 --steps 20 --out runs/cpu_adaptive_b_s0/reset_probe.md

For every reset it measures, on the batches the run trained on next:
* the forward pass alone: training loss and accuracy of the pre-reset parameters at the pre-reset keep and at
  keep 1 (no update). A collapse here means the network does not work dense, whatever the optimiser does;
* the scale of the residual stream: RMS of every block's output and of the logits at keep 1 over their RMS at the
  pre-reset keep;
* the first `--steps` optimiser steps from the checkpoint (its momentum and learning rate), once dense as the run
  did and once at the pre-reset keep as a control: loss per step, gradient norm, update norm and learning rate;
  with --warmup N,..., also dense with the update ramped up over N steps (Config.reset_warmup_steps = N), so a
  pilot can choose N from the run's own checkpoints instead of from whole runs.
Prints (and with --out writes) one table per reset and saves the numbers as JSON beside it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxsparse import checkpoint as checkpoint_lib
from jaxsparse import data as data_lib
from jaxsparse import loop, parallel
from jaxsparse import train as train_lib


def _loss(state, params, batch, keep):
  logits = state.apply_fn({"params": params, **state.model_state}, batch["image"], keep=keep, train=False)
  loss = jnp.mean(train_lib.cross_entropy(logits, batch["label"]))
  return loss, jnp.mean(jnp.argmax(logits, -1) == batch["label"])


def _scales(state, batch, keep) -> dict[str, float]:
  """RMS of every block's output (the residual stream) and of the logits at `keep`."""
  logits, captured = state.apply_fn(
    {"params": state.params, **state.model_state},
    batch["image"],
    keep=keep,
    train=False,
    capture_intermediates=lambda module, method: method == "__call__" and "block" in (module.name or ""),
    mutable=["intermediates"],
  )
  rms = lambda x: float(jnp.sqrt(jnp.mean(jnp.square(x))))  # noqa: E731
  out = {name: rms(v["__call__"][0]) for name, v in captured["intermediates"].items()}
  out["logits"] = rms(logits)
  return out


def probe_reset(config, state, batches, keep_before: float, steps: int, lr_at, warmups=()) -> dict:
  """The forward pass, the stream's scale and `steps` updates (dense, at `keep_before`, and dense with each
  reset warm-up of `warmups`) from `state`."""
  loss_fn = jax.jit(lambda params, batch, keep: _loss(state, params, batch, keep))
  grad_fn = jax.jit(jax.grad(lambda params, batch, keep: _loss(state, params, batch, keep)[0]))
  step_fn = jax.jit(train_lib.train_step, static_argnames="reset_warmup")
  forward = {}
  for name, keep in (("before", keep_before), ("dense", 1.0)):
    values = np.array([loss_fn(state.params, b, jnp.float32(keep)) for b in batches[:steps]], np.float64)
    forward[name] = {"loss": float(values[:, 0].mean()), "accuracy": float(values[:, 1].mean())}
  dense, sparse = _scales(state, batches[0], jnp.float32(1.0)), _scales(state, batches[0], jnp.float32(keep_before))
  updates = {}
  runs = [("dense", 1.0, 0), ("at_keep_before", keep_before, 0)] + [(f"dense_warmup{n}", 1.0, n) for n in warmups]
  for name, keep, warmup in runs:
    s, rows = state, []
    for batch in batches[:steps]:
      grad_norm = float(optax.tree.norm(grad_fn(s.params, batch, jnp.float32(keep))))
      new, metrics = step_fn(s, batch, jnp.float32(keep), reset_warmup=warmup)  # the state's reset step: this one
      delta = float(optax.tree.norm(jax.tree.map(lambda a, b: a - b, new.params, s.params)))
      rows.append(
        {"loss": float(metrics["loss"]), "grad_norm": grad_norm, "update_norm": delta, "lr": float(lr_at(int(s.step)))}
      )
      s = new
    updates[name] = rows
  return {
    "keep_before": keep_before,
    "forward": forward,
    "scale_ratio_dense_over_before": {k: dense[k] / sparse[k] for k in dense},
    "steps": updates,
  }


def probe_run(workdir: Path, steps: int, warmups=(), resets: int | None = None) -> list[dict]:
  """`probe_reset` at every kept cycle-end checkpoint of the run in `workdir` (the first `resets` of them)."""
  config, _, ds = loop.load_trained(workdir)
  history = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
  spe = data_lib.steps_per_epoch(len(ds.train.labels), config.batch_size)
  mesh = parallel.make_mesh()
  template = loop.initial_state(config, spe, mesh)
  lr_at = loop._lr_schedule(config, spe)
  results, cycle_start = [], 0  # the epoch (0-based) the cycle ending at each reset began with
  with checkpoint_lib.Checkpointer(workdir / "checkpoints") as ckpt:
    for cycle, step in sorted(ckpt.cycle_checkpoints().items()):
      epoch = step // spe  # the epoch trained right after the reset (0-based)
      start, cycle_start = cycle_start, epoch
      if epoch >= config.epochs or (resets is not None and len(results) >= resets):
        continue
      state, _ = ckpt.restore(step, template)
      batches = list(
        itertools.islice(
          data_lib.train_batches(
            ds.train, config.batch_size, mean=ds.mean, std=ds.std, seed=config.seed, epoch=epoch, augment=config.augment
          ),
          steps,
        )
      )
      result = probe_reset(config, state, batches, history[epoch - 1]["keep"], steps, lr_at, warmups)
      result["cycle_first_loss"] = history[start]["train_loss"]
      results.append({"cycle": cycle, "step": step, "next_epoch": epoch + 1, **result})
  return results


def markdown(results: list[dict], steps: int) -> str:
  lines = [
    f"| cycle | next epoch | keep before | lr | forward loss: at keep before / dense | forward acc: before / dense | "
    f"block RMS dense/before (max) | logits RMS dense/before | loss, dense steps 1 / {steps} | control (keep before) "
    "steps 1 / last | grad norm step 1: dense / control | update norm step 1: dense / control |",
    "|---:|---:|---:|---:|---|---|---:|---:|---|---|---|---|",
  ]
  for r in results:
    d, c, f = r["steps"]["dense"], r["steps"]["at_keep_before"], r["forward"]
    ratios = r["scale_ratio_dense_over_before"]
    lines.append(
      f"| {r['cycle']} | {r['next_epoch']} | {r['keep_before']:.3f} | {d[0]['lr']:.4f} | "
      f"{f['before']['loss']:.3f} / {f['dense']['loss']:.3f} | {f['before']['accuracy']:.3f} / "
      f"{f['dense']['accuracy']:.3f} | {max(v for k, v in ratios.items() if k != 'logits'):.2f} | "
      f"{ratios['logits']:.2f} | {d[0]['loss']:.3f} / {d[-1]['loss']:.3f} | {c[0]['loss']:.3f} / {c[-1]['loss']:.3f} | "
      f"{d[0]['grad_norm']:.2f} / {c[0]['grad_norm']:.2f} | {d[0]['update_norm']:.3f} / {c[0]['update_norm']:.3f} |"
    )
  warm = sorted({k for r in results for k in r["steps"] if k.startswith("dense_")}, key=lambda k: int(k[12:]))
  if warm:
    head = " | ".join(["plain", *(f"warm-up {k[12:]}" for k in warm), "control"])
    lines += [
      "",
      f"Mean / last training loss over the {steps} steps after each reset (dense):",
      "",
      f"| cycle | cycle's first epoch | {head} |",
      "|---:|---:|" + "---|" * (len(warm) + 2),
    ]
    for r in results:
      cells = [r["steps"][k] for k in ["dense", *warm, "at_keep_before"]]
      mean_last = " | ".join(f"{np.mean([x['loss'] for x in c]):.3f} / {c[-1]['loss']:.3f}" for c in cells)
      lines.append(f"| {r['cycle']} | {r['cycle_first_loss']:.3f} | {mean_last} |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("run", help="a finished run directory with cycle-end checkpoints")
  p.add_argument("--steps", type=int, default=20, help="optimiser steps probed after each reset (default: %(default)s)")
  p.add_argument("--warmup", default="", help="comma-separated reset warm-up lengths (steps) to probe as well")
  p.add_argument("--resets", type=int, help="probe only the first RESETS kept resets (default: all)")
  p.add_argument("--out", help="write the table here (and the numbers to the same name with .json)")
  args = p.parse_args(argv)
  if args.steps < 1:
    p.error("--steps must be >= 1")
  try:
    warmups = [int(n) for n in args.warmup.split(",") if n]
  except ValueError:
    p.error(f"--warmup takes comma-separated integers, got {args.warmup!r}")
  if any(n < 1 for n in warmups) or (args.resets is not None and args.resets < 1):
    p.error("--warmup lengths and --resets must be >= 1")
  results = probe_run(Path(args.run), args.steps, warmups, args.resets)
  if not results:
    print(f"error: {args.run} has no kept cycle-end checkpoint before its last epoch", file=sys.stderr)
    return 1
  text = markdown(results, args.steps)
  print(text)
  if args.out:
    Path(args.out).write_text(text)
    Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
