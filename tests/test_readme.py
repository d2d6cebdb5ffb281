"""Every Python code block of the README runs as shown, on its own (each in a fresh interpreter)."""

import re
import subprocess
import sys

import pytest

from conftest import ROOT

BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_the_readme_has_python_blocks():
  assert len(BLOCKS) >= 4


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs_alone(index):
  out = subprocess.run([sys.executable, "-c", BLOCKS[index]], capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, f"README block {index}:\n{BLOCKS[index]}\n{out.stderr[-3000:]}"
  for expected in re.findall(r"^# (\(.*|\{.*)$", BLOCKS[index], flags=re.M):  # a printed result shown as a comment
    assert expected in out.stdout, (expected, out.stdout)
  for expected in re.findall(r"print\(.*\)  # (.*)$", BLOCKS[index], flags=re.M):
    assert expected in out.stdout, (expected, out.stdout)
