"""Tests for jaxsparse.data: sources, the cifar10 download, caching, splits, batches, errors."""

import functools
import hashlib
import http.server
import inspect
import os
import pickle
import socket
import tarfile
import threading
import types
import urllib.request

import hypothesis
import numpy as np
import pytest
import tensorflow_datasets as tfds
from hypothesis import strategies as st
from PIL import Image

from conftest import GENUINE_NPZ, JPEG_TGZ, synthetic_cifar_npz
from jaxsparse import data, data_sources

GENUINE = str(GENUINE_NPZ)
JPEG = str(JPEG_TGZ)
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _images(n, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def _smooth_images(n, seed=0):
  """n distinct images JPEG keeps almost exactly: a flat colour per image (levels 6 apart) and a gentle ramp."""
  ramp = (np.arange(32)[None, :, None, None] + np.arange(32)[None, None, :, None]) // 2  # 0..31 across the image
  level = 10 + 6 * np.arange(n)[:, None, None, None] + 3 * seed
  return (level + ramp + np.array([0, 10, 20])).astype(np.uint8)  # at most 250 for n = 30: nothing clipped


def _write_folder(root, per_class=(3, 1), fmt="png", classes=CLASSES, make=_images):
  """Writes <root>/{train,test}/<class>/NNNN.png; returns the expected (x, y) of each split."""
  expected = {}
  for split, count in zip(("train", "test"), per_class):
    images = make(len(classes) * count, seed=len(split))
    for i, image in enumerate(images):
      folder = root / split / classes[i // count]
      folder.mkdir(parents=True, exist_ok=True)
      Image.fromarray(image).save(folder / f"{i % count:04d}.{fmt}")
    expected[split] = images, np.repeat(np.arange(len(classes)), count)
  return expected


def _tar(src, dst, arcname):
  with tarfile.open(dst, "w:gz") as tar:
    tar.add(src, arcname=arcname)
  return dst


def _write_batches(root, per_batch=4, data_key=b"data"):
  """Writes cifar-10-batches-py/ pickles; returns expected (x_train, y_train, x_test, y_test)."""
  root.mkdir(parents=True, exist_ok=True)
  xs, ys = [], []
  for i, name in enumerate(data_sources.BATCH_NAMES):
    x, y = _images(per_batch, seed=i), [(i + j) % 10 for j in range(per_batch)]
    batch = {data_key: x.transpose(0, 3, 1, 2).reshape(per_batch, 3072), b"labels": y, b"batch_label": name.encode()}
    with open(root / name, "wb") as f:
      pickle.dump(batch, f, protocol=2)
    xs.append(x), ys.append(y)
  return np.concatenate(xs[:5]), np.concatenate(ys[:5]), xs[5], np.array(ys[5])


def _write_npz(path, n_train=40, n_test=12, **overrides):
  arrays = dict(
    x_train=_images(n_train, 1),
    y_train=np.arange(n_train) % 10,
    x_test=_images(n_test, 2),
    y_test=np.arange(n_test) % 10,
  )
  arrays.update(overrides)
  np.savez(path, **arrays)
  return arrays


def _split(n, seed=0):
  return data.Split(_images(n, seed), (np.arange(n) % 10).astype(np.int32))


@pytest.fixture
def cache(tmp_path):
  return str(tmp_path / "cache")


# ---------------------------------------------------------------- formats


def test_npz(tmp_path, cache):
  arrays = _write_npz(tmp_path / "c.npz")
  ds = data.load(str(tmp_path / "c.npz"), cache_dir=cache)
  np.testing.assert_array_equal(ds.train.images, arrays["x_train"])
  np.testing.assert_array_equal(ds.test.labels, arrays["y_test"])
  assert ds.train.labels.dtype == np.int32 and ds.val is None and ds.num_classes == 10
  assert ds.source == str(tmp_path / "c.npz") and not os.path.exists(cache)


def test_npz_keras_style_labels(tmp_path, cache):
  _write_npz(tmp_path / "c.npz", y_train=(np.arange(40) % 10)[:, None])
  assert data.load(str(tmp_path / "c.npz"), cache_dir=cache).train.labels.shape == (40,)


@pytest.mark.parametrize("archive", [False, True])
def test_image_folder(tmp_path, cache, archive):
  expected = _write_folder(tmp_path / "tree" / "cifar")
  source = tmp_path / "tree"
  if archive:
    source = _tar(source / "cifar", tmp_path / "cifar.tar.gz", "cifar")
  ds = data.load(str(source), cache_dir=cache)
  for split in ("train", "test"):
    np.testing.assert_array_equal(getattr(ds, split).images, expected[split][0])
    np.testing.assert_array_equal(getattr(ds, split).labels, expected[split][1])


def test_image_folder_jpeg(tmp_path, cache):
  expected = _write_folder(tmp_path / "tree", fmt="jpg", make=_smooth_images)
  ds = data.load(str(tmp_path / "tree"), cache_dir=cache)
  for split, n in (("train", 30), ("test", 10)):
    images, labels = getattr(ds, split).images.astype(int), getattr(ds, split).labels
    want_images, want_labels = expected[split]
    assert images.shape == (n, 32, 32, 3)
    np.testing.assert_array_equal(labels, want_labels)
    error = np.abs(images - want_images).mean(axis=(1, 2, 3))
    assert np.all(error < 2), error  # lossy, but within two levels on smooth images
    # ...and each is its own image, in order: of all the expected images, its own is the nearest.
    distance = np.abs(images[:, None] - want_images[None].astype(int)).mean(axis=(2, 3, 4))
    np.testing.assert_array_equal(np.argmin(distance, axis=1), np.arange(n))


@pytest.mark.parametrize("archive", [False, True])
def test_python_batches(tmp_path, cache, archive):
  x_train, y_train, x_test, y_test = _write_batches(tmp_path / "cifar-10-batches-py")
  source = tmp_path / "cifar-10-batches-py"
  if archive:
    source = _tar(source, tmp_path / "cifar-10-python.tar.gz", "cifar-10-batches-py")
  ds = data.load(str(source), cache_dir=cache)
  np.testing.assert_array_equal(ds.train.images, x_train)
  np.testing.assert_array_equal(ds.train.labels, y_train)
  np.testing.assert_array_equal(ds.test.images, x_test)
  np.testing.assert_array_equal(ds.test.labels, y_test)


def test_tfds_mock(cache):
  with tfds.testing.mock_data(num_examples=12):
    ds = data.load("tfds:cifar10", cache_dir=cache)
  assert ds.train.images.shape == (12, 32, 32, 3) and ds.test.labels.shape == (12,)
  assert ds.train.images.dtype == np.uint8 and ds.source.startswith("tfds:cifar10")


def test_tfds_mock_wrong_image_shape(cache):
  with tfds.testing.mock_data(num_examples=4):
    with pytest.raises(data.DataError, match=r"tfds:mnist .*images are \(28, 28, 1\)"):
      data.load("tfds:mnist", cache_dir=cache)
  assert not os.path.exists(cache)


def test_tfds_not_prepared_fails_fast(tmp_path, cache, monkeypatch):
  calls = []
  real = tfds.data_source
  monkeypatch.setattr(tfds, "data_source", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
  with pytest.raises(data.DataNotFoundError, match="Config.data") as info:
    data.load("tfds:cifar10", cache_dir=cache, tfds_data_dir=str(tmp_path / "tfds"))
  assert [kw["download"] for kw in calls] == [False]  # fast: TFDS is never asked to download (minutes offline)
  assert "cifar-10-python.tar.gz" in str(info.value) and not os.path.exists(cache)


# ---------------------------------------------------------------- caching


def test_cache_reused_and_invalidated(tmp_path, cache, monkeypatch):
  _write_batches(tmp_path / "b")
  first = data.load(str(tmp_path / "b"), cache_dir=cache)
  assert len(os.listdir(cache)) == 1
  monkeypatch.setattr(data_sources, "from_members", lambda *a: pytest.fail("decoded twice"))
  second = data.load(str(tmp_path / "b"), cache_dir=cache)
  np.testing.assert_array_equal(first.train.images, second.train.images)
  os.utime(tmp_path / "b" / "test_batch", ns=(1, 1))  # a changed file is a new source
  with pytest.raises(pytest.fail.Exception, match="decoded twice"):
    data.load(str(tmp_path / "b"), cache_dir=cache)


def test_interrupted_cache_write_leaves_nothing(tmp_path, cache, monkeypatch):
  _write_batches(tmp_path / "b")

  def crash(f, **arrays):
    f.write(b"PK partial")
    raise KeyboardInterrupt

  monkeypatch.setattr(np, "savez", crash)
  with pytest.raises(KeyboardInterrupt):
    data.load(str(tmp_path / "b"), cache_dir=cache)
  assert os.listdir(cache) == []
  monkeypatch.undo()
  assert data.load(str(tmp_path / "b"), cache_dir=cache).train.images.shape == (20, 32, 32, 3)


def test_unwritable_cache_is_logged_and_still_loads(tmp_path, caplog):
  _write_batches(tmp_path / "b")
  (tmp_path / "file").write_text("not a directory")
  with caplog.at_level("WARNING", logger="jaxsparse"):
    ds = data.load(str(tmp_path / "b"), cache_dir=str(tmp_path / "file"))
  assert "cannot write cache" in caplog.text  # on the library's one channel, the "jaxsparse" logger
  assert ds.train.images.shape == (20, 32, 32, 3)


def test_corrupt_cache_file_is_rebuilt(tmp_path, cache):
  _write_batches(tmp_path / "b")
  data.load(str(tmp_path / "b"), cache_dir=cache)
  (path,) = [os.path.join(cache, f) for f in os.listdir(cache)]
  with open(path, "wb") as f:
    f.write(b"garbage")
  assert data.load(str(tmp_path / "b"), cache_dir=cache).test.labels.shape == (4,)


# ---------------------------------------------------------------- errors


def _bad_size(root):
  _write_folder(root)
  Image.fromarray(_images(1)[0, :31]).save(root / "train" / "cat" / "0001.png")


def _bad_image(root):
  _write_folder(root)
  (root / "test" / "dog" / "0000.png").write_bytes(b"\x89PNG not really")


def _nine_classes(root):
  _write_folder(root, classes=CLASSES[:9])


def _class_mismatch(root):
  _write_folder(root)
  os.rename(root / "test" / "truck", root / "test" / "lorry")


def _stray_image(root):
  _write_folder(root)
  Image.fromarray(_images(1)[0]).save(root / "train" / "stray.png")


def _missing_batch(root):
  _write_batches(root)
  os.remove(root / "data_batch_3")


def _bad_batch_shape(root):
  _write_batches(root)
  with open(root / "data_batch_2", "wb") as f:
    pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)


def _malicious_pickle(root):
  _write_batches(root)
  with open(root / "test_batch", "wb") as f:
    pickle.dump({b"data": os.system, b"labels": []}, f)


def _batch_label_out_of_range(root):
  _write_batches(root)
  with open(root / "test_batch", "wb") as f:
    pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, f)


@pytest.mark.parametrize(
  "make, match",
  [
    (_bad_size, r"0001.png: image is 32x31, expected 32x32"),
    (_bad_image, r"dog/0000.png: cannot decode image"),
    (_nine_classes, r"same 10 folders"),
    (_class_mismatch, r"lorry"),
    (_stray_image, r"stray.png: image outside the expected layout"),
    (_missing_batch, r"missing data_batch_3"),
    (_bad_batch_shape, r"data_batch_2: b'data' is uint8 \(2, 100\), expected uint8 \(N, 3072\)"),
    (_malicious_pickle, r"test_batch: not a CIFAR-10 python batch.*refusing"),
    (_batch_label_out_of_range, r"y_test has labels in \[0, 10\], expected 0..9"),
  ],
)
@pytest.mark.parametrize("archive", [False, True])
def test_bad_local_sources(tmp_path, cache, make, match, archive):
  make(tmp_path / "src")
  source = _tar(tmp_path / "src", tmp_path / "src.tgz", "src") if archive else tmp_path / "src"
  with pytest.raises(data.DataError, match=match):
    data.load(str(source), cache_dir=cache)
  assert not os.path.exists(cache) or os.listdir(cache) == []


@pytest.mark.parametrize(
  "overrides, match",
  [
    (dict(y_train=np.full(40, 10)), r"y_train has labels in \[10, 10\]"),
    (dict(y_test=-np.ones(12, int)), r"y_test has labels in \[-1, -1\]"),
    (dict(x_test=np.zeros((12, 28, 28, 3), np.uint8)), r"x_test is uint8 \(12, 28, 28, 3\)"),
    (dict(x_train=np.zeros((40, 32, 32, 3), np.float32)), r"x_train is float32"),
    (dict(y_train=np.zeros(39, int)), r"y_train is int64 \(39,\), expected integers \(40,\)"),
  ],
)
def test_bad_npz(tmp_path, cache, overrides, match):
  _write_npz(tmp_path / "c.npz", **overrides)
  with pytest.raises(data.DataError, match=match):
    data.load(str(tmp_path / "c.npz"), cache_dir=cache)


def test_bad_paths(tmp_path, cache):
  with pytest.raises(FileNotFoundError, match=r"nowhere.tar.gz does not exist; expected"):
    data.load(str(tmp_path / "nowhere.tar.gz"), cache_dir=cache)
  with pytest.raises(data.DataError, match=r"unknown data source 'hf:cifar10'"):
    data.load("hf:cifar10", cache_dir=cache)
  (tmp_path / "notes.txt").write_text("hi")
  with pytest.raises(data.DataError, match=r"notes.txt: unknown file type"):
    data.load(str(tmp_path / "notes.txt"), cache_dir=cache)
  (tmp_path / "empty").mkdir()
  with pytest.raises(data.DataError, match=r"empty: no CIFAR-10 data found"):
    data.load(str(tmp_path / "empty"), cache_dir=cache)
  np.savez(tmp_path / "keys.npz", x=np.zeros(1))
  with pytest.raises(data.DataError, match=r"keys.npz: missing arrays"):
    data.load(str(tmp_path / "keys.npz"), cache_dir=cache)
  assert not os.path.exists(cache)


@pytest.mark.parametrize("name", ["broken.tar.gz", "broken.npz"])
def test_corrupted_files(tmp_path, cache, name):
  if name.endswith(".npz"):
    _write_npz(tmp_path / name)
  else:
    _write_batches(tmp_path / "b")
    _tar(tmp_path / "b", tmp_path / name, "b")
  blob = (tmp_path / name).read_bytes()
  (tmp_path / name).write_bytes(blob[: len(blob) // 2])
  with pytest.raises(data.DataError, match=f"{name}: corrupted or unreadable"):
    data.load(str(tmp_path / name), cache_dir=cache)
  assert not os.path.exists(cache) or os.listdir(cache) == []


# ---------------------------------------------------------------- the 'cifar10' source (download)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
  def log_message(self, *args):
    pass


@pytest.fixture
def no_proxy(monkeypatch):
  for name in ("http_proxy", "https_proxy", "all_proxy"):  # urllib would route 127.0.0.1 there
    monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv(name.upper(), raising=False)


@pytest.fixture
def fake_cifar(tmp_path, no_proxy):  # pylint: disable=unused-argument
  """A fake cifar-10-python.tar.gz served over loopback HTTP while the test runs."""
  expected = _write_batches(tmp_path / "src" / "cifar-10-batches-py")
  (tmp_path / "www").mkdir()
  archive = _tar(
    tmp_path / "src" / "cifar-10-batches-py", tmp_path / "www" / "cifar-10-python.tar.gz", "cifar-10-batches-py"
  )
  blob = archive.read_bytes()
  handler = functools.partial(_QuietHandler, directory=str(tmp_path / "www"))
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  thread = threading.Thread(target=server.serve_forever, kwargs=dict(poll_interval=0.05))
  thread.start()

  def stop():
    if thread.is_alive():
      server.shutdown()
      thread.join()
    server.server_close()

  url = f"http://127.0.0.1:{server.server_address[1]}/cifar-10-python.tar.gz"
  yield types.SimpleNamespace(
    url=url,
    blob=blob,
    expected=expected,
    stop=stop,
    kwargs=dict(
      download_url=url,
      download_md5=hashlib.md5(blob).hexdigest(),
      download_size=len(blob),
      tfds_data_dir=str(tmp_path / "tfds"),
    ),
  )
  stop()


def _closed_port_url():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  return f"http://127.0.0.1:{port}/cifar-10-python.tar.gz"


def test_cifar10_downloads_verifies_decodes_then_uses_the_cache(fake_cifar, cache, monkeypatch):
  calls = []
  ds = data.load("cifar10", cache_dir=cache, progress=lambda *a: calls.append(a), **fake_cifar.kwargs)
  for got, want in zip((ds.train.images, ds.train.labels, ds.test.images, ds.test.labels), fake_cifar.expected):
    np.testing.assert_array_equal(got, want)
  archive = os.path.join(cache, "cifar-10-python.tar.gz")
  assert ds.source == archive and open(archive, "rb").read() == fake_cifar.blob
  size = len(fake_cifar.blob)
  assert calls[-1] == (size, size) and [d for d, _ in calls] == sorted({d for d, _ in calls})
  assert sorted(f.endswith(".npz") for f in os.listdir(cache)) == [False, True]  # no temp files
  fake_cifar.stop()
  monkeypatch.setattr(data_sources, "from_members", lambda *a: pytest.fail("decoded twice"))
  again = data.load("cifar10", cache_dir=cache, **fake_cifar.kwargs)
  np.testing.assert_array_equal(again.train.images, ds.train.images)
  assert again.source == archive


def test_cifar10_downloads_again_over_a_truncated_archive(fake_cifar, cache):
  os.makedirs(cache)
  with open(os.path.join(cache, "cifar-10-python.tar.gz"), "wb") as f:
    f.write(fake_cifar.blob[:100])
  ds = data.load("cifar10", cache_dir=cache, **fake_cifar.kwargs)
  assert ds.test.labels.shape == (4,)
  assert os.path.getsize(os.path.join(cache, "cifar-10-python.tar.gz")) == len(fake_cifar.blob)


@pytest.mark.parametrize(
  "override, match",
  [
    (
      dict(download_md5="0" * 32),
      r"failed verification: got md5 [0-9a-f]{32}, expected \d+ "
      r"bytes with md5 0{32}; nothing was kept",
    ),
    (dict(download_size=10**6), r"the server offers \d+ bytes, expected 1000000"),
  ],
  ids=["md5", "size"],
)
def test_cifar10_bad_checksum_or_size_keeps_nothing(fake_cifar, cache, override, match):
  with pytest.raises(data.DataError, match=match) as info:
    data.load("cifar10", cache_dir=cache, **(fake_cifar.kwargs | override))
  assert not isinstance(info.value, data.DataNotFoundError)
  assert os.listdir(cache) == []


@pytest.mark.parametrize("where", ["closed port", "404"])
def test_cifar10_unreachable_fails_fast_naming_alternatives(fake_cifar, cache, where, monkeypatch):
  url = _closed_port_url() if where == "closed port" else fake_cifar.url + ".missing"
  timeouts = _spy_urlopen(monkeypatch)
  with pytest.raises(data.DataNotFoundError, match=r"cannot download .*Config.data") as info:
    data.load("cifar10", cache_dir=cache, **(fake_cifar.kwargs | dict(download_url=url)))
  assert timeouts == [10]  # fast: one attempt (no retries), bounded by the default timeout
  message = str(info.value)
  assert url in message and "TFDS cifar10 is not prepared" in message
  assert "cifar-10-python.tar.gz (md5" in message and ".npz" in message
  assert os.listdir(cache) == []


def _spy_urlopen(monkeypatch) -> list:
  """The timeout of every urllib.request.urlopen call from now on (the calls still go through)."""
  timeouts, real = [], urllib.request.urlopen
  monkeypatch.setattr(
    urllib.request,
    "urlopen",
    lambda url, *a, timeout, **kw: timeouts.append(timeout) or real(url, *a, timeout=timeout, **kw),
  )
  return timeouts


@pytest.mark.usefixtures("no_proxy")
def test_download_times_out_on_a_silent_server(tmp_path, monkeypatch):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    s.listen()  # the kernel accepts the connection; nobody ever answers
    url = f"http://127.0.0.1:{s.getsockname()[1]}/x"
    timeouts = _spy_urlopen(monkeypatch)
    with pytest.raises(data.DataNotFoundError, match=r"cannot download .*timed out"):
      data_sources.download(url, str(tmp_path / "x"), md5="0" * 32, size=1, timeout=0.3)
    assert timeouts == [0.3]  # the timeout that ended the wait is the one set, not the time the machine took
  assert os.listdir(tmp_path) == []
  assert inspect.signature(data_sources.download).parameters["timeout"].default == 10


def test_cifar10_prefers_prepared_tfds(cache):
  with tfds.testing.mock_data(num_examples=12):
    ds = data.load("cifar10", cache_dir=cache, download_url=_closed_port_url())
  assert ds.source.startswith("tfds:cifar10") and ds.train.images.shape == (12, 32, 32, 3)
  assert "cifar-10-python.tar.gz" not in os.listdir(cache)


def test_cifar10_is_the_default_source():
  assert inspect.signature(data.load).parameters["source"].default == "cifar10"


# ---------------------------------------------------------------- splits and statistics


def test_val_and_train_size_are_stratified_disjoint_and_seeded(tmp_path, cache):
  y = np.repeat(np.arange(10), [30, 30, 30, 30, 30, 20, 20, 20, 20, 20])
  x = _images(250)
  x[:, 0, 0, 0] = np.arange(250)  # pixel (0, 0) identifies the example
  np.savez(tmp_path / "c.npz", x_train=x, y_train=y, x_test=x[:5], y_test=y[:5])
  load = lambda **kw: data.load(str(tmp_path / "c.npz"), cache_dir=cache, **kw)
  ds = load(val_size=50, train_size=100, seed=3)
  val_ids, train_ids = ds.val.images[:, 0, 0, 0], ds.train.images[:, 0, 0, 0]
  assert np.bincount(ds.val.labels).tolist() == [6] * 5 + [4] * 5
  assert np.bincount(ds.train.labels).tolist() == [12] * 5 + [8] * 5
  assert not set(val_ids) & set(train_ids)
  np.testing.assert_array_equal(y[val_ids], ds.val.labels)
  np.testing.assert_array_equal(load(val_size=50, seed=3).val.images, ds.val.images)
  assert not np.array_equal(load(val_size=50, seed=4).val.images, ds.val.images)
  full = load(val_size=50, seed=3)
  assert len(full.train.labels) == 200
  assert set(full.train.images[:, 0, 0, 0]) | set(val_ids) == set(range(250))
  np.testing.assert_allclose(ds.mean, data.channel_stats(ds.train.images)[0])
  assert not ds.train.images.flags.writeable
  with pytest.raises(ValueError, match="val_size=250"):
    load(val_size=250)
  with pytest.raises(ValueError, match="train_size=201"):
    load(val_size=50, train_size=201)


@hypothesis.settings(max_examples=30, deadline=None, derandomize=True)
@hypothesis.given(
  counts=st.lists(st.integers(1, 20), min_size=1, max_size=10), frac=st.floats(0, 1), seed=st.integers(0, 2**16)
)
def test_stratified_indices_property(counts, frac, seed):
  labels = np.repeat(np.arange(len(counts)), counts)
  n = int(frac * len(labels))
  idx = data._stratified_indices(labels, n, np.random.default_rng(seed))
  assert len(idx) == n == len(np.unique(idx)) and np.all(np.diff(idx) > 0)
  got = np.bincount(labels[idx], minlength=len(counts))
  exact = n * np.array(counts) / len(labels)
  assert np.all(got >= np.floor(exact)) and np.all(got <= np.ceil(exact))


def test_channel_stats_exact():
  x = _images(7)
  mean, std = data.channel_stats(x)
  ref = x.reshape(-1, 3).astype(np.float64) / 255
  np.testing.assert_allclose(mean, ref.mean(0), rtol=1e-6)
  np.testing.assert_allclose(std, ref.std(0), rtol=1e-6)
  assert mean.dtype == std.dtype == np.float32


# ---------------------------------------------------------------- batches

MEAN, STD = np.array([0.5, 0.4, 0.3], np.float32), np.array([0.2, 0.25, 0.3], np.float32)


def _train(split, batch_size, **kw):
  kw = dict(mean=MEAN, std=STD, seed=0, epoch=0) | kw
  return list(data.train_batches(split, batch_size, **kw))


def _raw(batch):
  return np.rint((batch["image"] * STD + MEAN) * 255).astype(np.uint8)


def test_steps_per_epoch():
  assert data.steps_per_epoch(50000, 128) == 390 and data.steps_per_epoch(7, 8) == 0
  with pytest.raises(ValueError):
    data.steps_per_epoch(10, 0)


def test_train_batches_deterministic_permutation_and_normalized():
  split = _split(103)
  batches = _train(split, 10)
  assert len(batches) == 10
  assert batches[0]["image"].dtype == np.float32 and batches[0]["label"].dtype == np.int32
  images = np.concatenate([_raw(b) for b in batches])
  order = np.random.default_rng([0, 0]).permutation(103)[:100]
  np.testing.assert_array_equal(images, split.images[order])
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]), split.labels[order])
  again, other = _train(split, 10), _train(split, 10, epoch=1)
  assert all(np.array_equal(a["image"], b["image"]) for a, b in zip(batches, again))
  assert not np.array_equal(batches[0]["label"], other[0]["label"]) or not np.array_equal(
    batches[0]["image"], other[0]["image"]
  )


