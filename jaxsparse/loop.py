"""train_and_evaluate(config, workdir): the training loop, and the only reader of a whole Config.

Side effects live here (files, logs, checkpoints, device transfers); the steps and controllers it drives are pure.
Run directory layout:
  workdir/config.json  metrics.jsonl  summary.json  provenance.jsonl  checkpoints/  plots/*.png

Interruptions lose nothing. Checkpoints are keyed by the global optimizer step: every epoch end is saved, and a
stop request (`should_stop`, or a KeyboardInterrupt during the train steps) saves the current step with the data
position and the partial epoch's metric sums in its meta, so the resumed run continues mid-epoch and ends bitwise
identical to an uninterrupted one. A checkpoint that fails to load is skipped, logged and moved aside. Every
failure to write the run directory (read-only, disk full) is a `WorkdirError` naming the file and the fix.

Several processes (after `jax.distributed.initialize()`): every process trains on its slice of each batch, saves and
restores the checkpoints with the others, and combines its stop flag with theirs after every step; process 0 alone
writes the run's files and logs the epochs.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from tqdm import tqdm  # plain tqdm: tqdm.auto warns in Jupyter without ipywidgets

from jaxsparse import checkpoint as checkpoint_lib
from jaxsparse import controllers as controllers_lib
from jaxsparse import data as data_lib
from jaxsparse import parallel, provenance, report
from jaxsparse import train as train_lib
from jaxsparse import workdir as workdir_lib
from jaxsparse.config import MODELS, Config
from jaxsparse.models import WideResNet, resolve_conv
from jaxsparse.workdir import ConfigMismatchError, WorkdirError  # noqa: F401  (re-exported)

_logger = logging.getLogger("jaxsparse")


class Interrupted(KeyboardInterrupt):
  """The run stopped on request (`should_stop`, Ctrl-C); its message says what was saved and how to resume.

  Attributes:
    checkpoint: directory of the checkpoint to resume from; None if none was saved yet.
    step: the global optimizer step of that checkpoint (0 if none).
  """

  def __init__(self, message: str = "interrupted", *, checkpoint: str | None = None, step: int = 0):
    super().__init__(message)
    self.checkpoint, self.step = checkpoint, step


def build_model(config: Config) -> WideResNet:
  depth, widen = MODELS[config.model]
  return WideResNet(
    depth=depth,
    widen=widen,
    num_classes=10,
    norm=config.norm,
    dropout=config.dropout,
    dtype=jnp.dtype(config.dtype),
    gradient=config.topk_gradient,
    score=config.topk_score,
    conv=config.conv,
    relative=config.topk_keep == "relative",
  )


def build_controller(config: Config) -> controllers_lib.Controller:
  return controllers_lib.get(config.schedule, **config.controller_options)


def check_config(config: Config) -> controllers_lib.Controller:
  """Checks what a Config cannot check alone (the controller and its options); returns the controller.

  Raises:
    ValueError: naming the bad option and the fix, e.g. for `preset("smoke", schedule="adaptive_b", val_size=0)`:
      "schedule 'adaptive_b' needs a validation split: set val_size > 0 (--val-size)".
  """
  controller = build_controller(config)
  if controller.needs_validation and config.val_size < 1:
    raise ValueError(f"schedule {config.schedule!r} needs a validation split: set val_size > 0 (--val-size)")
  if config.regimes > 1 and config.schedule == "dense":
    raise ValueError(
      f"regimes={config.regimes} trains keeps from the controller's keep up to 1.0, and schedule "
      "'dense' keeps 1.0: every pass would be dense. For a fixed smallest keep use schedule "
      "'constant' with controller_options {'keep': k}"
    )
  return controller


def _lr_schedule(config: Config, steps_per_epoch: int):
  """The run's learning-rate schedule (linear warm-up, then cosine decay over all steps)."""
  total_steps = steps_per_epoch * config.epochs
  return train_lib.lr_schedule(
    config.learning_rate, total_steps=total_steps, warmup_steps=min(config.warmup_epochs * steps_per_epoch, total_steps)
  )


