"""CIFAR-10 input pipeline: a source string -> cached uint8 arrays -> numpy batches.

Sources (``load(source)``; ``Config.data``):

* ``cifar10`` (the default) -- works on a fresh machine with internet. If TFDS ``cifar10`` is
  already prepared in the TFDS data_dir it is read as ``tfds:cifar10`` (below). Otherwise the
  original ``cifar-10-python.tar.gz`` (170 MB, ``CIFAR10_URL``) is downloaded once into
  ``cache_dir`` with the standard library (one attempt, 10 s timeout, no retries), its size and
  md5 checked before it is moved into place, and read like a local python-batches archive; later
  loads find it there and need no network. With neither TFDS data nor network, ``load`` fails
  within seconds with a ``DataNotFoundError`` naming ``Config.data`` and the local alternatives.
  Progress goes to the optional ``progress`` callback and the ``jaxsparse.data`` logger (INFO).
* ``tfds:<name>`` -- a dataset already prepared in the TFDS data_dir, read with
  ``tfds.data_source`` (reading needs no TensorFlow). We never ask TFDS to download: preparing
  CIFAR-10 with TFDS needs TensorFlow, and offline it retries for minutes. If the dataset is not
  prepared, ``load`` fails at once with a ``DataNotFoundError``.
* an image-folder tree ``<root>/{train,test}/<class>/*.{jpg,jpeg,png}``, or a ``.tar.gz`` /
  ``.tgz`` / ``.tar`` of one, read without unpacking. Labels follow the sorted class-folder
  names (CIFAR-10's label order is alphabetical); 10 classes, the same in train and test.
* the original python batches: ``cifar-10-python.tar.gz`` (md5
  c58f30108f718f92721af3b95e74349a) or its extracted ``cifar-10-batches-py/`` folder.
* an ``.npz`` with ``x_train, y_train, x_test, y_test`` (read directly, never cached).

Decoded arrays are cached as an uncompressed ``.npz`` in ``cache_dir``, keyed by the source's
identity (path, size and mtime of every file read), written atomically (temp file +
``os.replace``) and only after validation: a failed or interrupted decode leaves nothing that loads.
The readers and the downloader live in `jaxsparse.data_sources`; this module is the entry point.

Batches are numpy. Each process takes its contiguous slice of every global batch; augmentation
is drawn per global batch, so batches do not depend on the process count.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import re
import tempfile
import zipfile
from collections.abc import Callable, Iterator

import numpy as np

from jaxsparse import data_sources as sources
from jaxsparse.data_sources import (
  CIFAR10_MD5,
  CIFAR10_SIZE,
  CIFAR10_URL,
  IMAGE_SHAPE,
  NUM_CLASSES,
  DataError,
  DataNotFoundError,
  Raw,
)
from jaxsparse.errors import OptionError

DEFAULT_CACHE_DIR = "~/.cache/jaxsparse"
_logger = logging.getLogger("jaxsparse.data")
_KEYS = sources.KEYS
_CACHE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Split:
  images: np.ndarray  # uint8 (N, 32, 32, 3)
  labels: np.ndarray  # int32 (N,)


@dataclasses.dataclass(frozen=True)
class Dataset:
  train: Split
  val: Split | None
  test: Split
  mean: np.ndarray  # float32 (3,), train split actually used, [0, 1] pixel units
  std: np.ndarray  # float32 (3,)
  source: str  # human-readable identity of the source
  num_classes: int = NUM_CLASSES


def _validate(raw: Raw, where: str) -> Raw:
  out = []
  for split, x, y in (("train", *raw[:2]), ("test", *raw[2:])):
    x, y = np.asarray(x), np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:  # Keras-style (N, 1) labels
      y = y[:, 0]
    if x.dtype != np.uint8 or x.shape[1:] != IMAGE_SHAPE or not len(x):
      raise DataError(f"{where}: x_{split} is {x.dtype} {x.shape}, expected uint8 (N>0, 32, 32, 3)")
    if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
      raise DataError(f"{where}: y_{split} is {y.dtype} {y.shape}, expected integers ({len(x)},)")
    if y.min() < 0 or y.max() >= NUM_CLASSES:
      raise DataError(f"{where}: y_{split} has labels in [{y.min()}, {y.max()}], expected 0..{NUM_CLASSES - 1}")
    out += [x, y.astype(np.int32)]
  return tuple(out)


def _stat(path: str) -> tuple[str, int, int]:
  st = os.stat(path)
  return path, st.st_size, st.st_mtime_ns


def _load_cached(path: str, where: str) -> Raw | None:
  try:
    with np.load(path, allow_pickle=False) as npz:
      return _validate(tuple(npz[k] for k in _KEYS), where)
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
    return None  # absent or unreadable: decode again


def _save_cached(path: str, raw: Raw) -> None:
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".npz")
  except OSError as e:
    _logger.warning("cannot write cache %s: %s", path, e)
    return
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **dict(zip(_KEYS, raw)))
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared cache from other users
    os.replace(tmp, path)
  finally:
    with contextlib.suppress(OSError):
      os.remove(tmp)


def _tfds_plan(source: str, tfds_sources) -> tuple[str, str, object, Callable[[], Raw]]:
  info = tfds_sources[0].dataset_info
  files = sorted(os.listdir(info.data_dir)) if os.path.isdir(info.data_dir) else []
  key = (
    str(info.version),
    tuple(len(s) for s in tfds_sources),
    tuple(_stat(os.path.join(info.data_dir, f)) for f in files),
  )
  where = f"{source} ({info.data_dir})"
  return where, f"tfds_{source[len('tfds:') :]}", key, lambda: sources.read_tfds(tfds_sources, where)


def _fetch_cifar10(
  cache_dir: str, tfds_data_dir: str | None, url: str, md5: str, size: int, progress: sources.Progress | None
) -> str:
  """Path of the verified cifar-10-python.tar.gz in cache_dir, downloading it if absent."""
  path = os.path.join(cache_dir, "cifar-10-python.tar.gz")
  if os.path.isfile(path) and os.path.getsize(path) == size:
    return path  # only ever moved into place after its md5 matched
  try:
    sources.download(url, path, md5=md5, size=size, progress=progress)
  except DataNotFoundError as e:
    raise DataNotFoundError(
      f"{e}; TFDS cifar10 is not prepared in the TFDS data_dir "
      f"({tfds_data_dir or '$TFDS_DATA_DIR or ~/tensorflow_datasets'}) either. Connect to the "
      f"internet, or set {{data}} to a local copy: {sources.LOCAL_SOURCES}."
    ) from e
  return path


def _load_raw(source: str, cache_dir: str, tfds_data_dir: str | None, fetch: dict) -> tuple[Raw, str]:
  """Returns validated (x_train, y_train, x_test, y_test) and a description of the source."""
  if source == "cifar10":
    try:
      tfds_sources = sources.open_tfds("cifar10", tfds_data_dir)
    except DataError:  # not prepared, or no tensorflow-datasets: use the original archive
      source = _fetch_cifar10(cache_dir, tfds_data_dir, **fetch)
    else:
      return _cached(cache_dir, *_tfds_plan("tfds:cifar10", tfds_sources))
  if source.startswith("tfds:"):
    name = source[len("tfds:") :]
    return _cached(cache_dir, *_tfds_plan(source, sources.open_tfds(name, tfds_data_dir)))
  if re.match(r"^[A-Za-z][\w+.-]+:", source) and not os.path.exists(source):
    raise DataError(
      f"unknown data source {source!r}: expected 'cifar10', 'tfds:<name>' or a local path to {sources.LOCAL_SOURCES}"
    )
  where = os.path.abspath(os.path.expanduser(source))
  if not os.path.exists(where):
    raise DataNotFoundError(f"data source {where} does not exist; expected {sources.LOCAL_SOURCES}")
  if os.path.isdir(where):
    key = tuple(_stat(f) for f in sources.dir_files(where))
    decode = lambda: sources.from_members(sources.read_dir(where), where)
  elif where.lower().endswith((".tar.gz", ".tgz", ".tar")):
    key = _stat(where)
    decode = lambda: sources.from_members(sources.read_tar(where), where)
  elif where.lower().endswith(".npz"):
    return _validate(sources.read_npz(where), where), where
  else:
    raise DataError(f"{where}: unknown file type; expected {sources.LOCAL_SOURCES}")
  return _cached(cache_dir, where, os.path.basename(where), key, decode)


def _cached(cache_dir: str, where: str, label: str, key: object, decode: Callable[[], Raw]) -> tuple[Raw, str]:
  digest = hashlib.sha256(repr((_CACHE_VERSION, where, key)).encode()).hexdigest()[:24]
  label = re.sub(r"[^\w.-]", "_", label)
  cache_path = os.path.join(cache_dir, f"{label}-{digest}.npz")
  raw = _load_cached(cache_path, where)
  if raw is None:
    raw = _validate(decode(), where)
    _save_cached(cache_path, raw)
  return raw, where


def _stratified_indices(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
  """Sorted indices of n examples, per-class counts proportional (largest remainder)."""
  classes, counts = np.unique(labels, return_counts=True)
  exact = n * counts / counts.sum()
  quota = np.floor(exact).astype(np.int64)
  quota[np.argsort(quota - exact, kind="stable")[: n - quota.sum()]] += 1
  picked = [rng.choice(np.flatnonzero(labels == c), q, replace=False) for c, q in zip(classes, quota)]
  return np.sort(np.concatenate(picked)).astype(np.int64)


def _split_train(
  images: np.ndarray, labels: np.ndarray, val_size: int, train_size: int | None, seed: int
) -> tuple[Split, Split | None]:
  n = len(labels)
  if not 0 <= val_size < n:
    raise OptionError(f"{{val_size}}={val_size} must be in [0, {n}) (training examples: {n})")
  val_idx = _stratified_indices(labels, val_size, np.random.default_rng([seed, 0]))
  rest = np.setdiff1d(np.arange(n), val_idx)
  if train_size is not None:
    if not 0 < train_size <= len(rest):
      raise OptionError(
        f"{{train_size}}={train_size} must be in [1, {len(rest)}] "
        f"({n} training examples, {val_size} held out for validation)"
      )
    rest = rest[_stratified_indices(labels[rest], train_size, np.random.default_rng([seed, 1]))]
  val = _frozen_split(images[val_idx], labels[val_idx]) if val_size else None
  if train_size is None and not val_size:
    return _frozen_split(images, labels), None
  return _frozen_split(images[rest], labels[rest]), val


def _frozen_split(images: np.ndarray, labels: np.ndarray) -> Split:
  images, labels = np.ascontiguousarray(images), np.ascontiguousarray(labels)
  images.flags.writeable = labels.flags.writeable = False
  return Split(images, labels)


def channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Exact per-channel mean and (population) std of uint8 images, in [0, 1] pixel units.

  Args:
    images: uint8 (N, H, W, 3).

  Returns:
    (mean, std), float32 (3,) each.

  Example:
    >>> channel_stats(np.full((2, 32, 32, 3), 255, np.uint8))[0]
    array([1., 1., 1.], dtype=float32)
  """
  hist = np.zeros((3, 256), np.int64)
  for start in range(0, len(images), 1024):  # chunks keep bincount's int64 copy in cache
    pixels = images[start : start + 1024].reshape(-1, 3)
    for c in range(3):
      hist[c] += np.bincount(pixels[:, c], minlength=256)
  values = np.arange(256) / 255.0
  mean = hist @ values / hist.sum(axis=1)
  var = (hist * (values[None] - mean[:, None]) ** 2).sum(axis=1) / hist.sum(axis=1)
  return mean.astype(np.float32), np.sqrt(var).astype(np.float32)


