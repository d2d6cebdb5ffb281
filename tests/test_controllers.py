"""Tests for jaxsparse.controllers: scripted trajectories, jit parity, pytree state, registry."""

import functools
import re

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsparse import controllers, schedules
from jaxsparse.errors import Explained, OptionError

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


@hypothesis.settings(max_examples=25, deadline=None, derandomize=True)
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
  assert controllers.names() == ("dense", "constant", "cyclic", "adaptive_a", "adaptive_b", "tighten_relax")
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
  assert controllers.options("tighten_relax") == {  # the author's script's values
    "interval": 128,
    "tighten": 0.018,
    "tol": 0.12,
    "beta": 0.5,
    "cooldown": 3,
    "relax_step": 1.0,
    "relax_gain": 1.5,
    "max_scale": 5.0,
    "max_jump": 1.0,
    "min_keep": 0.0,
    "max_keep": 1.0,
    "init_keep": 1.0,
  }
  for name in controllers.names():
    ctrl = controllers.get(name, **controllers.options(name))
    assert ctrl.needs_validation == (name == "adaptive_b")
    assert (ctrl.step is not None) == (name == "tighten_relax")
  assert controllers.get("cyclic", period=4, shape="linear").update(
    controllers.get("cyclic", period=4).init(), _metrics()
  ).keep == pytest.approx(0.7, rel=1e-6)


def test_registry_errors():
  with pytest.raises(ValueError, match="unknown controller 'adaptive_c'.*adaptive_b"):
    controllers.get("adaptive_c")
  with pytest.raises(ValueError, match="unknown controller"):
    controllers.options("nope")
  with pytest.raises(
    OptionError, match=r"^Config.controller_options\['period'\] .* Config.schedule 'adaptive_a'.*'patience'"
  ):
    controllers.get("adaptive_a", period=3)
  with pytest.raises(
    OptionError, match="^Config.controller_options\\['keep'\\] does not apply .*'dense'; its options: none$"
  ):
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
  with pytest.raises(ValueError) as e:
    controllers.get(name, **kwargs)
  assert re.search(bad, _plain(e.value)), e.value


def _plain(error: Exception) -> str:
  """An error's message with each option it names by its plain name (``Config.controller_options['tol']`` ->
  ``tol``)."""
  return error.render(lambda name: name.rpartition(".")[2]) if isinstance(error, Explained) else str(error)


def _steps(ctrl, accuracies, jit=False):
  """States after each optimiser step of a step-level controller (the init state excluded)."""
  step = jax.jit(ctrl.step) if jit else ctrl.step
  state, states = ctrl.init(), []
  for t, a in enumerate(accuracies):
    state = step(state, jnp.float32(a) if jit else a, jnp.int32(t))
    states.append(state)
  return states


def test_tighten_relax_hand_trace():
  # Decisions every 2 steps; each tightening halves keep; a drop of more than 0.1 relaxes, then 1 decision holds.
  ctrl = controllers.tighten_relax(interval=2, tighten=0.5, tol=0.1, cooldown=1)
  accs = [0.8, 0.8, 0.6, 0.6, 0.8, 0.8, 0.8, 0.8]
  # EMA (beta 0.5): the first batch sets EMA and best to 0.8; then 0.8, 0.7, 0.65 (drop 0.15 at the 2nd decision),
  # 0.725, 0.7625 (decision in the cooldown: hold), 0.78125, 0.790625 (decision: tighten; best is still 0.8).
  want_keep = [1, 0.5, 0.5, 1, 1, 1, 1, 0.5]
  want_ema = [0.8, 0.8, 0.7, 0.65, 0.725, 0.7625, 0.78125, 0.790625]
  for jit in (False, True):
    states = _steps(ctrl, accs, jit=jit)
    np.testing.assert_allclose(_field(states, "keep"), want_keep, rtol=1e-6)
    np.testing.assert_allclose(_field(states, "prev"), want_ema, rtol=1e-6)
    np.testing.assert_allclose(_field(states, "ref"), [0.8] * 8, rtol=1e-6)  # the best EMA, never reset
    assert _field(states, "holds") == [0, 0, 0, 1, 1, 0, 0, 0]
    assert _field(states, "cycle") == [0, 0, 0, 1, 1, 1, 1, 1]
    assert _field(states, "epoch") == [0] * 8  # only the epoch-end update counts epochs


