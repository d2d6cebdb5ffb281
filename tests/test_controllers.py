"""Tests for jaxsparse.controllers: scripted trajectories, jit parity, pytree state, registry."""

import functools

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsparse import controllers, schedules

NAN = float("nan")
F32 = np.float32


def _metrics(train_accuracy=NAN, val_accuracy=NAN, train_loss=1.0):
  return controllers.EpochMetrics(train_accuracy=train_accuracy, train_loss=train_loss, val_accuracy=val_accuracy)


def _run(ctrl, metrics, jit=False):
  """States after each update (the init state excluded)."""
  update = jax.jit(ctrl.update) if jit else ctrl.update
  state, states = ctrl.init(), []
  for m in metrics:
    m = jax.tree.map(jnp.float32, m) if jit else m
    state = update(state, m)
    states.append(state)
  return states


def _field(states, name):
  return [getattr(s, name).item() for s in states]


def test_dense_and_constant():
  for ctrl, keep in ((controllers.dense(), 1.0), (controllers.constant(keep=0.3), F32(0.3))):
    assert ctrl.init().keep == keep and not ctrl.needs_validation
    states = _run(ctrl, [_metrics(0.5, 0.5)] * 3)
    assert _field(states, "keep") == [keep] * 3
    assert _field(states, "epoch") == [1, 2, 3]
    assert _field(states, "cycle") == [0, 0, 0]


def test_cyclic_follows_schedule_in_epochs():
  ctrl = controllers.cyclic(min_keep=0.25, period=3, warmup=1, cycles=2)
  keep_at = schedules.cyclic(0.25, 3, warmup=1, cycles=2)
  cycle_at = schedules.cycle_index(3, warmup=1, cycles=2)
  states = [ctrl.init()] + _run(ctrl, [_metrics()] * 9)
  np.testing.assert_array_equal(_field(states, "keep"), keep_at(jnp.arange(10)))
  np.testing.assert_array_equal(_field(states, "cycle"), cycle_at(jnp.arange(10)))
  np.testing.assert_allclose(_field(states, "keep"), [1, 1, 0.5, 0.25, 1, 0.5, 0.25, 1, 1, 1], rtol=1e-6)
  assert _field(states, "cycle") == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_adaptive_a_compress_hold_patience_reset():
  ctrl = controllers.adaptive_a(min_keep=0.2, gamma=0.5, tol=0.1, patience=2)
  accs = [
    0.50,  # dense epoch: ref 0.5, compress to 0.5
    0.40,  # < 0.9 * 0.5: hold (1)
    0.44,  # hold (2)
    0.30,  # patience spent: compress anyway to 0.25
    0.46,  # recovered: compress, clamped to min_keep 0.2
    0.46,  # recovered at min_keep: reset, cycle 1
    0.70,  # dense epoch: new ref 0.7, compress to 0.5
    0.62,
  ]  # < 0.63: hold
  states = _run(ctrl, [_metrics(a) for a in accs])
  assert _field(states, "keep") == [0.5, 0.5, 0.5, 0.25, F32(0.2), 1.0, 0.5, 0.5]
  assert _field(states, "holds") == [0, 1, 2, 0, 0, 0, 0, 1]
  assert _field(states, "cycle") == [0, 0, 0, 0, 0, 1, 1, 1]
  assert _field(states, "epoch") == list(range(1, 9))
  np.testing.assert_allclose(_field(states, "ref"), [0.5] * 6 + [0.7] * 2, rtol=1e-6)
  assert not ctrl.needs_validation


def test_adaptive_a_defaults_fast_recovery_cycle():
  ctrl = controllers.adaptive_a()
  states = _run(ctrl, [_metrics(0.9)] * 9)
  np.testing.assert_allclose(
    _field(states, "keep"), [0.7, 0.49, 0.343, 0.2401, 0.16807, 0.117649, 0.1, 1.0, 0.7], rtol=1e-6
  )
  assert _field(states, "cycle") == [0] * 7 + [1, 1]


def test_adaptive_a_zero_patience_never_holds_and_nan_holds():
  never = _run(controllers.adaptive_a(gamma=0.5, patience=0), [_metrics(0.9), _metrics(0.0)])
  assert _field(never, "keep") == [0.5, 0.25]
  holds = _run(controllers.adaptive_a(gamma=0.5), [_metrics(0.9), _metrics(NAN)])
  assert _field(holds, "keep") == [0.5, 0.5] and holds[-1].holds == 1