def load(
  source: str = "cifar10",
  *,
  cache_dir: str | None = None,
  val_size: int = 0,
  train_size: int | None = None,
  seed: int = 0,
  tfds_data_dir: str | None = None,
  download_url: str = CIFAR10_URL,
  download_md5: str = CIFAR10_MD5,
  download_size: int = CIFAR10_SIZE,
  progress: Callable[[int, int], None] | None = None,
) -> Dataset:
  """Loads CIFAR-10 from `source`, decoding once and caching (see the module docstring).

  Args:
    source: 'cifar10' (prepared TFDS data, else download the original archive), 'tfds:<name>',
      an image-folder tree or its .tar.gz, cifar-10-python.tar.gz or cifar-10-batches-py/, or an
      .npz with x_train, y_train, x_test, y_test (a local folder named cifar10: './cifar10').
    cache_dir: where downloads and decoded arrays are cached; default ~/.cache/jaxsparse.
    val_size: examples held out of the training set for validation (seeded, stratified).
    train_size: if given, a seeded, class-stratified subset of the remaining training set.
    seed: seed of the validation and subset draws.
    tfds_data_dir: TFDS data_dir for 'tfds:' and 'cifar10' sources (default: TFDS's own default).
    download_url: where 'cifar10' downloads cifar-10-python.tar.gz from (e.g. a mirror).
    download_md5: the md5 the download must have.
    download_size: the size in bytes the download must have.
    progress: called as `progress(bytes_done, download_size)` while 'cifar10' downloads.

  Returns:
    A Dataset; mean and std come from the training split actually used.

  Raises:
    DataNotFoundError: missing path, a TFDS dataset that is not prepared, or a 'cifar10'
      download that cannot reach its URL.
    DataError: unknown source, wrong layout, corrupted file, bad label or image size, or a
      download whose size or md5 does not match.

  Example:
    >>> ds = load("cifar10", val_size=5000)  # downloads and decodes once, then cached
    >>> ds.train.images.shape, ds.val.labels.shape, ds.test.labels.shape
    ((45000, 32, 32, 3), (5000,), (10000,))
  """
  fetch = dict(url=download_url, md5=download_md5, size=download_size, progress=progress)
  (x_train, y_train, x_test, y_test), where = _load_raw(
    source, os.path.expanduser(cache_dir or DEFAULT_CACHE_DIR), tfds_data_dir, fetch
  )
  train, val = _split_train(x_train, y_train, val_size, train_size, seed)
  mean, std = channel_stats(train.images)
  return Dataset(train=train, val=val, test=_frozen_split(x_test, y_test), mean=mean, std=std, source=where)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Training steps in one epoch (the remainder is dropped): `steps_per_epoch(50000, 128) == 390`."""
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  return num_examples // batch_size


def _local_slice(batch_size: int, process_index: int, process_count: int) -> slice:
  if batch_size <= 0 or process_count <= 0 or batch_size % process_count:
    raise ValueError(f"global batch_size={batch_size} must be a positive multiple of process_count={process_count}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, {process_count})")
  local = batch_size // process_count
  return slice(process_index * local, (process_index + 1) * local)


def _normalize(images: np.ndarray, mean, std) -> np.ndarray:
  # Statistics tiled over whole images: numpy's inner loop over a length-3 axis is ~10x slower.
  pixels = images.reshape(len(images), -1)
  std, reps = np.asarray(std, np.float32), pixels.shape[1] // 3
  out = np.multiply(pixels, np.tile(1 / (255 * std), reps), dtype=np.float32)
  out -= np.tile(np.asarray(mean, np.float32) / std, reps)
  return out.reshape(images.shape)


def flip_crop(images: np.ndarray, flip: np.ndarray, offsets: np.ndarray) -> np.ndarray:
  """Horizontal flip + crop from the 4-pixel zero-padded image (torchvision's convention).

  Args:
    images: uint8 (B, H, W, C).
    flip: bool (B,), mirror horizontally.
    offsets: int (B, 2) in [0, 8], (row, column) of the crop in the padded image; 4 = no shift.

  Returns:
    uint8 (B, H, W, C).

  Example:
    >>> x = np.arange(2 * 32 * 32 * 1, dtype=np.uint8).reshape(2, 32, 32, 1)
    >>> bool((flip_crop(x, np.zeros(2, bool), np.full((2, 2), 4)) == x).all())
    True
  """
  _, h, w, _ = images.shape
  padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
  out = np.empty_like(images)
  for i, (row, col) in enumerate(offsets):  # slice copies, faster than a per-pixel gather (docs/performance.md)
    out[i] = padded[i, row : row + h, col : col + w]
  out[flip] = out[flip, :, ::-1]
  return out


def train_batches(
  split: Split,
  batch_size: int,
  *,
  mean,
  std,
  seed: int,
  epoch: int,
  start_step: int = 0,
  augment: str | None = None,
  process_index: int = 0,
  process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
  """Yields one epoch of normalised training batches, this process's slice of each.

  The order is `np.random.default_rng([seed, epoch]).permutation(N)` (remainder dropped) and
  augmentation draws come from `[seed, epoch, step]`, so resuming at `start_step` yields exactly
  the batches a full run would have yielded from there on.

  Args:
    split: the training Split.
    batch_size: the global batch size (all processes together).
    mean, std: float (3,) normalisation statistics in [0, 1] pixel units.
    seed, epoch: determine the order and augmentation.
    start_step: first step to yield (resume), in [0, steps_per_epoch].
    augment: None (the paper's setting) or 'flip_crop'.
    process_index, process_count: which contiguous slice of each global batch to yield.

  Returns:
    An iterator of {'image': float32 (b, 32, 32, 3), 'label': int32 (b,)},
    b = batch_size // process_count.

  Example:
    >>> batch = next(train_batches(ds.train, 128, mean=ds.mean, std=ds.std, seed=0, epoch=0))
  """
  local = _local_slice(batch_size, process_index, process_count)
  if augment not in (None, "flip_crop"):
    raise ValueError(f"augment={augment!r}; expected None or 'flip_crop'")
  steps = steps_per_epoch(len(split.labels), batch_size)
  if steps == 0:
    raise DataError(f"batch_size={batch_size} exceeds the {len(split.labels)} training examples")
  if not 0 <= start_step <= steps:
    raise ValueError(f"start_step={start_step} not in [0, {steps}]")

  def batches():
    order = np.random.default_rng([seed, epoch]).permutation(len(split.labels))
    for step in range(start_step, steps):
      idx = order[step * batch_size : (step + 1) * batch_size][local]
      images = split.images[idx]
      if augment == "flip_crop":
        rng = np.random.default_rng([seed, epoch, step])
        flip = rng.random(batch_size) < 0.5
        offsets = rng.integers(0, 9, size=(batch_size, 2))
        images = flip_crop(images, flip[local], offsets[local])
      yield {"image": _normalize(images, mean, std), "label": split.labels[idx]}

  return batches()


def eval_batches(
  split: Split, batch_size: int, *, mean, std, process_index: int = 0, process_count: int = 1
) -> Iterator[dict[str, np.ndarray]]:
  """Yields every example exactly once; the last batch is padded and masked.

  Args:
    split: the Split to evaluate.
    batch_size: the global batch size.
    mean, std: float (3,) normalisation statistics in [0, 1] pixel units.
    process_index, process_count: which contiguous slice of each global batch to yield.

  Returns:
    An iterator of {'image': float32 (b, 32, 32, 3), 'label': int32 (b,), 'mask': float32 (b,)}
    with mask 1 for real examples and 0 for padding; ceil(N / batch_size) batches.

  Example:
    >>> sum(b["mask"].sum() for b in eval_batches(ds.test, 128, mean=ds.mean, std=ds.std))
    10000.0
  """
  local = _local_slice(batch_size, process_index, process_count)
  n = len(split.labels)

  def batches():
    for start in range(0, n, batch_size):
      idx = np.arange(start, start + batch_size)[local]
      real = idx < n
      idx = np.where(real, idx, 0)
      yield {
        "image": _normalize(split.images[idx], mean, std),
        "label": split.labels[idx],
        "mask": real.astype(np.float32),
      }

  return batches()