def test_tighten_relax_first_batch_sets_ema_and_best():
  ctrl = controllers.tighten_relax()
  (state,) = _steps(ctrl, [0.3])
  assert state.prev == F32(0.3) and state.ref == F32(0.3) and state.keep == 1.0  # not 0.5 * 0.3 from an EMA of 0
  state = ctrl.update(state, _metrics(0.3))
  assert int(state.epoch) == 1 and state.keep == 1.0 and state.prev == F32(0.3)


def test_tighten_relax_relaxes_from_a_small_keep_by_the_scaled_capped_step():
  # relax_step 0.1, cap 0.15: a drop of 0.15 over tol 0.1 gives scale 1 + 1.5 * 0.05 / 0.1 = 1.75, step 0.175,
  # capped at 0.15; a drop of 0.3 (scale 4.75) likewise.
  ctrl = controllers.tighten_relax(interval=1, tighten=0.5, tol=0.1, cooldown=0, relax_step=0.1, max_jump=0.15)
  states = _steps(ctrl, [0.8, 0.8, 0.8, 0.8, 0.5])  # keep 0.5, 0.25, 0.125, 0.0625; then EMA 0.65: drop 0.15
  np.testing.assert_allclose(_field(states, "keep"), [0.5, 0.25, 0.125, 0.0625, 0.2125], rtol=1e-6)
  assert int(states[-1].cycle) == 1
  # Without the cap, the step is relax_step * min(scale, max_scale): 0.1 * 1.75.
  free = controllers.tighten_relax(interval=1, tighten=0.5, tol=0.1, cooldown=0, relax_step=0.1, max_jump=0.0)
  assert _steps(free, [0.8, 0.8, 0.8, 0.8, 0.5])[-1].keep == pytest.approx(0.0625 + 0.175, rel=1e-6)
  capped = controllers.tighten_relax(interval=1, tighten=0.5, tol=0.1, cooldown=0, relax_step=0.1, max_jump=0.0,
                                     max_scale=1.2)  # fmt: skip
  assert _steps(capped, [0.8, 0.8, 0.8, 0.8, 0.5])[-1].keep == pytest.approx(0.0625 + 0.12, rel=1e-6)


def test_tighten_relax_relaxes_during_a_cooldown_and_restarts_it():
  ctrl = controllers.tighten_relax(interval=1, tighten=0.5, tol=0.1, cooldown=2)
  # t2: EMA 0.5 (drop 0.3): relax to 1, cooldown 2; t3: EMA 0.35 (drop 0.45): relax again (keep already 1, so no
  # new cycle), cooldown back to 2; t4, t5: EMA climbs back but the drop stays > 0.1 until ...
  states = _steps(ctrl, [0.8, 0.2, 0.2, 0.8, 0.8, 0.8, 0.8])
  # EMA: 0.8, 0.5, 0.35, 0.575, 0.6875, 0.74375, 0.771875 -> drops 0, .3, .45, .225, .1125, .05625, .028125
  assert _field(states, "keep") == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
  assert _field(states, "holds") == [0, 2, 2, 2, 2, 1, 0]
  assert _field(states, "cycle") == [0, 1, 1, 1, 1, 1, 1]
  assert _steps(ctrl, [0.8, 0.2, 0.2, 0.8, 0.8, 0.8, 0.8, 0.8])[-1].keep == 0.5  # the cooldown over: tighten


def test_tighten_relax_min_keep_zero_still_keeps_one_unit():
  from jaxsparse.topk import topk_mask

  ctrl = controllers.tighten_relax(interval=1, tighten=0.99, min_keep=0.0)
  keep = _steps(ctrl, [0.5] * 6, jit=True)[-1].keep  # 0.01 ** 6 = 1e-12 (float32)
  assert 0 < float(keep) < 1e-11
  x = jnp.arange(1.0, 101.0).reshape(1, 100)
  for rounding in ("floor", "ceil"):
    kept = jax.jit(lambda x, k, r=rounding: topk_mask(x, k, rounding=r))(x, keep)
    np.testing.assert_array_equal(np.nonzero(np.asarray(kept))[1], [99])  # k = max(1, int(1e-12 * 100)) = 1
  tiny = controllers.tighten_relax(interval=1, tighten=0.5, min_keep=0.3)
  assert _field(_steps(tiny, [0.5] * 3), "keep") == [0.5, F32(0.3), F32(0.3)]