def test_adaptive_b_grow_shrink_reset():
  ctrl = controllers.adaptive_b(min_keep=0.1, gamma=0.5, tol=0.02, grow=2.0, shrink=0.5, gamma_min=0.2, gamma_max=0.8)
  vals = [
    0.60,  # dense: best 0.60, compress by gamma 0.5
    0.62,  # improved: gamma 0.5**2 = 0.25, keep 0.5 * 0.25
    0.61,  # hurt but within tol: gamma 0.25**0.5 = 0.5, keep max(0.0625, 0.1)
    0.615,  # improved (gamma 0.25) but keep at min_keep: reset, cycle 1
    0.63,  # dense: best 0.63, compress by gamma 0.25
    0.60,  # below best - tol: reset, cycle 2; hurt: gamma 0.5
    0.64,  # dense: compress by 0.5
    0.66,  # improved: gamma 0.25, keep 0.125
    0.67,
  ]  # improved: gamma 0.0625 -> bound 0.2, keep max(0.025, 0.1)
  states = _run(ctrl, [_metrics(0.1, v) for v in vals])
  assert _field(states, "keep") == [0.5, 0.125, F32(0.1), 1.0, 0.25, 1.0, 0.5, 0.125, F32(0.1)]
  np.testing.assert_allclose(_field(states, "gamma"), [0.5, 0.25, 0.5, 0.25, 0.25, 0.5, 0.5, 0.25, 0.2], rtol=1e-6)
  assert _field(states, "cycle") == [0, 0, 0, 1, 1, 2, 2, 2, 2]
  np.testing.assert_allclose(_field(states, "ref"), [0.60, 0.62, 0.62, 0.62, 0.63, 0.63, 0.64, 0.66, 0.67], rtol=1e-6)
  assert ctrl.needs_validation


def test_adaptive_b_gamma_upper_bound_and_default_docstring_values():
  # Hurt: 0.7 ** 0.5 = 0.837 is capped at 0.8; then held (equal accuracy) counts as good.
  capped = _run(
    controllers.adaptive_b(gamma=0.7, shrink=0.5, gamma_max=0.8),
    [_metrics(val_accuracy=v) for v in (0.6, 0.595, 0.595)],
  )
  np.testing.assert_allclose(_field(capped, "gamma"), [0.7, 0.8, 0.8**1.25], rtol=1e-6)
  np.testing.assert_allclose(_field(capped, "keep"), [0.7, 0.56, 0.56 * 0.8**1.25], rtol=1e-6)
  rising = _run(controllers.adaptive_b(), [_metrics(val_accuracy=0.6 + 0.01 * i) for i in range(6)])
  np.testing.assert_allclose(_field(rising, "keep"), [0.7, 0.448, 0.257, 0.128, 0.1, 1.0], atol=1e-3)


def test_adaptive_b_nan_validation_resets():
  states = _run(controllers.adaptive_b(), [_metrics(0.9, NAN)] * 2)
  assert _field(states, "keep") == [F32(0.7), 1.0]
  assert states[-1].cycle == 1


SCRIPT = [
  _metrics(a, v)
  for a, v in [
    (0.5, 0.6),
    (0.52, 0.62),
    (0.4, 0.61),
    (0.3, 0.5),
    (0.6, 0.65),
    (0.61, 0.66),
    (0.62, 0.66),
    (0.3, 0.62),
    (0.64, 0.67),
    (0.65, 0.68),
    (0.66, 0.69),
    (0.7, 0.7),
  ]
]


@pytest.mark.parametrize("name", controllers.names())
def test_jit_update_equals_eager(name):
  ctrl = controllers.get(name)
  eager = _run(ctrl, SCRIPT)
  jitted = _run(ctrl, SCRIPT, jit=True)
  chex.assert_trees_all_close(eager, jitted, rtol=1e-6)
  np.testing.assert_array_equal(_field(eager, "cycle"), _field(jitted, "cycle"))


@pytest.mark.parametrize("name", controllers.names())
def test_state_is_a_pytree_of_typed_scalars(name):
  ctrl = controllers.get(name)
  init = ctrl.init()
  updated = ctrl.update(init, SCRIPT[0])
  want = {
    "keep": jnp.float32,
    "cycle": jnp.int32,
    "epoch": jnp.int32,
    "ref": jnp.float32,
    "prev": jnp.float32,
    "gamma": jnp.float32,
    "holds": jnp.int32,
  }
  for state in (init, updated):
    assert isinstance(state, controllers.ControllerState)
    assert {k: v.dtype for k, v in state._asdict().items()} == want
    assert all(isinstance(x, jax.Array) and x.shape == () for x in jax.tree.leaves(state))
  # One structure for every controller: the loop can checkpoint any of them the same way.
  assert jax.tree.structure(updated) == jax.tree.structure(controllers.dense().init())


