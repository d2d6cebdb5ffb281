"""CIFAR-10 source readers and the downloader behind `jaxsparse.data.load` (internal).

Each reader turns one kind of source into raw ``(x_train, y_train, x_test, y_test)`` arrays;
`jaxsparse.data` validates and caches them. `download` fetches the original
``cifar-10-python.tar.gz`` with the standard library only. This is the only module besides
`jaxsparse.data` that touches TFDS, and only `jaxsparse.data` imports it.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import http.client
import io
import logging
import os
import pathlib
import pickle
import tarfile
import tempfile
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterator

import numpy as np

from jaxsparse.errors import Explained

NUM_CLASSES = 10
IMAGE_SHAPE = (32, 32, 3)
KEYS = ("x_train", "y_train", "x_test", "y_test")
BATCH_NAMES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_SIZE = 170_498_071
LOCAL_SOURCES = (
  "an image-folder tree <root>/{train,test}/<class>/*.jpg|png or its .tar.gz, "
  f"cifar-10-python.tar.gz (md5 {CIFAR10_MD5}) or its extracted "
  "cifar-10-batches-py/ folder, or an .npz with x_train, y_train, x_test, y_test"
)
_IMAGE_EXTS = (".jpg", ".jpeg", ".png")
_CHUNK = 1 << 20

Raw = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
Progress = Callable[[int, int], None]

_logger = logging.getLogger("jaxsparse.data")


class DataError(Explained, ValueError):
  """A data source is malformed, unsupported or inconsistent."""


class DataNotFoundError(DataError, FileNotFoundError):
  """A data source does not exist (missing path, dataset not prepared, download failed)."""


# ---------------------------------------------------------------- archives and folders


def _wanted(name: str) -> bool:
  base = name.rsplit("/", 1)[-1]
  return base.lower().endswith(_IMAGE_EXTS) or base in BATCH_NAMES


def read_tar(path: str) -> dict[str, bytes]:
  """The CIFAR-10 members (images, python batches) of a tar archive, by name."""
  members = {}
  try:
    with tarfile.open(path, "r:*") as tar:
      for member in tar:
        if member.isfile() and _wanted(member.name):
          members[member.name.removeprefix("./")] = tar.extractfile(member).read()
  except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
    raise DataError(f"{path}: corrupted or unreadable archive ({e})") from e
  return members


def dir_files(path: str) -> list[str]:
  """The CIFAR-10 files (images, python batches) under a folder, sorted."""
  return sorted(os.path.join(root, n) for root, _, names in os.walk(path) for n in names if _wanted(n))


def read_dir(path: str) -> dict[str, bytes]:
  """`dir_files(path)` read into memory, keyed by '/'-separated relative path."""
  return {os.path.relpath(f, path).replace(os.sep, "/"): pathlib.Path(f).read_bytes() for f in dir_files(path)}


class _ArrayUnpickler(pickle.Unpickler):
  """Unpickles only plain containers and numpy arrays (no arbitrary code)."""

  _ALLOWED = {  # (top-level module, name) -> object
    ("numpy", "_reconstruct"): np.zeros(1).__reduce__()[0],
    ("numpy", "_frombuffer"): np.zeros(1).__reduce_ex__(5)[0],
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,  # bytes in protocol-2 pickles written by Python 3
  }

  def find_class(self, module: str, name: str):
    allowed = self._ALLOWED.get((module.split(".")[0], name))
    if allowed is None:
      raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
    return allowed


def _decode_batch(data: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
  try:
    batch = _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
    images = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"])
  except Exception as e:  # pickle raises many types on corrupt input
    raise DataError(
      f"{where}: not a CIFAR-10 python batch, a pickled dict with b'data' and b'labels' ({type(e).__name__}: {e})"
    ) from e
  if images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != 3072:
    raise DataError(f"{where}: b'data' is {images.dtype} {images.shape}, expected uint8 (N, 3072)")
  return images.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _assemble_batches(members: dict[str, bytes], where: str) -> Raw:
  found = {}
  for name, data in members.items():
    base = name.rsplit("/", 1)[-1]
    if base in BATCH_NAMES:
      if base in found:
        raise DataError(f"{where}: several copies of {base}; expected one cifar-10-batches-py/")
      found[base] = (data, f"{where}/{name}")
  missing = [b for b in BATCH_NAMES if b not in found]
  if missing:
    raise DataError(f"{where}: missing {', '.join(missing)}; expected data_batch_1..5 and test_batch")
  train = [_decode_batch(*found[b]) for b in BATCH_NAMES[:-1]]
  x_test, y_test = _decode_batch(*found["test_batch"])
  return (np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]), x_test, y_test)


def _decode_image(data: bytes, where: str) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top

  try:
    with Image.open(io.BytesIO(data)) as image:
      if image.size != IMAGE_SHAPE[:2]:
        raise DataError(f"{where}: image is {image.size[0]}x{image.size[1]}, expected 32x32")
      return np.asarray(image.convert("RGB"))
  except DataError:
    raise
  except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for bad or truncated files
    raise DataError(f"{where}: cannot decode image ({e})") from e


def _assemble_folder(members: dict[str, bytes], where: str) -> Raw:
  layout = "<root>/{train,test}/<class>/<image>.jpg|png"
  tree: dict[str, dict[str, list[str]]] = {"train": {}, "test": {}}
  prefixes = set()
  for name in members:
    parts = name.split("/")
    if len(parts) < 3 or parts[-3] not in tree:
      raise DataError(f"{where}/{name}: image outside the expected layout {layout}")
    prefixes.add(tuple(parts[:-3]))
    tree[parts[-3]].setdefault(parts[-2], []).append(name)
  if len(prefixes) > 1:
    raise DataError(f"{where}: several image trees ({sorted('/'.join(p) for p in prefixes)})")
  classes = sorted(tree["train"])
  if sorted(tree["test"]) != classes or len(classes) != NUM_CLASSES:
    raise DataError(
      f"{where}: train classes {classes} and test classes {sorted(tree['test'])} "
      f"must be the same {NUM_CLASSES} folders ({layout})"
    )
  arrays = []
  for split in ("train", "test"):
    names = [(c, n) for c, cls in enumerate(classes) for n in sorted(tree[split][cls])]
    images = np.empty((len(names),) + IMAGE_SHAPE, np.uint8)
    for i, (_, name) in enumerate(names):
      images[i] = _decode_image(members[name], f"{where}/{name}")
    arrays += [images, np.array([c for c, _ in names], np.int32)]
  return tuple(arrays)


def from_members(members: dict[str, bytes], where: str) -> Raw:
  """Decodes python batches or an image-folder tree from `read_tar`/`read_dir` members."""
  if any(name.rsplit("/", 1)[-1] in BATCH_NAMES for name in members):
    return _assemble_batches(members, where)
  if members:
    return _assemble_folder(members, where)
  raise DataError(f"{where}: no CIFAR-10 data found; expected {LOCAL_SOURCES}")


def read_npz(path: str) -> Raw:
  """The four arrays of a CIFAR-10 .npz (x_train, y_train, x_test, y_test)."""
  try:
    with np.load(path, allow_pickle=False) as npz:
      missing = [k for k in KEYS if k not in npz.files]
      if missing:
        raise DataError(f"{path}: missing arrays {missing}; found {npz.files}, expected {KEYS}")
      return tuple(npz[k] for k in KEYS)
  except DataError:
    raise
  except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
    raise DataError(f"{path}: corrupted or unreadable .npz ({e})") from e


# ---------------------------------------------------------------- TFDS


def open_tfds(name: str, data_dir: str | None):
  """[train, test] TFDS data sources of an already-prepared dataset; never downloads."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise DataError(f"tfds:{name} needs tensorflow-datasets; or set {{data}} to one of {LOCAL_SOURCES}") from e
  try:
    return tfds.data_source(name, split=["train", "test"], data_dir=data_dir, download=False)
  except Exception as e:  # TFDS raises KeyError, AssertionError, ... when not prepared
    raise DataNotFoundError(
      f"TFDS dataset {name!r} is not prepared in the TFDS data_dir "
      f"({data_dir or '$TFDS_DATA_DIR or ~/tensorflow_datasets'}), and jaxsparse does not "
      f"download through TFDS (preparing needs TensorFlow and network: `tfds build {name}`). "
      f"Use {{data}}='cifar10' to download the original archive, or set {{data}} to a "
      f"local copy: {LOCAL_SOURCES}. [{type(e).__name__}: {e}]"
    ) from e


