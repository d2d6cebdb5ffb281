"""Orbax checkpoints for runs whose keep ratio is cycled and reset.

Checkpoints are keyed by an increasing step and hold ``state`` (a pytree of arrays) and ``meta`` (a JSON dict).
Retention keeps the newest ``keep_latest`` plus the cycle ends (saved with ``cycle_end=c``, a mark in the step's
Orbax custom metadata) that ``keep_cycles`` selects. An interrupted save never becomes a checkpoint (Orbax commits
by renaming), and ``restore_latest`` falls back past checkpoints that fail to load.
"""

import contextlib
import dataclasses
import itertools
import json
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocp_managers

PyTree = Any

_logger = logging.getLogger(__name__)
_CYCLE_KEY = "cycle_end"
RETENTION = "'all', 'none', 'last:N' or 'every:K' with N, K >= 1"


class Restored(NamedTuple):
  """What `Checkpointer.restore_latest` returns: the state (placed like the template), its meta, its step, and
  ``(step, reason)`` for each newer checkpoint that failed to load, newest first."""

  state: PyTree
  meta: dict[str, Any]
  step: int
  skipped: tuple[tuple[int, str], ...]


def cycle_retention(spec: str) -> Callable[[Mapping[int, int]], set[int]]:
  """The cycle-end checkpoints kept for good, as a function {step: cycle} -> steps kept, from `spec`: "all", "none",
  "last:N" (the N newest cycles) or "every:K" (cycles K, 2K, ... counted from 1); ValueError naming keep_cycles."""
  kind, _, number = str(spec).partition(":")
  if (kind, number) in (("all", ""), ("none", "")):
    return (lambda cycle_of: set(cycle_of)) if kind == "all" else (lambda cycle_of: set())
  if kind in ("last", "every") and number.isdigit() and int(number) >= 1:
    n = int(number)
    if kind == "every":
      return lambda cycle_of: {step for step, cycle in cycle_of.items() if (cycle + 1) % n == 0}
    return lambda cycle_of: set(sorted(cycle_of, key=cycle_of.get)[-n:])
  raise ValueError(f"keep_cycles must be {RETENTION}, got {spec!r}")


@dataclasses.dataclass
class _KeepSteps:
  """Orbax preservation policy: keep the cycle-end checkpoints (``cycle_of``: step -> cycle) that `select` picks."""

  cycle_of: Mapping[int, int]
  select: Callable[[Mapping[int, int]], set[int]]

  def should_preserve(self, checkpoints, *, context) -> list[bool]:
    kept = self.select(self.cycle_of)
    return [info.step in kept for info in checkpoints]


