"""The run directory's files: its config.json guard and the small atomic/append writes the loop makes.

Layout (written by jaxsparse.loop): workdir/config.json  metrics.jsonl  summary.json  provenance.jsonl  checkpoints/
plots/*.png
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable

from jaxsparse.config import Config


class ConfigMismatchError(ValueError):
  """The run directory holds a run made with a different config."""


class WorkdirError(OSError):
  """The run directory cannot be written (permissions, full disk); what was saved before is intact."""


def prepare_workdir(config: Config, workdir: Path, *, fresh: bool, write: bool = True) -> None:
  """Creates `workdir`, or checks that the run already there was made with the same config.

  A directory whose run never saved a checkpoint (e.g. it stopped on bad input) has nothing to lose: its
  config.json is replaced, so a corrected command is not refused. With `write=False` (the other processes of a
  multi-process run) nothing is created, deleted or written: only the check runs, and not at all when `fresh`.

  Raises:
    ConfigMismatchError: an existing run used another config (nothing is overwritten).
  """
  saved = workdir / "config.json"
  if fresh and not write:
    return
  if fresh and workdir.exists():
    for name in ("checkpoints", "plots"):
      shutil.rmtree(workdir / name, ignore_errors=True)
    for name in ("config.json", "metrics.jsonl", "summary.json", "provenance.jsonl"):
      (workdir / name).unlink(missing_ok=True)
  if saved.exists():
    try:
      old = json.loads(saved.read_text())
    except json.JSONDecodeError as e:
      raise ConfigMismatchError(
        f"{saved} is unreadable ({e}); pass fresh=True to start the run over, or choose another workdir"
      ) from e
    new = json.loads(config.to_json())
    # A field the saved config predates had its default's behaviour then.
    defaults = json.loads(type(config)().to_json())
    old = {**{k: defaults[k] for k in new if k not in old and k in defaults}, **old}
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if diff and not has_checkpoints(workdir / "checkpoints"):
      if write:
        atomic_write(saved, config.to_json())
    elif diff:
      details = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff)
      raise ConfigMismatchError(
        f"{workdir} holds a run with a different config ({details}); pass fresh=True to start it over, or "
        f"choose another workdir"
      )
    return
  if write:
    workdir.mkdir(parents=True, exist_ok=True)
    atomic_write(saved, config.to_json())


@contextlib.contextmanager
def writing(what: object):
  """Turns an OSError while writing `what` (read-only directory, full disk) into a WorkdirError with the fix."""
  try:
    yield
  except WorkdirError:
    raise
  except OSError as e:
    raise WorkdirError(
      f"cannot write {what}: {e.strerror or e}; free disk space or choose a writable workdir "
      f"(checkpoints saved before are intact; run the same command again to resume)"
    ) from e


def has_checkpoints(directory: Path) -> bool:
  return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def atomic_write(path: Path, text: str) -> None:
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


def append_line(path: Path, text: str) -> None:
  with path.open("a") as f:
    f.write(text + "\n")


def read_history(path: Path, upto_epoch: int, log: Callable[[str], None], *, write: bool = True) -> list[dict]:
  """Epoch records already written, dropping any beyond the restored checkpoint (they will be redone); the file is
  rewritten without them unless `write=False`."""
  if not path.exists():
    return []
  lines = [line for line in path.read_text().splitlines() if line.strip()]
  records = []
  for line in lines:
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:  # a line cut short when the process was killed while appending it
      log(f"dropped an unreadable line of {path}: {line[:80]!r}")
  records = [r for r in records if r["epoch"] <= upto_epoch]
  if len(records) != len(lines) and write:
    with writing(path):
      atomic_write(path, "".join(json.dumps(r) + "\n" for r in records))
  return records
