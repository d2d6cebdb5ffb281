"""Tests for jaxsparse.models.wrn: structure, parameter count, sites, dtypes, norms, recompiles."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsparse.models import WRN10_1, WRN16_2, WRN28_4, WideResNet, site_densities
from jaxsparse.models.wrn import BasicBlock


def _x(shape=(2, 8, 8, 3), seed=1):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _variables(model, x, seed=0):
  """Variables of the model's structure filled from numpy (a jitted WRN init compiles for ~10 s)."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == "kernel":
      fan_in = math.prod(leaf.shape[:-1])
      return jnp.asarray(rng.normal(size=leaf.shape) * math.sqrt(2 / fan_in), leaf.dtype)
    return jnp.full(leaf.shape, 1.0 if name in ("scale", "var") else 0.0, leaf.dtype)

  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  return jax.tree_util.tree_map_with_path(fill, shapes)


def _num_params(model):
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  return sum(math.prod(a.shape) for a in jax.tree.leaves(shapes["params"]))


def _site_names(model, image=32):
  def run(v, x):
    return model.apply(v, x, keep=0.5, mutable=["density"])[1]["density"]

  x = jax.ShapeDtypeStruct((1, image, image, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  return list(site_densities(jax.eval_shape(run, variables, x)))


def test_wrn28_4_parameter_count_is_pinned():
  assert _num_params(WRN28_4()) == 5_845_450  # RMSNorm: one scale per channel
  assert _num_params(WRN28_4(norm="batchnorm")) == 5_849_050  # + one bias per channel
  assert _num_params(WRN28_4(sites=False)) == 5_845_450


def test_wrn28_4_has_25_named_sites():
  names = _site_names(WRN28_4(), image=8)
  expected = [f"group{g}_block{b}/act{i}" for g in range(3) for b in range(4) for i in (1, 2)]
  assert sorted(names) == sorted(expected + ["final_act"])
  assert len(names) == 25


@pytest.mark.parametrize("factory, n_sites", [(WRN16_2, 13), (WRN10_1, 7)])
def test_small_variants_site_count(factory, n_sites):
  assert len(_site_names(factory(), image=8)) == n_sites


@pytest.fixture(scope="module")
def sited():
  """WRN-10-1 with top-k sites, random variables, and one jitted (logits, densities) function."""
  model = WRN10_1(zero_init_residual=False)
  x = _x()
  variables = _variables(model, x)

  @jax.jit
  def run(variables, keep):
    logits, state = model.apply(variables, x, keep=keep, mutable=["density"])
    return logits, site_densities(state["density"])

  return model, x, variables, run


@pytest.fixture(scope="module")
def plain_logits(sited):
  _, x, variables, _ = sited
  return jax.jit(WRN10_1(sites=False).apply)(variables, x)


def test_density_collection_only_when_mutable_and_sited(sited):
  model, x, variables, _ = sited
  assert set(variables) == {"params"}
  run = lambda m, mutable: jax.eval_shape(lambda v: m.apply(v, x, keep=0.3, mutable=mutable)[1], variables)
  assert run(model, ["density"]) and not run(model, ["batch_stats"])
  assert not run(WRN10_1(sites=False), ["density"])


def test_keep_one_equals_plain_model_and_sparse_differs(sited, plain_logits):
  *_, variables, run = sited
  np.testing.assert_array_equal(run(variables, jnp.float32(1.0))[0], plain_logits)
  assert not np.allclose(run(variables, jnp.float32(0.3))[0], plain_logits, atol=1e-3)


def test_density_per_site_equals_keep_without_recompiling(sited):
  *_, variables, run = sited
  # units per example at each site of WRN-10-1 on 8x8 inputs (stride 1, 2, 2)
  units = {
    "group0_block0/act1": 8 * 8 * 16,
    "group0_block0/act2": 8 * 8 * 16,
    "group1_block0/act1": 8 * 8 * 16,
    "group1_block0/act2": 4 * 4 * 32,
    "group2_block0/act1": 4 * 4 * 32,
    "group2_block0/act2": 2 * 2 * 64,
    "final_act": 2 * 2 * 64,
  }
  run(variables, jnp.float32(0.5))
  with jax.no_tracing():
    for keep in (0.3, 0.1):
      dens = run(variables, jnp.float32(keep))[1]
      assert set(dens) == set(units)
      for name, n in units.items():
        assert float(dens[name]) == pytest.approx(math.ceil(keep * n) / n, abs=1e-6), name


def test_grads_flow_and_jit_compiles_once_across_keep(sited):
  model, x, variables, _ = sited

  @jax.jit
  def loss_and_grad(params, keep):
    loss = lambda p: jnp.mean(model.apply({"params": p}, x, keep=keep) ** 2)
    return jax.value_and_grad(loss)(params)

  loss_and_grad(variables["params"], jnp.float32(0.5))
  with jax.no_tracing():
    for keep in (1.0, 0.3, 0.05):
      loss, grads = loss_and_grad(variables["params"], jnp.float32(keep))
      assert np.isfinite(float(loss))
      assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  assert np.any(grads["group0_block0"]["conv1"]["kernel"])


def test_bfloat16_compute_gives_float32_logits_and_float32_params(sited, plain_logits):
  _, x, variables, _ = sited
  assert {a.dtype for a in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  run = jax.jit(WRN10_1(zero_init_residual=False, dtype=jnp.bfloat16).apply)
  logits = run(variables, x, keep=jnp.float32(0.3))
  assert logits.dtype == jnp.float32 and logits.shape == (2, 10)
  np.testing.assert_allclose(run(variables, x, keep=jnp.float32(1.0)), plain_logits, atol=0.1, rtol=0.1)


def test_batchnorm_dropout_variant_in_training_and_eval():
  x = _x((4, 8, 8, 3))
  model = WRN10_1(norm="batchnorm", dropout=0.3, zero_init_residual=False)
  variables = _variables(model, x)
  assert set(variables) == {"params", "batch_stats"}

  @jax.jit
  def train(variables, seed):
    # rbg keys: threefry's dropout mask compiles for ~10 s on this CPU
    return model.apply(
      variables,
      x,
      keep=jnp.float32(0.5),
      train=True,
      mutable=["batch_stats", "density"],
      rngs={"dropout": jax.random.key(seed, impl="rbg")},
    )

  logits, state = train(variables, 0)
  assert logits.shape == (4, 10) and len(site_densities(state["density"])) == 7
  before, after = jax.tree.leaves(variables["batch_stats"]), jax.tree.leaves(state["batch_stats"])
  assert any(not np.allclose(a, b) for a, b in zip(before, after))
  assert not np.allclose(train(variables, 1)[0], logits)  # dropout draws differ
  # eval mode reads the running averages and needs neither mutable state nor rngs
  out = jax.eval_shape(lambda v: model.apply(v, x, keep=0.5), {**variables, **state})
  assert out.shape == (4, 10)


@pytest.mark.parametrize("zero_init", [True, False])
def test_block_init_he_fan_out_and_zero_init_residual(zero_init):
  block = BasicBlock(32, 2, "rmsnorm", 0.0, True, "masked", "value", zero_init, jnp.float32, jnp.float32)
  x = _x((2, 8, 8, 16))
  key = jax.random.key(0, impl="rbg")  # threefry compiles slowly on this CPU
  params = jax.jit(block.init, static_argnums=3)(key, x, jnp.float32(1.0), False)
  params = params["params"]
  assert set(params) == {"norm1", "norm2", "conv1", "conv2", "shortcut"}
  k1 = np.asarray(params["conv1"]["kernel"])
  assert k1.shape == (3, 3, 16, 32) and "bias" not in params["conv1"]
  assert np.std(k1) == pytest.approx(math.sqrt(2 / (3 * 3 * 32)), rel=0.1)  # fan_out = 3*3*32
  assert np.any(params["conv2"]["kernel"]) != zero_init
  np.testing.assert_array_equal(params["norm1"]["rms"]["scale"], np.ones(16))


def test_none_norm_and_straight_through_options_trace():
  x = _x()
  model = WRN10_1(norm="none", gradient="straight_through", score="magnitude")
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  assert set(variables["params"]["group0_block0"]) == {"conv1", "conv2"}
  grads = jax.eval_shape(jax.grad(lambda v: model.apply(v, x, keep=0.2).sum()), variables)
  assert jax.tree.structure(grads) == jax.tree.structure(variables)


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(depth=12), r"WRN depth must be 6n \+ 4 with n >= 1, got 12"),
    (dict(depth=4), r"WRN depth must be 6n \+ 4 with n >= 1, got 4"),
    (dict(norm="layernorm"), r"norm must be one of \(.*\), got 'layernorm'"),
  ],
)
def test_bad_configuration_raises(kwargs, match):
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(WideResNet(**kwargs).init, jax.random.key(0), _x())


