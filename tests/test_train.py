import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
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
    init = jax.jit(
      lambda rng: train_lib.create_train_state(rng, model, tx, controllers.get("dense"), image_shape=(8, 8, 3))
    )
    _STATES[model] = init(jax.random.PRNGKey(0))
  return _STATES[model]


def _batch(n=8, seed=0):
  rng = np.random.default_rng(seed)
  return {
    "image": rng.normal(size=(n, 8, 8, 3)).astype(np.float32),
    "label": rng.integers(0, 10, size=n).astype(np.int32),
  }


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
  assert len(densities) == 7  # WRN-10-1: 2 * 3 * 1 + 1 sites
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


# ------------------------------------------------------------ several regimes per step (sandwich)


def _sgd_state(model=None):
  """A state whose update is exactly params - grads (SGD, lr 1, no momentum or decay)."""
  model = model or _tiny()
  key = ("sgd", model)
  if key not in _STATES:
    init = jax.jit(
      lambda rng: train_lib.create_train_state(
        rng, model, optax.sgd(1.0), controllers.get("dense"), image_shape=(8, 8, 3)
      )
    )
    _STATES[key] = init(jax.random.PRNGKey(0))
  return _STATES[key]


def _grads_at(state, batch, keep, targets=None):
  """Gradient of one pass at `keep`, against the labels or against constant soft targets."""

  def loss(params):
    logits, _ = state.apply_fn(
      {"params": params, **state.model_state}, batch["image"], keep=keep, train=True, mutable=["density"]
    )
    if targets is None:
      return jnp.mean(train_lib.cross_entropy(logits, batch["label"]))
    return jnp.mean(optax.softmax_cross_entropy(logits, targets))

  return jax.jit(jax.grad(loss))(state.params)


def _sandwich_keeps(state, keep, regimes):
  keeps_rng = jax.random.split(jax.random.fold_in(state.rng, state.step), regimes + 1)[0]
  return np.asarray(train_lib.regime_keeps(keeps_rng, jnp.float32(keep), regimes))


@pytest.mark.parametrize("distill", [False, True])
def test_sandwich_gradient_is_the_mean_of_the_per_keep_gradients(distill):
  state, batch, regimes = _sgd_state(), _batch(), 4
  keeps = _sandwich_keeps(state, 0.2, regimes)
  assert keeps[0] == 1.0 and keeps[1] == np.float32(0.2) and ((keeps[2:] >= 0.2) & (keeps[2:] < 1)).all()
  new, metrics = jax.jit(functools.partial(train_lib.train_step, regimes=regimes, distill=distill))(
    state, batch, jnp.float32(0.2)
  )
  grads = jax.tree.map(lambda a, b: a - b, state.params, new.params)  # SGD at lr 1: the gradient itself
  targets = None
  if distill:  # constant soft targets from the dense pass: the reference has no path through them
    logits = state.apply_fn({"params": state.params}, batch["image"], keep=1.0, train=True)
    targets = jax.nn.softmax(logits)
  parts = [_grads_at(state, batch, jnp.float32(keeps[0]))]
  parts += [_grads_at(state, batch, jnp.float32(k), targets) for k in keeps[1:]]
  expected = jax.tree.map(lambda *g: sum(g) / regimes, *parts)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6), grads, expected)
  assert set(metrics) >= {"loss", "accuracy", "dense_loss", "dense_accuracy"}
  assert all(0.0 < float(v) <= 0.2 + 0.05 for k, v in metrics.items() if k.startswith("density/"))


def test_each_pass_of_a_sandwich_step_draws_its_own_dropout_mask():
  model = _tiny(dropout=0.5, zero_init_residual=False)  # else conv2, which reads the dropped units, starts at zero
  state, batch = _sgd_state(model), _batch()
  new, metrics = jax.jit(functools.partial(train_lib.train_step, regimes=3))(state, batch, jnp.float32(0.3))
  keeps = _sandwich_keeps(state, 0.3, 3)
  dropout_rngs = jax.random.split(jax.random.fold_in(state.rng, state.step), 4)[1:]

  def loss(keep, rng):
    logits, _ = state.apply_fn(
      {"params": state.params}, batch["image"], keep=keep, train=True, mutable=["density"], rngs={"dropout": rng}
    )
    return float(jnp.mean(train_lib.cross_entropy(logits, batch["label"])))

  losses = [loss(jnp.float32(k), r) for k, r in zip(keeps, dropout_rngs)]
  np.testing.assert_allclose(float(metrics["loss"]), np.mean(losses), rtol=1e-5)
  # The same keep with another pass's key gives another loss: the masks differ between passes.
  assert loss(jnp.float32(keeps[0]), dropout_rngs[1]) != losses[0]


