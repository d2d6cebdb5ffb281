"""The tree is formatted and linted by ruff with the settings in pyproject.toml (`ruff format .`, `ruff check .`)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT


def _ruff() -> list[str]:
  exe = str(Path(sys.executable).parent / "ruff")  # the one installed beside this interpreter
  exe = exe if os.path.exists(exe) else shutil.which("ruff")
  if exe is None:
    pytest.fail("ruff is not installed: pip install -e '.[test]' installs it")
  return [exe]


@pytest.mark.parametrize("command", [["format", "--check", "."], ["check", "."]], ids=["format", "lint"])
def test_ruff(command):
  done = subprocess.run(_ruff() + command, cwd=ROOT, capture_output=True, text=True)
  assert done.returncode == 0, f"ruff {' '.join(command)}:\n{done.stdout}{done.stderr}"