def test_keep_out_of_range_raises():
  model = WRN10_1()
  variables = _variables(model, _x())
  for keep in (0.0, 1.5):
    with pytest.raises(ValueError, match="keep"):
      jax.eval_shape(lambda v: model.apply(v, _x(), keep=keep), variables)


# ------------------------------------------------------------ per-site keep, relative keep


def _densities(model, variables, x, keep):
  _, state = model.apply(variables, x, keep=keep, mutable=["density"])
  return {k: float(v) for k, v in site_densities(state["density"]).items()}


def test_site_names_are_the_density_keys():
  model = WRN10_1()
  assert sorted(model.site_names()) == sorted(_site_names(model))


def test_per_site_keep_mapping_applies_to_the_right_sites():
  model = WRN10_1()
  x = _x((2, 16, 16, 3))
  variables = _variables(model, x)
  keep = {"*": 0.3, "group2_*": 0.1, "group0_block0/act2": 0.2}  # exact name > longer glob > "*"
  dens = _densities(model, variables, x, keep)
  expected = {
    "group0_block0/act1": 0.3,
    "group0_block0/act2": 0.2,
    "group1_block0/act1": 0.3,
    "group1_block0/act2": 0.3,
    "group2_block0/act1": 0.1,
    "group2_block0/act2": 0.1,
    "final_act": 0.3,
  }
  assert dens.keys() == expected.keys()
  for name, k in expected.items():  # density of an exact top-k = ceil(k * n) / n, a hair above k
    assert k - 1e-6 <= dens[name] <= k + 0.02, (name, dens[name], k)
  # Sites no key matches stay dense: the output equals the per-site run with those sites at 1.0.
  only = {"group1_block0/act1": 0.3}
  full = {n: (0.3 if n == "group1_block0/act1" else 1.0) for n in model.site_names()}
  np.testing.assert_array_equal(model.apply(variables, x, keep=only), model.apply(variables, x, keep=full))
  assert _densities(model, variables, x, only)["group0_block0/act1"] > 0.3  # ReLU density, not masked


