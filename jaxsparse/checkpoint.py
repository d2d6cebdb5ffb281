"""Orbax checkpoints for runs whose keep ratio is cycled and reset.

Each checkpoint is keyed by an increasing int ``step`` (the loop uses the global optimizer step, so
epoch-end and mid-epoch checkpoints share one order) and holds two items: ``state`` (any pytree of
jax arrays, e.g. a flax TrainState) and ``meta`` (a small JSON dict: the loop keeps the metric sums of a
partial epoch there; where the run stands is the state's own step). Retention keeps the newest ``keep_latest``
checkpoints plus, for good, every checkpoint saved with ``cycle_end=c``. That mark is
written into the step's Orbax custom metadata, so the keep-forever set is rebuilt whenever a
directory is reopened (Orbax preservation policies hold no state across restarts).

``restore_latest`` never hands back a checkpoint that fails to load: it walks back from the newest
one, reports every one it skipped and why, and moves the skipped ones aside (``<step>.corrupt``) so
the loop can save those steps again. Interrupted saves never become checkpoints: Orbax writes into
``<step>.orbax-checkpoint-tmp`` and renames on commit; such leftovers are ignored and deleted.
"""

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocp_managers

PyTree = Any
Log = Callable[[str], None]

_logger = logging.getLogger(__name__)
_CYCLE_KEY = "cycle_end"
_QUARANTINE_SUFFIX = ".corrupt"
_MAX_REASON_CHARS = 400


class Restored(NamedTuple):
  """What `Checkpointer.restore_latest` returns.

  Attributes:
    state: the restored pytree, same structure and types as the template, placed with its shardings.
    meta: the JSON dict saved with it (tuples come back as lists, dict keys as strings).
    step: the key of the checkpoint that was restored.
    skipped: ``(step, reason)`` for each newer checkpoint that failed to load, newest first.
  """

  state: PyTree
  meta: dict[str, Any]
  step: int
  skipped: tuple[tuple[int, str], ...]


def cycle_retention(spec: str, *, name: str = "keep_cycles") -> Callable[[Mapping[int, int]], set[int]]:
  """The cycle-end checkpoints to keep for good, as a function {step: cycle} -> steps kept.

  `spec` is "all", "none", "last:N" (the N newest cycles) or "every:K" (cycles K, 2K, 3K, ... counted from 1);
  a bad one is a ValueError naming `name`.
  """
  kind, _, number = str(spec).partition(":")
  if (kind, number) in (("all", ""), ("none", "")):
    return (lambda cycle_of: set(cycle_of)) if kind == "all" else (lambda cycle_of: set())
  if kind in ("last", "every") and number.isdigit() and int(number) >= 1:
    n = int(number)
    if kind == "every":
      return lambda cycle_of: {step for step, cycle in cycle_of.items() if (cycle + 1) % n == 0}
    return lambda cycle_of: set(sorted(cycle_of, key=cycle_of.get)[-n:])
  raise ValueError(f"{name} must be 'all', 'none', 'last:N' or 'every:K' with N, K >= 1, got {spec!r}")


@dataclasses.dataclass
class _KeepSteps:
  """Orbax preservation policy: keep the cycle-end checkpoints (``cycle_of``: step -> cycle) that `select` picks."""

  cycle_of: Mapping[int, int]
  select: Callable[[Mapping[int, int]], set[int]]

  def should_preserve(self, checkpoints, *, context) -> list[bool]:
    del context
    kept = self.select(self.cycle_of)
    return [info.step in kept for info in checkpoints]


def _absolute(directory: str | os.PathLike[str]) -> str:
  # Orbax accepts a relative directory but its background writer then fails with
  # "Checkpoint path should be absolute", so resolve local paths up front.
  path = os.fspath(directory)
  return path if "://" in path else os.path.abspath(path)


