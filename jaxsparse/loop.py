"""train_and_evaluate(config, workdir): one run, owned by a `Trainer`; the only reader of a whole Config.

Side effects live here (files, logs, checkpoints, device transfers, signals); the steps and controllers it drives
are pure. Run directory: config.json  metrics.jsonl  summary.json  provenance.jsonl  checkpoints/  plots/*.png

Interruptions lose nothing. Checkpoints are keyed by the global optimizer step: every epoch end is saved, and a
stop request (`should_stop`, or SIGINT / SIGTERM while the run trains) saves the current step with the partial
epoch's metric sums in its meta, so the resumed run continues mid-epoch and ends bitwise identical to an
uninterrupted one. With several processes (after `jax.distributed.initialize()`) every process trains on its slice
of each batch, checkpoints with the others and combines its stop flag with theirs after every step; process 0
alone writes the run's files and logs.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import signal
import sys
import threading
import time
import types
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
from jaxsparse.config import Config
from jaxsparse.errors import OptionError
from jaxsparse.models import WideResNet, resolve_conv
from jaxsparse.models.wrn import MODELS
from jaxsparse.workdir import ConfigMismatchError, RunDir, WorkdirError, writing  # noqa: F401  (re-exported)


class Interrupted(KeyboardInterrupt):
  """The run stopped on request (`should_stop`, SIGINT, SIGTERM); its message says what was saved and how to
  resume. `checkpoint` is the directory to resume from (None if none was saved yet), `step` its optimizer step,
  `signum` the signal that asked (None: `should_stop`)."""

  def __init__(self, message: str, *, checkpoint: str | None = None, step: int = 0, signum: int | None = None):
    super().__init__(message)
    self.checkpoint, self.step, self.signum = checkpoint, step, signum


def build_model(config: Config) -> WideResNet:
  depth, widen = MODELS[config.model]
  c = config
  return WideResNet(
    depth, widen, num_classes=10, norm=c.norm, dropout=c.dropout, dtype=jnp.dtype(c.dtype), gradient=c.topk_gradient,
    score=c.topk_score, conv=c.conv, relative=c.topk_keep == "relative", shortcut=c.shortcut, norm_eps=c.norm_eps,
    norm_bias=c.norm_bias, zero_init_residual=c.zero_init_residual, padding=c.padding, rounding=c.topk_round,
  )  # fmt: skip


def build_controller(config: Config) -> controllers_lib.Controller:
  return controllers_lib.get(config.schedule, **config.controller_options)


def check_config(config: Config) -> controllers_lib.Controller:
  """Checks what a Config cannot check alone (the controller and its options, the retention, the run to start
  from); returns the controller. Raises OptionError naming the option and the fix."""
  controller = build_controller(config)
  try:
    checkpoint_lib.cycle_retention(config.keep_cycles)
  except ValueError:
    raise OptionError(f"{{keep_cycles}} must be {checkpoint_lib.RETENTION}, got {config.keep_cycles!r}") from None
  check_source(config)
  if controller.step is not None and config.reset_warmup_steps:
    raise OptionError(
      f"{{reset_warmup_steps}} needs an epoch-level schedule; {config.schedule!r} changes the keep inside epochs: "
      "set {reset_warmup_steps} to 0"
    )
  if controller.needs_validation and config.val_size < 1:
    raise OptionError(f"schedule {config.schedule!r} needs a validation split: set {{val_size}} > 0")
  if config.regimes > 1 and config.schedule == "dense":
    raise OptionError(
      f"{{regimes}}={config.regimes} trains keeps from the controller's keep up to 1.0, and schedule 'dense' keeps "
      "1.0: every pass would be dense. For a fixed smallest keep use {schedule} 'constant' with "
      "{controller_options.keep}"
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
    raise OptionError(f"{{init_from}}: {source} {problem}")

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
      raise OptionError(f"{{init_from}}: {source} has no checkpoint of its final step {summary['steps']}")
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
  epoch resumed mid-way averages to the same bits as an uninterrupted one. Every `every` steps the loss and
  accuracy since the last window are averaged into `windows` (flax's log_every_steps; the reset-shock measurement
  in `report.reset_shocks` reads them). `cycle` is the controller's cycle when the epoch began."""

  def __init__(self, every: int, meta: dict | None = None, *, cycle: int = 0):
    meta = meta or {}
    self.every, self.cycle = every, int(meta.get("cycle", cycle))
    self.sums, self.count = dict(meta.get("sums", {})), int(meta.get("count", 0))
    self.windows, self.window = list(meta.get("windows", [])), dict(meta.get("window", {}))

  def add(self, metrics: dict) -> None:
    for k, v in metrics.items():
      self.sums[k] = self.sums.get(k, 0.0) + float(v)
    for k in ("loss", "accuracy"):
      self.window[k] = self.window.get(k, 0.0) + float(metrics[k])
    self.count += 1
    if self.count % self.every == 0:
      self.close_window()

  def close_window(self) -> None:
    if self.window:
      n = self.count - self.every * len(self.windows)
      self.windows.append({k: v / n for k, v in self.window.items()})
      self.window = {}

  def means(self) -> dict[str, float]:
    return {k: v / self.count for k, v in self.sums.items()}

  def meta(self, wall_time_s: float) -> dict:
    """A checkpoint's meta: these sums and the run's wall time (where the run stands is the state's own)."""
    keys = ("cycle", "sums", "count", "windows", "window")
    return {**{k: getattr(self, k) for k in keys}, "wall_time_s": wall_time_s}


