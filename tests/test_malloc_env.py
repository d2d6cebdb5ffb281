"""experiments/malloc_env.py: an entry point without GLIBC_TUNABLES re-executes itself once with them; a user's
own setting (empty included) is left alone."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT, experiment

malloc_env = experiment("malloc_env")

SCRIPT = f"""
import importlib.util, os, sys
print(repr(os.environ.get("GLIBC_TUNABLES")), os.getpid(), flush=True)
spec = importlib.util.spec_from_file_location("malloc_env", {str(ROOT / "experiments" / "malloc_env.py")!r})
malloc_env = importlib.util.module_from_spec(spec)
spec.loader.exec_module(malloc_env)
malloc_env.reexec_with_tunables()
print("main", sys.argv[1:], flush=True)
"""

needs_glibc = pytest.mark.skipif(not malloc_env.wants_tunables({}), reason="not Linux with glibc and a CPU-only jax")


def _run(tmp_path, env):
  script = tmp_path / "entry.py"
  script.write_text(SCRIPT)
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "JAX_PLATFORMS")} | env
  out = subprocess.run(
    [sys.executable, str(script), "--flag=1"], env=env, capture_output=True, text=True, timeout=60, check=True
  )
  return out.stdout.splitlines()


@needs_glibc
def test_unset_tunables_reexec_once_with_the_same_arguments_and_pid(tmp_path):
  first, second, main = _run(tmp_path, {})
  assert first.split()[0] == "None"
  assert second.split()[0] == repr(malloc_env.TUNABLES)
  assert first.split()[1] == second.split()[1]  # exec: the same process
  assert main == "main ['--flag=1']"


def test_a_users_own_setting_is_kept_and_an_empty_one_opts_out(tmp_path):
  assert _run(tmp_path, {"GLIBC_TUNABLES": ""})[0].split()[0] == "''"
  assert len(_run(tmp_path, {"GLIBC_TUNABLES": ""})) == 2
  assert _run(tmp_path, {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})[0].split()[0] == "'glibc.malloc.arena_max=2'"


def test_accelerator_platforms_are_left_alone():
  assert not malloc_env.wants_tunables({"JAX_PLATFORMS": "cuda"})
  assert not malloc_env.wants_tunables({"GLIBC_TUNABLES": ""})
