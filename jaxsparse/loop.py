"""train_and_evaluate(config, workdir): one run, owned by a `Trainer`; the only reader of a whole Config. Side
effects live here (files, logs, checkpoints, signals); the steps and controllers it drives are pure. Run directory:
config.json metrics.jsonl summary.json provenance.jsonl checkpoints/ plots/*.png. With several processes (after
`jax.distributed.initialize()`) each trains its slice of every batch; process 0 alone writes files and logs."""

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
from jaxsparse import controllers, parallel, plots, provenance, report
from jaxsparse import data as data_lib
from jaxsparse import evaluate as evaluate_lib
from jaxsparse import train as train_lib
from jaxsparse.config import Config
from jaxsparse.errors import OptionError
from jaxsparse.models import WideResNet, resolve_conv
from jaxsparse.models.wrn import MODELS
from jaxsparse.workdir import ConfigMismatchError, RunDir, WorkdirError, finished, writing  # noqa: F401  (re-exported)


class Interrupted(KeyboardInterrupt):
  """The run stopped on request; the message says what was saved and how to resume. `checkpoint`: the directory
  to resume from (None before the first), `step`: its step, `signum`: the signal that asked (None: `should_stop`)."""

  def __init__(self, message: str, *, checkpoint: str | None = None, step: int = 0, signum: int | None = None):
    super().__init__(message)
    self.checkpoint, self.step, self.signum = checkpoint, step, signum


def build_model(config: Config) -> WideResNet:
  c = config
  return WideResNet(
    *MODELS[c.model], num_classes=10, norm=c.norm, dropout=c.dropout, dtype=jnp.dtype(c.dtype),
    gradient=c.topk_gradient, score=c.topk_score, conv=c.conv, relative=c.topk_keep == "relative",
    shortcut=c.shortcut, norm_eps=c.norm_eps, norm_bias=c.norm_bias, zero_init_residual=c.zero_init_residual,
    padding=c.padding, rounding=c.topk_round,
  )  # fmt: skip


