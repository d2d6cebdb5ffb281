"""Tests for jaxsparse.schedules: values at boundaries under jit, shapes, composition, errors."""

import math

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxsparse import schedules

F32 = np.float32


def _explicit(shape, min_keep, t):
  """Reference compression curve in float64 (t already clipped to [0, 1])."""
  t = np.asarray(t, np.float64)
  if shape == "linear":
    return 1 - (1 - min_keep) * t
  if shape == "geometric":
    return min_keep**t
  return min_keep + (1 - min_keep) * 0.5 * (1 + np.cos(np.pi * t))


@pytest.mark.parametrize("shape", schedules.SHAPES)
def test_compression_matches_explicit_values_under_jit(shape):
  sched = schedules.compression(0.25, 4, shape)
  steps = np.arange(-2, 8)
  got = jax.jit(sched)(jnp.asarray(steps, jnp.int32))
  want = _explicit(shape, 0.25, np.clip(steps / 4, 0, 1))
  assert got.dtype == jnp.float32 and got.shape == steps.shape
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # Both ends are exact: 1.0 up to step 0, min_keep from step `steps` on.
  assert np.all(np.asarray(got)[steps <= 0] == F32(1.0))
  assert np.all(np.asarray(got)[steps >= 4] == F32(0.25))


def test_named_shapes_are_compression():
  steps = jnp.arange(12)
  for factory, shape in (
    (schedules.linear, "linear"),
    (schedules.geometric, "geometric"),
    (schedules.cosine, "cosine"),
  ):
    np.testing.assert_array_equal(factory(0.1, 10)(steps), schedules.compression(0.1, 10, shape)(steps))


def test_known_values():
  steps = jnp.arange(4)
  np.testing.assert_allclose(schedules.linear(0.5, 2)(steps), [1.0, 0.75, 0.5, 0.5])
  np.testing.assert_allclose(schedules.geometric(0.25, 2)(steps), [1.0, 0.5, 0.25, 0.25])
  np.testing.assert_allclose(schedules.cosine(0.5, 2)(steps), [1.0, 0.75, 0.5, 0.5])
  np.testing.assert_allclose(
    schedules.cosine(0.0625, 4)(jnp.int32(1)), 0.0625 + 0.9375 * 0.5 * (1 + math.cos(math.pi / 4)), rtol=1e-6
  )


def test_constant():
  got = jax.jit(schedules.constant(0.3))(jnp.zeros((2, 3), jnp.int32))
  assert got.shape == (2, 3) and got.dtype == jnp.float32
  assert np.all(np.asarray(got) == F32(0.3))


def test_cyclic_boundaries_exact():
  # warm-up 3 dense steps, then 2 cycles of period 5, then final_keep 0.5.
  sched = jax.jit(schedules.cyclic(0.1, 5, shape="geometric", warmup=3, cycles=2, final_keep=0.5))
  got = np.asarray(sched(jnp.arange(16)))
  ramp = [1.0] + [0.1 ** (i / 4) for i in (1, 2, 3)] + [0.1]
  want = [1.0, 1.0, 1.0] + ramp + ramp + [0.5, 0.5, 0.5]
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert got[2] == F32(1.0)  # last warm-up step
  assert got[3] == F32(1.0)  # first step of cycle 0
  assert got[7] == F32(0.1)  # last step of the period: exactly min_keep
  assert got[8] == F32(1.0)  # reset step
  assert got[12] == F32(0.1)  # last step of the last cycle
  assert got[13] == F32(0.5)  # after the final cycle


def test_cyclic_docstring_example():
  sched = schedules.cyclic(0.25, 3, warmup=2, cycles=2)
  np.testing.assert_allclose(sched(jnp.arange(10)), [1.0, 1.0, 1.0, 0.5, 0.25, 1.0, 0.5, 0.25, 1.0, 1.0], rtol=1e-6)
  np.testing.assert_array_equal(
    schedules.cycle_index(3, warmup=2, cycles=2)(jnp.arange(10)), [0, 0, 0, 0, 0, 1, 1, 1, 2, 2]
  )


def test_cyclic_forever_and_period_one():
  sched = schedules.cyclic(0.2, 4, shape="linear")
  got = np.asarray(sched(jnp.arange(1000, 1008)))  # 1000 = 250 * 4: start of a cycle
  np.testing.assert_allclose(got, [1.0, 0.7333333, 0.4666667, 0.2] * 2, rtol=1e-6)
  # period 1: every step is its period's last step.
  np.testing.assert_array_equal(
    schedules.cyclic(0.3, 1, warmup=2)(jnp.arange(5)), np.array([1.0, 1.0, 0.3, 0.3, 0.3], np.float32)
  )