@pytest.mark.parametrize("regimes", [1, 3])
def test_reset_warmup_scales_the_update_from_the_reset_on(regimes):
  state, batch, keep = _sgd_state(), _batch(), jnp.float32(0.5)
  plain = functools.partial(train_lib.train_step, regimes=regimes)
  warm = jax.jit(functools.partial(train_lib.train_step, regimes=regimes, reset_warmup=4))
  ref, ref_metrics = jax.jit(plain)(state, batch, keep)
  step, after_a_reset = int(state.step), state.controller._replace(cycle=jnp.int32(1))
  cases = [(after_a_reset, step, 0.25), (after_a_reset, step - 1, 0.5), (after_a_reset, step - 3, 1.0)]
  cases += [(after_a_reset, step + 1, 0.0), (state.controller, step, 1.0)]  # the first cycle: no reset began it
  for controller, reset_step, scale in cases:
    new, metrics = warm(state.replace(controller=controller, reset_step=jnp.int32(reset_step)), batch, keep)
    assert float(metrics["loss"]) == float(ref_metrics["loss"])  # the forward pass is the same
    expected = jax.tree.map(lambda p, r: p + scale * (r - p), state.params, ref.params)  # SGD at lr 1
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), new.params, expected)
  with pytest.raises(ValueError, match="reset_warmup must be >= 0, got -1"):
    train_lib.train_step(state, batch, keep, reset_warmup=-1)


def test_a_reset_starts_a_cycle_at_the_state_s_step():
  state = _sgd_state().replace(step=jnp.int32(7), reset_step=jnp.int32(3))
  same = state.with_controller(state.controller._replace(keep=jnp.float32(0.5)))  # a new keep, no reset
  assert int(same.reset_step) == 3 and float(same.controller.keep) == 0.5
  reset = state.with_controller(state.controller._replace(cycle=state.controller.cycle + 1))
  assert int(reset.reset_step) == 7


def test_distillation_targets_carry_no_gradient():
  """With distill, the sparse passes' loss reaches the parameters only through the sparse logits."""
  state, batch = _sgd_state(), _batch()
  new, _ = jax.jit(functools.partial(train_lib.train_step, regimes=2, distill=True))(state, batch, jnp.float32(0.3))
  grads = jax.tree.map(lambda a, b: a - b, state.params, new.params)
  logits = state.apply_fn({"params": state.params}, batch["image"], keep=1.0, train=True)

  def through_targets(params):  # the (wrong) gradient that also flows into the dense pass via the targets
    dense, _ = state.apply_fn({"params": params}, batch["image"], keep=1.0, train=True, mutable=["density"])
    sparse, _ = state.apply_fn({"params": params}, batch["image"], keep=0.3, train=True, mutable=["density"])
    return 0.5 * (
      jnp.mean(train_lib.cross_entropy(dense, batch["label"]))
      + jnp.mean(optax.softmax_cross_entropy(sparse, jax.nn.softmax(dense)))
    )

  wrong = jax.jit(jax.grad(through_targets))(state.params)
  right = jax.tree.map(
    lambda a, b: (a + b) / 2,
    _grads_at(state, batch, jnp.float32(1.0)),
    _grads_at(state, batch, jnp.float32(0.3), jax.nn.softmax(logits)),
  )
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6), grads, right)
  diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(wrong)))
  assert diff > 1e-4


def test_sandwich_compiles_once_and_draws_new_keeps_each_step():
  state, batch = _state(), _batch()
  step = jax.jit(functools.partial(train_lib.train_step, regimes=3, distill=True))
  state, _ = step(state, batch, jnp.float32(0.5))
  with jax.no_tracing():
    for keep in (0.1, 1.0, 0.3):
      state, m = step(state, batch, jnp.float32(keep))
  assert np.isfinite(float(m["loss"]))
  k1, k2 = _sandwich_keeps(state, 0.1, 3), _sandwich_keeps(state.replace(step=state.step + 1), 0.1, 3)
  assert k1[2] != k2[2]


def test_one_regime_step_is_unchanged_by_the_option():
  state, batch = _state(), _batch()
  a = jax.jit(train_lib.train_step)(state, batch, jnp.float32(0.5))
  b = jax.jit(functools.partial(train_lib.train_step, regimes=1))(state, batch, jnp.float32(0.5))
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(regimes=0), "regimes must be an integer >= 1, got 0"),
    (dict(regimes=2.0), "regimes must be an integer >= 1, got 2.0"),
    (dict(regimes=1, distill=True), "distill needs regimes >= 2"),
  ],
)
def test_bad_regime_options_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    train_lib.train_step(_state(), _batch(), jnp.float32(0.5), **kwargs)


@pytest.mark.parametrize(
  "args, kwargs, match",
  [
    ((0.5, 1), {}, "regimes must be an integer >= 2 for a multi-regime step, got 1"),
    ((0.0, 3), {}, r"min_keep must be in \(0, 1\], got 0.0"),
    ((0.6, 3), dict(max_keep=0.4), r"min_keep \(0.6\) must be <= max_keep \(0.4\)"),
    ((0.5, 3), dict(max_keep=1.5), r"max_keep must be in \(0, 1\], got 1.5"),
  ],
)
def test_regime_keeps_bad_input(args, kwargs, match):
  with pytest.raises(ValueError, match=match):
    train_lib.regime_keeps(jax.random.PRNGKey(0), *args, **kwargs)
