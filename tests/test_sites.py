"""Tests for jaxsparse.sites: the TopK layer, site_densities and the per-site keep rules."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsparse
from jaxsparse.models import site_densities
from jaxsparse.sites import keep_for_site
from jaxsparse.topk import topk_mask


class Net(nn.Module):
  relative: bool = False

  @nn.compact
  def __call__(self, x, keep=1.0):
    h = nn.relu(nn.Dense(32)(x))
    h = jaxsparse.TopK(relative=self.relative, name="hidden")(h, keep)
    return nn.Dense(3)(h)


def _setup(relative=False):
  x = jax.random.normal(jax.random.key(1, impl="rbg"), (5, 16))
  model = Net(relative=relative)
  return model, model.init(jax.random.key(0, impl="rbg"), x), x


def test_topk_layer_masks_and_sows_density_under_its_path():
  model, variables, x = _setup()
  assert "density" not in variables  # nothing sown during init
  y, state = model.apply(variables, x, keep=0.25, mutable=["density"])
  h = nn.relu(nn.Dense(32).apply({"params": variables["params"]["Dense_0"]}, x))
  ref = nn.Dense(3).apply({"params": variables["params"]["Dense_1"]}, topk_mask(h, 0.25))
  np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-6)
  dens = site_densities(state["density"])
  assert list(dens) == ["hidden"]
  assert float(dens["hidden"]) == pytest.approx(float(jnp.mean(topk_mask(h, 0.25) != 0)), abs=1e-7)
  np.testing.assert_array_equal(model.apply(variables, x), model.apply(variables, x, keep=1.0))
  assert "density" not in model.apply(variables, x, keep=0.5, mutable=["params"])[1]


def test_topk_layer_relative_and_one_compilation():
  model, variables, x = _setup(relative=True)
  f = jax.jit(lambda v, keep: model.apply(v, x, keep=keep, mutable=["density"]))
  f(variables, jnp.float32(0.5))
  with jax.no_tracing():
    for keep in (0.1, 1.0, 0.7):
      _, state = f(variables, jnp.float32(keep))
  h = nn.relu(nn.Dense(32).apply({"params": variables["params"]["Dense_0"]}, x))
  _, state = f(variables, jnp.float32(0.5))
  expected = np.mean(np.maximum(np.ceil(0.5 * np.asarray((h > 0).sum(1))), 1) / 32)
  assert float(site_densities(state["density"])["hidden"]) == pytest.approx(expected, abs=1e-6)


def test_topk_layer_rejects_a_keep_mapping():
  model, variables, x = _setup()
  with pytest.raises(TypeError, match="TopK hidden: keep must be a keep ratio, not a mapping"):
    model.apply(variables, x, keep={"hidden": 0.5})


def test_keep_for_site_precedence():
  keep = {"*": 1, "group*": 2, "group2_*": 3, "group2_block0/act1": 4, "*/act2": 5}
  assert keep_for_site(keep, "group2_block0/act1") == 4  # exact name
  assert keep_for_site(keep, "group2_block1/act1") == 3  # most literal characters
  assert keep_for_site(keep, "group0_block0/act1") == 2
  assert keep_for_site(keep, "final_act") == 1  # "*" is the default
  assert keep_for_site({"group*": 0.5}, "final_act") == 1.0  # nothing matches: dense
  with pytest.raises(ValueError, match=r"'group0_block0/act2' matches several keep keys of equal rank"):
    keep_for_site(keep, "group0_block0/act2")  # "group*" and "*/act2": 5 literals each
