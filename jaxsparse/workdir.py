"""The run directory's files (see jaxsparse.loop): its config.json guard and the small atomic/append writes."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path

from jaxsparse.config import Config, Explained, OptionError


class ConfigMismatchError(OptionError):
  """The run directory holds a run made with a different config."""


class WorkdirError(Explained, OSError):
  """The run directory cannot be written (permissions, full disk); what was saved before is intact."""


def prepare_workdir(config: Config, workdir: Path, *, fresh: bool, write: bool = True) -> None:
  """Creates `workdir`, or checks that the run already there was made with the same config.

  A directory whose run never saved a checkpoint (e.g. it stopped on bad input) has nothing to lose: its
  config.json is replaced, so a corrected command is not refused. With `write=False` (the other processes of a
  multi-process run) nothing is created, deleted or written: only the check runs, and not at all when `fresh`.
  Raises ConfigMismatchError when an existing run used another config (nothing is overwritten).
  """
  if workdir.exists() and not workdir.is_dir():
    raise WorkdirError(lambda n: f"{n('workdir')} {workdir} is a file, not a directory: choose another {n('workdir')}")
  if fresh and not write:
    return
  saved = workdir / "config.json"
  with writing(f"the run directory {workdir}"):
    if fresh and workdir.exists():
      shutil.rmtree(workdir / "checkpoints", ignore_errors=True)
      shutil.rmtree(workdir / "plots", ignore_errors=True)
      for name in ("config.json", "metrics.jsonl", "summary.json", "provenance.jsonl"):
        (workdir / name).unlink(missing_ok=True)
    if not saved.exists():
      if write:
        workdir.mkdir(parents=True, exist_ok=True)
        atomic_write(saved, config.to_json())
      return
    try:
      diff = config_diff(config, saved)
    except json.JSONDecodeError as e:
      raise ConfigMismatchError(
        lambda n, e=e: f"{saved} is unreadable ({e}); pass {n('fresh')} to start over, or choose another {n('workdir')}"
      ) from e
    checkpoints = workdir / "checkpoints"
    if diff and checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir()):
      details = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in diff.items())
      raise ConfigMismatchError(
        lambda n: (
          f"{workdir} holds a run with a different config ({details}); pass {n('fresh')} to start it over, "
          f"or choose another {n('workdir')}"
        )
      )
    if diff and write:
      atomic_write(saved, config.to_json())


def config_diff(config: Config, saved: Path) -> dict[str, tuple]:
  """{field: (saved value, `config`'s value)} for every field where the config.json at `saved` differs from
  `config` (a field the saved file predates counts as its default). Raises OSError or json.JSONDecodeError when
  `saved` cannot be read."""
  old = json.loads(saved.read_text())
  new, defaults = json.loads(config.to_json()), json.loads(Config().to_json())
  old = {**{k: defaults[k] for k in new if k not in old and k in defaults}, **old}  # fields it predates: defaults
  return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}


@contextlib.contextmanager
def writing(what: object):
  """Turns an OSError while writing `what` (read-only directory, full disk) into a WorkdirError with the fix."""
  try:
    yield
  except WorkdirError:
    raise
  except OSError as e:
    raise WorkdirError(
      lambda n, e=e: (
        f"cannot write {what}: {e.strerror or e}; free disk space or choose a writable {n('workdir')} "
        "(checkpoints saved before are intact; run the same command again to resume)"
      )
    ) from e


def atomic_write(path: Path, text: str) -> None:
  """Replaces `path` with `text` at once (a crash leaves the old or the new file); a WorkdirError if it cannot."""
  with writing(path):
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def append_line(path: Path, text: str) -> None:
  """Appends one line to `path`; a WorkdirError if it cannot."""
  with writing(path), path.open("a") as f:
    f.write(text + "\n")


def read_history(path: Path, upto_epoch: int, *, write: bool = True) -> list[dict]:
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
      logging.getLogger(__name__).warning(f"dropped an unreadable line of {path}: {line[:80]!r}")
  records = [r for r in records if r["epoch"] <= upto_epoch]
  if len(records) != len(lines) and write:
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in records))
  return records