def check_config(config: Config) -> controllers.Controller:
  """Checks what a Config cannot check alone (the controller and its options, the retention, the run to start
  from); returns the controller. Raises OptionError naming the option and the fix."""
  controller = controllers.get(config.schedule, **config.controller_options)
  try:
    checkpoint_lib.cycle_retention(config.keep_cycles)
  except ValueError:
    raise OptionError(f"{{keep_cycles}} must be {checkpoint_lib.RETENTION}, got {config.keep_cycles!r}") from None
  _source(config)
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
  """Linear warm-up, then cosine decay over all steps; with ``lr_by_epoch`` held at each epoch's first step's."""
  total = steps_per_epoch * config.epochs
  warmup = min(config.warmup_epochs * steps_per_epoch, total)
  schedule = train_lib.lr_schedule(config.learning_rate, total_steps=total, warmup_steps=warmup)
  return (lambda step: schedule(step // steps_per_epoch * steps_per_epoch)) if config.lr_by_epoch else schedule


def initial_state(config: Config, steps_per_epoch: int, mesh, controller=None) -> train_lib.TrainState:
  """The run's state before its first step (model, optimizer and controller from `config`), replicated."""
  controller = controller or controllers.get(config.schedule, **config.controller_options)
  c, lr = config, _lr_schedule(config, steps_per_epoch)
  tx = train_lib.make_optimizer(lr, momentum=c.momentum, nesterov=c.nesterov, weight_decay=c.weight_decay)
  create = functools.partial(train_lib.create_train_state, model=build_model(config), tx=tx, controller=controller)
  return jax.jit(create, out_shardings=parallel.replicated(mesh))(jax.random.PRNGKey(config.seed))


def load_trained(workdir: str | os.PathLike, *, mesh=None) -> tuple[Config, train_lib.TrainState, data_lib.Dataset]:
  """(config, state, data) of the run in `workdir`: its saved config, newest checkpoint and dataset (normalise other
  data with its ``mean`` / ``std``). Raises FileNotFoundError when `workdir` has no config.json or no checkpoint."""
  workdir = Path(workdir)
  if not (workdir / "config.json").exists():
    raise FileNotFoundError(f"{workdir} is not a run directory (no config.json)")
  config = Config.from_dict(json.loads((workdir / "config.json").read_text()))
  ds, mesh = _load_data(config, progress=False), mesh or parallel.make_mesh()
  spe = data_lib.steps_per_epoch(len(ds.train.labels), config.batch_size)
  with checkpoint_lib.Checkpointer(workdir / "checkpoints") as ckpt:
    restored = ckpt.restore_latest(initial_state(config, spe, mesh))
  if restored is None:
    raise FileNotFoundError(f"{workdir / 'checkpoints'} holds no checkpoint")
  return config, restored.state, ds


def _source(config: Config) -> tuple[Config, dict] | None:
  """(config, summary) of the finished run ``config.init_from`` names (None without one). Raises OptionError when it
  is not a finished run (`workdir.finished`) or trained another model or norm."""
  if config.init_from is None:
    return None
  try:
    theirs, summary = finished(config.init_from)
  except FileNotFoundError as e:
    raise OptionError(f"{{init_from}}: {e}; choose a finished run") from None
  if (theirs.model, theirs.norm) != (config.model, config.norm):
    raise OptionError(
      f"{{init_from}}: {config.init_from} holds a {theirs.model} model (norm {theirs.norm}), not this config's "
      f"{config.model} ({config.norm})"
    )
  return theirs, summary


def init_from(config: Config, state: train_lib.TrainState, mesh) -> tuple[train_lib.TrainState, dict]:
  """`state` with the final parameters and model state of the finished run in ``config.init_from`` (the optimiser,
  step and controller stay `state`'s), and their origin {"run", "step", "test_accuracy"}. Raises OptionError as
  `check_config`."""
  source_config, summary = _source(config)
  source, step = Path(config.init_from), summary["steps"]
  with checkpoint_lib.Checkpointer(source / "checkpoints") as ckpt:
    restored, _ = ckpt.restore(step, initial_state(source_config, 1, mesh))  # the source's own structure
  origin = {"run": str(source.resolve()), "step": step, "test_accuracy": summary["test_accuracy"]}
  return state.replace(params=restored.params, model_state=restored.model_state), origin


def _load_data(config: Config, *, progress: bool) -> data_lib.Dataset:
  with contextlib.ExitStack() as stack:
    bars = []  # the download's bar, made when a download starts

    def on_download(done: int, total: int):
      if not bars:
        bars.append(stack.enter_context(tqdm(total=total, unit="B", unit_scale=True, desc="download CIFAR-10")))
      bars[0].update(done - bars[0].n)

    c, on_download = config, on_download if progress else None
    return data_lib.load(
      c.data, cache_dir=c.cache_dir, val_size=c.val_size, train_size=c.train_size, seed=c.seed, progress=on_download
    )


class _EpochSums:
  """One epoch's per-step metrics summed in step order in float64 (exact through a checkpoint's JSON meta, so a
  mid-epoch resume averages to the same bits), with the sums marked every `every` steps: `windows()` averages loss
  and accuracy between marks (flax's log_every_steps; `report.reset_shocks` reads them). `cycle`: the controller's
  cycle when the epoch began."""

  def __init__(self, every: int, meta: dict | None = None, *, cycle: int = 0):
    meta = meta or {}
    self.every, self.cycle, self.count = every, int(meta.get("cycle", cycle)), int(meta.get("count", 0))
    self.sums, self.marks = dict(meta.get("sums", {})), list(meta.get("marks", [[0, 0.0, 0.0]]))

  def add(self, metrics: dict) -> None:
    for k, v in metrics.items():
      self.sums[k] = self.sums.get(k, 0.0) + float(v)
    self.count += 1
    if self.count % self.every == 0:
      self.mark()

  def mark(self) -> None:
    if self.count > self.marks[-1][0]:
      self.marks.append([self.count, self.sums["loss"], self.sums["accuracy"]])

  def windows(self) -> dict:
    pairs = list(zip(self.marks, self.marks[1:]))
    mean = lambda i: [(b[i] - a[i]) / (b[0] - a[0]) for a, b in pairs]
    return {"every": self.every, "loss": mean(1), "accuracy": mean(2)}

  def means(self) -> dict[str, float]:
    return {k: v / self.count for k, v in self.sums.items()}

  def meta(self, wall_time_s: float) -> dict:
    """A checkpoint's meta: these sums and the run's wall time (where the run stands is the state's own)."""
    return {k: getattr(self, k) for k in ("cycle", "sums", "count", "marks")} | {"wall_time_s": wall_time_s}


def _where(step: int, steps_per_epoch: int) -> str:
  epoch, in_epoch = divmod(step, steps_per_epoch)
  return f"epoch {epoch + 1}, step {in_epoch} of {steps_per_epoch}" if in_epoch else f"end of epoch {epoch}"


@contextlib.contextmanager
def _signals_ask_to_stop():
  """While inside: SIGINT and SIGTERM set `.signum` of the yielded object (the run stops after its current step);
  a second signal raises KeyboardInterrupt at once. Outside the main thread signals are left alone."""
  asked = types.SimpleNamespace(signum=None)

  def handle(signum, frame):
    name = signal.Signals(signum).name
    if asked.signum is not None:
      abort = KeyboardInterrupt(f"{name} again")
      abort.signum = signum
      raise abort
    asked.signum = signum
    print(f"\n{name}: saving a checkpoint after the current step (send it again to abort at once)", file=sys.stderr)

  main = threading.current_thread() is threading.main_thread()
  previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
  try:
    yield asked
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)


class Trainer:
  """One run of `config` in `workdir`: train state, data, compiled steps, checkpoints, epoch sums and history.
  Construction sets up (checks, run directory, data, the state restored or `config.init_from`'s); `run()` trains to
  the end. The arguments are `train_and_evaluate`'s, which adds stopping on SIGINT and SIGTERM."""

  def __init__(self, config: Config, workdir, *, fresh: bool = False, progress: bool = True, should_stop=None):
    self.config, self.progress, self.user_stop = config, progress, should_stop or (lambda: False)
    controller = check_config(config)  # validates the schedule and its options before any work
    self.dir = RunDir(workdir, primary=parallel.is_primary())
    self.dir.prepare(config, fresh=fresh)
    self.origin = provenance.provenance()  # where this process runs, taken at its start (the tree may change)
    started = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "process_count": jax.process_count()}
    self.dir.append("provenance.jsonl", started | self.origin)
    parallel.sync("jaxsparse:workdir")  # the run directory is ready (and, with fresh, emptied) for every process
    self.mesh = parallel.make_mesh()
    parallel.check_batch_size(config.batch_size, self.mesh)
    self.ds = _load_data(config, progress=progress and self.dir.primary)
    self.steps_per_epoch = spe = data_lib.steps_per_epoch(len(self.ds.train.labels), config.batch_size)
    self.total_steps, self.every = spe * config.epochs, config.log_every_steps or max(1, spe // 10)
    state = initial_state(config, spe, self.mesh, controller)
    with writing(self.dir.path / "checkpoints"):
      self.ckpt = checkpoint_lib.Checkpointer(
        self.dir.path / "checkpoints", keep_latest=config.keep_checkpoints, keep_cycles=config.keep_cycles
      )
    try:
      self.state, meta = self._restore(state)
      self.source = None
      if config.init_from is not None:
        source_state, self.source = init_from(config, self.state, self.mesh)
        if self.step == 0:  # else resumed from this run's own checkpoint
          self.state, s = source_state, self.source
          self.dir.log(f"initialised from {s['run']} (step {s['step']}, test accuracy {s['test_accuracy']:.4f})")
      self.history = self.dir.read_history(self.step // spe)
      self.sums = _EpochSums(self.every, meta, cycle=int(self.state.controller.cycle))
      self._t0 = time.time() - float(meta.get("wall_time_s", 0.0))
      self._compile(controller)
    except BaseException:  # the checkpointer's threads end with the failed setup
      self.ckpt.close()
      raise

  def _compile(self, controller) -> None:
    rep, bat, c = parallel.replicated(self.mesh), parallel.batch_sharded(self.mesh), self.config
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
    return time.time() - self._t0

  def __enter__(self) -> "Trainer":
    return self

  def __exit__(self, *exc_info) -> None:
    self.ckpt.close()

  def run(self) -> dict:
    """Trains the remaining epochs, then writes the keep curve, summary.json and plots; returns the summary.
    `should_stop` (any process's) is polled at the start, after every step and epoch end: True saves the current
    step and raises `Interrupted`, the one way out of a run before its end."""
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
    self.dir.log(
      f"resumed from {self.ckpt.path(restored.step)}: step {restored.step} ({_where(restored.step, self.steps_per_epoch)})"
    )
    return restored.state, restored.meta

  def _train_epoch(self, stop, bar) -> bool:
    """Trains the rest of the epoch, summing each step's metrics (read after the next step is dispatched: no
    stall); returns whether `stop()` asked to stop."""
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
      pending, stopped = metrics, stop()
      bar.update(1)
      if stopped:
        break
    if pending is not None:
      self._add(pending, self.step)
    return stopped

  def _add(self, metrics, step: int) -> None:
    metrics = jax.device_get(metrics)
    if not np.isfinite(metrics["loss"]):
      steps = self.ckpt.all_steps()
      last = f"the last good checkpoint is {self.ckpt.path(steps[-1])}" if steps else "no checkpoint yet"
      raise FloatingPointError(
        f"non-finite training loss ({metrics['loss']}) at step {step} ({_where(step, self.steps_per_epoch)}); "
        f"stopping. {last}; start over with a lower learning rate, or check the data"
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
    sums.mark()
    train, t_eval = sums.means(), time.time()
    val = self._evaluate(ds.val, 1.0) if ds.val is not None else None
    test = self._evaluate(ds.test, 1.0) if epoch % c.eval_every == 0 or epoch == c.epochs else None
    eval_time = time.time() - t_eval
    metrics = controllers.EpochMetrics(
      jnp.float32(train["accuracy"]), jnp.float32(train["loss"]), jnp.float32(val["accuracy"] if val else math.nan)
    )
    self.state = self.end_fn(self.state, metrics)
    cycle = int(self.state.controller.cycle)
    record = {
      "epoch": epoch, "step": self.step,
      "cycle": sums.cycle, "reset_after": cycle > sums.cycle, "resets": cycle - sums.cycle,
      "keep": train["keep"],  # the mean over the epoch's steps: its one keep, unless a step-level controller moved it
      "next_keep": float(self.state.controller.keep), "lr": float(self.lr_at(self.step - 1)),
      "train_loss": train["loss"], "train_accuracy": train["accuracy"], "train_windows": sums.windows(),
      **({"train_dense_accuracy": train["dense_accuracy"]} if "dense_accuracy" in train else {}),
      "val_accuracy": val["accuracy"] if val else None,
      "test_accuracy": test["accuracy"] if test else None, "test_loss": test["loss"] if test else None,
      "density": {k[len("density/") :]: v for k, v in train.items() if k.startswith("density/")},
      "epoch_time_s": time.time() - t_epoch, "eval_time_s": eval_time, "wall_time_s": self.wall(),
    }  # fmt: skip
    self.dir.append("metrics.jsonl", record)
    self.history.append(record)
    self.sums = _EpochSums(self.every, cycle=cycle)
    cycle_end = sums.cycle if record["reset_after"] else None
    self.ckpt.save(self.step, self.state, meta=self.sums.meta(record["wall_time_s"]), cycle_end=cycle_end)
    self.dir.log(_epoch_line(record, c.epochs))

  def _interrupted(self) -> Interrupted:
    """The Interrupted error naming the newest checkpoint and how to resume."""
    if not (steps := self.ckpt.all_steps()):
      return Interrupted("interrupted before the first checkpoint; run the same command again to start over")
    step, path = steps[-1], self.ckpt.path(steps[-1])
    resume = "run the same command again (or train_and_evaluate with the same config and workdir) to resume"
    where = f"checkpoint {path} holds step {step} ({_where(step, self.steps_per_epoch)})"
    return Interrupted(f"interrupted; {where}; {resume}", checkpoint=path, step=step)

  def _finish(self) -> dict:
    """The keep curve of the final state, then summary.json and the plots; returns the summary."""
    c, state, device = self.config, self.state, jax.devices()[0]
    variables = {"params": state.params, **state.model_state}
    evaluate_at = lambda k: self._evaluate(self.ds.test, k)
    keep_macs, dense_macs = evaluate_lib.keep_curve(evaluate_at, build_model(c), variables, c.eval_keeps)
    keep_curve = {k: v["accuracy"] for k, v in keep_macs.items()}
    auto = {"auto": "per layer (xla or wgrad_matmul by shape)"}.get(a := resolve_conv("auto"), a)
    summary = report.summarize(
      self.history, keep_curve=keep_curve, keep_macs=keep_macs, dense_macs=dense_macs, config=c.to_dict(),
      device=f"{jax.device_count()} x {device.device_kind} ({device.platform})", data_source=self.ds.source,
      conv=f"auto -> {auto}" if c.conv == "auto" else c.conv, passes_per_step=c.regimes, provenance=self.origin,
      process_count=jax.process_count(),
      **({"init_from": self.source} if self.source else {}),  # the run fine-tuned, its step and test accuracy
    )  # fmt: skip
    self.dir.write("summary.json", json.dumps(summary, indent=2))
    if self.dir.primary:
      plots.plot_run(self.history, keep_curve, self.dir.path / "plots")
    self.ckpt.wait()
    return summary


def train_and_evaluate(
  config: Config, workdir: str | os.PathLike, *, fresh: bool = False, progress: bool = True,
  should_stop: Callable[[], bool] | None = None,
) -> dict:  # fmt: skip
  """Trains `config` in `workdir`; returns the summary (also summary.json). Epochs, resumes and fallbacks go to the
  "jaxsparse" logger; `progress` shows a tqdm bar. A `workdir` holding checkpoints of the same config resumes, mid-epoch
  if it stopped there, bitwise as if never stopped; `fresh` deletes its previous outputs first. `should_stop` is polled
  after every step, as SIGINT and SIGTERM are (main thread): True checkpoints the step and raises `Interrupted`; a
  second signal raises KeyboardInterrupt. Raises ConfigMismatchError (`workdir` holds another config's run),
  WorkdirError (unwritable), FloatingPointError (non-finite loss), OptionError or data.DataError (bad options, data).
  """
  user_stop = should_stop or (lambda: False)
  with _signals_ask_to_stop() as asked:
    try:
      with Trainer(
        config, workdir, fresh=fresh, progress=progress, should_stop=lambda: user_stop() or asked.signum is not None
      ) as trainer:
        return trainer.run()
    except Interrupted as e:
      e.signum = asked.signum
      raise


def _epoch_line(record: dict, epochs: int) -> str:
  """The log line of one epoch's record."""
  r, optional = record, lambda key, label: f"{label} {r[key]:.4f} " if r[key] is not None else ""
  return (
    f"epoch {r['epoch']:3d}/{epochs} keep {r['keep']:.3f} cycle {r['cycle']:2d} loss {r['train_loss']:.4f} "
    f"train {r['train_accuracy']:.4f} {optional('val_accuracy', 'val')}{optional('test_accuracy', 'test')}"
    f"({r['epoch_time_s']:.1f}s)" + (" | reset" if r["reset_after"] else "")
  )