@pytest.mark.parametrize("augment", [None, "flip_crop"])
def test_resume_and_process_slices_match_full_run(augment):
  split = _split(64)
  full = _train(split, 16, augment=augment, epoch=2)
  resumed = _train(split, 16, augment=augment, epoch=2, start_step=3)
  assert len(resumed) == 1 and np.array_equal(resumed[0]["image"], full[3]["image"])
  assert _train(split, 16, start_step=4) == []
  parts = [_train(split, 16, augment=augment, epoch=2, process_index=i, process_count=4) for i in range(4)]
  for step in range(4):
    assert parts[0][step]["image"].shape == (4, 32, 32, 3)
    joined = np.concatenate([p[step]["image"] for p in parts])
    np.testing.assert_array_equal(joined, full[step]["image"])


def test_flip_crop():
  x = _images(3)
  flip, offsets = np.array([False, True, True]), np.array([[4, 4], [4, 4], [0, 8]])
  out = data.flip_crop(x, flip, offsets)
  np.testing.assert_array_equal(out[0], x[0])
  np.testing.assert_array_equal(out[1], x[1, :, ::-1])
  padded = np.pad(x[2], ((4, 4), (4, 4), (0, 0)))
  np.testing.assert_array_equal(out[2], padded[0:32, 8:40][:, ::-1])
  split = _split(32)
  plain, augmented = _train(split, 32), _train(split, 32, augment="flip_crop")
  assert not np.array_equal(plain[0]["image"], augmented[0]["image"])
  np.testing.assert_array_equal(plain[0]["label"], augmented[0]["label"])