def _abstract(tree: PyTree) -> PyTree:
  """A restore target: `jax.ShapeDtypeStruct`s (with shardings) of a concrete or abstract state."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpointer:
  """Step-keyed checkpoints: the latest few plus one kept forever per reset cycle.

  Example::

    with Checkpointer(workdir / "checkpoints") as ckpt:
      start = 0
      restored = ckpt.restore_latest(state)          # None on a fresh run
      if restored is not None:
        state, start = restored.state, restored.meta["epoch"] + 1
      for epoch in range(start, num_epochs):
        state = train_one_epoch(state)
        ckpt.save(int(state.step), state, meta={"epoch": epoch},
                  cycle_end=cycle if reset_next else None)

  Single host only for the quarantine of unloadable checkpoints (done by process 0, no barrier).
  """

  def __init__(
    self,
    directory: str | os.PathLike[str],
    *,
    keep_latest: int = 2,
    keep_cycles: str = "all",
    async_save: bool = True,
    log: Log | None = None,
  ):
    """Opens (creating if needed) a checkpoint directory.

    Args:
      directory: where the numbered checkpoint folders live; made absolute.
      keep_latest: how many of the newest checkpoints to keep besides the cycle ends. 2 leaves a
        fallback if the newest one turns out to be unreadable.
      keep_cycles: which cycle-end checkpoints to keep for good (`cycle_retention`): "all", "none",
        "last:N" or "every:K". A cycle end it drops is deleted once it is not among the newest `keep_latest`.
      async_save: write in a background thread; `save` returns once arrays are copied to host.
      log: receives one line per notable event (skips, fallbacks, quarantines); defaults to this
        module's `logging` logger.

    Example::

      ckpt = Checkpointer("/tmp/run/checkpoints", keep_latest=2, log=print)
    """
    if keep_latest < 1:
      raise ValueError(f"keep_latest must be >= 1, got {keep_latest}")
    self._log = log
    self._cycle_of: dict[int, int] = {}  # step -> cycle whose end it marks
    keep = _KeepSteps(self._cycle_of, cycle_retention(keep_cycles))
    policy = ocp_managers.AnyPreservationPolicy([ocp_managers.LatestN(n=keep_latest), keep])
    options = ocp.CheckpointManagerOptions(
      preservation_policy=policy, enable_async_checkpointing=async_save, create=True, cleanup_tmp_directories=True
    )
    # Naming the item handlers lets Orbax read step metadata without warning about unknown items.
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    self._manager = ocp.CheckpointManager(_absolute(directory), options=options, item_handlers=handlers)
    self._cycle_of.update(self._read_cycle_marks(self._manager.all_steps()))

  @property
  def directory(self) -> str:
    """The absolute checkpoint directory."""
    return os.fspath(self._manager.directory)

  def save(self, step: int, state: PyTree, *, meta: Mapping[str, Any], cycle_end: int | None = None) -> bool:
    """Saves the state as checkpoint `step` (asynchronously unless `async_save=False`).

    The arrays are copied to host before this returns, so the caller may donate or delete the
    state's buffers right away. Older checkpoints beyond the retention are deleted once the write
    commits.

    Args:
      step: the checkpoint key (e.g. the global optimizer step); must be greater than every step
        already saved.
      state: pytree of jax arrays (params, optimizer state, controller state, step, PRNG key...).
      meta: JSON-serialisable dict (epoch, data position, cycle, config hash...); checked here.
      cycle_end: ``c`` if this checkpoint ends keep-ratio cycle ``c``: it is kept for good.

    Returns:
      True if written; False (and a log line) if `step` is not newer than the latest checkpoint.

    Example::

      ckpt.save(360, state, meta={"epoch": 9, "cycle": 0}, cycle_end=0)
    """
    json.dumps(meta)  # fail here, not later in Orbax's background thread
    latest = self._manager.latest_step()
    if latest is not None and step <= latest:
      self._warn(f"checkpoint for step {step} not saved: step {latest} is already saved")
      return False
    custom = {}
    if cycle_end is not None:
      self._cycle_of[step] = int(cycle_end)  # before saving: pruning runs when the write commits
      custom = {_CYCLE_KEY: int(cycle_end)}
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta)))
    saved = self._manager.save(step, args=args, custom_metadata=custom)
    if not saved:
      self._cycle_of.pop(step, None)
    return saved

  def restore(self, step: int, abstract_state: PyTree) -> tuple[PyTree, dict[str, Any]]:
    """Restores checkpoint `step` exactly as saved, raising if it cannot be read.

    Args:
      step: which checkpoint.
      abstract_state: a template with the saved structure: concrete arrays or
        `jax.ShapeDtypeStruct`s with shardings, e.g.
        ``jax.tree.map(ocp.utils.to_shape_dtype_struct, state)``. NamedTuples, flax dataclasses
        and dtypes are taken from it, and each array is placed with its leaf's sharding.

    Returns:
      ``(state, meta)``.

    Example::

      state, meta = ckpt.restore(360, abstract_state)
    """
    self._manager.wait_until_finished()
    return self._restore(step, _abstract(abstract_state))

  def _restore(self, step: int, target: PyTree) -> tuple[PyTree, dict[str, Any]]:
    restored = self._manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
    )
    if restored.meta is None:
      raise ValueError(f"checkpoint of step {step} has no meta item")
    return restored.state, restored.meta

  def restore_latest(self, abstract_state: PyTree) -> Restored | None:
    """Restores the newest checkpoint that loads, falling back to older ones.

    Checkpoints newer than the restored one failed to load; they are logged, returned in
    `Restored.skipped` and renamed ``<step>.corrupt`` so that those steps can be saved again.
    If no checkpoint loads, nothing is renamed and `RuntimeError` is raised: that usually means
    the template does not match, not that every file is damaged.

    Args:
      abstract_state: template of the saved state (see `restore`).

    Returns:
      a `Restored`, or None when the directory holds no committed checkpoint.

    Example::

      restored = ckpt.restore_latest(state)
      start_step = 0 if restored is None else restored.step
    """
    self._manager.wait_until_finished()
    self._manager.reload()
    target = _abstract(abstract_state)
    skipped = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        state, meta = self._restore(step, target)
      except Exception as e:  # pylint: disable=broad-except
        # Any reader error (missing/truncated file, bad JSON, checksum) makes it unusable.
        reason = f"{type(e).__name__}: {e}"[:_MAX_REASON_CHARS]
        self._warn(f"checkpoint {self.path(step)} failed to load, skipped: {reason}")
        skipped.append((step, reason))
        continue
      if skipped:
        self._quarantine([s for s, _ in skipped])
        self._warn(
          f"fell back to checkpoint {self.path(step)}: newer checkpoint(s) at step(s) "
          f"{[s for s, _ in skipped]} could not be read and were moved aside"
        )
      return Restored(state, meta, step, tuple(skipped))
    if skipped:
      raise RuntimeError(f"no checkpoint in {self.directory} could be restored (template mismatch?): {skipped}")
    return None

  def cycle_checkpoints(self) -> dict[int, int]:
    """Returns ``{cycle: step}`` of the preserved cycle-end checkpoints (waits for saves).

    Example::

      ckpt.cycle_checkpoints()  # {0: 120, 1: 280}
    """
    self._manager.wait_until_finished()
    present = set(self._manager.all_steps())
    return {cycle: step for step, cycle in sorted(self._cycle_of.items()) if step in present}

  def all_steps(self) -> list[int]:
    """Returns the steps of all committed checkpoints, ascending (waits for saves).

    Example::

      ckpt.all_steps()  # [120, 280, 360, 400]
    """
    self._manager.wait_until_finished()
    return sorted(self._manager.all_steps())

  def path(self, step: int) -> str:
    """The directory of checkpoint `step` (whether or not it exists).

    Example::

      ckpt.path(360)  # '/abs/run/checkpoints/360'
    """
    return os.path.join(self.directory, str(step))

  def wait(self) -> None:
    """Blocks until pending saves and deletions are done; raises a background save's error."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves, then releases Orbax's resources."""
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def _read_cycle_marks(self, steps: Sequence[int]) -> dict[int, int]:
    cycle_of = {}
    for step in steps:
      try:
        custom = self._manager.metadata(step).custom_metadata or {}
      except Exception as e:  # pylint: disable=broad-except
        self._warn(f"cannot read metadata of step {step}, not kept as a cycle end: {e}")
        continue
      if custom.get(_CYCLE_KEY) is not None:
        cycle_of[step] = int(custom[_CYCLE_KEY])
    return cycle_of

  def _quarantine(self, steps: Sequence[int]) -> None:
    for step in steps:
      self._cycle_of.pop(step, None)
      source = self._manager.directory / str(step)
      target = self._manager.directory / f"{step}{_QUARANTINE_SUFFIX}"
      n = 1
      while target.exists():
        n += 1
        target = self._manager.directory / f"{step}{_QUARANTINE_SUFFIX}{n}"
      if jax.process_index() == 0:
        source.rename(target)
      self._warn(f"moved unloadable checkpoint {source} to {target}")
    self._manager.reload()

  def _warn(self, message: str) -> None:
    if self._log is not None:
      self._log(message)
    else:
      _logger.warning(message)