def initial_state(config: Config, steps_per_epoch: int, mesh, controller=None) -> train_lib.TrainState:
  """The run's state before its first step (model, optimizer and controller from `config`), replicated."""
  controller = controller or build_controller(config)
  tx = train_lib.make_optimizer(
    _lr_schedule(config, steps_per_epoch),
    momentum=config.momentum,
    nesterov=config.nesterov,
    weight_decay=config.weight_decay,
  )
  model = build_model(config)
  init_fn = jax.jit(
    lambda rng: train_lib.create_train_state(rng, model, tx, controller), out_shardings=parallel.replicated(mesh)
  )
  return init_fn(jax.random.PRNGKey(config.seed))


def load_trained(workdir: str | os.PathLike, *, mesh=None) -> tuple[Config, train_lib.TrainState, data_lib.Dataset]:
  """(config, state, data) of the run in `workdir`: its saved config, its newest checkpoint and its dataset.

  For evaluating a trained run on other data (normalise with ``data.mean`` / ``data.std``, as in training).
  Raises FileNotFoundError when `workdir` has no config.json or no checkpoint.
  """
  workdir = Path(workdir)
  config_path = workdir / "config.json"
  if not config_path.exists():
    raise FileNotFoundError(f"{workdir} is not a run directory (no config.json)")
  config = Config.from_dict(json.loads(config_path.read_text()))
  mesh = mesh or parallel.make_mesh()
  ds = _load_data(config, progress=False)
  state = initial_state(config, data_lib.steps_per_epoch(len(ds.train.labels), config.batch_size), mesh)
  with checkpoint_lib.Checkpointer(workdir / "checkpoints") as ckpt:
    restored = ckpt.restore_latest(jax.tree.map(ocp.utils.to_shape_dtype_struct, state))
  if restored is None:
    raise FileNotFoundError(f"{workdir / 'checkpoints'} holds no checkpoint")
  return config, restored.state, ds


def _load_data(config: Config, *, progress: bool) -> data_lib.Dataset:
  bar = None

  def on_download(done: int, total: int):
    nonlocal bar
    if bar is None:
      bar = tqdm(total=total, unit="B", unit_scale=True, desc="download CIFAR-10", disable=not progress)
    bar.update(done - bar.n)

  try:
    return data_lib.load(
      config.data,
      cache_dir=config.cache_dir,
      val_size=config.val_size,
      train_size=config.train_size,
      seed=config.seed,
      progress=on_download,
    )
  finally:
    if bar is not None:
      bar.close()


def make_eval_fn(mesh):
  """`train.eval_step` jitted for `mesh`: replicated state and keep, batch sharded over `data`."""
  rep, bat = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  return jax.jit(train_lib.eval_step, in_shardings=(rep, bat, rep), out_shardings=rep)


def evaluate(eval_fn, state, split, *, keep: float, batch_size: int, mean, std, mesh) -> dict:
  """Exact accuracy and loss over every example of `split` (padded, masked batches)."""
  rep = parallel.replicated(mesh)
  keep = jax.device_put(jnp.float32(keep), rep)
  batches = data_lib.eval_batches(
    split, batch_size, mean=mean, std=std, process_index=jax.process_index(), process_count=jax.process_count()
  )
  sums = [eval_fn(state, batch, keep) for batch in parallel.prefetch_to_mesh(batches, mesh)]
  totals = jax.device_get(jax.tree.map(lambda *xs: jnp.sum(jnp.stack(xs)), *sums))
  count = float(totals["count"])
  return {"accuracy": float(totals["correct"]) / count, "loss": float(totals["loss"]) / count, "count": int(count)}


def _device_summary() -> str:
  d = jax.devices()
  return f"{len(d)} x {d[0].device_kind} ({d[0].platform})"


