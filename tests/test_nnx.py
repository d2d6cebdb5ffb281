"""Tests for jaxsparse.sparse_apply and jaxsparse.nnx.TopK on Flax NNX models written here."""

import math
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxsparse
from jaxsparse import nnx as jnnx
from jaxsparse.topk import topk_mask

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _rbg():
  with jax.default_prng_impl("rbg"):  # threefry compiles slowly on this CPU; rbg is quick
    yield


class MLP(nnx.Module):
  """Flattening MLP; `mask` (applied by hand before each hidden Linear) is the reference for sparse_apply."""

  def __init__(self, rngs):
    self.linear1 = nnx.Linear(24, 48, rngs=rngs)
    self.linear2 = nnx.Linear(48, 40, rngs=rngs)
    self.head = nnx.Linear(40, 10, rngs=rngs)

  def __call__(self, x, mask=None):
    mask = mask or (lambda h: h)
    h = nnx.gelu(self.linear1(x.reshape((x.shape[0], -1))))
    h = nnx.gelu(self.linear2(mask(h)))
    return self.head(mask(h))


class CNN(nnx.Module):
  """Conv - BatchNorm - ReLU twice, dropout, pooled Linear."""

  def __init__(self, rngs):
    self.convs = nnx.List([nnx.Conv(3, 8, (3, 3), rngs=rngs), nnx.Conv(8, 16, (3, 3), rngs=rngs)])
    self.norms = nnx.List([nnx.BatchNorm(8, rngs=rngs), nnx.BatchNorm(16, rngs=rngs)])
    self.dropout = nnx.Dropout(0.2, rngs=rngs)
    self.head = nnx.Linear(16, 10, rngs=rngs)

  def __call__(self, x):
    for conv, norm in zip(self.convs, self.norms):
      x = nnx.relu(norm(conv(x)))
    return self.head(self.dropout(x).mean(axis=(1, 2)))


class EncoderBlock(nnx.Module):
  """Pre-LN Transformer encoder block: self-attention + GELU MLP, both residual."""

  def __init__(self, rngs, d=16):
    self.ln1, self.ln2 = nnx.LayerNorm(d, rngs=rngs), nnx.LayerNorm(d, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=d, qkv_features=16, decode=False, rngs=rngs)
    self.up, self.down = nnx.Linear(d, 32, rngs=rngs), nnx.Linear(32, d, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.ln1(x))
    return x + self.down(nnx.gelu(self.up(self.ln2(x))))


def _normal(shape, seed=1):
  return jax.random.normal(jax.random.key(seed), shape)


def _expected(keep, n):
  return math.ceil(keep * n) / n


def _snapshot(model):
  """Everything a call must leave as it was: graph, classes of every module, and state values."""
  graphdef, state = nnx.split(model)
  leaves = [
    np.asarray(jax.random.key_data(v) if jnp.issubdtype(v.dtype, jax.dtypes.prng_key) else v)
    for v in jax.tree.leaves(state)
  ]
  return graphdef, [(p, type(m)) for p, m in nnx.iter_modules(model)], leaves


def _assert_unchanged(model, snapshot):
  graphdef, classes, leaves = _snapshot(model)
  assert graphdef == snapshot[0]
  assert classes == snapshot[1]
  for a, b in zip(leaves, snapshot[2], strict=True):
    np.testing.assert_array_equal(a, b)


def test_mlp_matches_masking_by_hand_and_reports_densities():
  model, x = MLP(nnx.Rngs(0)), _normal((4, 3, 4, 2))
  before = _snapshot(model)
  for keep in (0.5, 0.1):
    y, dens = jaxsparse.sparse_apply(model, x, keep=keep, return_density=True)
    ref = model(x, mask=lambda h, keep=keep: topk_mask(h, keep))
    np.testing.assert_array_equal(y, ref)
    assert set(dens) == {"linear2", "head"}  # linear1 reads the model's input: never masked
    assert float(dens["linear2"]) == pytest.approx(_expected(keep, 48))
    assert float(dens["head"]) == pytest.approx(_expected(keep, 40))
  _assert_unchanged(model, before)