def read_tfds(sources, where: str) -> Raw:
  """Reads [train, test] TFDS data sources into uint8 images and int64 labels."""
  arrays = []
  for source in sources:
    shape = np.shape(source[0]["image"]) if len(source) else IMAGE_SHAPE
    if shape != IMAGE_SHAPE:
      raise DataError(f"{where}: images are {shape}, expected {IMAGE_SHAPE}")
    images = np.empty((len(source),) + IMAGE_SHAPE, np.uint8)
    labels = np.empty(len(source), np.int64)
    for i in range(len(source)):  # __getitems__ is broken under tfds.testing.mock_data
      example = source[i]
      images[i], labels[i] = example["image"], example["label"]
    arrays += [images, labels]
  return tuple(arrays)


# ---------------------------------------------------------------- download


def _chunks(url: str, size: int, timeout: float) -> Iterator[bytes]:
  """Streams `url`; network failures become DataNotFoundError (write errors stay outside)."""
  try:
    with urllib.request.urlopen(url, timeout=timeout) as response:
      length = response.headers.get("Content-Length")
      if length is not None and length.isdigit() and int(length) != size:
        raise DataError(f"{url}: the server offers {length} bytes, expected {size}")
      while chunk := response.read(_CHUNK):
        yield chunk
  except (OSError, http.client.HTTPException) as e:  # URLError, timeouts, resets, short reads
    raise DataNotFoundError(f"cannot download {url} ({type(e).__name__}: {e})") from e


