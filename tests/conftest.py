"""Shared test fixtures: paths to the read-only CIFAR-10 copies beside the repository."""
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
GENUINE_NPZ = SHARED_DATA / "cifar10-genuine-subset.npz"
JPEG_TGZ = SHARED_DATA / "cifar10-jpeg.tar.gz"


@pytest.fixture(scope="session")
def genuine_npz() -> Path:
  if not GENUINE_NPZ.exists():
    pytest.skip(f"{GENUINE_NPZ} not found (the shared data copy sits beside the repository)")
  return GENUINE_NPZ
