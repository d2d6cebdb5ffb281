"""A run directory (see jaxsparse.loop): its config.json guard, logs and small atomic/append writes."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path

from jaxsparse.config import Config
from jaxsparse.errors import Explained, OptionError

_logger = logging.getLogger("jaxsparse")


class ConfigMismatchError(OptionError):
  """The run directory holds a run made with a different config."""


class WorkdirError(Explained, OSError):
  """The run directory cannot be written (permissions, full disk); what was saved before is intact."""


class RunDir:
  """The files of one run directory. Only the primary process (`primary`) writes or logs: on the others every
  write and log line is a no-op, so callers never ask which process they are."""

  def __init__(self, path: str | os.PathLike, *, primary: bool = True):
    self.path, self.primary = Path(path), primary

  def prepare(self, config: Config, *, fresh: bool) -> None:
    """Creates the directory, or checks that the run there was made with `config` (ConfigMismatchError if not,
    unless it never saved a checkpoint: then its config.json is replaced). `fresh` deletes the previous run first.
    Raises WorkdirError when the path is a file or cannot be written."""
    path, saved = self.path, self.path / "config.json"
    if path.exists() and not path.is_dir():
      raise WorkdirError(f"{{workdir}} {path} is a file, not a directory: choose another {{workdir}}")
    if fresh and not self.primary:
      return
    with writing(f"the run directory {path}"):
      for name in ("checkpoints", "plots") if fresh else ():
        shutil.rmtree(path / name, ignore_errors=True)
      for name in ("config.json", "metrics.jsonl", "summary.json", "provenance.jsonl") if fresh else ():
        (path / name).unlink(missing_ok=True)
      if self.primary:
        path.mkdir(parents=True, exist_ok=True)
      try:
        diff = saved.exists() and config_diff(config, saved)
      except json.JSONDecodeError as e:
        raise ConfigMismatchError(
          f"{saved} is unreadable ({e}); pass {{fresh}} to start over, or choose another {{workdir}}"
        ) from e
      checkpoints = path / "checkpoints"
      if diff and checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir()):
        details = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in diff.items())
        raise ConfigMismatchError(
          f"{path} holds a run with a different config ({details}); pass {{fresh}} to start it over, or choose "
          "another {workdir}"
        )
      if diff or not saved.exists():
        self.write("config.json", config.to_json())

  def write(self, name: str, text: str) -> None:
    """Replaces file `name` with `text` at once (a crash leaves the old or the new file)."""
    if self.primary:
      with writing(self.path / name):
        tmp = self.path / (name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.path / name)

  def append(self, name: str, record: dict) -> None:
    """Appends `record` to the JSON-lines file `name`."""
    if self.primary:
      with writing(self.path / name), (self.path / name).open("a") as f:
        f.write(json.dumps(record) + "\n")

  def log(self, message: str) -> None:
    if self.primary:
      _logger.info(message)

  def read_history(self, upto_epoch: int) -> list[dict]:
    """The epoch records of metrics.jsonl, dropping any beyond `upto_epoch` (the restored checkpoint's: they will
    be redone) and lines cut short by a kill; the file is rewritten without them."""
    path, records = self.path / "metrics.jsonl", []
    lines = [line for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    for line in lines:
      try:
        records += [r for r in [json.loads(line)] if r["epoch"] <= upto_epoch]
      except json.JSONDecodeError:
        _logger.warning(f"dropped an unreadable line of {path}: {line[:80]!r}")
    if len(records) != len(lines):
      self.write("metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    return records


def finished(path: str | os.PathLike) -> tuple[Config, dict]:
  """(config, summary) of the finished run in `path`: its config.json, summary.json and the checkpoint of its final
  step. Raises FileNotFoundError saying which is missing."""
  path = Path(path)
  for name, problem in (("config.json", "is not a run directory"), ("summary.json", "holds no finished run")):
    if not (path / name).is_file():
      raise FileNotFoundError(f"{path} {problem} (no {name})")
  summary = json.loads((path / "summary.json").read_text())
  if not (path / "checkpoints" / str(summary["steps"])).is_dir():
    raise FileNotFoundError(f"{path} has no checkpoint of its final step {summary['steps']}")
  return Config.from_dict(json.loads((path / "config.json").read_text())), summary


def config_diff(config: Config, saved: Path) -> dict[str, tuple]:
  """{field: (saved value, `config`'s value)} for every field where the config.json at `saved` differs from
  `config` (a field the saved file predates counts as its default). Raises OSError or json.JSONDecodeError when
  `saved` cannot be read."""
  new = json.loads(config.to_json())
  old = {**json.loads(Config().to_json()), **json.loads(saved.read_text())}  # fields it predates: defaults
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
      f"cannot write {what}: {e.strerror or e}; free disk space or choose a writable {{workdir}} (checkpoints "
      "saved before are intact; run the same command again to resume)"
    ) from e
