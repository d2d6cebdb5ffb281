"""Errors that name run options in braces, spelled by whoever shows them: ``{train_size}`` (a Config field),
``{controller_options.keep}`` (a controller's option), ``{workdir}``, ``{fresh}`` (`train_and_evaluate`'s arguments).
`str(error)` spells them for the library (``Config.train_size``, ``Config.controller_options['keep']``,
``fresh=True``); ``error.render(name)`` another way, e.g. experiments/run.py as flags (``--train-size``, ``--keep``).
"""

from __future__ import annotations

import re
from typing import Callable

_OPTION = re.compile(r"\{([a-z_]+(?:\.[a-z_]+)?)\}")


def library_name(option: str) -> str:
  """How the library spells an option of a message (see the module docstring)."""
  field, _, key = option.partition(".")
  return {"fresh": "fresh=True", "workdir": "workdir"}.get(option, f"Config.{field}" + (f"[{key!r}]" if key else ""))


class Explained(Exception):
  """An error whose message names options in braces; `fields` lists them, `render(name)` spells them."""

  def __init__(self, message: str):
    self.message = message
    super().__init__(self.render(library_name))

  @property
  def fields(self) -> tuple[str, ...]:
    return tuple(dict.fromkeys(_OPTION.findall(self.message)))

  def render(self, name: Callable[[str], str]) -> str:
    return _OPTION.sub(lambda m: name(m[1]), self.message)


class OptionError(Explained, ValueError):
  """A bad run option."""
