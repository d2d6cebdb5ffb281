"""Tests for jaxsparse.sparse_apply on model families the library did not write for itself."""

import math
import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsparse
from jaxsparse.models import WRN10_1, site_densities
from jaxsparse.sparse_apply import sparse_apply
from jaxsparse.topk import topk_mask

ROOT = pathlib.Path(__file__).resolve().parents[1]
KEY = jax.random.key(0, impl="rbg")  # threefry compiles slowly on this CPU; rbg is quick


class MLP(nn.Module):
  """Flattening MLP; `mask` is applied by hand before every hidden Dense (the reference)."""

  mask: object = None

  @nn.compact
  def __call__(self, x):
    mask = self.mask or (lambda h: h)
    h = nn.gelu(nn.Dense(48)(x.reshape((x.shape[0], -1))))
    h = nn.gelu(nn.Dense(40)(inputs=mask(h)))  # by keyword: sparse_apply masks `inputs=` too
    return nn.Dense(10)(mask(h))


class CNN(nn.Module):
  """Conv - BatchNorm - ReLU twice, dropout, pooled Dense."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    for features in (8, 16):
      x = nn.Conv(features, (3, 3))(x)
      x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
    x = nn.Dropout(0.2, deterministic=not train)(x)
    return nn.Dense(10)(x.mean(axis=(1, 2)))


class EncoderBlock(nn.Module):
  """Pre-LN Transformer encoder block: self-attention + GELU MLP, both residual."""

  @nn.compact
  def __call__(self, x):
    x = x + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=16)(nn.LayerNorm()(x))
    h = nn.gelu(nn.Dense(32)(nn.LayerNorm()(x)))
    return x + nn.Dense(16)(h)


class Tokens(nn.Module):
  @nn.compact
  def __call__(self, ids):
    return nn.Dense(4)(nn.Embed(10, 4)(ids % 10))


def _normal(shape, seed=1):
  return jax.random.normal(jax.random.key(seed, impl="rbg"), shape)


@pytest.fixture(scope="module")
def mlp():
  x = _normal((4, 3, 4, 2))
  return MLP(), jax.jit(MLP().init)(KEY, x), x


@pytest.fixture(scope="module")
def mlp_run(mlp):
  model, _, _ = mlp
  return jax.jit(lambda v, x, keep: sparse_apply(model, v, x, keep=keep, return_density=True))


def _expected(keep, n):
  return math.ceil(keep * n) / n


def test_mlp_masks_hidden_dense_inputs_exactly_and_skips_the_first_layer(mlp, mlp_run):
  model, variables, x = mlp
  keep = 0.25
  out, density = mlp_run(variables, x, jnp.float32(keep))
  assert set(density) == {"Dense_1", "Dense_2"}  # Dense_0 reads the (reshaped) input
  assert float(density["Dense_1"]) == pytest.approx(_expected(keep, 48), abs=1e-6)
  assert float(density["Dense_2"]) == pytest.approx(_expected(keep, 40), abs=1e-6)
  reference = MLP(mask=lambda h: topk_mask(h, keep)).apply(variables, x)
  np.testing.assert_allclose(out, reference, rtol=1e-6, atol=1e-6)


def test_traced_keep_never_recompiles_and_keep_one_is_dense(mlp, mlp_run):
  model, variables, x = mlp
  mlp_run(variables, x, jnp.float32(0.5))
  with jax.no_tracing():
    for keep in (0.1, 0.7, 1.0):
      out, density = mlp_run(variables, x, jnp.float32(keep))
  np.testing.assert_array_equal(out, jax.jit(model.apply)(variables, x))
  assert float(density["Dense_1"]) == 1.0


def test_grad_and_vmap_compose(mlp):
  model, variables, x = mlp
  loss = lambda p, keep, gradient: jnp.sum(sparse_apply(model, {"params": p}, x, keep=keep, gradient=gradient) ** 2)
  grad = jax.jit(jax.grad(loss), static_argnums=2)
  masked = grad(variables["params"], jnp.float32(0.2), "masked")
  straight = grad(variables["params"], jnp.float32(0.2), "straight_through")
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(masked))
  assert not np.allclose(masked["Dense_0"]["kernel"], straight["Dense_0"]["kernel"])
  keeps = jnp.array([0.2, 0.5, 1.0], jnp.float32)
  batched = jax.jit(jax.vmap(lambda k: sparse_apply(model, variables, x, keep=k)))(keeps)
  single = jax.jit(lambda k: sparse_apply(model, variables, x, keep=k))
  for i, keep in enumerate(keeps):
    np.testing.assert_allclose(batched[i], single(keep), rtol=1e-6, atol=1e-6)


def test_cnn_with_batchnorm_and_dropout_in_training():
  model, x = CNN(), _normal((4, 8, 8, 3))
  variables = jax.jit(model.init)(KEY, x)

  @jax.jit
  def train(variables, keep, seed):
    return sparse_apply(
      model,
      variables,
      x,
      keep=keep,
      train=True,
      mutable=["batch_stats"],
      rngs={"dropout": jax.random.key(seed, impl="rbg")},
      return_density=True,
    )

  (out, state), density = train(variables, jnp.float32(0.3), 0)
  assert out.shape == (4, 10) and set(state) == {"batch_stats"}
  assert not np.allclose(state["batch_stats"]["BatchNorm_0"]["mean"], variables["batch_stats"]["BatchNorm_0"]["mean"])
  assert set(density) == {"Conv_1", "Dense_0"}  # Conv_0 reads the image
  assert float(density["Conv_1"]) == pytest.approx(_expected(0.3, 8 * 8 * 8), abs=1e-6)
  assert float(density["Dense_0"]) == pytest.approx(_expected(0.3, 16), abs=1e-6)
  assert not np.allclose(train(variables, jnp.float32(0.3), 1)[0][0], out)  # dropout draws


def test_transformer_block_sites_and_densities():
  model, x = EncoderBlock(), _normal((2, 6, 16))
  variables = jax.jit(model.init)(KEY, x)
  run = jax.jit(lambda v, keep: sparse_apply(model, v, x, keep=keep, return_density=True))
  _, density = run(variables, jnp.float32(0.3))
  # query/key/value read LayerNorm(x), the first weight layer's input, so they are skipped
  units = {"MultiHeadDotProductAttention_0/out": 6 * 16, "Dense_0": 6 * 16, "Dense_1": 6 * 32}
  assert set(density) == set(units)
  for site, n in units.items():
    assert float(density[site]) == pytest.approx(_expected(0.3, n), abs=1e-6), site


@pytest.mark.parametrize(
  "where, sites",
  [
    (nn.Dense, {"Dense_0", "Dense_1"}),
    (nn.DenseGeneral, {"MultiHeadDotProductAttention_0/out"}),
    ("*/out", {"MultiHeadDotProductAttention_0/out"}),
    (re.compile(r"Dense_\d$"), {"Dense_0", "Dense_1"}),
    (lambda module, path: isinstance(module, nn.Dense) and path.endswith("_1"), {"Dense_1"}),
    (("Dense_1", nn.DenseGeneral), {"Dense_1", "MultiHeadDotProductAttention_0/out"}),
  ],
)
def test_where_selectors(where, sites):
  model, x = EncoderBlock(), _normal((2, 6, 16))
  variables = jax.eval_shape(model.init, KEY, x)
  _, density = jax.eval_shape(
    lambda v: sparse_apply(model, v, x, keep=0.5, where=where, return_density=True), variables
  )
  assert set(density) == sites


def test_outputs_position_masks_module_outputs():
  model, x = EncoderBlock(), _normal((2, 6, 16))
  variables = jax.jit(model.init)(KEY, x)
  _, density = jax.jit(
    lambda v: sparse_apply(model, v, x, keep=0.25, where=nn.LayerNorm, position="outputs", return_density=True)
  )(variables)
  assert set(density) == {"LayerNorm_0", "LayerNorm_1"}
  assert all(float(d) == pytest.approx(0.25) for d in density.values())


def test_matches_wrn_builtin_sites():
  x = _normal((2, 8, 8, 3))
  plain = WRN10_1(sites=False, zero_init_residual=False)
  sited = WRN10_1(zero_init_residual=False)
  shapes = jax.eval_shape(plain.init, KEY, x)  # a jitted WRN init compiles for ~10 s here
  variables = jax.tree.map(lambda a: 0.3 * _normal(a.shape, 3), shapes)
  keep = jnp.float32(0.3)
  out, density = jax.jit(lambda v: sparse_apply(plain, v, x, keep=keep, return_density=True))(variables)
  ref, state = jax.jit(lambda v: sited.apply(v, x, keep=keep, mutable=["density"]))(variables)
  np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
  builtin = site_densities(state["density"])
  assert len(density) == 9  # 7 sites; act1 of groups 1 and 2 also feeds the shortcut conv
  for path, d in density.items():
    block, _, layer = path.rpartition("/")
    name = {"conv1": "act1", "shortcut": "act1", "conv2": "act2"}.get(layer, "final_act")
    assert float(d) == float(builtin[f"{block}/{name}" if block else name]), path


def test_per_site_keep_mapping(mlp):
  model, variables, x = mlp
  run = jax.jit(lambda v, keep: sparse_apply(model, v, x, keep=keep, return_density=True))
  out, density = run(variables, {"Dense_2": jnp.float32(0.25)})
  assert float(density["Dense_1"]) == 1.0  # no key matches: dense
  assert float(density["Dense_2"]) == pytest.approx(_expected(0.25, 40), abs=1e-6)
  _, density = run(variables, {"Dense_*": jnp.float32(0.5), "Dense_1": jnp.float32(0.1)})
  assert float(density["Dense_1"]) == pytest.approx(_expected(0.1, 48), abs=1e-6)
  assert float(density["Dense_2"]) == pytest.approx(_expected(0.5, 40), abs=1e-6)
  with jax.no_tracing():  # the values are traced data
    _, density = run(variables, {"Dense_*": jnp.float32(0.2), "Dense_1": jnp.float32(1.0)})
  assert float(density["Dense_1"]) == 1.0
  # Both sites at the same keep through a mapping == the scalar keep.
  same, _ = run(variables, {"*": jnp.float32(0.3)})
  np.testing.assert_array_equal(same, sparse_apply(model, variables, x, keep=0.3))


def test_relative_keep(mlp):
  model, variables, x = mlp
  relu_mlp = nn.Sequential([nn.Dense(64), nn.relu, nn.Dense(10)])
  xs = x.reshape(4, -1)
  v = relu_mlp.init(KEY, xs)
  _, dense = sparse_apply(relu_mlp, v, xs, keep=1.0, return_density=True)
  _, rel = sparse_apply(relu_mlp, v, xs, keep=0.5, relative=True, return_density=True)
  h = nn.relu(nn.Dense(64).apply({"params": v["params"]["layers_0"]}, xs))
  active = np.asarray((h > 0).sum(1))
  expected = np.mean(np.maximum(np.ceil(0.5 * active), 1) / 64)
  assert float(rel["layers_2"]) == pytest.approx(expected, abs=1e-6) and float(dense["layers_2"]) > expected


def test_return_structure_follows_model_apply(mlp):
  model, variables, x = mlp
  out, state = sparse_apply(model, variables, x, keep=0.5, mutable=["batch_stats"])
  assert out.shape == (4, 10) and state == {}
  (out2, state2), density = sparse_apply(model, variables, x, keep=0.5, mutable=True, return_density=True)
  assert set(state2) == {"params"} and set(density) == {"Dense_1", "Dense_2"}
  out3, density3 = sparse_apply(model, variables, x, keep=0.5, return_density=True)
  np.testing.assert_array_equal(out2, out)
  np.testing.assert_array_equal(out3, out)
  assert jax.tree.map(float, density3) == jax.tree.map(float, density)


def test_interception_is_scoped_to_the_call(mlp, mlp_run):
  model, variables, x = mlp
  dense = jax.jit(model.apply)(variables, x)
  mlp_run(variables, x, jnp.float32(0.2))
  np.testing.assert_array_equal(jax.jit(model.apply)(variables, x), dense)
  np.testing.assert_allclose(model.apply(variables, x), dense, rtol=1e-5, atol=1e-6)  # eager


@pytest.mark.parametrize(
  "kwargs, error, match",
  [
    (dict(where=3), TypeError, "where must be"),
    (dict(where=int), TypeError, "not a flax.linen.Module"),
    (dict(where=()), ValueError, "empty"),
    (dict(position="middle"), ValueError, "position"),
    (dict(position="outputs"), ValueError, "explicit `where`"),
    (dict(gradient="soft"), ValueError, "gradient"),
    (dict(score="rank"), ValueError, "score"),
    (dict(keep=0.0), ValueError, "keep"),
    (dict(keep=1.5), ValueError, "keep"),
    (dict(keep=float("nan")), ValueError, "keep"),
    (dict(where=nn.LayerNorm, keep=0.5), TypeError, None),
    (
      dict(keep={"Dense_9": 0.5}),
      ValueError,
      "sparse_apply: keep key 'Dense_9' matches no top-k site; the sites are: Dense_1, Dense_2",
    ),
    (dict(keep={"Dense_0": 0.5}), ValueError, "keep key 'Dense_0' matches no"),  # the input layer is no site
    (dict(keep={"Dense_1": 2.0}), ValueError, r"keep\['Dense_1'\] must be a keep ratio in \(0, 1\], got 2.0"),
    (dict(keep={"Dense_*": -0.1}), ValueError, r"keep\['Dense_\*'\] must be a keep ratio in \(0, 1\]"),
    (dict(keep={None: 0.5}), ValueError, "keys must be site names or globs"),
  ],
)
def test_bad_input_raises(mlp, kwargs, error, match):
  model, variables, x = mlp
  kwargs = {"keep": 0.5, **kwargs}
  if kwargs.get("where") is nn.LayerNorm:  # a selected site whose input is not floating
    model, x = Tokens(), jnp.zeros((2, 3), jnp.int32)
    variables = jax.eval_shape(model.init, KEY, x)
    kwargs["where"] = nn.Embed
    match = "not a floating array"
  with pytest.raises(error, match=match):
    jax.eval_shape(lambda v: sparse_apply(model, v, x, **kwargs), variables)


def test_no_matching_site_warns_with_model_class(mlp):
  model, variables, x = mlp
  with pytest.warns(UserWarning, match="no site of MLP matched"):
    jax.eval_shape(lambda v: sparse_apply(model, v, x, keep=0.5, where="nothing*"), variables)
  one_layer = nn.Dense(3)
  with pytest.warns(UserWarning, match="no site of Dense"):
    jax.eval_shape(
      lambda v: sparse_apply(one_layer, v, x[:, 0, 0], keep=0.5), jax.eval_shape(one_layer.init, KEY, x[:, 0, 0])
    )


def _snippet() -> str:
  """The python block between the snippet markers of README.md."""
  text = (ROOT / "README.md").read_text()
  start, end = "<!-- snippet:sparse_apply -->", "<!-- /snippet:sparse_apply -->"
  assert start in text and end in text, "README.md lost its sparse_apply snippet markers"
  block = text[text.index(start) + len(start) : text.index(end)]
  return block.split("```python", 1)[1].split("```", 1)[0]


def test_readme_snippet_runs(capsys):
  assert jaxsparse.sparse_apply is sparse_apply
  with jax.default_prng_impl("rbg"):  # threefry's init compiles for ~10 s on this CPU
    exec(compile(_snippet(), "README:sparse_apply", "exec"), {"__name__": "__snippet__"})
  assert "(4, 10) {'Conv_1': 0.3, 'Dense_0': 0.312}" in capsys.readouterr().out
