"""Shared test fixtures and process-wide test settings."""

import importlib.util
import sys
import tempfile
from pathlib import Path

import jax
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
GENUINE_NPZ = SHARED_DATA / "cifar10-genuine-subset.npz"
JPEG_TGZ = SHARED_DATA / "cifar10-jpeg.tar.gz"

# Many tests compile the same small programs (e.g. each end-to-end run compiles the same train step): a
# session-local persistent compilation cache turns the repeats into cache hits.
jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="jaxsparse-test-xla-"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def experiment(name: str):
  """experiments/<name>.py as a module, loaded once from its file (the scripts are not an installed package)."""
  key = f"jaxsparse_experiments_{name}"
  if key not in sys.modules:
    spec = importlib.util.spec_from_file_location(key, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module
    spec.loader.exec_module(module)
  return sys.modules[key]


@pytest.fixture(scope="session")
def genuine_npz() -> Path:
  if not GENUINE_NPZ.exists():
    pytest.skip(f"{GENUINE_NPZ} not found (the shared data copy sits beside the repository)")
  return GENUINE_NPZ


@pytest.fixture(scope="session")
def cache(tmp_path_factory) -> Path:
  """A decoded-data cache shared by the end-to-end tests (the first load decodes, later ones hit)."""
  return tmp_path_factory.mktemp("data_cache")