def test_per_site_keep_is_traced_and_compiles_once():
  model = WRN10_1()
  x = _x()
  variables = _variables(model, x)
  f = jax.jit(lambda v, keep: model.apply(v, x, keep=keep))
  f(variables, {"group*": jnp.float32(0.5), "final_act": jnp.float32(1.0)})
  with jax.no_tracing():
    for a, b in ((0.1, 0.2), (1.0, 1.0), (0.7, 0.05)):
      f(variables, {"group*": jnp.float32(a), "final_act": jnp.float32(b)})


@pytest.mark.parametrize(
  "keep, error, match",
  [
    ({"group9_*": 0.5}, ValueError, r"WideResNet: keep key 'group9_\*' matches no top-k site"),
    ({"final": 0.5}, ValueError, "keep key 'final' matches no top-k site; the sites are: group0_block0/act1"),
    ({"final_act": 1.5}, ValueError, r"keep\['final_act'\] must be a keep ratio in \(0, 1\], got 1.5"),
    ({"final_act": 0.0}, ValueError, r"keep\['final_act'\] must be a keep ratio in \(0, 1\], got 0.0"),
    ({"final_act": "half"}, ValueError, r"keep\['final_act'\] must be a keep ratio"),
    ({3: 0.5}, ValueError, "keys must be site names or globs .*got 3"),
    ({}, ValueError, "keep mapping is empty"),
    ({"*/act1": 0.5, "group*": 0.2}, ValueError, r"matches several keep keys of equal rank"),
  ],
)
def test_bad_per_site_keep_raises_naming_the_key(keep, error, match):
  model = WRN10_1()
  variables = _variables(model, _x())
  with pytest.raises(error, match=match):
    jax.eval_shape(lambda v: model.apply(v, _x(), keep=keep), variables)


