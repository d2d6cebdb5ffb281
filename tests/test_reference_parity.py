"""The torch-free pieces of experiments/reference_parity.py: the script's names and layouts mapped onto ours."""

import jax
import jax.numpy as jnp
import numpy as np

from conftest import experiment
from jaxsparse import controllers
from jaxsparse.models import WideResNet

parity = experiment("reference_parity")


def _script_state_dict(depth: int = 28, widen: int = 4) -> dict[str, np.ndarray]:
  """A torch-style state dict of the script's WideResNet (its names and OIHW / (out, in) shapes), random values."""
  rng = np.random.default_rng(0)
  shapes, n, cin = {"conv1.weight": (16, 3, 3, 3)}, (depth - 4) // 6, 16
  for g in range(3):
    cout = 16 * widen * 2**g
    for b in range(n):
      c = cin if b == 0 else cout
      p = f"block{g + 1}.{b}."
      shapes.update({p + "norm1.weight": (c,), p + "norm1.bias": (c,), p + "conv1.weight": (cout, c, 3, 3)})
      shapes.update({p + "norm2.weight": (cout,), p + "norm2.bias": (cout,), p + "conv2.weight": (cout, cout, 3, 3)})
      if b == 0 and (c != cout or g > 0):
        shapes[p + "shortcut.weight"] = (cout, c, 1, 1)
    cin = cout
  shapes.update({"norm.weight": (cin,), "norm.bias": (cin,), "fc.weight": (10, cin), "fc.bias": (10,)})
  return {name: rng.normal(size=shape).astype(np.float32) for name, shape in shapes.items()}


def test_script_parameters_map_onto_every_parameter_of_ours_with_its_shape():
  model = WideResNet(norm_bias=True, shortcut="input", padding="symmetric", conv="xla")
  ours = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  state_dict = _script_state_dict()
  mapped = parity.to_flax_params(state_dict)
  assert jax.tree.map(np.shape, mapped) == jax.tree.map(np.shape, ours)
  assert len(jax.tree.leaves(mapped)) == len(state_dict)  # no two script parameters land on one of ours
  conv = state_dict["block2.0.conv1.weight"]  # OIHW -> HWIO
  assert mapped["group1_block0"]["conv1"]["kernel"][2, 1, 5, 7] == conv[7, 5, 2, 1]
  assert mapped["classifier"]["kernel"][3, 4] == state_dict["fc.weight"][4, 3]
  np.testing.assert_array_equal(mapped["group0_block0"]["norm1"]["rms"]["scale"], state_dict["block1.0.norm1.weight"])
  np.testing.assert_array_equal(mapped["final_norm"]["bias"], state_dict["norm.bias"])


def test_script_sites_name_our_25_sites_in_program_order():
  torch_names = [f"block{g}.{b}.act{i}" for g in (1, 2, 3) for b in range(4) for i in (1, 2)] + ["act"]
  assert [parity.site_name(n) for n in torch_names] == WideResNet(depth=28, widen=4).site_names()


def test_controller_options_name_tighten_relax_options():
  assert set(parity.CONTROLLER_OPTIONS.values()) == set(controllers.options("tighten_relax")) - {
    "interval",
    "max_scale",
  }


def test_actions_are_read_from_the_cooldown_counter():
  # interval 2, cooldown 2: decisions at steps 1, 3, 5, 7: a relax (counter restarts), two holds, a tighten.
  before, after = [0, 0, 2, 2, 1, 1, 0, 0], [0, 2, 2, 1, 1, 0, 0, 0]
  assert parity.actions(2, 2, before, after) == ["", "relax", "", "hold", "", "hold", "", "tighten"]


def test_accuracy_trace_is_seeded_batch_accuracies_that_collapse():
  accs = parity.accuracy_trace(2000, seed=3)
  np.testing.assert_array_equal(accs, parity.accuracy_trace(2000, seed=3))
  np.testing.assert_array_equal(accs * 128, np.round(accs * 128))
  assert (
    accs.min() >= 0 and accs.max() <= 1 and accs[1000:1100].mean() - accs[1160:1220].mean() > 0.3
  )  # a collapse: steps 1154-1225


def test_symmetric_padding_is_torch_padding_1_in_the_strided_conv():
  x = jax.random.normal(jax.random.key(0), (1, 8, 8, 3))
  for padding, pads in (("symmetric", ((1, 1), (1, 1))), ("same", "SAME")):
    model = WideResNet(depth=10, widen=1, padding=padding, conv="xla")
    variables = model.init(jax.random.key(1), x)
    _, state = model.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
    inter = state["intermediates"]["group1_block0"]
    a1, out = inter["norm1"]["__call__"][0], inter["conv1"]["__call__"][0]  # at keep 1, conv1 reads relu(norm1)
    kernel = variables["params"]["group1_block0"]["conv1"]["kernel"]
    want = jax.lax.conv_general_dilated(
      jax.nn.relu(a1), kernel, (2, 2), pads, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    np.testing.assert_allclose(out, want, atol=1e-5)
