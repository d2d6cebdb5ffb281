"""Effective MACs: dense counts by hand from kernel shapes, and densities applied to the right layers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from jaxsparse import macs, sparse_apply
from jaxsparse.models import WideResNet, site_densities


class TinyCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Conv(4, (3, 3), name="conv")(x))  # SAME padding: 8x8 outputs
    h = nn.relu(nn.Conv(6, (3, 3), strides=2, name="down")(h))  # 4x4 outputs
    return nn.Dense(10, name="head")(h.reshape(h.shape[0], -1))


# WRN-10-1's weight layers and the site each reads, by hand: conv1 and the projection shortcut read the block's
# act1, conv2 its act2, the classifier final_act; the stem reads the image. Group 0 has no projection (16 -> 16).
WRN10_1_INPUTS = {
  "stem": None,
  "group0_block0/conv1": "group0_block0/act1",
  "group0_block0/conv2": "group0_block0/act2",
  "group1_block0/conv1": "group1_block0/act1",
  "group1_block0/conv2": "group1_block0/act2",
  "group1_block0/shortcut": "group1_block0/act1",
  "group2_block0/conv1": "group2_block0/act1",
  "group2_block0/conv2": "group2_block0/act2",
  "group2_block0/shortcut": "group2_block0/act1",
  "classifier": "final_act",
}


def _tiny():
  model, x = TinyCNN(), jnp.ones((1, 8, 8, 3))
  return model, model.init(jax.random.key(0), x), x


def test_dense_macs_of_a_tiny_cnn_by_hand():
  model, variables, x = _tiny()
  assert macs.layer_macs(model, variables, x) == {
    "conv": 3 * 3 * 3 * 4 * 8 * 8,
    "down": 3 * 3 * 4 * 6 * 4 * 4,
    "head": 6 * 4 * 4 * 10,
  }
  # The count is per example: a batch of 5 gives the same numbers.
  assert macs.layer_macs(model, variables, jnp.ones((5, 8, 8, 3))) == macs.layer_macs(model, variables, x)


@pytest.mark.parametrize("depth,widen,millions", [(10, 1, 12.541952), (16, 2, 101.187584)])
def test_wide_resnet_dense_macs_equal_the_kernel_shapes_times_output_positions(depth, widen, millions):
  model, x = WideResNet(depth=depth, widen=widen), jnp.zeros((1, 32, 32, 3))
  variables = model.init(jax.random.key(0), x)
  counted = macs.layer_macs(model, variables, x)
  # By hand: every kernel's size times its output's spatial positions (32x32 up to group 0, then 16x16, 8x8).
  side = {"stem": 32, "group0": 32, "group1": 16, "group2": 8, "classifier": 8}
  flat = jax.tree_util.tree_flatten_with_path(variables["params"])[0]
  by_hand = {}
  for path, kernel in flat:
    names = [p.key for p in path]
    if names[-1] == "kernel":
      layer = "/".join(names[:-1])
      by_hand[layer] = kernel.size * side[layer.split("_")[0] if layer.startswith("group") else layer] ** 2
  assert counted == by_hand
  assert sum(counted.values()) == round(millions * 1e6)
  assert set(model.layer_inputs()) == set(counted)  # every counted layer has its input site named


def test_wide_resnet_layer_inputs_name_the_site_each_layer_reads():
  assert WideResNet(depth=10, widen=1).layer_inputs() == WRN10_1_INPUTS
  # WRN-16-2: two blocks per group; widening makes group 0's first block project too (16 -> 32 channels).
  by_hand = {"stem": None, "classifier": "final_act"}
  for g in range(3):
    for b in range(2):
      block = f"group{g}_block{b}"
      by_hand |= {f"{block}/conv1": f"{block}/act1", f"{block}/conv2": f"{block}/act2"}
    by_hand[f"group{g}_block0/shortcut"] = f"group{g}_block0/act1"
  assert WideResNet(depth=16, widen=2).layer_inputs() == by_hand


def test_effective_macs_apply_each_layers_input_density():
  model, variables, x = _tiny()
  layer = macs.layer_macs(model, variables, x)
  dense = sum(layer.values())
  assert macs.effective_macs(layer, {}) == dense  # nothing known: dense
  got = macs.effective_macs(layer, {"down": 0.5, "head": 0.25})
  assert got == layer["conv"] + 0.5 * layer["down"] + 0.25 * layer["head"]
  # A mapping names each layer's input site; a layer mapped to None (the image) stays dense.
  got = macs.effective_macs(layer, {"a": 0.5, "b": 0.1}, inputs={"conv": None, "down": "a", "head": "b"})
  assert got == pytest.approx(layer["conv"] + 0.5 * layer["down"] + 0.1 * layer["head"])


def test_effective_macs_of_sparse_apply_on_a_known_mask():
  model, variables, _ = _tiny()
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  _, densities = sparse_apply(model, variables, x, keep=0.25, return_density=True)
  layer = macs.layer_macs(model, variables, x[:1])
  assert set(densities) == {"down", "head"}  # the stem conv reads the image: not a site
  # Distinct activations: top-k keeps exactly a quarter of the 8x8x4 and 4x4x6 inputs.
  assert float(densities["down"]) == 0.25 and float(densities["head"]) == 0.25
  assert macs.effective_macs(layer, densities) == layer["conv"] + 0.25 * (layer["down"] + layer["head"])


def test_wide_resnet_effective_macs_at_keep_1_and_below():
  model, x = WideResNet(depth=10, widen=1), jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
  variables = model.init(jax.random.key(1), x)
  layer = macs.layer_macs(model, variables, x[:1])
  dense = sum(layer.values())
  _, state = model.apply(variables, x, keep=0.1, mutable=["density"])
  densities = site_densities(state["density"])
  sparse = macs.effective_macs(layer, densities, model.layer_inputs())
  expected = layer["stem"] + sum(layer[k] * float(densities[s]) for k, s in WRN10_1_INPUTS.items() if s)
  assert sparse == pytest.approx(expected) and sparse < 0.2 * dense
  assert macs.effective_macs(layer, {k: 1.0 for k in densities}, model.layer_inputs()) == dense


def test_nnx_layer_macs_count_linear_and_conv():
  model = nnx.Sequential(
    nnx.Linear(32, 64, rngs=nnx.Rngs(0)), nnx.relu, nnx.Conv(64, 8, (3,), rngs=nnx.Rngs(1)), nnx.relu
  )
  assert macs.layer_macs(model, jnp.ones((1, 5, 32))) == {"layers/0": 32 * 64 * 5, "layers/2": 3 * 64 * 8 * 5}
  assert type(model.layers[0]) is nnx.Linear  # the model's classes are restored


def test_layer_macs_rejects_what_is_not_a_model():
  with pytest.raises(TypeError, match="layer_macs: a Linen model needs its variables"):
    macs.layer_macs(TinyCNN())
  with pytest.raises(TypeError, match="flax.linen.Module or a flax.nnx.Module"):
    macs.layer_macs(TinyCNN, {})
