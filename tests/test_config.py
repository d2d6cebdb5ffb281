import dataclasses
import json

import pytest

from jaxsparse import config as config_lib


def test_presets_are_valid_and_paper_is_the_default():
  assert config_lib.PRESETS["paper"] == config_lib.Config()
  paper = config_lib.PRESETS["paper"]
  assert (paper.model, paper.norm, paper.augment, paper.epochs, paper.batch_size) == (
    "wrn28_4",
    "rmsnorm",
    None,
    200,
    128,
  )
  assert paper.eval_keeps == (1.0, 0.7, 0.5, 0.3, 0.2, 0.1, 0.05)


def test_overfit_preset_is_the_study_recipe_on_a_wider_model_and_fewer_images():
  study, overfit = config_lib.preset("study"), config_lib.preset("overfit")
  assert (overfit.model, overfit.train_size, overfit.val_size, overfit.epochs, overfit.augment) == (
    "wrn16_2",
    2000,
    1000,
    40,
    None,
  )
  same = ("batch_size", "learning_rate", "warmup_epochs", "norm", "weight_decay", "schedule")
  assert all(getattr(overfit, f) == getattr(study, f) for f in same)
  assert overfit.epochs % overfit.eval_every == 0 and 1.0 in overfit.eval_keeps


def test_json_round_trip():
  c = config_lib.preset("smoke", controller_options={"min_keep": 0.2}, eval_keeps=[1, 0.5])
  back = config_lib.Config.from_dict(json.loads(c.to_json()))
  assert back == c
  assert back.eval_keeps == (1.0, 0.5)


@pytest.mark.parametrize(
  "bad, match",
  [
    (dict(model="wrn99"), "model must be one of"),
    (dict(norm="layernorm"), "norm must be one of"),
    (dict(epochs=0), "epochs must be an integer >= 1"),
    (dict(eval_keeps=(1.0, 0.0)), "eval_keeps"),
    (dict(eval_keeps=(1.5,)), "eval_keeps"),
    (dict(dropout=1.0), "dropout"),
    (dict(train_size=10), "train_size"),
    (dict(augment="mixup"), "augment"),
  ],
)
def test_bad_values_raise(bad, match):
  with pytest.raises(ValueError, match=match):
    config_lib.preset("smoke", **bad)


def test_every_checked_field_refuses_a_wrong_value():
  wrong = {
    "val_size": -1, "norm_eps": True, "dropout": -0.1, "epochs": True, "batch_size": 0, "learning_rate": 0.0,
    "warmup_epochs": 1.5, "reset_warmup_steps": -1, "weight_decay": -1e-4, "eval_keeps": (0.5, 2.0),
    "eval_every": 0, "log_every_steps": -1, "regimes": "3", "keep_checkpoints": 0,
  }  # fmt: skip
  checked = [f.name for f in dataclasses.fields(config_lib.Config) if f.metadata["rule"] is not None]
  assert set(wrong) <= set(checked) and len(checked) > len(wrong)  # the rest: choices and bools
  for name in checked:
    with pytest.raises(ValueError, match=rf"^Config.{name} must be "):
      config_lib.preset("smoke", **{name: wrong.get(name, "bogus")})  # no choice or bool is a string "bogus"


def test_unknown_preset_and_field():
  with pytest.raises(ValueError, match="unknown preset"):
    config_lib.preset("huge")
  with pytest.raises(ValueError, match="unknown config fields"):
    config_lib.Config.from_dict({"lr": 0.1})
  with pytest.raises(ValueError, match=r"unknown config fields: \['bogus'\]"):
    config_lib.preset("smoke", bogus=1)


@pytest.mark.parametrize(
  "bad, match",
  [
    (dict(topk_keep="fraction"), r"^Config.topk_keep must be one of \['absolute', 'relative'\], got 'fraction'"),
    (dict(regimes=0), "^Config.regimes must be an integer >= 1, got 0"),
    (dict(regimes=2.5), "^Config.regimes must be an integer >= 1, got 2.5"),
    (dict(distill=True), r"^Config.distill needs Config.regimes >= 2 \(a dense pass to learn from\), got 1$"),
    (dict(regimes=2, distill="yes"), "^Config.distill must be a bool, got 'yes'"),
  ],
)
def test_bad_method_options_raise(bad, match):
  with pytest.raises(ValueError, match=match):
    config_lib.preset("smoke", **bad)


def test_errors_name_options_for_whoever_shows_them():
  from jaxsparse import errors
  from jaxsparse.data import DataError

  e = errors.OptionError("{train_size} (9) must be >= {batch_size}; set {controller_options.keep} or pass {fresh}")
  assert e.fields == ("train_size", "batch_size", "controller_options.keep", "fresh")
  assert str(e) == (
    "Config.train_size (9) must be >= Config.batch_size; set Config.controller_options['keep'] or pass fresh=True"
  )
  assert e.render(str.upper) == "TRAIN_SIZE (9) must be >= BATCH_SIZE; set CONTROLLER_OPTIONS.KEEP or pass FRESH"
  untouched = "a dict {'a': 1}, a set {3}, a tree <root>/{train,test}/"  # braces that name no option stay
  assert str(errors.OptionError(untouched)) == untouched and errors.OptionError(untouched).fields == ()
  assert str(DataError("set {data} to a local copy")) == "set Config.data to a local copy"


def test_method_options_round_trip():
  c = config_lib.preset("smoke", topk_keep="relative", regimes=4, distill=True)
  assert config_lib.Config.from_dict(json.loads(c.to_json())) == c


def test_a_saved_config_without_newer_fields_still_resumes(tmp_path):
  from jaxsparse import workdir as workdir_lib

  config = config_lib.preset("smoke")
  saved = json.loads(config.to_json())
  for field in ("topk_keep", "regimes", "distill"):  # a run directory written before these fields existed
    del saved[field]
  (tmp_path / "config.json").write_text(json.dumps(saved))
  (tmp_path / "checkpoints" / "10").mkdir(parents=True)
  workdir_lib.RunDir(tmp_path).prepare(config, fresh=False)  # same behaviour: accepted
  with pytest.raises(workdir_lib.ConfigMismatchError, match="regimes: 1 -> 2"):
    workdir_lib.RunDir(tmp_path).prepare(config.replace(regimes=2), fresh=False)
