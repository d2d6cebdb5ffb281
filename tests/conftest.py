"""Shared test fixtures and process-wide test settings."""

import importlib.util
import logging
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

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


def synthetic_cifar_npz(path: Path, n_train: int = 1200, n_test: int = 400, seed: int = 0) -> Path:
  """Writes a small, deterministic CIFAR-10-shaped .npz in the real subset's format (uint8 x_train / x_test of
  (n, 32, 32, 3), int64 labels, classes balanced): each class is a colour and a stripe frequency under a
  random colour cast and noise, so that an untrained network guesses and a few epochs learn something. Returns `path`."""
  rng = np.random.default_rng(seed)
  colours = rng.uniform(90, 165, (10, 3))
  ramp = np.arange(32, dtype=np.float64)

  def split(n):
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    # One stripe frequency per class, at a random phase; a random colour cast per image as large as the classes'
    # colour differences; pixel noise. An untrained network then guesses (no class maps to a fixed wrong answer).
    phase = rng.uniform(0, 2 * np.pi, (n, 1))
    stripes = 30 * np.sin(ramp[None, :] * (1 + labels[:, None]) * np.pi / 16 + phase)  # (n, 32)
    cast = rng.normal(0, 40, (n, 1, 1, 3))
    images = colours[labels][:, None, None, :] + cast + stripes[:, :, None, None] + rng.normal(0, 40, (n, 32, 32, 3))
    return np.clip(images, 0, 255).astype(np.uint8), labels.astype(np.int64)

  (x_train, y_train), (x_test, y_test) = split(n_train), split(n_test)
  np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
  return path


# The command-line form of the end-to-end tests' run (`tiny_config`, 2 epochs): 4 steps per epoch.
TINY_FLAGS = [
  "--preset=smoke",
  "--epochs=2",
  "--train-size=128",
  "--val-size=64",
  "--batch-size=32",
  "--eval-keeps=1,0.5",
  "--no-progress",
]
TIMES = ("epoch_time_s", "eval_time_s", "wall_time_s")  # what differs between two runs of one config


def tiny_config(data: Path, cache: Path, **overrides):
  """The smoke preset on 128 training images (64 validation, batch 32) of `data`: the end-to-end tests' run."""
  from jaxsparse import config as config_lib

  base = dict(data=str(data), cache_dir=str(cache), train_size=128, val_size=64, batch_size=32)
  return config_lib.preset("smoke", **{**base, **overrides})


def assert_same_final_state(workdir, reference) -> None:
  """The newest checkpoints of two run directories hold the same train state bit for bit: step, parameters, model
  state, optimiser, controller and RNG (what resuming must reproduce, beyond the metrics it logs)."""
  from jaxsparse import loop

  ours, theirs = (loop.load_trained(w)[1] for w in (workdir, reference))
  assert int(ours.step) == int(theirs.step)
  ours, theirs = (jax.tree_util.tree_flatten_with_path(s)[0] for s in (ours, theirs))
  assert [p for p, _ in ours] == [p for p, _ in theirs]  # the same leaves (the static apply_fn and tx differ)
  for (path, a), (_, b) in zip(ours, theirs):
    a, b = np.asarray(a), np.asarray(b)
    assert (a.dtype, a.shape, a.tobytes()) == (b.dtype, b.shape, b.tobytes()), jax.tree_util.keystr(path)


@pytest.fixture(scope="session")
def cifar_npz(tmp_path_factory) -> Path:
  """The genuine CIFAR-10 subset beside the repository (../shared/data), else a generated one in its format."""
  if GENUINE_NPZ.exists():
    return GENUINE_NPZ
  return synthetic_cifar_npz(tmp_path_factory.mktemp("synthetic_data") / "cifar10-synthetic.npz")


@pytest.fixture(scope="session")
def cache(tmp_path_factory) -> Path:
  """A decoded-data cache shared by the end-to-end tests (the first load decodes, later ones hit)."""
  return tmp_path_factory.mktemp("data_cache")


@pytest.fixture
def log_lines():
  """The messages the "jaxsparse" loggers emit during a test (whatever the handlers or propagation)."""
  lines: list[str] = []
  handler = logging.Handler()
  handler.emit = lambda record: lines.append(record.getMessage())
  logger = logging.getLogger("jaxsparse")
  logger.addHandler(handler)
  level = logger.level
  logger.setLevel(logging.INFO)  # not `logger.level = ...`: that keeps the cached answers of isEnabledFor
  yield lines
  logger.removeHandler(handler)
  logger.setLevel(level)


@pytest.fixture
def figures(monkeypatch):
  """{file name: the matplotlib Figure saved to it}, for every figure the plots module saves during a test."""
  from jaxsparse import plots

  saved, real = {}, plots._save

  def save(fig, path):
    saved[path.name] = fig
    return real(fig, path)

  monkeypatch.setattr(plots, "_save", save)
  return saved


def plotted_lines(fig, axis=0):
  """{label: (x, y)} of the plotted lines of one axes (vertical marker lines left out)."""
  ax = fig.axes[axis]
  return {
    line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
    for line in ax.get_lines()
    if len(set(line.get_xdata())) > 1 or len(line.get_xdata()) == 1
  }


def vertical_lines(fig, axis=0):
  ax = fig.axes[axis]
  return [
    line.get_xdata()[0] for line in ax.get_lines() if len(set(line.get_xdata())) == 1 and len(line.get_xdata()) == 2
  ]


def assert_plausible_png(path, width_in, height_in, dpi=110, series_colour=(31, 119, 180)):
  """`path` decodes as a PNG about the figure's size (a tight bounding box trims or widens it a little) that is
  not blank: many colours, and `series_colour` (default: tab:blue, matplotlib's first series) drawn."""
  with Image.open(path) as image:
    assert image.format == "PNG"
    w, h = image.size
    pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
  assert 0.7 * width_in * dpi < w < 1.5 * width_in * dpi and 0.7 * height_in * dpi < h < 1.5 * height_in * dpi, (w, h)
  assert len(np.unique(pixels, axis=0)) > 50
  if series_colour is not None:
    drawn = np.all(np.abs(pixels.astype(int) - series_colour) < 8, axis=1)
    assert drawn.sum() > 50, drawn.sum()