def test_keep_one_is_the_plain_call_bitwise():
  model, x = MLP(nnx.Rngs(0)), _normal((4, 24))
  np.testing.assert_array_equal(jaxsparse.sparse_apply(model, x, keep=1.0), model(x))
  block, t = EncoderBlock(nnx.Rngs(0)), _normal((2, 5, 16))
  np.testing.assert_array_equal(jaxsparse.sparse_apply(block, t, keep=jnp.float32(1.0)), block(t))


def test_jaxsparse_nnx_sparse_apply_is_the_same_function_for_nnx_models():
  model, x = MLP(nnx.Rngs(0)), _normal((4, 24))
  np.testing.assert_array_equal(jnnx.sparse_apply(model, x, keep=0.3), jaxsparse.sparse_apply(model, x, keep=0.3))


@pytest.mark.parametrize("train", [True, False])
def test_cnn_with_batchnorm_and_dropout_in_train_and_eval_mode(train):
  model, x = CNN(nnx.Rngs(0)), _normal((4, 8, 8, 3))
  model.train() if train else model.eval()
  stats = np.asarray(model.norms[1].mean[...])
  y, dens = jaxsparse.sparse_apply(model, x, keep=0.25, return_density=True)
  assert y.shape == (4, 10)
  assert set(dens) == {"convs/1", "head"}  # convs/0 reads the image
  assert float(dens["convs/1"]) == pytest.approx(_expected(0.25, 8 * 8 * 8), abs=1e-6)
  # BatchNorm updates its running statistics in train mode only (from the masked input of convs/1).
  assert np.array_equal(np.asarray(model.norms[1].mean[...]), stats) != train
  if not train:  # eval mode (running statistics, no dropout) equals masking the two sites' inputs by hand
    h = nnx.relu(model.norms[0](model.convs[0](x)))
    h = nnx.relu(model.norms[1](model.convs[1](topk_mask(h, 0.25))))
    np.testing.assert_array_equal(y, model.head(topk_mask(h.mean(axis=(1, 2)), 0.25)))


def test_encoder_block_masks_attention_output_and_mlp_hidden():
  block, x = EncoderBlock(nnx.Rngs(0)), _normal((2, 5, 16))
  y, dens = jaxsparse.sparse_apply(block, x, keep=0.3, return_density=True)
  assert y.shape == x.shape
  # query/key/value read the LayerNorm output of the model's input through one array: the first weight layer's
  # input, skipped; the output projection reads the attention heads, up reads ln2(x), down the GELU hidden.
  assert set(dens) == {"attn/out", "up", "down"}
  assert float(dens["down"]) == pytest.approx(_expected(0.3, 5 * 32))
  assert float(dens["attn/out"]) == pytest.approx(_expected(0.3, 5 * 16))


@pytest.mark.parametrize(
  "where, sites",
  [
    (nnx.Linear, {"linear2", "head"}),
    ("linear*", {"linear2"}),
    (re.compile("head$"), {"head"}),
    (lambda m, p: p == "linear2", {"linear2"}),
    (("head", re.compile("2")), {"linear2", "head"}),
  ],
)
def test_selectors(where, sites):
  model, x = MLP(nnx.Rngs(0)), _normal((4, 24))
  _, dens = jaxsparse.sparse_apply(model, x, keep=0.5, where=where, return_density=True)
  assert set(dens) == sites