def _conv_summary(config: Config) -> str:
  if config.conv != "auto":
    return config.conv
  resolved = resolve_conv(config.conv)
  return "auto -> per layer (xla or wgrad_matmul by shape)" if resolved == "auto" else f"auto -> {resolved}"


class _EpochSums:
  """Per-step metrics of one epoch summed in step order in float64: exact through JSON, so an epoch resumed from
  a mid-epoch checkpoint averages to the same bits as an uninterrupted one."""

  def __init__(self, sums: dict[str, float] | None = None, count: int = 0):
    self.sums, self.count = dict(sums or {}), int(count)

  def add(self, metrics: dict) -> None:
    for k, v in metrics.items():
      self.sums[k] = self.sums.get(k, 0.0) + float(v)
    self.count += 1

  def means(self) -> dict[str, float]:
    return {k: v / self.count for k, v in self.sums.items()}


def _position(epoch: int, step_in_epoch: int, sums: _EpochSums, wall_time_s: float, cycle: int) -> dict:
  """A checkpoint's meta: completed epochs, steps done in the next one and their metric sums, wall time."""
  return {
    "epoch": epoch,
    "step_in_epoch": step_in_epoch,
    "partial_sums": sums.sums,
    "partial_count": sums.count,
    "wall_time_s": wall_time_s,
    "cycle": cycle,
  }


def _restore(ckpt: checkpoint_lib.Checkpointer, state, steps_per_epoch: int, log: Callable[[str], None]):
  """(state, position meta) of the newest checkpoint that loads; the fresh state at position 0 if none."""
  try:
    restored = ckpt.restore_latest(jax.tree.map(ocp.utils.to_shape_dtype_struct, state))
  except RuntimeError as e:
    raise ConfigMismatchError(
      f"no checkpoint in {ckpt.directory} fits this config's model (see the log above); pass --fresh to start "
      f"over, or choose another --workdir"
    ) from e
  if restored is None:
    return state, _position(0, 0, _EpochSums(), 0.0, 0)
  meta = {"step_in_epoch": 0, "partial_sums": {}, "partial_count": 0, **restored.meta}
  epoch, in_epoch = int(meta["epoch"]), int(meta["step_in_epoch"])
  if int(restored.state.step) != epoch * steps_per_epoch + in_epoch:
    raise ConfigMismatchError(
      f"checkpoint {ckpt.path(restored.step)} is at step {int(restored.state.step)}, which is not epoch {epoch} "
      f"+ {in_epoch} steps of {steps_per_epoch}; pass --fresh to start over, or choose another --workdir"
    )
  if restored.skipped:
    log(
      f"resuming from an older checkpoint: the newer one(s) at step(s) {[s for s, _ in restored.skipped]} "
      f"could not be read (moved aside as <step>.corrupt; their steps will be redone)"
    )
  log(
    f"resumed from {ckpt.path(restored.step)}: step {restored.step} (epoch {epoch + 1}, step {in_epoch} of "
    f"{steps_per_epoch})"
    if in_epoch
    else f"resumed from {ckpt.path(restored.step)}: step {restored.step} (end of epoch {epoch})"
  )
  return restored.state, meta


def _is_alive(state) -> bool:
  return not any(leaf.is_deleted() for leaf in jax.tree.leaves(state) if isinstance(leaf, jax.Array))


def _run_steps(train_fn, state, batches, keep, sums: _EpochSums, *, first_step: int, check, should_stop, bar):
  """Runs train steps over `batches`, adding each step's metrics to `sums`; returns (state, stopped).

  The metrics of step t are read after step t+1 is dispatched (no pipeline stall). Stops early, with every
  finished step counted in `sums`, when `should_stop()` or on a KeyboardInterrupt. If the interrupt hit where the
  state and `sums` disagree (e.g. inside the donated step call), raises a bare `Interrupted` instead.
  """
  pending, stopped = None, False
  try:
    for batch in batches:
      state, metrics = train_fn(state, batch, keep)
      if pending is not None:
        sums.add(check(jax.device_get(pending), int(state.step) - 1))
      pending = metrics
      bar.update(1)
      if should_stop():
        stopped = True
        break
  except KeyboardInterrupt:
    stopped = True
    consistent = _is_alive(state) and sums.count + (pending is not None) == int(state.step) - first_step
    if not consistent:
      raise Interrupted() from None
  if pending is not None:
    sums.add(check(jax.device_get(pending), int(state.step)))
  return state, stopped