def _where(step: int, steps_per_epoch: int) -> str:
  epoch, in_epoch = divmod(step, steps_per_epoch)
  return f"epoch {epoch + 1}, step {in_epoch} of {steps_per_epoch}" if in_epoch else f"end of epoch {epoch}"


@contextlib.contextmanager
def _signals_ask_to_stop():
  """While inside: SIGINT and SIGTERM set `.signum` of the yielded object (the run stops after its current step);
  a second signal raises KeyboardInterrupt at once. Outside the main thread signals are left alone."""
  asked = types.SimpleNamespace(signum=None)

  def handle(signum, frame):
    del frame
    if asked.signum is not None:
      abort = KeyboardInterrupt(f"{signal.Signals(signum).name} again")
      abort.signum = signum
      raise abort
    asked.signum = signum
    name = signal.Signals(signum).name
    print(f"\n{name}: saving a checkpoint after the current step (send it again to abort at once)", file=sys.stderr)

  main = threading.current_thread() is threading.main_thread()
  previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
  try:
    yield asked
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)


class Trainer:
  """One run of `config` in the run directory `workdir`: its train state (model, optimiser, controller, reset
  step), data, compiled steps, checkpoints, epoch sums and history. Construction does the setup (checks, run
  directory, data, state restored from the newest checkpoint or `config.init_from`); `run()` trains to the end and
  returns the summary. The arguments are `train_and_evaluate`'s, which adds stopping on SIGINT and SIGTERM."""

  def __init__(self, config: Config, workdir, *, fresh: bool = False, progress: bool = True, should_stop=None):
    self.config, self.progress, self.user_stop = config, progress, should_stop or (lambda: False)
    controller = check_config(config)  # validates the schedule and its options before any work
    self.dir = RunDir(workdir, primary=parallel.is_primary())
    self.dir.prepare(config, fresh=fresh)
    self.origin = provenance.provenance()  # where this process runs, taken at its start (the tree may change)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    self.dir.append("provenance.jsonl", {"started": started, "process_count": jax.process_count(), **self.origin})
    parallel.sync("jaxsparse:workdir")  # the run directory is ready (and, with fresh, emptied) for every process
    self.mesh = mesh = parallel.make_mesh()
    parallel.check_batch_size(config.batch_size, mesh)
    self.ds = _load_data(config, progress=progress and self.dir.primary)
    self.steps_per_epoch = spe = data_lib.steps_per_epoch(len(self.ds.train.labels), config.batch_size)
    self.total_steps = spe * config.epochs
    state = initial_state(config, spe, mesh, controller)
    checkpoints = self.dir.path / "checkpoints"
    with writing(checkpoints):
      self.ckpt = checkpoint_lib.Checkpointer(
        checkpoints, keep_latest=config.keep_checkpoints, keep_cycles=config.keep_cycles
      )
    try:
      self.state, meta = self._restore(state)
      self.source = None
      if config.init_from is not None:
        source_state, self.source = init_from(config, self.state, mesh)
        if self.step == 0:  # else resumed from this run's own checkpoint
          self.state = source_state
          s = self.source
          self.dir.log(f"initialised from {s['run']} (step {s['step']}, test accuracy {s['test_accuracy']:.4f})")
      self.history = self.dir.read_history(self.step // spe)
      self.every = config.log_every_steps or max(1, spe // 10)
      self.sums = _EpochSums(self.every, meta, cycle=int(self.state.controller.cycle))
      self._wall = (time.time(), float(meta.get("wall_time_s", 0.0)))
      self._compile(controller)
    except BaseException:  # the checkpointer's threads end with the failed setup
      self.ckpt.close()
      raise

  def _compile(self, controller) -> None:
    rep, bat = parallel.replicated(self.mesh), parallel.batch_sharded(self.mesh)
    c = self.config
    step = functools.partial(
      train_lib.train_step, regimes=c.regimes, distill=c.distill, reset_warmup=c.reset_warmup_steps,
      controller_step=controller.step,
    )  # fmt: skip

    def train_fn(state, batch):  # the keep is the controller's, read on the device at every step
      state_after, metrics = step(state, batch, state.controller.keep)
      return state_after, {**metrics, "keep": state.controller.keep}

    def end_fn(state, metrics):  # the controller's epoch-end decision
      return state.with_controller(controller.update(state.controller, metrics))

    self.train_fn = jax.jit(train_fn, in_shardings=(rep, bat), out_shardings=(rep, rep), donate_argnums=0)
    self.end_fn = jax.jit(end_fn, out_shardings=rep, donate_argnums=0)
    self.eval_fn = evaluate_lib.make_eval_fn(self.mesh)
    self.lr_at = _lr_schedule(c, self.steps_per_epoch)

  @property
  def step(self) -> int:
    return int(self.state.step)

  def wall(self) -> float:
    """Seconds this run has trained, over all its (re)starts."""
    return self._wall[1] + time.time() - self._wall[0]

  def __enter__(self) -> "Trainer":
    return self

  def __exit__(self, *exc_info) -> None:
    self.ckpt.close()

  def run(self) -> dict:
    """Trains the remaining epochs, then writes the keep curve, summary.json and plots; returns the summary.

    `should_stop` (combined over processes) is polled at the start, after every step and after every epoch end;
    True saves the current step and raises `Interrupted`, the one way out of a run before its end.
    """
    spe = self.steps_per_epoch
    with writing(f"the run directory {self.dir.path}"):
      stop = (lambda: parallel.any_process(self.user_stop())) if jax.process_count() > 1 else self.user_stop
      show = self.progress and self.dir.primary
      with tqdm(total=self.total_steps, initial=self.step, disable=not show, unit="step", desc="train") as bar:
        stopped = stop()
        while not stopped and self.step < self.total_steps:
          t_epoch = time.time()
          stopped = self._train_epoch(stop, bar)
          if self.step % spe == 0:  # the epoch is complete (also when the stop came at its last step)
            self._end_epoch(t_epoch)
            stopped = stopped or (self.step < self.total_steps and stop())
      if stopped:
        if self.step % spe:
          self.ckpt.save(self.step, self.state, meta=self.sums.meta(self.wall()))
        raise self._interrupted()
      summary = self._finish()
    self.dir.log(report.format_summary(summary))
    return summary

  def _restore(self, state):
    """(state, meta) of the newest checkpoint that loads; `state` and an empty meta if none."""
    try:
      restored = self.ckpt.restore_latest(state)
    except RuntimeError as e:
      raise ConfigMismatchError(
        f"no checkpoint in {self.ckpt.directory} fits this config's model; pass {{fresh}} to start over, or "
        "choose another {workdir}"
      ) from e
    if restored is None:
      return state, {}
    where = _where(restored.step, self.steps_per_epoch)
    self.dir.log(f"resumed from {self.ckpt.path(restored.step)}: step {restored.step} ({where})")
    return restored.state, restored.meta

  def _train_epoch(self, stop, bar) -> bool:
    """Trains the rest of the current epoch at the controller's keep, adding each step's metrics to the sums;
    returns whether `stop()` asked to stop (then every finished step is counted). The metrics of step t are read
    after step t+1 is dispatched (no pipeline stall)."""
    c, ds = self.config, self.ds
    epoch, start = divmod(self.step, self.steps_per_epoch)
    batches = data_lib.train_batches(
      ds.train, c.batch_size, mean=ds.mean, std=ds.std, seed=c.seed, epoch=epoch, start_step=start,
      augment=c.augment, process_index=jax.process_index(), process_count=jax.process_count(),
    )  # fmt: skip
    pending, stopped = None, False
    for batch in parallel.prefetch_to_mesh(batches, self.mesh):
      self.state, metrics = self.train_fn(self.state, batch)
      if pending is not None:
        self._add(pending, self.step - 1)
      pending = metrics
      bar.update(1)
      if stop():
        stopped = True
        break
    if pending is not None:
      self._add(pending, self.step)
    return stopped

  def _add(self, metrics, step: int) -> None:
    metrics = jax.device_get(metrics)
    if not np.isfinite(metrics["loss"]):
      steps = self.ckpt.all_steps()
      where = (
        f"the last good checkpoint is {self.ckpt.path(steps[-1])} (step {steps[-1]})" if steps else "no checkpoint yet"
      )
      raise FloatingPointError(
        f"non-finite training loss ({metrics['loss']}) at step {step} (epoch {(step - 1) // self.steps_per_epoch + 1}); "
        f"stopping. {where}; start over with a lower learning rate, or check the data"
      )
    self.sums.add(metrics)

  def _evaluate(self, split, keep: float) -> dict:
    ds, batch_size = self.ds, 2 * self.config.batch_size
    return evaluate_lib.evaluate(
      self.eval_fn, self.state, split, keep=keep, batch_size=batch_size, mean=ds.mean, std=ds.std, mesh=self.mesh
    )

  def _end_epoch(self, t_epoch: float) -> None:
    """Evaluates the finished epoch, lets the controller decide the next keep, then records, saves and logs it."""
    c, ds, sums = self.config, self.ds, self.sums
    epoch = self.step // self.steps_per_epoch
    sums.close_window()
    train, t_eval = sums.means(), time.time()
    val = self._evaluate(ds.val, 1.0) if ds.val is not None else None
    test = self._evaluate(ds.test, 1.0) if epoch % c.eval_every == 0 or epoch == c.epochs else None
    eval_time = time.time() - t_eval
    metrics = controllers_lib.EpochMetrics(
      train_accuracy=jnp.float32(train["accuracy"]),
      train_loss=jnp.float32(train["loss"]),
      val_accuracy=jnp.float32(val["accuracy"] if val else math.nan),
    )
    self.state = self.end_fn(self.state, metrics)
    cycle = int(self.state.controller.cycle)
    record = {
      "epoch": epoch,
      "step": self.step,
      "keep": train["keep"],  # the mean over the epoch's steps: its one keep, unless a step-level controller moved it
      "cycle": sums.cycle,
      "reset_after": cycle > sums.cycle,
      "resets": cycle - sums.cycle,
      "next_keep": float(self.state.controller.keep),
      "lr": float(self.lr_at(self.step - 1)),
      "train_loss": train["loss"],
      "train_accuracy": train["accuracy"],
      "train_windows": {"every": sums.every, **{k: [w[k] for w in sums.windows] for k in ("loss", "accuracy")}},
      **({"train_dense_accuracy": train["dense_accuracy"]} if "dense_accuracy" in train else {}),
      "val_accuracy": val["accuracy"] if val else None,
      "test_accuracy": test["accuracy"] if test else None,
      "test_loss": test["loss"] if test else None,
      "density": {k[len("density/") :]: v for k, v in train.items() if k.startswith("density/")},
      "epoch_time_s": time.time() - t_epoch,
      "eval_time_s": eval_time,
      "wall_time_s": self.wall(),
    }
    self.dir.append("metrics.jsonl", record)
    self.history.append(record)
    self.sums = _EpochSums(self.every, cycle=cycle)
    cycle_end = sums.cycle if record["reset_after"] else None
    self.ckpt.save(self.step, self.state, meta=self.sums.meta(record["wall_time_s"]), cycle_end=cycle_end)
    self.dir.log(_epoch_line(record, c.epochs))

  def _interrupted(self) -> Interrupted:
    """The Interrupted error naming the newest checkpoint and how to resume."""
    steps = self.ckpt.all_steps()
    if not steps:
      message = "interrupted before the first checkpoint; run the same command again to start over"
      return Interrupted(message)
    step, path = steps[-1], self.ckpt.path(steps[-1])
    return Interrupted(
      f"interrupted; checkpoint {path} holds step {step} ({_where(step, self.steps_per_epoch)}); run the same "
      f"command again (or train_and_evaluate with the same config and workdir) to resume",
      checkpoint=path,
      step=step,
    )

  def _finish(self) -> dict:
    """The keep curve of the final state, then summary.json and the plots; returns the summary."""
    c, state = self.config, self.state
    variables = {"params": state.params, **state.model_state}
    evaluate_at = lambda k: self._evaluate(self.ds.test, k)  # noqa: E731
    keep_macs, dense_macs = evaluate_lib.keep_curve(evaluate_at, build_model(c), variables, c.eval_keeps)
    keep_curve = {k: v["accuracy"] for k, v in keep_macs.items()}
    conv = resolve_conv(c.conv)  # what "auto" meant on this backend
    conv = "per layer (xla or wgrad_matmul by shape)" if conv == "auto" else conv
    device = jax.devices()[0]
    summary = report.summarize(
      self.history,
      keep_curve=keep_curve,
      device=f"{jax.device_count()} x {device.device_kind} ({device.platform})",
      data_source=self.ds.source,
      config=c.to_dict(),
      keep_macs=keep_macs,
      dense_macs=dense_macs,
      conv=c.conv if c.conv != "auto" else f"auto -> {conv}",
      passes_per_step=c.regimes,  # forward/backward passes of the model per train step
      provenance=self.origin,
      **({"init_from": self.source} if self.source else {}),  # the run fine-tuned, its step and test accuracy
      process_count=jax.process_count(),
    )
    self.dir.write("summary.json", json.dumps(summary, indent=2))
    if self.dir.primary:
      plots.plot_run(self.history, keep_curve, self.dir.path / "plots")
    self.ckpt.wait()
    return summary


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
  `should_stop` is polled after every step, as SIGINT and SIGTERM are (from the start of the call, in the main
  thread): True checkpoints the current step and raises `Interrupted`, whose message names the checkpoint to
  resume from; a second signal raises KeyboardInterrupt at once.

  Raises ConfigMismatchError (`workdir` holds another config's run), WorkdirError (it cannot be written),
  FloatingPointError (a non-finite training loss), OptionError, ValueError or data.DataError (bad options or data).
  """
  user_stop = should_stop or (lambda: False)
  with _signals_ask_to_stop() as asked:
    stop = lambda: user_stop() or asked.signum is not None  # noqa: E731
    try:
      with Trainer(config, workdir, fresh=fresh, progress=progress, should_stop=stop) as trainer:
        return trainer.run()
    except Interrupted as e:
      e.signum = asked.signum
      raise


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