def test_batch_argument_errors():
  split = _split(20)
  with pytest.raises(ValueError, match="multiple of process_count=3"):
    _train(split, 8, process_count=3)
  with pytest.raises(ValueError, match="multiple of process_count=3"):
    data.eval_batches(split, 8, mean=MEAN, std=STD, process_count=3)
  with pytest.raises(ValueError, match="process_index=2"):
    _train(split, 8, process_index=2, process_count=2)
  with pytest.raises(ValueError, match="start_step=3"):
    _train(split, 8, start_step=3)
  with pytest.raises(ValueError, match="augment='mixup'"):
    _train(split, 8, augment="mixup")
  with pytest.raises(data.DataError, match="exceeds the 20 training examples"):
    _train(split, 32)


@pytest.mark.parametrize("n, batch_size, process_count", [(103, 10, 1), (100, 10, 1), (5, 16, 1), (103, 12, 4)])
def test_eval_covers_every_example_once(n, batch_size, process_count):
  split = _split(n)
  per_process = [
    list(data.eval_batches(split, batch_size, mean=MEAN, std=STD, process_index=i, process_count=process_count))
    for i in range(process_count)
  ]
  assert all(len(p) == -(-n // batch_size) for p in per_process)
  batches = [b for step in zip(*per_process) for b in step]  # global order
  assert all(b["image"].shape[0] == batch_size // process_count for b in batches)
  mask = np.concatenate([b["mask"] for b in batches]).astype(bool)
  assert mask.sum() == n and mask.dtype == bool and not mask[n:].any()
  np.testing.assert_array_equal(np.concatenate([_raw(b) for b in batches])[mask], split.images)
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches])[mask], split.labels)