def test_outputs_per_example_keep_and_per_site_mapping():
  model, x = MLP(nnx.Rngs(0)), _normal((4, 24))
  _, dens = jaxsparse.sparse_apply(model, x, keep=0.25, where="linear2", position="outputs", return_density=True)
  assert float(dens["linear2"]) == pytest.approx(_expected(0.25, 40))
  keep = jnp.array([0.1, 0.5, 1.0, 0.25])
  y = jaxsparse.sparse_apply(model, x, keep=keep, where="linear2", position="outputs")
  ref_hidden = topk_mask(model.linear2(nnx.gelu(model.linear1(x))), keep)
  np.testing.assert_array_equal(y, model.head(nnx.gelu(ref_hidden)))
  _, dens = jaxsparse.sparse_apply(model, x, keep={"head": 0.1, "linear*": 0.5}, return_density=True)
  assert float(dens["head"]) == pytest.approx(_expected(0.1, 40))
  assert float(dens["linear2"]) == pytest.approx(_expected(0.5, 48))
  with pytest.raises(ValueError, match="'nothing' matches no top-k site"):
    jaxsparse.sparse_apply(model, x, keep={"nothing": 0.5})


@pytest.mark.parametrize("gradient", ["masked", "straight_through"])
def test_gradients_under_nnx_grad(gradient):
  model, x = MLP(nnx.Rngs(0)), _normal((4, 24))

  def loss(model, mask=None):
    if mask is None:
      return jnp.sum(jaxsparse.sparse_apply(model, x, keep=0.25, gradient=gradient) ** 2)
    return jnp.sum(model(x, mask=mask) ** 2)

  grads = nnx.grad(loss)(model)
  ref = nnx.grad(lambda m: loss(m, mask=lambda h: topk_mask(h, 0.25, gradient=gradient)))(model)
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref), strict=True):
    np.testing.assert_allclose(g, r, rtol=1e-6, atol=1e-7)
  assert float(jnp.abs(grads["linear1"]["kernel"][...]).sum()) > 0


def test_jitted_optimizer_step_compiles_once_across_keeps():
  model = CNN(nnx.Rngs(0))
  model.train()
  optimizer = nnx.Optimizer(model, optax.sgd(0.05), wrt=nnx.Param)
  x, labels = _normal((8, 8, 8, 3)), jnp.arange(8) % 10
  traces = []

  @nnx.jit
  def step(model, optimizer, keep):
    traces.append(1)

    def loss_fn(model):
      logits, dens = jaxsparse.sparse_apply(model, x, keep=keep, return_density=True)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), dens

    (loss, dens), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    return loss, dens

  before = _snapshot(model)
  for keep in (0.3, 0.2, 1.0, 0.1):  # ReLU after BatchNorm: about half the units are active
    loss, dens = step(model, optimizer, jnp.float32(keep))
    assert np.isfinite(float(loss))
    if keep < 1:
      assert float(dens["convs/1"]) == pytest.approx(_expected(keep, 8 * 8 * 8), abs=1e-6)
  assert len(traces) == 1
  graphdef, classes, leaves = _snapshot(model)
  assert graphdef == before[0] and classes == before[1]
  assert any(not np.array_equal(a, b) for a, b in zip(leaves, before[2], strict=True))  # it trained


def test_model_unchanged_after_a_call_that_raised():
  model = CNN(nnx.Rngs(0))
  model.train()
  before = _snapshot(model)
  with pytest.raises((TypeError, ValueError)):  # the first conv wants 3 channels, not 5: raises mid-call
    jaxsparse.sparse_apply(model, _normal((4, 8, 8, 5)), keep=0.5)
  _assert_unchanged(model, before)
  # Other instances of the same layer classes never see a site class, during or after the call.
  other = nnx.Linear(16, 10, rngs=nnx.Rngs(1))
  assert type(other) is nnx.Linear and type(model.head) is nnx.Linear