def test_cycle_index():
  index = jax.jit(schedules.cycle_index(4, warmup=1))
  got = index(jnp.arange(10))
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(got, [0, 0, 0, 0, 0, 1, 1, 1, 1, 2])


@pytest.mark.parametrize("shape", schedules.SHAPES)
def test_scalar_jit_equals_vectorised(shape):
  sched = schedules.cyclic(0.1, 7, shape=shape, warmup=2, cycles=3, final_keep=0.8)
  steps = np.arange(30)
  jitted = jax.jit(sched)
  vectorised = np.asarray(jitted(jnp.asarray(steps)))
  per_step = np.array([jitted(jnp.int32(s)) for s in steps])
  np.testing.assert_array_equal(per_step, vectorised)
  grid = np.asarray(jitted(jnp.asarray(steps.reshape(5, 6))))
  np.testing.assert_array_equal(grid.reshape(-1), vectorised)
  # Eager and vmapped evaluation may differ from jit by an ulp (XLA fuses multiply-adds).
  np.testing.assert_allclose(sched(jnp.asarray(steps)), vectorised, rtol=1e-6)
  np.testing.assert_allclose(jax.vmap(sched)(jnp.asarray(steps)), vectorised, rtol=1e-6)


@hypothesis.settings(max_examples=30, deadline=None, derandomize=True)
@hypothesis.given(
  shape=st.sampled_from(schedules.SHAPES),
  min_keep=st.floats(0.01, 1.0),
  period=st.integers(1, 20),
  warmup=st.integers(0, 5),
)
def test_monotone_within_each_cycle(shape, min_keep, period, warmup):
  sched = schedules.cyclic(min_keep, period, shape=shape, warmup=warmup)
  # A fixed-size step array keeps eager op caches warm across examples.
  keep = np.asarray(sched(jnp.arange(72)))[: warmup + 3 * period]
  assert np.all((keep > 0) & (keep <= 1))
  cycles = keep[warmup:].reshape(3, period)
  assert np.all(np.diff(cycles, axis=1) <= 0)
  assert np.all(cycles[:, -1] == F32(min_keep))
  if period > 1:
    assert np.all(cycles[:, 0] == F32(1.0))


def test_join_schedules_warmup_equals_cyclic_warmup():
  joined = optax.join_schedules([schedules.constant(1.0), schedules.cyclic(0.25, 3)], [2])
  steps = jnp.arange(20)
  np.testing.assert_array_equal(joined(steps), schedules.cyclic(0.25, 3, warmup=2)(steps))


def test_join_schedules_of_compressions_equals_cyclic():
  # sgdr-style: three geometric ramps of 3 steps joined at 3 and 6 == 3 cycles of period 3.
  ramp = schedules.geometric(0.25, 2)
  joined = jax.jit(optax.join_schedules([ramp, ramp, ramp], [3, 6]))
  steps = jnp.arange(9)
  np.testing.assert_array_equal(joined(steps), schedules.cyclic(0.25, 3, cycles=3)(steps))


@pytest.mark.parametrize(
  "build, bad",
  [
    (lambda: schedules.constant(0.0), "0.0"),
    (lambda: schedules.constant(1.5), "1.5"),
    (lambda: schedules.linear(float("nan"), 3), "nan"),
    (lambda: schedules.geometric(-0.1, 3), "-0.1"),
    (lambda: schedules.cosine(0.1, 0), "steps"),
    (lambda: schedules.compression(0.1, 3, "exp"), "'exp'"),
    (lambda: schedules.cyclic(0.1, 0), "period"),
    (lambda: schedules.cyclic(0.1, 2.5), "2.5"),
    (lambda: schedules.cyclic(0.1, 5, warmup=-1), "-1"),
    (lambda: schedules.cyclic(0.1, 5, shape="step"), "'step'"),
    (lambda: schedules.cyclic(0.1, 5, cycles=0), "cycles"),
    (lambda: schedules.cyclic(0.1, 5, final_keep=2.0), "2.0"),
    (lambda: schedules.cyclic(1.01, 5), "1.01"),
    (lambda: schedules.cycle_index(0), "period"),
  ],
)
def test_invalid_arguments_raise_at_construction(build, bad):
  with pytest.raises(ValueError, match=bad):
    build()
