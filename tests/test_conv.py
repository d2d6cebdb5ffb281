"""The convs of jaxsparse.models.conv equal lax.conv_general_dilated (values and gradients) and slot into the WRN."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxsparse import config as config_lib
from jaxsparse.models import conv as conv_lib
from jaxsparse.models import wrn as wrn_lib
from jaxsparse.models.wrn import WideResNet, resolve_conv

CONVS = [conv_lib.shifted_matmul_conv, conv_lib.wgrad_matmul_conv]


def _both(x, w, strides, padding, fn=conv_lib.shifted_matmul_conv, **kw):
  dn = lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
  args = dict(dimension_numbers=dn, precision=lax.Precision.HIGHEST, **kw)
  return (
    lambda x, w: lax.conv_general_dilated(x, w, strides, padding, **args),
    lambda x, w: fn(x, w, strides, padding, **args),
  )


@pytest.mark.parametrize(
  "size,kernel,strides,padding",
  [
    (8, 3, (1, 1), "SAME"),
    (9, 3, (2, 2), "SAME"),
    (8, 1, (2, 2), "SAME"),
    (7, 3, (1, 1), "VALID"),
    (8, 3, (2, 1), ((2, 0), (1, 1))),
    (6, 5, (1, 1), "SAME"),
    (16, 3, (1, 1), "SAME"),
    (16, 3, (1, 1), ((2, 0), (0, 1))),
  ],
)
@pytest.mark.parametrize("fn", CONVS, ids=lambda f: f.__name__)
def test_values_and_gradients_match_lax(size, kernel, strides, padding, fn):
  kx, kw = jax.random.split(jax.random.PRNGKey(0))
  x = jax.random.normal(kx, (2, size, size, 3))
  w = jax.random.normal(kw, (kernel, kernel, 3, 4))
  ref, ours = _both(x, w, strides, padding, fn)
  np.testing.assert_allclose(ours(x, w), ref(x, w), rtol=1e-5, atol=1e-5)
  loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))  # noqa: E731
  for g_ours, g_ref in zip(jax.grad(loss(ours), (0, 1))(x, w), jax.grad(loss(ref), (0, 1))(x, w)):
    np.testing.assert_allclose(g_ours, g_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fn", CONVS, ids=lambda f: f.__name__)
def test_other_layouts_fall_back_to_lax_exactly(fn):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 4))
  w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 2, 4))
  ref, ours = _both(x, w, (1, 1), "SAME", fn, feature_group_count=2)  # grouped: not ours to handle
  np.testing.assert_array_equal(ours(x, w), ref(x, w))
  ref, ours = _both(x, jnp.ones((3, 3, 4, 4)), (1, 1), "SAME", fn, rhs_dilation=(2, 2))
  np.testing.assert_array_equal(ours(x, jnp.ones((3, 3, 4, 4))), ref(x, jnp.ones((3, 3, 4, 4))))


def test_wrn_with_matmul_convs_has_the_same_parameters_and_outputs():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  xla, mm = WideResNet(depth=10, widen=1, conv="xla"), WideResNet(depth=10, widen=1, conv="matmul")
  variables = xla.init(jax.random.PRNGKey(1), x)
  assert jax.tree.structure(variables) == jax.tree.structure(mm.init(jax.random.PRNGKey(1), x))
  for keep in (1.0, 0.3):
    np.testing.assert_allclose(
      mm.apply(variables, x, keep=keep), xla.apply(variables, x, keep=keep), rtol=1e-4, atol=1e-4
    )
  with pytest.raises(ValueError, match="conv must be 'auto' or one of"):
    WideResNet(depth=10, widen=1, conv="fft").init(jax.random.PRNGKey(1), x)


@pytest.mark.parametrize("strides,size", [((1, 1), 16), ((1, 1), 4), ((2, 2), 9)])
def test_kernel_gradient_paths_equal_lax(strides, size):
  """Both paths of kernel_gradient: flattened rows (stride 1, little padding) and strided windows."""
  kx, kg = jax.random.split(jax.random.PRNGKey(2))
  x = jax.random.normal(kx, (3, size, size, 5))
  w = jnp.zeros((3, 3, 5, 2))
  conv = lambda w: lax.conv_general_dilated(
    x,
    w,
    strides,
    "SAME",
    dimension_numbers=("NHWC", "HWIO", "NHWC"),  # noqa: E731
    precision=lax.Precision.HIGHEST,
  )
  out, vjp = jax.vjp(conv, w)
  g = jax.random.normal(kg, out.shape)
  padding = lax.padtype_to_pads(x.shape[1:3], (3, 3), strides, "SAME")
  ours = conv_lib.kernel_gradient(x, g, (3, 3), strides, padding, precision=lax.Precision.HIGHEST)
  np.testing.assert_allclose(ours, vjp(g)[0], rtol=1e-5, atol=1e-5)


def test_wgrad_matmul_forward_and_input_gradient_are_xlas_bit_for_bit():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))
  w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 3, 4))
  ref, ours = _both(x, w, (1, 1), "SAME", conv_lib.wgrad_matmul_conv)
  np.testing.assert_array_equal(jax.jit(ours)(x, w), jax.jit(ref)(x, w))
  loss = lambda f: lambda x: jnp.sum(jnp.sin(f(x, w)))  # noqa: E731
  np.testing.assert_array_equal(jax.jit(jax.grad(loss(ours)))(x), jax.jit(jax.grad(loss(ref)))(x))


def test_auto_is_per_layer_on_cpu_and_every_config_choice_is_a_model_choice():
  assert jax.default_backend() == "cpu"  # the test suite runs on CPU
  assert resolve_conv("auto") == "auto" and resolve_conv("xla") == "xla"
  assert set(config_lib.CONVS) == set(wrn_lib.CONVS)
  assert config_lib.Config().conv == "auto" and WideResNet().conv == "auto"


@pytest.mark.parametrize(
  "lhs, rhs, strides, backend, expected",
  [
    ((64, 32, 32, 16), (1, 1, 16, 32), (2, 2), "cpu", "wgrad_matmul"),  # 1x1 projection shortcut
    ((64, 16, 16, 128), (3, 3, 128, 128), (1, 1), "cpu", "wgrad_matmul"),  # WRN-28-4 group 1
    ((64, 32, 32, 128), (3, 3, 128, 256), (2, 2), "cpu", "wgrad_matmul"),  # 16x16 output pixels
    ((64, 8, 8, 256), (3, 3, 256, 256), (1, 1), "cpu", "xla"),  # too few pixels
    ((64, 32, 32, 16), (3, 3, 16, 16), (1, 1), "cpu", "xla"),  # too few channels
    ((64, 32, 32, 64), (3, 3, 64, 64), (1, 1), "cpu", "xla"),
    ((64, 32, 32, 3), (3, 3, 3, 16), (1, 1), "cpu", "xla"),  # the stem
    ((64, 32, 32, 16), (1, 1, 16, 32), (2, 2), "gpu", "xla"),
    ((64, 16, 16, 128), (3, 3, 128, 128), (1, 1), "tpu", "xla"),
  ],
)
def test_choose_conv_follows_the_documented_rule(lhs, rhs, strides, backend, expected):
  assert conv_lib.choose_conv(lhs, rhs, strides, backend=backend) == expected


def test_auto_conv_computes_xlas_forward_bit_for_bit_and_its_gradients():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 128))
  for w_shape, strides in (((1, 1, 128, 64), (2, 2)), ((3, 3, 128, 128), (1, 1)), ((3, 3, 128, 16), (1, 1))):
    w = jax.random.normal(jax.random.PRNGKey(1), w_shape) * 0.05
    ref, ours = _both(x, w, strides, "SAME", conv_lib.auto_conv)
    np.testing.assert_array_equal(jax.jit(ours)(x, w), jax.jit(ref)(x, w))
    loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))  # noqa: E731
    for got, want in zip(jax.grad(loss(ours), (0, 1))(x, w), jax.grad(loss(ref), (0, 1))(x, w)):
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_wrn_auto_equals_xla_forward_bit_for_bit():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  xla, auto = WideResNet(depth=10, widen=1, conv="xla"), WideResNet(depth=10, widen=1, conv="auto")
  variables = xla.init(jax.random.PRNGKey(1), x)
  np.testing.assert_array_equal(auto.apply(variables, x, keep=0.3), xla.apply(variables, x, keep=0.3))