def download(
  url: str, path: str, *, md5: str, size: int, progress: Progress | None = None, timeout: float = 10.0
) -> None:
  """Downloads `url` to `path`, moved into place only once its size and md5 match.

  One attempt, no retries: `timeout` bounds the connection and every read, so an offline
  machine fails within seconds. The bytes go to a temporary file beside `path` that is removed
  on any failure.

  Args:
    url: http(s) or file URL.
    path: destination; its folder is created if needed.
    md5: expected hex md5 of the whole file.
    size: expected size in bytes; a larger stream is cut off at `size + 1` bytes.
    progress: called as `progress(bytes_done, size)` after every chunk.
    timeout: seconds for connecting and for each read.

  Raises:
    DataNotFoundError: the URL cannot be reached or the transfer broke off.
    DataError: wrong size or md5, or `path`'s folder is not writable.

  Example:
    >>> download(CIFAR10_URL, "/tmp/cifar-10-python.tar.gz", md5=CIFAR10_MD5, size=CIFAR10_SIZE)
  """
  folder = os.path.dirname(os.path.abspath(path))
  try:
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".part")
  except OSError as e:
    raise DataError(f"cannot write the download to {folder}: {e}") from e
  _logger.info("downloading %s (%.0f MB) to %s", url, size / 1e6, path)
  try:
    digest, done = hashlib.md5(), 0
    with os.fdopen(fd, "wb") as f:
      for chunk in _chunks(url, size, timeout):
        f.write(chunk)
        digest.update(chunk)
        done += len(chunk)
        if progress is not None:
          progress(done, size)
        if done > size:
          break
    if done != size or digest.hexdigest() != md5:
      got = f"{done} bytes" if done != size else f"md5 {digest.hexdigest()}"
      raise DataError(
        f"{url}: downloaded file failed verification: got {got}, expected {size} bytes with md5 {md5}; nothing was kept"
      )
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared cache from other users
    os.replace(tmp, path)
  finally:
    with contextlib.suppress(OSError):
      os.remove(tmp)
  _logger.info("verified md5 %s: %s", md5, path)