def _script_rule(accs, interval, tighten, tol, beta, cooldown, relax_step, relax_gain, max_jump, min_keep, max_keep):
  """The author's script's controller, re-derived in float64 Python from its description (PAPER.md)."""
  keep, ema, best, left, out = max(min_keep, min(1.0, max_keep)), None, None, 0, []
  for t, a in enumerate(accs, 1):
    ema = a if ema is None else beta * ema + (1 - beta) * a
    best = ema if best is None else max(best, ema)
    if t % interval == 0:
      drop = best - ema
      if drop > tol:
        delta = relax_step * min(1 + relax_gain * (drop - tol) / max(tol, 1e-8), 5.0)
        keep, left = min(max_keep, keep + (min(delta, max_jump) if max_jump > 0 else delta)), cooldown
      elif left > 0:
        left -= 1
      else:
        keep = max(min_keep, keep * (1 - tighten))
    out.append(keep)
  return out


def test_tighten_relax_matches_a_float64_reading_of_the_script_over_thousands_of_steps():
  # Batch accuracies that train up, then collapse now and then (as a too-small keep does): several relaxes.
  rng = np.random.default_rng(0)
  t = np.arange(4000)
  accs = np.clip(0.9 - 0.5 * (t % 700 > 620) + rng.normal(0, 0.04, t.size), 0, 1)
  accs = np.round(accs * 128) / 128  # a batch of 128's accuracies
  opts = dict(interval=8, tighten=0.018, tol=0.12, beta=0.5, cooldown=3, relax_step=1.0, relax_gain=1.5, max_jump=1.0,
              min_keep=0.0, max_keep=1.0)  # fmt: skip
  want = np.asarray(_script_rule(accs.tolist(), **opts))
  ctrl = controllers.tighten_relax(**opts)

  def body(state, inputs):
    state = ctrl.step(state, *inputs)
    return state, state.keep

  _, keeps = jax.jit(lambda a: jax.lax.scan(body, ctrl.init(), (a, jnp.arange(a.size, dtype=jnp.int32))))(
    jnp.asarray(accs, jnp.float32)
  )
  keeps = np.asarray(keeps, np.float64)
  assert np.sum(np.diff(want) > 0) >= 4  # several relaxes
  assert want.min() < 0.3
  np.testing.assert_allclose(keeps, want, rtol=2e-5)  # float32 keep vs float64: the same decisions


@pytest.mark.parametrize(
  "option, value, match",
  [
    ("interval", 0, "interval must be an integer >= 1, got 0"),
    ("interval", 2.0, "interval must be an integer >= 1"),
    ("tighten", 1.0, r"tighten must be a number in \[0.0, 1.0\), got 1.0"),
    ("tighten", -0.1, "tighten must be a number in"),
    ("tol", 1.0, r"tol must be a number in \[0.0, 1.0\)"),
    ("beta", 1.0, r"beta must be a number in \[0.0, 1.0\)"),
    ("cooldown", -1, "cooldown must be an integer >= 0"),
    ("relax_step", 0.0, r"relax_step must be a number in \(0.0, inf\)"),
    ("relax_gain", -1.0, "relax_gain must be a number in"),
    ("max_scale", 0.5, r"max_scale must be a number in \[1.0, inf\)"),
    ("max_jump", -0.1, "max_jump must be a number in"),
    ("max_keep", 0.0, r"max_keep must be a number in \(0.0, 1.0\]"),
    ("min_keep", 1.5, r"min_keep must be a number in \[0.0, 1.0\]"),
    ("init_keep", 0.0, "init_keep must be a number in"),
  ],
)
def test_tighten_relax_refuses_options_out_of_range(option, value, match):
  kwargs = {option: value, **({"min_keep": 0.1} if option == "init_keep" else {})}
  with pytest.raises(OptionError) as e:
    controllers.get("tighten_relax", **kwargs)
  assert e.value.fields[0] == f"controller_options.{option}" and re.search(match, _plain(e.value))
