"""train_and_evaluate(config, workdir): the training loop, and the only reader of a whole Config.

Side effects live here (files, logs, checkpoints, device transfers); the steps and controllers it drives are pure.
Run directory: config.json  metrics.jsonl  summary.json  provenance.jsonl  checkpoints/  plots/*.png

Interruptions lose nothing. Checkpoints are keyed by the global optimizer step: every epoch end is saved, and a
stop request (`should_stop`, or a KeyboardInterrupt during the train steps) saves the current step with the
partial epoch's metric sums in its meta, so the resumed run continues mid-epoch and ends bitwise identical to an
uninterrupted one. With several processes (after `jax.distributed.initialize()`) every process trains on its slice
of each batch, checkpoints with the others and combines its stop flag with theirs after every step; process 0
alone writes the run's files and logs.
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
from tqdm import tqdm  # plain tqdm: tqdm.auto warns in Jupyter without ipywidgets

from jaxsparse import checkpoint as checkpoint_lib
from jaxsparse import controllers as controllers_lib
from jaxsparse import data as data_lib
from jaxsparse import evaluate as evaluate_lib
from jaxsparse import parallel, plots, provenance, report
from jaxsparse import train as train_lib
from jaxsparse import workdir as workdir_lib
from jaxsparse.config import Config, OptionError
from jaxsparse.models import WideResNet, resolve_conv
from jaxsparse.models.wrn import MODELS
from jaxsparse.workdir import ConfigMismatchError, WorkdirError  # noqa: F401  (re-exported)

_logger = logging.getLogger("jaxsparse")


class Interrupted(KeyboardInterrupt):
  """The run stopped on request (`should_stop`, Ctrl-C); its message says what was saved and how to resume.
  `checkpoint` is the directory to resume from (None if none was saved yet), `step` its optimizer step."""

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
    shortcut=config.shortcut,
    norm_eps=config.norm_eps,
    norm_bias=config.norm_bias,
    zero_init_residual=config.zero_init_residual,
    padding=config.padding,
    rounding=config.topk_round,
  )


def build_controller(config: Config) -> controllers_lib.Controller:
  return controllers_lib.get(config.schedule, **config.controller_options)


def check_config(config: Config) -> controllers_lib.Controller:
  """Checks what a Config cannot check alone (the controller and its options, the retention, the run to start
  from); returns the controller. Raises OptionError (or the controller's ValueError) naming the option and the fix.
  """
  controller = build_controller(config)
  try:
    checkpoint_lib.cycle_retention(config.keep_cycles)
  except ValueError:
    raise OptionError(
      lambda n: f"{n('keep_cycles')} must be {checkpoint_lib.RETENTION}, got {config.keep_cycles!r}"
    ) from None
  check_source(config)
  if controller.step is not None and config.reset_warmup_steps:
    raise OptionError(
      lambda n: (
        f"{n('reset_warmup_steps')} needs an epoch-level schedule; {config.schedule!r} changes the keep inside epochs: "
        f"set {n('reset_warmup_steps')} to 0"
      )
    )
  if controller.needs_validation and config.val_size < 1:
    raise OptionError(lambda n: f"schedule {config.schedule!r} needs a validation split: set {n('val_size')} > 0")
  if config.regimes > 1 and config.schedule == "dense":
    raise OptionError(
      lambda n: (
        f"{n('regimes')}={config.regimes} trains keeps from the controller's keep up to 1.0, and schedule "
        f"'dense' keeps 1.0: every pass would be dense. For a fixed smallest keep use {n('schedule')} 'constant' with "
        f"{n('keep')}"
      )
    )
  return controller


def _lr_schedule(config: Config, steps_per_epoch: int):
  """The run's learning-rate schedule (linear warm-up, then cosine decay over all steps); with
  ``config.lr_by_epoch`` held at each epoch's first step's value through the epoch."""
  total_steps = steps_per_epoch * config.epochs
  schedule = train_lib.lr_schedule(
    config.learning_rate, total_steps=total_steps, warmup_steps=min(config.warmup_epochs * steps_per_epoch, total_steps)
  )
  if config.lr_by_epoch:
    return lambda step: schedule(step // steps_per_epoch * steps_per_epoch)
  return schedule


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
  """(config, state, data) of the run in `workdir`: its saved config, newest checkpoint and dataset (normalise other
  data with its ``mean`` / ``std``). Raises FileNotFoundError when `workdir` has no config.json or no checkpoint."""
  workdir = Path(workdir)
  config_path = workdir / "config.json"
  if not config_path.exists():
    raise FileNotFoundError(f"{workdir} is not a run directory (no config.json)")
  config = Config.from_dict(json.loads(config_path.read_text()))
  mesh = mesh or parallel.make_mesh()
  ds = _load_data(config, progress=False)
  state = initial_state(config, data_lib.steps_per_epoch(len(ds.train.labels), config.batch_size), mesh)
  with checkpoint_lib.Checkpointer(workdir / "checkpoints") as ckpt:
    restored = ckpt.restore_latest(state)
  if restored is None:
    raise FileNotFoundError(f"{workdir / 'checkpoints'} holds no checkpoint")
  return config, restored.state, ds


def check_source(config: Config) -> tuple[Config, dict] | None:
  """(config, summary) of the run ``config.init_from`` names (None without one). Raises OptionError naming the
  field and the path when it is not a run directory, holds no finished run or trained another model or norm."""
  if config.init_from is None:
    return None
  source = Path(config.init_from)

  def fail(problem: str):
    raise OptionError(lambda n: f"{n('init_from')}: {source} {problem}")

  if not (source / "config.json").is_file():
    fail("is not a run directory (no config.json)")
  if not (source / "summary.json").is_file():
    fail("holds no finished run (no summary.json): finish it or choose another run")
  source_config = Config.from_dict(json.loads((source / "config.json").read_text()))
  theirs, ours = ((c.model, c.norm) for c in (source_config, config))
  if theirs != ours:
    fail(f"holds a {theirs[0]} model (norm {theirs[1]}), not this config's {ours[0]} ({ours[1]})")
  return source_config, json.loads((source / "summary.json").read_text())


def init_from(config: Config, state: train_lib.TrainState, mesh) -> tuple[train_lib.TrainState, dict]:
  """`state` with the final parameters and model state of the finished run in ``config.init_from`` (the optimiser,
  step and controller stay `state`'s), and their origin {"run", "step", "test_accuracy"}. Raises OptionError as
  `check_source`, or when the source has no checkpoint of its final step."""
  source_config, summary = check_source(config)
  source = Path(config.init_from)
  template = initial_state(source_config, 1, mesh)  # the source's own structure, so restoring never fails on it
  with checkpoint_lib.Checkpointer(source / "checkpoints") as ckpt:
    if summary["steps"] not in ckpt.all_steps():
      raise OptionError(lambda n: f"{n('init_from')}: {source} has no checkpoint of its final step {summary['steps']}")
    restored, _ = ckpt.restore(summary["steps"], template)
  origin = {"run": str(source.resolve()), "step": summary["steps"], "test_accuracy": summary["test_accuracy"]}
  return state.replace(params=restored.params, model_state=restored.model_state), origin


def _load_data(config: Config, *, progress: bool) -> data_lib.Dataset:
  bars = []  # the download's bar, made when a download starts

  def on_download(done: int, total: int):
    if not bars:
      bars.append(tqdm(total=total, unit="B", unit_scale=True, desc="download CIFAR-10", disable=not progress))
    bars[0].update(done - bars[0].n)

  try:
    kwargs = dict(val_size=config.val_size, train_size=config.train_size, seed=config.seed, progress=on_download)
    return data_lib.load(config.data, cache_dir=config.cache_dir, **kwargs)
  finally:
    for bar in bars:
      bar.close()


class _EpochSums:
  """Per-step metrics of one epoch summed in step order in float64: exact through a checkpoint's JSON meta, so an
  epoch resumed mid-way averages to the same bits as an uninterrupted one. The loss and accuracy of the epoch's
  first `head_steps` steps are also summed apart (`head_means`): what a reset's first dense steps cost. `cycle` is
  the controller's cycle when the epoch began (a step-level controller may reset inside it)."""

  def __init__(self, head_steps: int, meta: dict | None = None, *, cycle: int = 0):
    meta = meta or {}
    self.sums, self.count = dict(meta.get("partial_sums", {})), int(meta.get("partial_count", 0))
    self.head, self.head_steps = dict(meta.get("partial_head", {})), head_steps
    self.cycle = int(meta.get("partial_cycle", cycle))

  def add(self, metrics: dict) -> None:
    for k, v in metrics.items():
      self.sums[k] = self.sums.get(k, 0.0) + float(v)
      if self.count < self.head_steps and k in ("loss", "accuracy"):
        self.head[k] = self.head.get(k, 0.0) + float(v)
    self.count += 1

  def means(self) -> dict[str, float]:
    return {k: v / self.count for k, v in self.sums.items()}

  def head_means(self) -> dict[str, float]:
    return {k: v / min(self.count, self.head_steps) for k, v in self.head.items()}

  def meta(self, wall_time_s: float) -> dict:
    """A checkpoint's meta: these sums and the run's wall time (where the run stands is the state's own)."""
    return {
      "partial_sums": self.sums,
      "partial_count": self.count,
      "partial_head": self.head,
      "partial_cycle": self.cycle,
      "wall_time_s": wall_time_s,
    }


def _where(step: int, steps_per_epoch: int) -> str:
  epoch, in_epoch = divmod(step, steps_per_epoch)
  return f"epoch {epoch + 1}, step {in_epoch} of {steps_per_epoch}" if in_epoch else f"end of epoch {epoch}"


def _restore(ckpt: checkpoint_lib.Checkpointer, state, steps_per_epoch: int):
  """(state, meta) of the newest checkpoint that loads; the fresh state and an empty meta if none."""
  try:
    restored = ckpt.restore_latest(state)
  except RuntimeError as e:
    raise ConfigMismatchError(
      lambda n: (
        f"no checkpoint in {ckpt.directory} fits this config's model; pass {n('fresh')} to start over, or "
        f"choose another {n('workdir')}"
      )
    ) from e
  if restored is None:
    return state, {}
  _logger.info(
    f"resumed from {ckpt.path(restored.step)}: step {restored.step} ({_where(restored.step, steps_per_epoch)})"
  )
  return restored.state, restored.meta


def train_and_evaluate(
  config: Config,
  workdir: str | os.PathLike,
  *,
  fresh: bool = False,
  progress: bool = True,
  should_stop: Callable[[], bool] | None = None,
) -> dict:
  """Trains `config` in `workdir` and returns the summary (also workdir/summary.json: final dense test_accuracy,
  keep_curve, keep_macs, cycles, wall_time_s, provenance, ...). Epochs, resumes and fallbacks go to the "jaxsparse"
  logger.

  If `workdir` holds checkpoints of the same config the run resumes, mid-epoch if it stopped mid-epoch, and ends
  exactly as an uninterrupted run would; `fresh` deletes its previous outputs first. `progress` shows a tqdm bar.
  `should_stop` is polled after every step (e.g. a signal handler's flag): True checkpoints the current step and
  raises `Interrupted`, as Ctrl-C does; its message names the checkpoint to resume from.

  Raises ConfigMismatchError (`workdir` holds another config's run), WorkdirError (it cannot be written),
  FloatingPointError (a non-finite training loss), OptionError, ValueError or data.DataError (bad options or data).
  """
  primary = parallel.is_primary()
  log = _logger.info if primary else (lambda _: None)
  user_stop = should_stop or (lambda: False)
  should_stop = (lambda: parallel.any_process(user_stop())) if jax.process_count() > 1 else user_stop
  workdir = Path(workdir)
  controller = check_config(config)  # validates the schedule and its options before any work
  workdir_lib.prepare_workdir(config, workdir, fresh=fresh, write=primary)
  origin = provenance.provenance()  # where this process runs, taken at its start (the tree may change meanwhile)
  if primary:  # one line per (re)start: where each part ran
    started = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "process_count": jax.process_count()}
    workdir_lib.append_line(workdir / "provenance.jsonl", json.dumps({**started, **origin}))
  parallel.sync("jaxsparse:workdir")  # the run directory is ready (and, with fresh, emptied) for every process
  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.batch_size, mesh)
  ds = _load_data(config, progress=progress and primary)
  steps_per_epoch = data_lib.steps_per_epoch(len(ds.train.labels), config.batch_size)
  total_steps = steps_per_epoch * config.epochs
  state = initial_state(config, steps_per_epoch, mesh, controller)
  with workdir_lib.writing(workdir / "checkpoints"):
    ckpt = checkpoint_lib.Checkpointer(
      workdir / "checkpoints", keep_latest=config.keep_checkpoints, keep_cycles=config.keep_cycles
    )
  with ckpt, workdir_lib.writing(f"the run directory {workdir}"):
    run = _Run(config, workdir, ds, mesh, steps_per_epoch, ckpt, primary, controller)
    state, meta = _restore(ckpt, state, steps_per_epoch)
    source = None
    if config.init_from is not None:
      fresh_state, source = init_from(config, state, mesh)
      if int(state.step) == 0:  # else resumed from this run's own checkpoint
        state = fresh_state
        log(f"initialised from {source['run']} (step {source['step']}, test accuracy {source['test_accuracy']:.4f})")
    history = workdir_lib.read_history(run.metrics_path, int(state.step) // steps_per_epoch, write=primary)
    t_start = time.time()
    wall = lambda: float(meta.get("wall_time_s", 0.0)) + time.time() - t_start  # noqa: E731
    bar = tqdm(
      total=total_steps, initial=int(state.step), disable=not (progress and primary), unit="step", desc="train"
    )
    new_sums = functools.partial(_EpochSums, max(1, steps_per_epoch // 10))  # the first tenth of an epoch apart
    sums = new_sums(meta, cycle=int(state.controller.cycle))
    try:
      if should_stop():
        raise Interrupted()
      while int(state.step) < total_steps:
        t_epoch = time.time()
        epoch = int(state.step) // steps_per_epoch
        state, stopped = _train_epoch(run, state, epoch, sums, history, should_stop=should_stop, bar=bar)
        if stopped and int(state.step) < (epoch + 1) * steps_per_epoch:  # else finish the epoch, then stop
          run.save(state, sums.meta(wall()))
          raise Interrupted()
        state, record = _end_epoch(run, state, epoch, sums, t_epoch=t_epoch, wall=wall)
        history.append(record)
        sums = new_sums(cycle=int(state.controller.cycle))
        if stopped or should_stop():
          raise Interrupted()
    except KeyboardInterrupt:
      raise _interrupted(ckpt, steps_per_epoch) from None
    finally:
      bar.close()
    summary = _finish(run, state, history, origin, source)
  log(report.format_summary(summary))
  return summary


class _Run:
  """What the parts of one run share: its config, data, mesh, compiled steps and checkpoints."""

  def __init__(self, config: Config, workdir: Path, ds, mesh, steps_per_epoch: int, ckpt, primary: bool, controller):
    self.config, self.workdir, self.ds, self.mesh, self.ckpt = config, workdir, ds, mesh, ckpt
    self.steps_per_epoch, self.primary, self.metrics_path = steps_per_epoch, primary, workdir / "metrics.jsonl"
    rep, bat = parallel.replicated(mesh), parallel.batch_sharded(mesh)
    step = functools.partial(
      train_lib.train_step,
      regimes=config.regimes,
      distill=config.distill,
      reset_warmup=config.reset_warmup_steps,
      controller_step=controller.step,
    )

    def train_fn(state, batch, reset_step):  # the keep is the controller's, read on the device at every step
      keep = state.controller.keep
      state, metrics = step(state, batch, keep, reset_step)
      return state, {**metrics, "keep": keep}

    self.train_fn = jax.jit(train_fn, in_shardings=(rep, bat, rep), out_shardings=(rep, rep), donate_argnums=0)
    self.eval_fn = evaluate_lib.make_eval_fn(mesh)
    self.update_fn = jax.jit(controller.update)
    self.lr_at = _lr_schedule(config, steps_per_epoch)

  def evaluate(self, state, split, keep: float) -> dict:
    ds = self.ds
    batch_size = 2 * self.config.batch_size
    return evaluate_lib.evaluate(
      self.eval_fn, state, split, keep=keep, batch_size=batch_size, mean=ds.mean, std=ds.std, mesh=self.mesh
    )

  def save(self, state, meta: dict, cycle_end: int | None = None) -> None:
    self.ckpt.save(int(state.step), state, meta=meta, cycle_end=cycle_end)


def _cycle_start(history: list[dict], cycle: int, epoch: int, steps_per_epoch: int) -> int:
  """The step at which keep-ratio cycle `cycle` began (its first epoch's first step; `epoch` if none is recorded
  yet); far in the past for the first cycle, which no reset began."""
  if cycle == 0:
    return -(2**30)
  return steps_per_epoch * next((r["epoch"] - 1 for r in history if r["cycle"] == cycle), epoch)


def _is_alive(state) -> bool:
  return not any(leaf.is_deleted() for leaf in jax.tree.leaves(state) if isinstance(leaf, jax.Array))


def _train_epoch(run: _Run, state, epoch: int, sums: _EpochSums, history: list[dict], *, should_stop, bar):
  """Trains the rest of `epoch` from the state's step at the controller's keep (a step-level controller changes it
  from step to step), adding each step's metrics to `sums`; returns (state, stopped).

  The metrics of step t are read after step t+1 is dispatched (no pipeline stall). Stops early, with every
  finished step counted in `sums`, when `should_stop()` or on a KeyboardInterrupt; if the interrupt hit where the
  state and `sums` disagree (e.g. inside the donated step call), raises a bare `Interrupted` instead.
  """
  rep = parallel.replicated(run.mesh)
  reset_step = jax.device_put(
    jnp.int32(_cycle_start(history, int(state.controller.cycle), epoch, run.steps_per_epoch)), rep
  )
  first_step = epoch * run.steps_per_epoch
  batches = data_lib.train_batches(
    run.ds.train,
    run.config.batch_size,
    mean=run.ds.mean,
    std=run.ds.std,
    seed=run.config.seed,
    epoch=epoch,
    start_step=int(state.step) - first_step,
    augment=run.config.augment,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  check = lambda m, step: sums.add(_check_finite(jax.device_get(m), step, epoch, run.ckpt))  # noqa: E731
  pending, stopped = None, False
  try:
    for batch in parallel.prefetch_to_mesh(batches, run.mesh):
      state, metrics = run.train_fn(state, batch, reset_step)
      if pending is not None:
        check(pending, int(state.step) - 1)
      pending = metrics
      bar.update(1)
      if should_stop():
        stopped = True
        break
  except KeyboardInterrupt:
    stopped = True
    if not (_is_alive(state) and sums.count + (pending is not None) == int(state.step) - first_step):
      raise Interrupted() from None
  if pending is not None:
    check(pending, int(state.step))
  return state, stopped


def _interrupted(ckpt: checkpoint_lib.Checkpointer, steps_per_epoch: int) -> Interrupted:
  """The Interrupted error naming the newest checkpoint and how to resume."""
  steps = ckpt.all_steps()
  if not steps:
    return Interrupted("interrupted before the first checkpoint; run the same command again to start over")
  step = steps[-1]
  return Interrupted(
    f"interrupted; checkpoint {ckpt.path(step)} holds step {step} ({_where(step, steps_per_epoch)}); run the same "
    f"command again (or train_and_evaluate with the same config and workdir) to resume",
    checkpoint=ckpt.path(step),
    step=step,
  )


def _end_epoch(run: _Run, state, epoch: int, sums: _EpochSums, *, t_epoch: float, wall):
  """Evaluates the finished epoch, lets the controller pick the next keep, then records, saves and logs the epoch;
  returns (state, the epoch's record)."""
  config = run.config
  cycle, train, head = sums.cycle, sums.means(), sums.head_means()
  t_eval = time.time()
  val = run.evaluate(state, run.ds.val, 1.0) if run.ds.val is not None else None
  tested = (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs
  test = run.evaluate(state, run.ds.test, 1.0) if tested else None
  eval_time = time.time() - t_eval
  metrics = controllers_lib.EpochMetrics(
    train_accuracy=jnp.float32(train["accuracy"]),
    train_loss=jnp.float32(train["loss"]),
    val_accuracy=jnp.float32(val["accuracy"] if val else math.nan),
  )
  state = state.replace(controller=run.update_fn(state.controller, metrics))
  cycle_end = cycle if int(state.controller.cycle) > cycle else None
  record = {
    "epoch": epoch + 1,
    "step": int(state.step),
    "keep": train["keep"],  # the mean over the epoch's steps: its one keep, unless a step-level controller moved it
    "cycle": cycle,
    "reset_after": cycle_end is not None,
    "resets": int(state.controller.cycle) - cycle,
    "next_keep": float(state.controller.keep),
    "lr": float(run.lr_at(int(state.step) - 1)),
    "train_loss": train["loss"],
    "train_accuracy": train["accuracy"],
    "first_steps": sums.head_steps,  # the epoch's first tenth: right after a reset, the shock
    "first_steps_loss": head["loss"],
    "first_steps_accuracy": head["accuracy"],
    **({"train_dense_accuracy": train["dense_accuracy"]} if "dense_accuracy" in train else {}),
    "val_accuracy": val["accuracy"] if val else None,
    "test_accuracy": test["accuracy"] if test else None,
    "test_loss": test["loss"] if test else None,
    "density": {k[len("density/") :]: v for k, v in train.items() if k.startswith("density/")},
    "epoch_time_s": time.time() - t_epoch,
    "eval_time_s": eval_time,
    "wall_time_s": wall(),
  }
  if run.primary:
    workdir_lib.append_line(run.metrics_path, json.dumps(record))
  run.save(state, _EpochSums(0).meta(record["wall_time_s"]), cycle_end=cycle_end)
  if run.primary:
    _logger.info(_epoch_line(record, config.epochs))
  return state, record


def _epoch_line(record: dict, epochs: int) -> str:
  """The log line of one epoch's record."""
  return (
    f"epoch {record['epoch']:3d}/{epochs} keep {record['keep']:.3f} cycle {record['cycle']:2d} "
    f"loss {record['train_loss']:.4f} train {record['train_accuracy']:.4f} "
    + (f"val {record['val_accuracy']:.4f} " if record["val_accuracy"] is not None else "")
    + (f"test {record['test_accuracy']:.4f} " if record["test_accuracy"] is not None else "")
    + f"({record['epoch_time_s']:.1f}s)"
    + (" | reset" if record["reset_after"] else "")
  )


def _finish(run: _Run, state, history: list[dict], origin: dict, source: dict | None) -> dict:
  """The keep curve of the final state, then summary.json and the plots; returns the summary."""
  variables = {"params": state.params, **state.model_state}
  keep_macs, dense_macs = evaluate_lib.keep_curve(
    lambda k: run.evaluate(state, run.ds.test, k), build_model(run.config), variables, run.config.eval_keeps
  )
  keep_curve_acc = {k: v["accuracy"] for k, v in keep_macs.items()}
  summary = report.summarize(
    history,
    keep_curve=keep_curve_acc,
    device=f"{jax.device_count()} x {jax.devices()[0].device_kind} ({jax.devices()[0].platform})",
    data_source=run.ds.source,
    config=run.config.to_dict(),
    keep_macs=keep_macs,
    dense_macs=dense_macs,
  )
  conv = resolve_conv(run.config.conv)  # what "auto" meant on this backend
  conv = "per layer (xla or wgrad_matmul by shape)" if conv == "auto" else conv
  summary["conv"] = run.config.conv if run.config.conv != "auto" else f"auto -> {conv}"
  summary["passes_per_step"] = run.config.regimes  # forward/backward passes of the model per train step
  summary["provenance"] = origin
  if source is not None:
    summary["init_from"] = source  # the run fine-tuned, its step and its dense test accuracy
  summary["process_count"] = jax.process_count()
  if run.primary:
    workdir_lib.atomic_write(run.workdir / "summary.json", json.dumps(summary, indent=2))
    plots.plot_run(history, keep_curve_acc, run.workdir / "plots")
  run.ckpt.wait()
  return summary


def _check_finite(metrics: dict, step: int, epoch: int, ckpt: checkpoint_lib.Checkpointer) -> dict:
  if not np.isfinite(metrics["loss"]):
    steps = ckpt.all_steps()
    where = f"the last good checkpoint is {ckpt.path(steps[-1])} (step {steps[-1]})" if steps else "no checkpoint yet"
    raise FloatingPointError(
      f"non-finite training loss ({metrics['loss']}) at step {step} (epoch {epoch + 1}); stopping. {where}; "
      "start over with a lower learning rate, or check the data"
    )
  return metrics
