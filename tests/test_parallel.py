"""Data parallelism: 8 forced CPU devices give the same training as 1 (in a subprocess: XLA_FLAGS must be set
before jax initialises its backend)."""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from jaxsparse import parallel

_SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np
    from jaxsparse import controllers, parallel, train as train_lib
    from jaxsparse.models import WideResNet
    assert jax.device_count() == 8, jax.devices()

    def run(devices):
      mesh = parallel.make_mesh(devices)
      rep, bat = parallel.replicated(mesh), parallel.batch_sharded(mesh)
      model = WideResNet(depth=10, widen=1)
      tx = train_lib.make_optimizer(0.05)
      init = jax.jit(lambda r: train_lib.create_train_state(r, model, tx, controllers.get("dense"),
                                                             image_shape=(8, 8, 3)), out_shardings=rep)
      state = init(jax.random.PRNGKey(0))
      step = jax.jit(train_lib.train_step, in_shardings=(rep, bat, rep), out_shardings=(rep, rep),
                     donate_argnums=0)
      rng = np.random.default_rng(0)
      batches = [{"image": rng.normal(size=(16, 8, 8, 3)).astype(np.float32),
                  "label": rng.integers(0, 10, 16).astype(np.int32)} for _ in range(3)]
      losses = []
      for batch in parallel.prefetch_to_mesh(batches, mesh):
        assert len(batch["image"].sharding.device_set) == len(devices)
        state, m = step(state, batch, jax.device_put(jnp.float32(0.3), rep))
        losses.append(float(m["loss"]))
      return losses, jax.tree.map(np.asarray, jax.device_get(state.params))

    l8, p8 = run(jax.devices())
    l1, p1 = run(jax.devices()[:1])
    np.testing.assert_allclose(l8, l1, rtol=1e-5, atol=1e-6)
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(p8), jax.tree.leaves(p1)))
    assert diff < 1e-5, diff
    print("OK", diff)
""")


def _run_with_devices(script: str, devices: int = 8):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout


def test_eight_devices_match_one_device():
  assert "OK" in _run_with_devices(_SCRIPT)


_BATCH_SIZE_SCRIPT = textwrap.dedent("""
    import jax, pytest
    from jaxsparse import parallel
    assert jax.device_count() == 8, jax.devices()
    mesh = parallel.make_mesh()
    for ok in (8, 16, 64):
      parallel.check_batch_size(ok, mesh)
    for bad in (9, 12, 4):
      with pytest.raises(ValueError, match=f"batch size {bad} is not divisible by the 8 devices.*multiple of 8"):
        parallel.check_batch_size(bad, mesh)
    parallel.check_batch_size(3, parallel.make_mesh(jax.devices()[:1]))  # one device takes any batch
    print("OK")
""")


def test_batch_size_must_divide_devices():
  # With one device every batch size divides: the refusal needs a mesh of several (8 forced CPU devices).
  assert "OK" in _run_with_devices(_BATCH_SIZE_SCRIPT)


def test_prefetch_keeps_order_and_raises_producer_errors():
  mesh = parallel.make_mesh(jax.devices()[:1])
  batches = [{"x": np.full((2,), i, np.float32)} for i in range(5)]
  got = [int(b["x"][0]) for b in parallel.prefetch_to_mesh(batches, mesh, size=2)]
  assert got == list(range(5))

  def broken():
    yield {"x": np.zeros(2, np.float32)}
    raise OSError("disk gone")

  with pytest.raises(OSError, match="disk gone"):
    list(parallel.prefetch_to_mesh(broken(), mesh))