def test_update_compiles_once():
  ctrl = controllers.adaptive_b()
  update = jax.jit(ctrl.update)
  metrics = [jax.tree.map(jnp.float32, m) for m in SCRIPT]
  state = update(ctrl.init(), metrics[0])
  with jax.no_tracing():
    for m in metrics[1:]:
      state = update(state, m)


@functools.partial(jax.jit, static_argnums=0)
def _scan(name, accs, vals):
  ctrl = controllers.get(name)

  def step(state, m):
    new = ctrl.update(state, controllers.EpochMetrics(m[0], 1.0, m[1]))
    return new, new

  return jax.lax.scan(step, ctrl.init(), jnp.stack([accs, vals], axis=1))[1]


@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(
  name=st.sampled_from(["adaptive_a", "adaptive_b"]),
  seq=st.lists(st.tuples(st.floats(0, 1, width=32), st.floats(0, 1, width=32)), min_size=24, max_size=24),
)
def test_adaptive_invariants(name, seq):
  accs, vals = np.asarray(seq, np.float32).T
  states = jax.tree.map(np.asarray, _scan(name, jnp.asarray(accs), jnp.asarray(vals)))
  keep, cycle = states.keep, states.cycle
  assert np.all((keep >= F32(0.1)) & (keep <= 1.0))
  np.testing.assert_array_equal(states.epoch, np.arange(1, 25))
  steps = np.diff(np.concatenate([[0], cycle]))
  assert set(steps.tolist()) <= {0, 1}
  # A reset is exactly a return to dense (a dense epoch always compresses next).
  np.testing.assert_array_equal(steps == 1, keep == 1.0)
  if name == "adaptive_a":
    assert np.all(states.holds <= 3)
  else:
    assert np.all((states.gamma >= F32(0.3)) & (states.gamma <= F32(0.9)))


def test_registry():
  assert controllers.names() == ("dense", "constant", "cyclic", "adaptive_a", "adaptive_b")
  assert controllers.options("dense") == {}
  assert controllers.options("constant") == {"keep": 0.5}
  assert controllers.options("adaptive_a") == {"min_keep": 0.1, "gamma": 0.7, "tol": 0.02, "patience": 3}
  assert controllers.options("adaptive_b") == {
    "min_keep": 0.1,
    "gamma": 0.7,
    "tol": 0.01,
    "grow": 1.25,
    "shrink": 0.8,
    "gamma_min": 0.3,
    "gamma_max": 0.9,
  }
  assert controllers.options("cyclic") == {
    "min_keep": 0.1,
    "period": 10,
    "shape": "geometric",
    "warmup": 0,
    "cycles": None,
    "final_keep": 1.0,
  }
  for name in controllers.names():
    ctrl = controllers.get(name, **controllers.options(name))
    assert ctrl.needs_validation == (name == "adaptive_b")
  assert controllers.get("cyclic", period=4, shape="linear").update(
    controllers.get("cyclic", period=4).init(), _metrics()
  ).keep == pytest.approx(0.7, rel=1e-6)


def test_registry_errors():
  with pytest.raises(ValueError, match="unknown controller 'adaptive_c'.*adaptive_b"):
    controllers.get("adaptive_c")
  with pytest.raises(ValueError, match="unknown controller"):
    controllers.options("nope")
  with pytest.raises(ValueError, match=r"\['period'\].*'adaptive_a'.*patience"):
    controllers.get("adaptive_a", period=3)
  with pytest.raises(ValueError, match="unknown option.*'dense'.*none"):
    controllers.get("dense", keep=0.5)


@pytest.mark.parametrize(
  "name, kwargs, bad",
  [
    ("constant", {"keep": 0.0}, "keep"),
    ("cyclic", {"period": 0}, "period"),
    ("cyclic", {"shape": "exp"}, "'exp'"),
    ("adaptive_a", {"min_keep": 1.0}, "min_keep"),
    ("adaptive_a", {"gamma": 1.0}, "gamma"),
    ("adaptive_a", {"tol": -0.1}, "-0.1"),
    ("adaptive_a", {"patience": -1}, "patience"),
    ("adaptive_a", {"patience": 1.5}, "1.5"),
    ("adaptive_b", {"gamma": 0.95}, "gamma must"),
    ("adaptive_b", {"grow": 0.9}, "grow"),
    ("adaptive_b", {"shrink": 0.0}, "shrink"),
    ("adaptive_b", {"gamma_min": 0.5, "gamma_max": 0.4}, "gamma_max"),
  ],
)
def test_invalid_options_raise(name, kwargs, bad):
  with pytest.raises(ValueError, match=bad):
    controllers.get(name, **kwargs)
