"""Shared test fixtures and process-wide test settings."""

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


@pytest.fixture(scope="session")
def genuine_npz() -> Path:
  if not GENUINE_NPZ.exists():
    pytest.skip(f"{GENUINE_NPZ} not found (the shared data copy sits beside the repository)")
  return GENUINE_NPZ


@pytest.fixture(scope="session")
def cache(tmp_path_factory) -> Path:
  """A decoded-data cache shared by the end-to-end tests (the first load decodes, later ones hit)."""
  return tmp_path_factory.mktemp("data_cache")