def _interrupted(ckpt: checkpoint_lib.Checkpointer, steps_per_epoch: int) -> Interrupted:
  """The Interrupted error naming the newest checkpoint and how to resume."""
  with workdir_lib.writing(ckpt.directory):
    steps = ckpt.all_steps()
  if not steps:
    return Interrupted("interrupted before the first checkpoint; run the same command again to start over")
  step = steps[-1]
  epoch, in_epoch = divmod(step, steps_per_epoch)
  where = f"epoch {epoch + 1}, step {in_epoch} of {steps_per_epoch}" if in_epoch else f"end of epoch {epoch}"
  return Interrupted(
    f"interrupted; checkpoint {ckpt.path(step)} holds step {step} ({where}); run the same "
    f"command again (or train_and_evaluate with the same config and workdir) to resume",
    checkpoint=ckpt.path(step),
    step=step,
  )


def train_and_evaluate(
  config: Config,
  workdir: str | os.PathLike,
  *,
  fresh: bool = False,
  progress: bool = True,
  log: Callable[[str], None] | None = None,
  should_stop: Callable[[], bool] | None = None,
) -> dict:
  """Trains `config` in `workdir`, resuming from its checkpoints if any, and returns the summary dict.

  Args:
    config: the run's config (see `jaxsparse.config`).
    workdir: run directory; created if missing. If it holds checkpoints of the same config the run resumes,
      mid-epoch if it was stopped mid-epoch, and ends exactly as an uninterrupted run would.
    fresh: delete this run's previous outputs in `workdir` first.
    progress: show a progress bar (tqdm, on stderr).
    log: receives one human-readable line per epoch, resume, checkpoint fallback and at the end (default: the
      "jaxsparse" logger).
    should_stop: polled after every train step (e.g. a signal handler's flag); when it returns True the current
      step is checkpointed and `Interrupted` is raised.

  Returns:
    The summary (also written to workdir/summary.json): test_accuracy (final, dense), best_test_accuracy,
    keep_curve {keep: test accuracy}, cycles, epochs, wall_time_s, device, data_source, ...

  Raises:
    Interrupted: on `should_stop()` or Ctrl-C (a KeyboardInterrupt); the message names the checkpoint to resume
      from. ConfigMismatchError: `workdir` holds another config's run. WorkdirError: `workdir` cannot be written.
    FloatingPointError: a non-finite training loss (names the step and the last good checkpoint). ValueError,
    data.DataError: a bad option or data source.

  Example:
    >>> summary = train_and_evaluate(preset("smoke", data="cifar10.npz"), "runs/smoke")
    >>> summary["test_accuracy"]
  """
  ckpt_log = log or _logger.warning  # checkpoint fallbacks must be seen even with the default logger
  # Multi-process runs: every process computes; process 0 alone writes the run's files and logs epochs.
  primary = parallel.is_primary()
  log = (log or _logger.info) if primary else (lambda _: None)
  progress = progress and primary
  user_stop = should_stop or (lambda: False)
  should_stop = (lambda: parallel.any_process(user_stop())) if jax.process_count() > 1 else user_stop
  workdir = Path(workdir)
  controller = check_config(config)  # validates the schedule and its options before any work
  with workdir_lib.writing(f"the run directory {workdir}"):
    workdir_lib.prepare_workdir(config, workdir, fresh=fresh, write=primary)
  # Where (and from which commit) this process runs, taken at its start: the tree may change while it runs.
  origin = provenance.provenance()
  if primary:
    with workdir_lib.writing(workdir / "provenance.jsonl"):  # one line per (re)start: where each part ran
      workdir_lib.append_line(
        workdir / "provenance.jsonl",
        json.dumps(
          {
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "process_count": jax.process_count(),
            **origin,
          }
        ),
      )
  parallel.sync("jaxsparse:workdir")  # the run directory is ready (and, with fresh, emptied) for every process
  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.batch_size, mesh)
  ds = _load_data(config, progress=progress)
  steps_per_epoch = data_lib.steps_per_epoch(len(ds.train.labels), config.batch_size)
  total_steps = steps_per_epoch * config.epochs
  state = initial_state(config, steps_per_epoch, mesh, controller)
  lr_at = _lr_schedule(config, steps_per_epoch)
  rep, bat = parallel.replicated(mesh), parallel.batch_sharded(mesh)

  with workdir_lib.writing(workdir / "checkpoints"):
    ckpt = checkpoint_lib.Checkpointer(workdir / "checkpoints", keep_latest=config.keep_checkpoints, log=ckpt_log)
  with ckpt:
    state, position = _restore(ckpt, state, steps_per_epoch, log)
    metrics_path = workdir / "metrics.jsonl"
    history = workdir_lib.read_history(metrics_path, position["epoch"], log, write=primary)

    step = functools.partial(train_lib.train_step, regimes=config.regimes, distill=config.distill)
    train_fn = jax.jit(step, in_shardings=(rep, bat, rep), out_shardings=(rep, rep), donate_argnums=0)
    eval_fn = make_eval_fn(mesh)
    update_fn = jax.jit(controller.update)
    eval_kw = dict(batch_size=2 * config.batch_size, mean=ds.mean, std=ds.std, mesh=mesh)

    def save(state, meta, cycle_end=None):
      with workdir_lib.writing(f"checkpoint {ckpt.path(int(state.step))}"):
        ckpt.save(int(state.step), state, meta=meta, cycle_end=cycle_end)

    t_start = time.time()
    wall = lambda: float(position["wall_time_s"]) + time.time() - t_start  # noqa: E731
    bar = tqdm(
      total=total_steps, initial=int(state.step), disable=not progress, unit="step", dynamic_ncols=True, desc="train"
    )
    try:
      if should_stop():
        raise Interrupted()
      for epoch in range(position["epoch"], config.epochs):
        t_epoch = time.time()
        resumed = epoch == position["epoch"] and position["step_in_epoch"] > 0
        start_step = position["step_in_epoch"] if resumed else 0
        sums = _EpochSums(position["partial_sums"], position["partial_count"]) if resumed else _EpochSums()
        keep_value = float(state.controller.keep)
        cycle = int(state.controller.cycle)
        keep = jax.device_put(jnp.float32(keep_value), rep)
        batches = data_lib.train_batches(
          ds.train,
          config.batch_size,
          mean=ds.mean,
          std=ds.std,
          seed=config.seed,
          epoch=epoch,
          start_step=start_step,
          augment=config.augment,
          process_index=jax.process_index(),
          process_count=jax.process_count(),
        )
        state, stopped = _run_steps(
          train_fn,
          state,
          parallel.prefetch_to_mesh(batches, mesh),
          keep,
          sums,
          first_step=epoch * steps_per_epoch,
          should_stop=should_stop,
          bar=bar,
          check=lambda m, step: _check_finite(m, step, epoch, ckpt),
        )
        done = int(state.step) - epoch * steps_per_epoch
        if stopped and done < steps_per_epoch:  # else finish the epoch (evaluate, save), then stop
          save(state, _position(epoch, done, sums, wall(), cycle))
          raise Interrupted()
        train = sums.means()

        t_eval = time.time()
        val = evaluate(eval_fn, state, ds.val, keep=1.0, **eval_kw) if ds.val is not None else None
        tested = (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs
        test = evaluate(eval_fn, state, ds.test, keep=1.0, **eval_kw) if tested else None
        eval_time = time.time() - t_eval
        epoch_metrics = controllers_lib.EpochMetrics(
          train_accuracy=jnp.float32(train["accuracy"]),
          train_loss=jnp.float32(train["loss"]),
          val_accuracy=jnp.float32(val["accuracy"] if val else math.nan),
        )
        state = state.replace(controller=update_fn(state.controller, epoch_metrics))
        cycle_end = cycle if int(state.controller.cycle) > cycle else None
        record = {
          "epoch": epoch + 1,
          "step": int(state.step),
          "keep": keep_value,
          "cycle": cycle,
          "reset_after": cycle_end is not None,
          "next_keep": float(state.controller.keep),
          "lr": float(lr_at(int(state.step) - 1)),
          "train_loss": train["loss"],
          "train_accuracy": train["accuracy"],
          **({"train_dense_accuracy": train["dense_accuracy"]} if "dense_accuracy" in train else {}),
          "val_accuracy": val["accuracy"] if val else None,
          "test_accuracy": test["accuracy"] if test else None,
          "test_loss": test["loss"] if test else None,
          "density": {k[len("density/") :]: v for k, v in train.items() if k.startswith("density/")},
          "epoch_time_s": time.time() - t_epoch,
          "eval_time_s": eval_time,
          "wall_time_s": wall(),
        }
        history.append(record)
        if primary:
          with workdir_lib.writing(metrics_path):
            workdir_lib.append_line(metrics_path, json.dumps(record))
        save(state, _position(epoch + 1, 0, _EpochSums(), record["wall_time_s"], cycle), cycle_end=cycle_end)
        log(
          f"epoch {epoch + 1:3d}/{config.epochs} keep {keep_value:.3f} cycle {cycle:2d} "
          f"loss {train['loss']:.4f} train {train['accuracy']:.4f} "
          + (f"val {val['accuracy']:.4f} " if val else "")
          + (f"test {test['accuracy']:.4f} " if test else "")
          + f"({record['epoch_time_s']:.1f}s)"
          + (" | reset" if cycle_end is not None else "")
        )
        if stopped or should_stop():
          raise Interrupted()
    except KeyboardInterrupt:
      raise _interrupted(ckpt, steps_per_epoch) from None
    finally:
      bar.close()

    keep_curve = {}
    last_test = history[-1]["test_accuracy"] if history else None  # the same state: keep 1.0 is not evaluated twice
    for k in config.eval_keeps:
      keep_curve[k] = (
        last_test
        if k == 1.0 and last_test is not None
        else evaluate(eval_fn, state, ds.test, keep=k, **eval_kw)["accuracy"]
      )
    summary = report.summarize(
      history, keep_curve=keep_curve, device=_device_summary(), data_source=ds.source, config=config.to_dict()
    )
    summary["conv"] = _conv_summary(config)  # what "auto" meant on this backend
    summary["passes_per_step"] = config.regimes  # forward/backward passes of the model per train step
    summary["provenance"] = origin
    summary["process_count"] = jax.process_count()
    if primary:
      with workdir_lib.writing(workdir / "summary.json"):
        workdir_lib.atomic_write(workdir / "summary.json", json.dumps(summary, indent=2))
      with workdir_lib.writing(workdir / "plots"):
        report.plot_run(history, keep_curve, workdir / "plots")
    with workdir_lib.writing(ckpt.directory):
      ckpt.wait()
  log(report.format_summary(summary))
  return summary


def _check_finite(metrics: dict, step: int, epoch: int, ckpt: checkpoint_lib.Checkpointer) -> dict:
  if not np.isfinite(metrics["loss"]):
    steps = ckpt.all_steps()
    where = (
      f"the last good checkpoint is {ckpt.path(steps[-1])} (step {steps[-1]})"
      if steps
      else "no checkpoint was saved yet"
    )
    raise FloatingPointError(
      f"non-finite training loss ({metrics['loss']}) at step {step} (epoch {epoch + 1}); stopping. {where}; "
      f"lower the learning rate (with --fresh or another --workdir) or check the data"
    )
  return metrics