def test_relative_keep_reaches_every_site():
  x = _x((2, 16, 16, 3))
  absolute, relative = WRN10_1(), WRN10_1(relative=True)
  variables = _variables(absolute, x)
  dense = _densities(absolute, variables, x, 1.0)
  assert all(d < 0.75 for d in dense.values())  # post-ReLU: many zeros already
  d_abs = _densities(absolute, variables, x, 0.9)  # absolute 0.9 is above the natural density: no-op
  for name in dense:
    assert d_abs[name] == dense[name], name
  np.testing.assert_array_equal(relative.apply(variables, x, keep=1.0), absolute.apply(variables, x, keep=1.0))
  # Relative 0.5 at one site (relative 1.0, a no-op, elsewhere) keeps exactly ceil(active / 2) of one example's
  # units there: the site's input is the dense one, so `active` is its dense count (units: 16x16x16 up to group
  # 1's first conv, then 8x8x32 and 4x4x64).
  x1 = x[:1]
  units = {
    "group0_block0/act1": 4096,
    "group0_block0/act2": 4096,
    "group1_block0/act1": 4096,
    "group1_block0/act2": 2048,
    "group2_block0/act1": 2048,
    "group2_block0/act2": 1024,
    "final_act": 1024,
  }
  assert units.keys() == dense.keys()
  active = {name: _densities(absolute, variables, x1, 1.0)[name] * n for name, n in units.items()}
  for name, n in units.items():
    assert active[name] == round(active[name]) > 0, (name, active[name])
    got = _densities(relative, variables, x1, {name: 0.5})[name]
    assert got == math.ceil(0.5 * round(active[name])) / n, (name, got, active[name])


def test_shortcut_from_the_block_input_reads_the_raw_input():
  x = _x((2, 8, 8, 3))
  for shortcut, reads_input in (("input", True), ("activated", False)):
    model = WRN10_1(shortcut=shortcut)
    variables = _variables(model, x)
    _, state = model.apply(variables, x, keep=0.3, capture_intermediates=True, mutable=["intermediates"])
    inter = state["intermediates"]
    block_in = inter["group0_block0"]["__call__"][0]  # group1_block0's input
    out = inter["group1_block0"]["shortcut"]["__call__"][0]
    kernel = variables["params"]["group1_block0"]["shortcut"]["kernel"]
    conv = jax.lax.conv_general_dilated(block_in, kernel, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert np.allclose(out, conv, atol=1e-5) == reads_input
  assert WRN10_1(shortcut="input").layer_inputs()["group1_block0/shortcut"] is None
  assert WRN10_1().layer_inputs()["group1_block0/shortcut"] == "group1_block0/act1"
  with pytest.raises(ValueError, match="shortcut must be one of"):
    WRN10_1(shortcut="raw").init(jax.random.key(0), x)


def test_rmsnorm_eps_and_bias_options():
  from jaxsparse.models.wrn import _Norm

  x = _x((2, 4, 4, 8)) * 1e-3
  for eps, bias in ((None, False), (1e-8, True)):
    norm = _Norm("rmsnorm", jnp.float32, jnp.float32, eps, bias)
    variables = norm.init(jax.random.key(0), x, False)
    assert ("bias" in variables["params"]) == bias
    if bias:
      variables = {"params": {**variables["params"], "bias": jnp.arange(8.0)}}
    y = norm.apply(variables, x, False)
    want = x / np.sqrt(np.mean(np.square(x), -1, keepdims=True) + (1e-6 if eps is None else eps))
    np.testing.assert_allclose(y, want + (np.arange(8.0) if bias else 0), rtol=1e-4, atol=1e-5)


def test_floor_rounding_reaches_the_sites():
  # group0_block0/act1 of a WRN-10-1 on 8x8 images has 8*8*16 = 1024 units, about half of them active: keep 0.1
  # keeps int(102.4) = 102 with floor, 103 with ceil (and k * (2 / 1024) at the final site's 256 units: 25 or 26).
  x = _x((1, 8, 8, 3))
  for rounding, k_block, k_final in (("floor", 102, 25), ("ceil", 103, 26)):
    model = WRN10_1(rounding=rounding)
    _, state = model.apply(_variables(model, x), x, keep=0.1, mutable=["density"])
    densities = site_densities(state["density"])
    assert densities["group0_block0/act1"] * 1024 == pytest.approx(k_block, abs=1e-3)
    assert densities["final_act"] * 256 == pytest.approx(k_final, abs=1e-3)
