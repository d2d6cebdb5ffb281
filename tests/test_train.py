import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsparse import controllers
from jaxsparse import train as train_lib
from jaxsparse.models import WideResNet


def _tiny(**kw):
  return WideResNet(depth=10, widen=1, **kw)


_STATES = {}


def _state(model=None):
  """A fresh-from-init train state, built once per model (pytrees are immutable; steps return new states)."""
  model = model or _tiny()
  if model not in _STATES:
    tx = train_lib.make_optimizer(0.05, weight_decay=5e-4)
    init = jax.jit(lambda rng: train_lib.create_train_state(rng, model, tx, controllers.get("dense"),
                                                             image_shape=(8, 8, 3)))
    _STATES[model] = init(jax.random.PRNGKey(0))
  return _STATES[model]


def _batch(n=8, seed=0):
  rng = np.random.default_rng(seed)
  return {"image": rng.normal(size=(n, 8, 8, 3)).astype(np.float32),
          "label": rng.integers(0, 10, size=n).astype(np.int32)}


def test_lr_schedule_warmup_then_cosine_to_zero():
  s = train_lib.lr_schedule(0.1, total_steps=100, warmup_steps=10)
  np.testing.assert_allclose([s(0), s(5), s(10), s(55), s(100)], [0.0, 0.05, 0.1, 0.05, 0.0], atol=1e-6)
  with pytest.raises(ValueError, match="warmup_steps"):
    train_lib.lr_schedule(0.1, total_steps=10, warmup_steps=11)


def test_weight_decay_only_on_kernels():
  state = _state()
  mask = train_lib.decay_mask(state.params)
  flat = jax.tree_util.tree_flatten_with_path(mask)[0]
  for path, decayed in flat:
    name = jax.tree_util.keystr(path)
    assert decayed == ("kernel" in name), name


def test_train_step_fits_a_fixed_batch_and_reports_densities():
  state = _state()
  batch = _batch()
  step = jax.jit(train_lib.train_step)
  keep = jnp.float32(0.5)
  losses = []
  for _ in range(30):
    state, m = step(state, batch, keep)
    losses.append(float(m["loss"]))
  assert losses[-1] < 0.3 * losses[0]
  assert int(state.step) == 30
  densities = {k: float(v) for k, v in m.items() if k.startswith("density/")}
  assert len(densities) == 7                     # WRN-10-1: 2 * 3 * 1 + 1 sites
  assert all(0.0 < d <= 0.5 + 1e-6 for d in densities.values()), densities


def test_train_step_compiles_once_for_every_keep():
  state = _state()
  batch = _batch()
  step = jax.jit(train_lib.train_step)
  state, _ = step(state, batch, jnp.float32(1.0))
  with jax.no_tracing():
    for keep in (0.7, 0.1, 1.0, 0.05):
      state, _ = step(state, batch, jnp.float32(keep))


def test_keep_one_equals_the_plain_model():
  plain, sparse = _state(_tiny(sites=False)), _state(_tiny())
  batch = _batch()
  step = jax.jit(train_lib.train_step)
  s1, m1 = step(plain, batch, jnp.float32(1.0))
  s2, m2 = step(sparse, batch, jnp.float32(1.0))
  np.testing.assert_array_equal(m1["loss"], m2["loss"])
  jax.tree.map(np.testing.assert_array_equal, s1.params, s2.params)


def test_eval_step_ignores_padding():
  state = _state()
  batch = _batch(8)
  real = {k: v[:5] for k, v in batch.items()}
  real["mask"] = np.ones(5, np.float32)
  padded = dict(batch, mask=np.array([1, 1, 1, 1, 1, 0, 0, 0], np.float32))
  a = jax.jit(train_lib.eval_step)(state, real, jnp.float32(0.3))
  b = jax.jit(train_lib.eval_step)(state, padded, jnp.float32(0.3))
  assert float(b["count"]) == 5.0
  np.testing.assert_allclose(float(a["loss"]), float(b["loss"]), rtol=1e-6)
  assert float(a["correct"]) == float(b["correct"])


def test_batchnorm_state_is_updated():
  state = _state(_tiny(norm="batchnorm"))
  assert "batch_stats" in state.model_state
  new, _ = jax.jit(train_lib.train_step)(state, _batch(), jnp.float32(0.5))
  before = jax.tree.leaves(state.model_state)
  after = jax.tree.leaves(new.model_state)
  assert any(not np.array_equal(a, b) for a, b in zip(before, after))
