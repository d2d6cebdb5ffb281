"""train_and_evaluate(config, workdir): the training loop, and the only reader of a whole Config.

Side effects live here (files, logs, checkpoints, device transfers); the steps and controllers it drives are pure.
Run directory layout:
  workdir/config.json  metrics.jsonl  summary.json  checkpoints/  plots/*.png
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from jaxsparse import checkpoint as checkpoint_lib
from jaxsparse import controllers as controllers_lib
from jaxsparse import data as data_lib
from jaxsparse import parallel
from jaxsparse import report
from jaxsparse import train as train_lib
from jaxsparse.config import MODELS, Config
from jaxsparse.models import WideResNet

_logger = logging.getLogger("jaxsparse")


class ConfigMismatchError(ValueError):
  """The run directory holds a run made with a different config."""


def build_model(config: Config) -> WideResNet:
  depth, widen = MODELS[config.model]
  return WideResNet(depth=depth, widen=widen, num_classes=10, norm=config.norm, dropout=config.dropout,
                    dtype=jnp.dtype(config.dtype), gradient=config.topk_gradient, score=config.topk_score)


def build_controller(config: Config) -> controllers_lib.Controller:
  return controllers_lib.get(config.schedule, **config.controller_options)


def prepare_workdir(config: Config, workdir: Path, *, fresh: bool) -> None:
  """Creates `workdir`, or checks that the run already there was made with the same config.

  Raises:
    ConfigMismatchError: an existing run used another config (nothing is overwritten).
  """
  saved = workdir / "config.json"
  if fresh and workdir.exists():
    for name in ("checkpoints", "plots"):
      shutil.rmtree(workdir / name, ignore_errors=True)
    for name in ("config.json", "metrics.jsonl", "summary.json"):
      (workdir / name).unlink(missing_ok=True)
  if saved.exists():
    old = json.loads(saved.read_text())
    new = json.loads(config.to_json())
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if diff:
      details = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff)
      raise ConfigMismatchError(
          f"{workdir} holds a run with a different config ({details}); pass --fresh to start it over, or "
          f"choose another --workdir")
    return
  workdir.mkdir(parents=True, exist_ok=True)
  _atomic_write(saved, config.to_json())


def _atomic_write(path: Path, text: str) -> None:
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


def _read_history(path: Path, upto_epoch: int) -> list[dict]:
  """Epoch records already written, dropping any beyond the restored checkpoint (they will be redone)."""
  if not path.exists():
    return []
  records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  records = [r for r in records if r["epoch"] <= upto_epoch]
  _atomic_write(path, "".join(json.dumps(r) + "\n" for r in records))
  return records


def _load_data(config: Config, *, progress: bool) -> data_lib.Dataset:
  bar = None

  def on_download(done: int, total: int):
    nonlocal bar
    if bar is None:
      bar = tqdm(total=total, unit="B", unit_scale=True, desc="download CIFAR-10", disable=not progress)
    bar.update(done - bar.n)

  try:
    return data_lib.load(config.data, cache_dir=config.cache_dir, val_size=config.val_size,
                         train_size=config.train_size, seed=config.seed, progress=on_download)
  finally:
    if bar is not None:
      bar.close()


def evaluate(eval_fn, state, split, *, keep: float, batch_size: int, mean, std, mesh) -> dict:
  """Exact accuracy and loss over every example of `split` (padded, masked batches)."""
  rep = parallel.replicated(mesh)
  keep = jax.device_put(jnp.float32(keep), rep)
  batches = data_lib.eval_batches(split, batch_size, mean=mean, std=std, process_index=jax.process_index(),
                                  process_count=jax.process_count())
  sums = [eval_fn(state, batch, keep) for batch in parallel.prefetch_to_mesh(batches, mesh)]
  totals = jax.device_get(jax.tree.map(lambda *xs: jnp.sum(jnp.stack(xs)), *sums))
  count = float(totals["count"])
  return {"accuracy": float(totals["correct"]) / count, "loss": float(totals["loss"]) / count,
          "count": int(count)}


def _device_summary() -> str:
  d = jax.devices()
  return f"{len(d)} x {d[0].device_kind} ({d[0].platform})"


def train_and_evaluate(config: Config, workdir: str | os.PathLike, *, fresh: bool = False,
                       progress: bool = True, log: Callable[[str], None] | None = None) -> dict:
  """Trains `config` in `workdir`, resuming from its checkpoints if any, and returns the summary dict.

  Args:
    config: the run's config (see `jaxsparse.config`).
    workdir: run directory; created if missing. If it holds checkpoints of the same config the run resumes.
    fresh: delete this run's previous outputs in `workdir` first.
    progress: show a progress bar (tqdm, on stderr).
    log: receives one human-readable line per epoch and at the end (default: the "jaxsparse" logger).

  Returns:
    The summary (also written to workdir/summary.json): test_accuracy (final, dense), best_test_accuracy,
    keep_curve {keep: test accuracy}, cycles, epochs, wall_time_s, device, data_source, ...
  """
  log = log or _logger.info
  workdir = Path(workdir)
  controller = build_controller(config)     # validates the schedule and its options before any work
  if controller.needs_validation and config.val_size < 1:
    raise ValueError(f"schedule {config.schedule!r} needs a validation split: set val_size > 0")
  prepare_workdir(config, workdir, fresh=fresh)
  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.batch_size, mesh)
  ds = _load_data(config, progress=progress)
  steps_per_epoch = data_lib.steps_per_epoch(len(ds.train.labels), config.batch_size)
  total_steps = steps_per_epoch * config.epochs
  model = build_model(config)
  lr_schedule = train_lib.lr_schedule(config.learning_rate, total_steps=total_steps,
                                      warmup_steps=min(config.warmup_epochs * steps_per_epoch, total_steps))
  tx = train_lib.make_optimizer(lr_schedule, momentum=config.momentum, nesterov=config.nesterov,
                                weight_decay=config.weight_decay)

  rep, bat = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  init_fn = jax.jit(lambda rng: train_lib.create_train_state(rng, model, tx, controller), out_shardings=rep)
  state = init_fn(jax.random.PRNGKey(config.seed))

  ckpt = checkpoint_lib.Checkpointer(workdir / "checkpoints", keep_latest=config.keep_checkpoints, log=log)
  restored = ckpt.restore_latest(jax.tree.map(ocp.utils.to_shape_dtype_struct, state))
  start_epoch, wall_before = 0, 0.0
  if restored is not None:
    state, meta = restored.state, restored.meta
    start_epoch, wall_before = int(meta["epoch"]), float(meta["wall_time_s"])
    log(f"resumed from {ckpt.directory} at epoch {start_epoch} (step {int(state.step)})")
  metrics_path = workdir / "metrics.jsonl"
  history = _read_history(metrics_path, start_epoch)

  train_fn = jax.jit(train_lib.train_step, in_shardings=(rep, bat, rep), out_shardings=(rep, rep),
                     donate_argnums=0)
  eval_fn = jax.jit(train_lib.eval_step, in_shardings=(rep, bat, rep), out_shardings=rep)
  update_fn = jax.jit(controller.update)
  eval_kw = dict(batch_size=2 * config.batch_size, mean=ds.mean, std=ds.std, mesh=mesh)

  t_start = time.time()
  bar = tqdm(total=total_steps, initial=start_epoch * steps_per_epoch, disable=not progress, unit="step",
             dynamic_ncols=True, desc="train")
  try:
    for epoch in range(start_epoch, config.epochs):
      t_epoch = time.time()
      keep_value = float(state.controller.keep)
      cycle = int(state.controller.cycle)
      keep = jax.device_put(jnp.float32(keep_value), rep)
      batches = data_lib.train_batches(
          ds.train, config.batch_size, mean=ds.mean, std=ds.std, seed=config.seed,
          epoch=epoch, augment=config.augment, process_index=jax.process_index(),
          process_count=jax.process_count())
      step_metrics, pending = [], None
      for batch in parallel.prefetch_to_mesh(batches, mesh):
        state, metrics = train_fn(state, batch, keep)
        if pending is not None:   # read step t-1 after dispatching step t: no pipeline stall
          step_metrics.append(_check_finite(jax.device_get(pending), int(state.step) - 1, epoch, ckpt))
        pending = metrics
        bar.update(1)
      step_metrics.append(_check_finite(jax.device_get(pending), int(state.step), epoch, ckpt))
      train = {k: float(np.mean([m[k] for m in step_metrics])) for k in step_metrics[0]}

      val = evaluate(eval_fn, state, ds.val, keep=1.0, **eval_kw) if ds.val is not None else None
      test = evaluate(eval_fn, state, ds.test, keep=1.0, **eval_kw)
      epoch_metrics = controllers_lib.EpochMetrics(
          train_accuracy=jnp.float32(train["accuracy"]), train_loss=jnp.float32(train["loss"]),
          val_accuracy=jnp.float32(val["accuracy"] if val else math.nan))
      state = state.replace(controller=update_fn(state.controller, epoch_metrics))
      cycle_end = cycle if int(state.controller.cycle) > cycle else None
      wall = wall_before + time.time() - t_start
      record = {
          "epoch": epoch + 1, "step": int(state.step), "keep": keep_value, "cycle": cycle,
          "reset_after": cycle_end is not None, "next_keep": float(state.controller.keep),
          "lr": float(lr_schedule(int(state.step) - 1)),
          "train_loss": train["loss"], "train_accuracy": train["accuracy"],
          "val_accuracy": val["accuracy"] if val else None, "test_accuracy": test["accuracy"],
          "test_loss": test["loss"],
          "density": {k[len("density/"):]: v for k, v in train.items() if k.startswith("density/")},
          "epoch_time_s": time.time() - t_epoch, "wall_time_s": wall,
      }
      history.append(record)
      with metrics_path.open("a") as f:
        f.write(json.dumps(record) + "\n")
      ckpt.save(epoch + 1, state, meta={"epoch": epoch + 1, "wall_time_s": wall, "cycle": cycle},
                cycle_end=cycle_end)
      line = (f"epoch {epoch + 1:3d}/{config.epochs} keep {keep_value:.3f} cycle {cycle:2d} "
              f"loss {train['loss']:.4f} train {train['accuracy']:.4f} "
              + (f"val {val['accuracy']:.4f} " if val else "")
              + f"test {test['accuracy']:.4f} ({record['epoch_time_s']:.1f}s)"
              + (" | reset" if cycle_end is not None else ""))
      log(line)
  finally:
    bar.close()
    ckpt.wait()

  keep_curve = {}
  for k in config.eval_keeps:
    keep_curve[k] = evaluate(eval_fn, state, ds.test, keep=k, **eval_kw)["accuracy"]
  summary = report.summarize(history, keep_curve=keep_curve, device=_device_summary(), data_source=ds.source,
                             config=config.to_dict())
  _atomic_write(workdir / "summary.json", json.dumps(summary, indent=2))
  report.plot_run(history, keep_curve, workdir / "plots")
  ckpt.close()
  log(report.format_summary(summary))
  return summary


def _check_finite(metrics: dict, step: int, epoch: int, ckpt) -> dict:
  if not np.isfinite(metrics["loss"]):
    last = max(ckpt.all_epochs(), default=None)
    where = (f"the last good checkpoint is epoch {last} in {ckpt.directory}" if last is not None
             else "no checkpoint was saved yet")
    raise FloatingPointError(
        f"non-finite training loss ({metrics['loss']}) at step {step} (epoch {epoch + 1}); stopping. {where}; "
        f"lower the learning rate or check the data")
  return metrics