def test_bad_inputs_raise_clear_errors():
  model, x = MLP(nnx.Rngs(0)), _normal((4, 24))
  with pytest.raises(TypeError, match=r"model must be a flax.linen.Module or a flax.nnx.Module instance, got dict"):
    jaxsparse.sparse_apply({"w": 1}, x, keep=0.5)
  with pytest.raises(TypeError, match=r"got the class MLP \(pass an instance\)"):
    jaxsparse.sparse_apply(MLP, x, keep=0.5)
  with pytest.raises(ValueError, match=r"keep must be a keep ratio in \(0, 1\]"):
    jaxsparse.sparse_apply(model, x, keep=1.5)
  with pytest.raises(TypeError, match="is not a flax.nnx.Module"):
    jaxsparse.sparse_apply(model, x, keep=0.5, where=int)
  with pytest.raises(ValueError, match="position must be one of"):
    jaxsparse.sparse_apply(model, x, keep=0.5, position="middle")
  with pytest.raises(ValueError, match="needs an explicit `where`"):
    jaxsparse.sparse_apply(model, x, keep=0.5, position="outputs")
  with pytest.warns(UserWarning, match="no site of MLP matched"):
    jaxsparse.sparse_apply(model, x, keep=0.5, where="nothing*")


def test_nested_calls_are_refused_and_leave_the_model_unchanged():
  inner = MLP(nnx.Rngs(0))

  class Outer(nnx.Module):
    def __init__(self):
      self.inner = inner

    def __call__(self, x):
      return jaxsparse.sparse_apply(self.inner, x, keep=0.5)

  outer, x = Outer(), _normal((4, 24))
  before = _snapshot(outer)
  with pytest.raises(RuntimeError, match="cannot be nested"):
    jaxsparse.sparse_apply(outer, x, keep=0.5)
  _assert_unchanged(outer, before)


class WithTopK(nnx.Module):
  def __init__(self, rngs):
    self.hidden, self.out = nnx.Linear(24, 64, rngs=rngs), nnx.Linear(64, 10, rngs=rngs)
    self.topk = jnnx.TopK()

  def __call__(self, x, keep=1.0):
    return self.out(self.topk(nnx.relu(self.hidden(x)), keep))


def test_topk_layer_masks_records_density_and_trains_under_jit():
  model, x = WithTopK(nnx.Rngs(0)), _normal((4, 24))
  h = nnx.relu(model.hidden(x))
  np.testing.assert_array_equal(model(x, keep=0.25), model.out(topk_mask(h, 0.25)))
  assert jnnx.site_densities(model) == {"topk": pytest.approx(float(jnp.mean(topk_mask(h, 0.25) != 0)))}
  np.testing.assert_array_equal(model(x, keep=1.0), model.out(h))
  assert float(jnnx.site_densities(model)["topk"]) == pytest.approx(float(jnp.mean(h != 0)))
  optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
  traces = []

  @nnx.jit
  def step(model, optimizer, keep):
    traces.append(1)
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(x, keep) ** 2))(model)
    optimizer.update(model, grads)
    return loss

  for keep in (0.5, 0.1):
    step(model, optimizer, jnp.float32(keep))
    assert float(jnnx.site_densities(model)["topk"]) <= _expected(keep, 64) + 1e-6
  assert len(traces) == 1
  assert len(jax.tree.leaves(nnx.state(model, jnnx.Density))) == 1
  assert "topk" not in nnx.state(model, nnx.Param)  # the density is state, never a parameter


def test_topk_layer_rejects_bad_arguments():
  with pytest.raises(ValueError, match="score must be one of"):
    jnnx.TopK(score="size")
  with pytest.raises(TypeError, match="keep must be a keep ratio, not a mapping"):
    jnnx.TopK()(jnp.ones((2, 4)), {"*": 0.5})


def test_readme_nnx_snippet_runs(capsys):
  text = (ROOT / "README.md").read_text()
  start, end = "<!-- snippet:sparse_apply_nnx -->", "<!-- /snippet:sparse_apply_nnx -->"
  assert start in text and end in text, "README.md lost its NNX snippet markers"
  block = text[text.index(start) + len(start) : text.index(end)].split("```python", 1)[1].split("```", 1)[0]
  exec(compile(block, "README:sparse_apply_nnx", "exec"), {"__name__": "__snippet__"})
  assert "{'head': 0.312, 'hidden2': 0.312}" in capsys.readouterr().out
