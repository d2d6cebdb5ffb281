"""jaxsparse.evaluate: padded evaluation equals one pass over the whole split; the keep curve's MACs."""

import numpy as np
import pytest

from jaxsparse import config as config_lib
from jaxsparse import data as data_lib
from jaxsparse import evaluate, loop, parallel
from jaxsparse.train import cross_entropy

MEAN, STD = np.full(3, 0.5, np.float32), np.full(3, 0.25, np.float32)
# WRN-10-1 on 32x32 images by hand: {layer: (MACs per image = kernel size x output positions, the site it reads)}.
WRN10_1_MACS = {
  "stem": (3 * 3 * 3 * 16 * 32 * 32, None),
  "group0_block0/conv1": (3 * 3 * 16 * 16 * 32 * 32, "group0_block0/act1"),
  "group0_block0/conv2": (3 * 3 * 16 * 16 * 32 * 32, "group0_block0/act2"),
  "group1_block0/conv1": (3 * 3 * 16 * 32 * 16 * 16, "group1_block0/act1"),
  "group1_block0/conv2": (3 * 3 * 32 * 32 * 16 * 16, "group1_block0/act2"),
  "group1_block0/shortcut": (16 * 32 * 16 * 16, "group1_block0/act1"),
  "group2_block0/conv1": (3 * 3 * 32 * 64 * 8 * 8, "group2_block0/act1"),
  "group2_block0/conv2": (3 * 3 * 64 * 64 * 8 * 8, "group2_block0/act2"),
  "group2_block0/shortcut": (32 * 64 * 8 * 8, "group2_block0/act1"),
  "classifier": (64 * 10 * 8 * 8, "final_act"),
}


@pytest.fixture(scope="module")
def setup():
  config = config_lib.preset("smoke", model="wrn10_1")
  mesh = parallel.make_mesh()
  state = loop.initial_state(config, 1, mesh)
  rng = np.random.default_rng(0)
  split = data_lib.Split(
    rng.integers(0, 256, (70, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 70).astype(np.int32)
  )
  return config, mesh, state, split


def _evaluate(setup, keep, batch_size=32):
  _, mesh, state, split = setup
  return evaluate.evaluate(
    evaluate.make_eval_fn(mesh), state, split, keep=keep, batch_size=batch_size, mean=MEAN, std=STD, mesh=mesh
  )


def test_padded_batches_count_every_example_once(setup):
  _, _, state, split = setup
  got = _evaluate(setup, 0.3)  # 70 = 32 + 32 + 6 (padded to 32, masked)
  images = (split.images.astype(np.float32) / 255 - MEAN) / STD
  variables = {"params": state.params, **state.model_state}
  logits = state.apply_fn(variables, images, keep=0.3, train=False)
  assert got["count"] == 70
  assert got["accuracy"] == pytest.approx(float(np.mean(np.argmax(logits, -1) == split.labels)))
  assert got["loss"] == pytest.approx(float(np.mean(cross_entropy(logits, split.labels))), rel=1e-5)
  assert _evaluate(setup, 0.3, batch_size=64)["accuracy"] == got["accuracy"]
  assert set(got["density"]) and all(0.2 < d < 0.4 for d in got["density"].values()), got["density"]


def test_keep_curve_prices_each_keep_by_its_densities(setup):
  config, _, state, _ = setup
  model, variables = loop.build_model(config), {"params": state.params, **state.model_state}
  measured = {k: _evaluate(setup, k) for k in (1.0, 0.3)}
  curve, dense = evaluate.keep_curve(measured.get, model, variables, (1.0, 0.3))
  for k, result in measured.items():
    assert curve[k]["accuracy"] == result["accuracy"]
    assert curve[k]["density"] == pytest.approx(np.mean(list(result["density"].values())))
    assert curve[k]["macs_fraction"] == pytest.approx(curve[k]["macs"] / dense)
  assert 0 < curve[0.3]["macs_fraction"] < curve[1.0]["macs_fraction"] < 1  # keep 1: ReLU zeros count too
  # By hand: each layer's dense MACs times the measured density of the site it reads (the stem: 1). At keep 1 the
  # sites keep their ReLU densities, which differ from site to site: a layer priced by the wrong site shows.
  assert dense == sum(m for m, _ in WRN10_1_MACS.values()) == 12_541_952
  for k, result in measured.items():
    by_hand = sum(m * (result["density"][site] if site else 1.0) for m, site in WRN10_1_MACS.values())
    assert curve[k]["macs"] == pytest.approx(by_hand, rel=1e-6), k  # float32 densities
  every_unit = {**measured[1.0], "density": {site: 1.0 for site in measured[1.0]["density"]}}
  all_dense, _ = evaluate.keep_curve(lambda k: every_unit, model, variables, (1.0,))
  assert all_dense[1.0]["macs"] == pytest.approx(dense) and dense > 0