def test_the_synthetic_copy_loads_like_the_real_subset_and_is_deterministic(tmp_path, cache):
  a = synthetic_cifar_npz(tmp_path / "a.npz")
  b = synthetic_cifar_npz(tmp_path / "b.npz")
  with np.load(a) as x, np.load(b) as y:
    assert all(np.array_equal(x[k], y[k]) for k in ("x_train", "y_train", "x_test", "y_test"))
    assert x["x_train"].dtype == np.uint8 and x["y_train"].dtype == np.int64
  ds = data.load(str(a), cache_dir=cache, val_size=200)
  assert ds.train.images.shape == (1000, 32, 32, 3) and ds.test.images.shape == (400, 32, 32, 3)
  assert np.bincount(ds.test.labels).tolist() == [40] * 10


# ---------------------------------------------------------------- the shared real files


# Collected only where the real copies sit beside the repository (CI has them); a bare clone has no such test to skip.
if os.path.exists(GENUINE) and os.path.exists(JPEG):

  def test_genuine_subset(cache):
    ds = data.load(GENUINE, cache_dir=cache, val_size=170)
    assert ds.train.images.shape == (5000, 32, 32, 3) and ds.val.images.shape == (170, 32, 32, 3)
    assert ds.test.images.shape == (1017, 32, 32, 3)
    full = data.load(GENUINE, cache_dir=cache)
    assert full.train.images.shape == (5170, 32, 32, 3)
    np.testing.assert_allclose(full.mean, [0.493762, 0.484851, 0.448441], atol=1e-5)

  @pytest.mark.slow
  def test_jpeg_archive(cache, monkeypatch):
    ds = data.load(JPEG, cache_dir=cache)
    assert ds.train.images.shape == (50000, 32, 32, 3) and ds.test.images.shape == (10000, 32, 32, 3)
    assert np.bincount(ds.train.labels).tolist() == [5000] * 10
    assert np.bincount(ds.test.labels).tolist() == [1000] * 10
    with np.load(GENUINE) as genuine:  # the first test images of each class, in order
      x, y = genuine["x_test"], genuine["y_test"]
    for c in range(10):
      jpeg = ds.test.images[ds.test.labels == c][: (y == c).sum()]
      assert np.abs(jpeg.astype(int) - x[y == c]).mean() < 12  # JPEG loss, ~6 on average
    monkeypatch.setattr(data_sources, "read_tar", lambda *a: pytest.fail("read the archive twice"))
    monkeypatch.setattr(data_sources, "from_members", lambda *a: pytest.fail("decoded twice"))
    np.testing.assert_array_equal(data.load(JPEG, cache_dir=cache).test.images, ds.test.images)  # from the cache
