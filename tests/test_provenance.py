"""provenance(): every key present and JSON-serialisable, "unknown" (never an error) where the OS or git cannot say."""

import json
import shutil
import subprocess

import pytest

from conftest import ROOT
from jaxsparse import provenance as provenance_lib
from jaxsparse.provenance import provenance

X86 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R14 96-Core Processor
flags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512_bf16 avx512vl amx_tile

processor\t: 1
model name\t: another name that is not read
flags\t\t: fpu
"""
ARM = """processor\t: 0
Features\t: fp asimd asimddp sve i8mm bf16
CPU implementer\t: 0x41
CPU part\t: 0xd40
"""


def _git(*args, cwd):
  return subprocess.run(
    ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True, capture_output=True, text=True
  ).stdout


def test_every_key_present_and_json_serialisable():
  p = provenance()
  assert sorted(p) == ["cpu", "devices", "driver", "env", "git", "hostname", "os", "versions"]
  assert json.loads(json.dumps(p)) == p
  assert sorted(p["cpu"]) == ["affinity", "count", "model", "usable", "vector_extensions"]
  assert sorted(p["versions"]) == sorted(("python",) + provenance_lib.PACKAGES)
  assert all(isinstance(v, str) for v in p["versions"].values()) and p["versions"]["jax"] != "unknown"
  assert sorted(p["env"]) == sorted(provenance_lib.ENV_VARS)
  assert p["devices"] and {"platform", "kind", "count"} <= set(p["devices"][0])
  assert isinstance(p["cpu"]["count"], int) and p["cpu"]["usable"] >= 1


def test_env_records_what_is_set_and_none_for_what_is_not(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_use_thunk_runtime=false")
  monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
  env = provenance()["env"]
  assert env["XLA_FLAGS"] == "--xla_cpu_use_thunk_runtime=false" and env["OMP_NUM_THREADS"] is None


def test_cpu_model_and_vector_extensions_from_cpuinfo_text():
  x86 = provenance_lib.cpu(X86)
  assert x86["model"] == "AMD EPYC 9R14 96-Core Processor"
  assert x86["vector_extensions"] == ["sse4_2", "avx", "avx2", "fma", "avx512f", "avx512vl", "avx512_bf16", "amx_tile"]
  arm = provenance_lib.cpu(ARM)
  assert arm["model"] == "Arm implementer 0x41 part 0xd40"
  assert arm["vector_extensions"] == ["asimd", "asimddp", "sve", "bf16", "i8mm"]


def test_labels_name_the_accelerators_cpu_vector_units_and_commit():
  record = {
    "cpu": provenance_lib.cpu(X86),
    "devices": [{"platform": "cpu", "kind": "cpu", "count": 1}, {"platform": "gpu", "kind": "NVIDIA H100", "count": 8}],
    "git": {"commit": "a63eee8851026053e8f910bead15d82a8c9c0894", "dirty": True},
  }
  assert provenance_lib.machine_label(record) == (
    "8 x NVIDIA H100 on AMD EPYC 9R14 96-Core Processor (AVX-512+bf16+AMX), commit a63eee8+dirty"
  )
  arm = {"cpu": provenance_lib.cpu(ARM), "devices": [{"platform": "cpu", "kind": "cpu", "count": 1}]}
  assert provenance_lib.hardware_label(arm) == "Arm implementer 0x41 part 0xd40 (SVE)"
  assert provenance_lib.vector_units(["sse4_2", "avx", "avx2", "fma"]) == "AVX2"
  unknown = {"cpu": {"model": "unknown", "vector_extensions": "unknown"}, "devices": "unknown", "git": "unknown"}
  assert provenance_lib.machine_label(unknown) == "unknown, commit unknown"
  assert provenance_lib.machine_label(None) == provenance_lib.machine_label({}) == "unrecorded machine"


def test_cpu_ranges():
  assert provenance_lib.cpu_ranges([5, 0, 1, 2]) == "0-2,5"
  assert provenance_lib.cpu_ranges([3]) == "3" and provenance_lib.cpu_ranges([]) == ""


def test_missing_cpuinfo_records_unknown(monkeypatch, tmp_path):
  monkeypatch.setattr(provenance_lib, "CPUINFO", tmp_path / "no_cpuinfo")
  cpu = provenance()["cpu"]
  assert cpu["model"] == "unknown" and cpu["vector_extensions"] == "unknown"
  assert isinstance(cpu["count"], int)  # the rest still comes from the OS


@pytest.mark.parametrize("how", ["executable", "path"])
def test_without_git_the_commit_is_unknown(how, monkeypatch, tmp_path):
  if how == "executable":
    monkeypatch.setattr(provenance_lib, "GIT", "git-that-does-not-exist")
  else:
    monkeypatch.setenv("PATH", str(tmp_path))
  assert provenance()["git"] == {"commit": "unknown", "dirty": "unknown"}


def test_outside_a_checkout_the_commit_is_unknown(tmp_path):
  assert provenance(tmp_path)["git"] == {"commit": "unknown", "dirty": "unknown"}


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_an_ignored_copy_inside_a_checkout_is_not_given_the_checkout_commit(tmp_path):
  _git("init", "-q", cwd=tmp_path)
  (tmp_path / ".gitignore").write_text("venv/\n")
  _git("add", ".gitignore", cwd=tmp_path)
  _git("commit", "-q", "-m", "init", cwd=tmp_path)
  installed = tmp_path / "venv" / "site-packages" / "jaxsparse"
  installed.mkdir(parents=True)
  (installed / "__init__.py").write_text("")
  assert provenance(installed)["git"] == {"commit": "unknown", "dirty": "unknown"}
  (tmp_path / ".gitignore").write_text("changed\n")
  assert provenance(tmp_path)["git"] == {"commit": _git("rev-parse", "HEAD", cwd=tmp_path).strip(), "dirty": True}


def test_commit_is_this_checkouts_head():
  if shutil.which("git") is None or not (ROOT / ".git").exists():
    pytest.skip("not a git checkout")
  head = _git("rev-parse", "HEAD", cwd=ROOT).strip()
  dirty = bool(_git("status", "--porcelain", "--untracked-files=no", cwd=ROOT).strip())
  assert provenance()["git"] == {"commit": head, "dirty": dirty}


def test_a_failing_part_records_unknown_and_never_raises(monkeypatch):
  def broken():
    raise RuntimeError("no backend")

  monkeypatch.setattr(provenance_lib, "jax_devices", broken)
  monkeypatch.setattr(provenance_lib, "versions", broken)
  p = provenance()
  assert p["devices"] == "unknown" and p["versions"] == "unknown" and p["driver"] is None