class Checkpointer:
  """Step-keyed checkpoints in `directory` (created, made absolute): the newest `keep_latest` (>= 1; 2 leave a
  fallback) plus the cycle ends `keep_cycles` selects (`cycle_retention`); with `async_save` a background thread
  writes. Skips and fallbacks go to the "jaxsparse.checkpoint" logger."""

  def __init__(self, directory, *, keep_latest: int = 2, keep_cycles: str = "all", async_save: bool = True):
    if keep_latest < 1:
      raise ValueError(f"keep_latest must be >= 1, got {keep_latest}")
    path = os.fspath(directory)
    self._cycle_of: dict[int, int] = {}  # step -> cycle whose end it marks
    keep = _KeepSteps(self._cycle_of, cycle_retention(keep_cycles))
    policy = ocp_managers.AnyPreservationPolicy([ocp_managers.LatestN(n=keep_latest), keep])
    options = ocp.CheckpointManagerOptions(
      preservation_policy=policy, enable_async_checkpointing=async_save, create=True, cleanup_tmp_directories=True
    )
    # Naming the item handlers lets Orbax read step metadata without warning about unknown items.
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    self._manager = ocp.CheckpointManager(
      path if "://" in path else os.path.abspath(path), options=options, item_handlers=handlers
    )
    for step in self._manager.all_steps():
      with contextlib.suppress(Exception):  # unreadable: `restore_latest` reports it if it matters
        if (cycle := (self._manager.metadata(step).custom_metadata or {}).get(_CYCLE_KEY)) is not None:
          self._cycle_of[step] = int(cycle)

  @property
  def directory(self) -> str:
    return os.fspath(self._manager.directory)  # absolute

  def save(self, step: int, state: PyTree, *, meta: Mapping[str, Any], cycle_end: int | None = None) -> bool:
    """Saves `state` and the JSON dict `meta` as checkpoint `step`, kept for good if it ends cycle `cycle_end`; the
    arrays are on the host when it returns (donate at will). False (logged) if `step` is not the newest."""
    json.dumps(meta)  # fails here, not later in Orbax's background thread
    latest = self._manager.latest_step()
    if latest is not None and step <= latest:
      _logger.warning(f"checkpoint for step {step} not saved: step {latest} is already saved")
      return False
    if cycle_end is not None:
      self._cycle_of[step] = int(cycle_end)  # before saving: pruning runs when the write commits
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta)))
    saved = self._manager.save(
      step, args=args, custom_metadata={} if cycle_end is None else {_CYCLE_KEY: int(cycle_end)}
    )
    if not saved:
      self._cycle_of.pop(step, None)
    return saved

  def restore(self, step: int, template: PyTree) -> tuple[PyTree, dict[str, Any]]:
    """(state, meta) of checkpoint `step`, raising if it cannot be read. `template` (concrete arrays or
    `jax.ShapeDtypeStruct`s with shardings) gives the structure, dtypes and where each array is placed."""
    self._manager.wait_until_finished()
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    args = ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
    restored = self._manager.restore(step, args=args)
    if restored.meta is None:
      raise ValueError(f"checkpoint of step {step} has no meta item")
    return restored.state, restored.meta

  def restore_latest(self, template: PyTree) -> Restored | None:
    """The newest checkpoint that loads (`restore`), or None when there is none. Newer ones that fail are logged and
    renamed ``<step>.corrupt`` (by process 0); if none loads, RuntimeError (the template does not match)."""
    self._manager.wait_until_finished()
    self._manager.reload()
    skipped = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        state, meta = self.restore(step, template)
      except Exception as e:  # pylint: disable=broad-except  (any reader error makes it unusable)
        skipped.append((step, f"{type(e).__name__}: {e}"[:400]))
        continue
      if skipped:
        reasons = "; ".join(f"{self.path(s)}: {reason}" for s, reason in skipped)
        _logger.warning(
          f"resuming from the older checkpoint {self.path(step)}: newer checkpoint(s) failed to load and were "
          f"moved aside as <step>.corrupt (their steps will be redone): {reasons}"
        )
        self._quarantine([s for s, _ in skipped])
      return Restored(state, meta, step, tuple(skipped))
    if skipped:
      raise RuntimeError(f"no checkpoint in {self.directory} could be restored (template mismatch?): {skipped}")

  def cycle_checkpoints(self) -> dict[int, int]:
    """``{cycle: step}`` of the kept cycle-end checkpoints (waits for saves)."""
    present = set(self.all_steps())
    return {cycle: step for step, cycle in sorted(self._cycle_of.items()) if step in present}

  def all_steps(self) -> list[int]:
    """The steps of all committed checkpoints, ascending (waits for saves)."""
    self._manager.wait_until_finished()
    return sorted(self._manager.all_steps())

  def path(self, step: int) -> str:
    """The directory of checkpoint `step` (whether or not it exists)."""
    return os.path.join(self.directory, str(step))

  def wait(self) -> None:
    """Blocks until pending saves and deletions are done; raises a background save's error."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()  # waits for pending saves

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def _quarantine(self, steps) -> None:
    for step in steps:
      self._cycle_of.pop(step, None)
      names = (f"{step}.corrupt{n or ''}" for n in itertools.count())
      target = next(t for t in (self._manager.directory / name for name in names) if not t.exists())
      if jax.process_index() == 0:
        (self._manager.directory / str(step)).rename(target)
    self._manager.reload()
