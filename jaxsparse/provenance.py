"""Where a result came from: the machine, software versions, settings and code commit of the running process.

`provenance()` gathers them in one dict for summary.json, provenance.jsonl and the benchmark JSON: a few small file
reads and subprocess calls with short timeouts, once per run (never per step). What it cannot find is recorded as
"unknown"; it never raises. `machine_label` names such a record in a few words.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Callable, Iterable, Mapping

import jax

UNKNOWN = "unknown"
CPUINFO = Path("/proc/cpuinfo")
GIT = "git"
NVIDIA_SMI = "nvidia-smi"
TIMEOUT_S = 3.0
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")
# Recorded, never acted on: the settings that change XLA's kernels, numerics, threads or the allocator.
ENV_VARS = (
  "XLA_FLAGS",
  "GLIBC_TUNABLES",
  "LD_PRELOAD",
  "JAX_PLATFORMS",
  "JAX_ENABLE_X64",
  "JAX_DEFAULT_MATMUL_PRECISION",
  "OMP_NUM_THREADS",
)
# CPU features that change which kernels XLA emits: x86 "flags" and Arm "Features" of /proc/cpuinfo.
VECTOR_EXTENSIONS = (
  "sse4_2",
  "avx",
  "avx2",
  "fma",
  "f16c",
  "avx_vnni",
  "avx512f",
  "avx512bw",
  "avx512dq",
  "avx512vl",
  "avx512_vnni",
  "avx512_bf16",
  "avx512_fp16",
  "amx_tile",
  "amx_bf16",
  "amx_int8",
  "amx_fp16",
  "asimd",
  "asimddp",
  "sve",
  "sve2",
  "bf16",
  "i8mm",
  "sme",
)
# The widest vector units a CPU may have below AVX-512, widest first, as `vector_units` names them.
VECTOR_UNITS = (("avx2", "AVX2"), ("avx", "AVX"), ("sve2", "SVE2"), ("sve", "SVE"), ("asimd", "NEON"))
UNRECORDED = "unrecorded machine"


def provenance(code_dir: str | os.PathLike | None = None) -> dict:
  """The machine, versions, settings and code commit of this process, as a JSON-serialisable dict.

  Args:
    code_dir: a directory of the code whose git commit is recorded; default: the jaxsparse package's directory.

  Returns:
    {"hostname", "os", "cpu": {"model", "vector_extensions", "count", "affinity", "usable"},
    "devices": [{"platform", "kind", "count"}], "driver", "versions": {"python", "jax", ...},
    "env": {name: value or None}, "git": {"commit", "dirty"}}; any value that could not be found is "unknown"
    (`driver` is None on a machine without an NVIDIA GPU).

  Example:
    >>> sorted(provenance())
    ['cpu', 'devices', 'driver', 'env', 'git', 'hostname', 'os', 'versions']
  """
  code_dir = Path(code_dir) if code_dir is not None else Path(__file__).resolve().parent
  devices = _safe(jax_devices)
  return {
    "hostname": _safe(socket.gethostname),
    "os": _safe(platform.platform),
    "cpu": _safe(lambda: cpu(read_cpuinfo())),
    "devices": devices,
    "driver": _safe(lambda: nvidia_driver() if _has_gpu(devices) else None),
    "versions": _safe(versions),
    "env": {name: os.environ.get(name) for name in ENV_VARS},
    "git": _safe(lambda: git_commit(code_dir)),
  }


def _safe(fn: Callable):
  """fn(), or "unknown" if it raises anything (a record must never fail a run)."""
  try:
    return fn()
  except Exception:  # noqa: BLE001
    return UNKNOWN


def read_cpuinfo() -> str | None:
  """The text of /proc/cpuinfo (`CPUINFO`); None where it does not exist or cannot be read."""
  try:
    return CPUINFO.read_text(errors="replace")
  except OSError:
    return None


def cpu(cpuinfo: str | None) -> dict:
  """The CPU's model, the vector extensions of `VECTOR_EXTENSIONS` it has, its logical CPU count and this process's
  CPU affinity (as ranges, e.g. "0-3,8", and a count), from the text of /proc/cpuinfo and the OS."""
  fields = _first_fields(cpuinfo or "")
  model = fields.get("model name") or fields.get("Model") or fields.get("Hardware")
  if not model and "CPU implementer" in fields:
    model = f"Arm implementer {fields['CPU implementer']} part {fields.get('CPU part', '?')}"
  flags = fields.get("flags", fields.get("Features"))
  have = set(flags.split()) if flags is not None else None
  affinity = _safe(lambda: sorted(os.sched_getaffinity(0)))
  return {
    "model": model or UNKNOWN,
    "vector_extensions": [f for f in VECTOR_EXTENSIONS if f in have] if have is not None else UNKNOWN,
    "count": os.cpu_count() or UNKNOWN,
    "affinity": cpu_ranges(affinity) if isinstance(affinity, list) else UNKNOWN,
    "usable": len(affinity) if isinstance(affinity, list) else UNKNOWN,
  }


def _first_fields(cpuinfo: str) -> dict[str, str]:
  """ "key : value" lines of /proc/cpuinfo, keeping the first occurrence of each key (the first processor's)."""
  fields: dict[str, str] = {}
  for line in cpuinfo.splitlines():
    key, sep, value = line.partition(":")
    if sep:
      fields.setdefault(key.strip(), value.strip())
  return fields


def cpu_ranges(cpus: Iterable[int]) -> str:
  """CPU numbers as ranges, e.g. [0, 1, 2, 5] -> "0-2,5"."""
  parts: list[list[int]] = []
  for c in sorted(cpus):
    if parts and c == parts[-1][1] + 1:
      parts[-1][1] = c
    else:
      parts.append([c, c])
  return ",".join(f"{a}-{b}" if b > a else f"{a}" for a, b in parts)


def jax_devices() -> list[dict]:
  """JAX's devices grouped by platform and kind, e.g. [{"platform": "gpu", "kind": "NVIDIA H100", "count": 8}]."""
  groups: dict[tuple[str, str], int] = {}
  for d in jax.devices():
    groups[(d.platform, d.device_kind)] = groups.get((d.platform, d.device_kind), 0) + 1
  return [{"platform": p, "kind": k, "count": n} for (p, k), n in groups.items()]


def _has_gpu(devices) -> bool:
  return isinstance(devices, list) and any(d["platform"] in ("gpu", "cuda") for d in devices)


def nvidia_driver() -> str:
  """The NVIDIA driver version from nvidia-smi; "unknown" without nvidia-smi on PATH or when it fails."""
  if shutil.which(NVIDIA_SMI) is None:
    return UNKNOWN
  out = _run([NVIDIA_SMI, "--query-gpu=driver_version", "--format=csv,noheader"])
  return out.splitlines()[0].strip() if out else UNKNOWN


def versions() -> dict[str, str]:
  """Versions of python and of `PACKAGES` ("unknown" for a package that is not installed)."""
  out = {"python": platform.python_version()}
  for name in PACKAGES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = UNKNOWN
  return out


def git_commit(code_dir: Path) -> dict:
  """{"commit": HEAD of the git checkout holding `code_dir`, "dirty": whether tracked files have uncommitted
  changes}; both "unknown" without git, outside a checkout, or where `code_dir` is not tracked in it (e.g. an
  installed copy inside an ignored virtualenv)."""
  unknown = {"commit": UNKNOWN, "dirty": UNKNOWN}
  if _run([GIT, "-C", str(code_dir), "ls-files", "--error-unmatch", "."]) is None:
    return unknown
  commit = _run([GIT, "-C", str(code_dir), "rev-parse", "HEAD"])
  status = _run([GIT, "-C", str(code_dir), "status", "--porcelain", "--untracked-files=no"])
  if not commit or status is None:
    return unknown
  return {"commit": commit.strip(), "dirty": bool(status.strip())}


def _run(argv: list[str]) -> str | None:
  """The stdout of `argv`; None if it cannot start, fails or takes longer than `TIMEOUT_S`."""
  try:
    done = subprocess.run(
      argv, capture_output=True, text=True, timeout=TIMEOUT_S, check=False, stdin=subprocess.DEVNULL
    )
  except (OSError, subprocess.SubprocessError):
    return None
  return done.stdout if done.returncode == 0 else None


def vector_units(extensions) -> str:
  """The widest vector units among a CPU's `vector_extensions`, e.g. "AVX-512+bf16+AMX", "AVX2", "SVE"; "" if
  unknown."""
  if not isinstance(extensions, list):
    return ""
  have = set(extensions)
  if "avx512f" in have:
    units = "AVX-512" + "".join(f"+{x}" for x in ("bf16", "fp16") if f"avx512_{x}" in have)
  else:
    units = next((name for flag, name in VECTOR_UNITS if flag in have), "")
  return units + ("+AMX" if any(x.startswith("amx") for x in have) else "")


def hardware_label(record: Mapping | None) -> str:
  """The hardware of a `provenance()` record in a few words: the accelerators, if any, on the CPU model with its
  widest vector units, e.g. ``2 x NVIDIA H100 on AMD EPYC 9R14 (AVX-512+bf16)``; `UNRECORDED` without a record."""
  if not record:
    return UNRECORDED
  cpu_ = record.get("cpu") if isinstance(record.get("cpu"), Mapping) else {}
  vector = vector_units(cpu_.get("vector_extensions"))
  label = str(cpu_.get("model", UNKNOWN)) + (f" ({vector})" if vector else "")
  devices = record.get("devices")
  accelerators = [d for d in devices if d.get("platform") != "cpu"] if isinstance(devices, list) else []
  if accelerators:
    label = ", ".join(f"{d.get('count', '?')} x {d.get('kind', UNKNOWN)}" for d in accelerators) + " on " + label
  return label


def commit_label(record: Mapping | None) -> str:
  """The short git commit of a `provenance()` record, with ``+dirty`` for uncommitted changes; "unknown" if not
  recorded."""
  git = (record or {}).get("git")
  commit = git.get("commit") if isinstance(git, Mapping) else None
  if not isinstance(commit, str) or commit == UNKNOWN:
    return UNKNOWN
  return commit[:7] + ("+dirty" if git.get("dirty") is True else "")


def machine_label(record: Mapping | None) -> str:
  """Hardware and commit of a `provenance()` record, e.g. ``AMD EPYC 9R14 (AVX-512+bf16), commit a63eee8``;
  `UNRECORDED` without a record."""
  return f"{hardware_label(record)}, commit {commit_label(record)}" if record else UNRECORDED
