"""glibc allocator settings for CPU runs: set once by the entry points (run.py, bench.py), never by the library.

XLA:CPU maps one large temp buffer per execution and unmaps it afterwards, so with glibc's default settings every
train step page-faults that memory again (docs/performance.md, "the allocator"). `TUNABLES` keeps freed memory in
the heap instead. The variable is read by glibc when a process starts, so an entry point that finds it unset
re-executes itself once with it set. Setting GLIBC_TUNABLES yourself (an empty value included) opts out.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys

TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.arena_max=1:glibc.malloc.trim_threshold=68719476736"
# Accelerator plugins of jaxlib: where one is installed the host allocator is not the bottleneck; leave it alone.
_ACCELERATOR_MODULES = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "libtpu")


def wants_tunables(environ=os.environ) -> bool:
  """True on Linux with glibc, GLIBC_TUNABLES unset, and no JAX accelerator plugin installed."""
  if sys.platform != "linux" or platform.libc_ver()[0] != "glibc" or "GLIBC_TUNABLES" in environ:
    return False
  if environ.get("JAX_PLATFORMS", "cpu").split(",")[0] not in ("", "cpu"):
    return False
  return not any(importlib.util.find_spec(m) is not None for m in _ACCELERATOR_MODULES)


def reexec_with_tunables() -> None:
  """Replaces this process by the same command with GLIBC_TUNABLES=`TUNABLES`, where `wants_tunables`; else returns.

  Call it first thing in an entry point's ``if __name__ == "__main__":`` block (nothing has run yet, so nothing is
  lost; the process id, and so a parent's handle on it and its CPU pinning, stay the same).
  """
  if wants_tunables():
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "GLIBC_TUNABLES": TUNABLES})
