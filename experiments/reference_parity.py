"""Parity with the author's published PyTorch script: same weights in, same logits, kept counts, keeps and steps out.

  python experiments/reference_parity.py --script /path/to/script.py [--steps 4000] [--batch 8] [--seed 0]

Imports the script from --script (a stub ``torchvision`` stands in for the one it imports for its data only), builds
its WRN-28-4 as its ``main()`` does from ``CFG`` (RMSNorm with bias, ReLU, global top-k; CPU, float32, no autocast),
gives its norms random scales and biases (so that their mapping is tested too), copies every weight into
``jaxsparse.models.WideResNet`` with the script's options (`our_model`) and checks:

  (a) logits within 1e-4 at keep 1, 0.5, 0.1, 0.01 on random normalised images (torch eval mode, train=False);
  (b) the kept (nonzero) units of each of the 25 top-k sites, summed over the batch, against what our rule keeps of
      the script's own activations: the script's kept units plus the units tied with a site's k-th value, which
      jaxsparse keeps all and torch.topk k of (its choice), less units within float32 rounding of 0 or the k-th value;
      where the script left tied units out, (a) reads TIES (inconclusive, not a failure) instead of FAIL;
  (c) ``controllers.tighten_relax`` against the script's ``AdaptiveKeepRatioController`` on a synthetic batch-accuracy
      trace of --steps steps, at interval 128 and 8: the same relax / hold / tighten at the same steps, the same keeps
      (float32 against float64); noted: how often floor(keep * units) of the two keeps differ;
  (d) two SGD steps (the script's lr 0.1, momentum 0.9, Nesterov, no weight decay) on one batch in train mode at keep
      0.5 and 1, torch's optimiser against ``jaxsparse.train.train_step``: in float64 (exact), and in float32 (loose:
      the CPU convolutions of both, oneDNN's and XLA's, lose about 3 digits in this net's float32 gradients).

Prints a markdown table and exits 1 if any check fails. Needs torch (``pip install -e ".[bench]"`` installs
torch==2.13.0, the CPU build) and the script's file, fetched outside the repository (it is GPL-3.0: never commit it).
Takes about 2 minutes on 2 busy CPU cores.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
import time
import types
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxsparse import config as config_lib
from jaxsparse import controllers, loop, models, train

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
FORWARD_KEEPS = (1.0, 0.5, 0.1, 0.01)
SGD_KEEPS, SGD_STEPS = (0.5, 1.0), 2
INTERVALS = (128, 8)
LOGIT_TOL, KEEP_TOL, UPDATE_TOL_F64, UPDATE_TOL_F32 = 1e-4, 2e-5, 1e-5, 5e-2
# The script's controller options (also its CFG fields) -> tighten_relax's; its max_scale (5.0) is a constant there.
CONTROLLER_OPTIONS = {
  "keep_init": "init_keep",
  "keep_min": "min_keep",
  "keep_max": "max_keep",
  "tighten_pct": "tighten",
  "relax_step": "relax_step",
  "ema_beta": "beta",
  "drop_tol": "tol",
  "cooldown_epochs": "cooldown",
  "relax_gain": "relax_gain",
  "max_relax_jump": "max_jump",
}
SLACK = 1e-5  # float32 rounding may put a unit this close to 0 or to a site's k-th value on either side of it


class Row(NamedTuple):
  """One line of the report: PASS when value <= tol; TIES (inconclusive, not a failure) when it is not but the
  script left out units tied with a site's k-th value, so that which of them it kept was torch's choice."""

  check: str
  value: float
  tol: float
  tied: bool = False

  def result(self) -> str:
    return "PASS" if self.value <= self.tol else "TIES" if self.tied else "FAIL"


def load_script(path: str) -> types.ModuleType:
  """The script as a module; a stub stands in for torchvision (imported at its top level, used only for data)."""
  if importlib.util.find_spec("torchvision") is None:
    stub = sys.modules["torchvision"] = types.ModuleType("torchvision")
    for name in ("datasets", "transforms"):
      setattr(stub, name, types.ModuleType(f"torchvision.{name}"))
      sys.modules[f"torchvision.{name}"] = getattr(stub, name)
  spec = importlib.util.spec_from_file_location("author_script", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up
  spec.loader.exec_module(module)
  return module


def site_name(torch_name: str) -> str:
  """The script's TopKActivation module name -> our site: "block2.0.act1" -> "group1_block0/act1", "act" -> "final_act"."""
  if torch_name == "act":
    return "final_act"
  group, block, act = re.fullmatch(r"block(\d)\.(\d+)\.(act[12])", torch_name).groups()
  return f"group{int(group) - 1}_block{block}/{act}"


def param_path(torch_name: str) -> tuple[str, ...]:
  """The script's parameter name -> our parameter path, e.g. "block1.0.norm1.bias" -> (group0_block0, norm1, bias)."""
  if torch_name.startswith("block"):
    group, block, layer, kind = re.fullmatch(r"block(\d)\.(\d+)\.(\w+)\.(weight|bias)", torch_name).groups()
    scope = (f"group{int(group) - 1}_block{block}", layer)
  else:
    layer, kind = torch_name.split(".")
    scope = ({"conv1": "stem", "norm": "final_norm", "fc": "classifier"}[layer],)
  if kind == "bias":
    return (*scope, "bias")
  return (*scope, "rms", "scale") if "norm" in scope[-1] else (*scope, "kernel")


def to_flax(value: np.ndarray) -> np.ndarray:
  """A script parameter in our layout: conv OIHW -> HWIO, linear (out, in) -> (in, out), vectors unchanged."""
  if value.ndim == 4:
    return value.transpose(2, 3, 1, 0)
  return value.T if value.ndim == 2 else value


def to_flax_params(state_dict: dict[str, np.ndarray], dtype=np.float32) -> dict:
  """{script parameter name: numpy array} -> our nested parameter tree of `dtype` arrays."""
  params: dict = {}
  for name, value in state_dict.items():
    *scopes, leaf = param_path(name)
    node = params
    for scope in scopes:
      node = node.setdefault(scope, {})
    node[leaf] = np.asarray(to_flax(value), dtype)
  return params


def build_script_model(script, seed: int):
  """The script's WideResNet as its main() builds it from CFG, with random norm scales and biases (float32, CPU)."""
  import torch  # pylint: disable=import-outside-toplevel

  cfg = script.CFG()
  torch.manual_seed(seed)
  model = script.WideResNet(
    depth=cfg.depth,
    widen_factor=cfg.widen_factor,
    num_classes=10,
    drop_rate=cfg.drop_rate,
    topk_keep_ratio=cfg.keep_init,
    topk_mode=cfg.topk_mode,
    topk_use_abs=cfg.topk_use_abs,
    act_type=cfg.act_type,
    act_leaky_slope=cfg.act_leaky_slope,
    act_eps=cfg.act_eps,
    norm_type=cfg.norm_type,
    norm_eps=cfg.norm_eps,
  )
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, script.RMSNorm2d):
        m.weight.mul_(1 + 0.2 * torch.randn_like(m.weight))
        m.bias.add_(0.2 * torch.randn_like(m.bias))
  return cfg, model


def our_model(cfg) -> models.WideResNet:
  """Our WideResNet as the `script` preset builds it (in float32, with XLA's convolutions), checked against `cfg`."""
  assert (cfg.norm_type, cfg.act_type, cfg.topk_mode, cfg.topk_use_abs, cfg.drop_rate) == (
    "rms",
    "relu",
    "global",
    False,
    0,
  )
  model = loop.build_model(config_lib.PRESETS["script"].replace(dtype="float32", conv="xla"))
  assert (model.depth, model.widen, model.norm_eps) == (cfg.depth, cfg.widen_factor, max(cfg.norm_eps, 1e-8))
  return model


def set_keep(script, model, keep: float) -> None:
  for m in model.modules():
    if isinstance(m, script.TopKActivation):
      m.keep_ratio = float(keep)


def site_stats(module, inputs, out) -> dict[str, int]:
  """A TopKActivation's batch totals: units per example, kept (nonzero) units, the units tied with its k-th value
  that it left out (jaxsparse keeps all ties: it would keep kept + ties), and the units within SLACK of 0 or of
  the k-th value (float32 rounding may put them on either side)."""
  v = inputs[0].relu().flatten(1)  # the script's activation (CFG: relu) before its top-k
  n, keep = v.shape[1], module.keep_ratio
  k = n if keep >= 1.0 - 1e-12 else max(1, int(n * keep))  # the script's k
  kth = v.topk(k, dim=1).values[:, -1:]
  kept = int((out != 0).sum())
  near = (inputs[0].abs() < SLACK) | (((v - kth).abs() < SLACK) & (v != kth)).view_as(inputs[0])
  return {"units": n, "kept": kept, "ties": int(((v >= kth) & (v > 0)).sum()) - kept, "ambiguous": int(near.sum())}


def torch_forward(script, model, x_NCHW: np.ndarray, keep: float):
  """Eval-mode logits and {our site name: `site_stats`} at `keep`."""
  import torch  # pylint: disable=import-outside-toplevel

  stats, hooks = {}, []
  for name, m in model.named_modules():
    if isinstance(m, script.TopKActivation):
      hook = lambda mod, i, o, site=site_name(name): stats.__setitem__(site, site_stats(mod, i, o))
      hooks.append(m.register_forward_hook(hook))
  set_keep(script, model, keep)
  model.eval()
  with torch.no_grad():
    logits = model(torch.from_numpy(x_NCHW)).numpy()
  for h in hooks:
    h.remove()
  return logits, stats


def check_forward(script, tmodel, model, params, x_NCHW: np.ndarray):
  """Rows (a) and (b) at every keep of FORWARD_KEEPS, {site: units per example}, and notes.

  (b) compares our kept count at each site with the count jaxsparse's rule gives on the script's own activations
  (its kept units plus the units tied with its k-th value), less the units within SLACK of a boundary. Where the
  script leaves tied units out, which of them it keeps is torch's choice: the logits are then not comparable, and
  (a) reads TIES instead of FAIL.
  """
  apply = jax.jit(lambda p, x, k: model.apply({"params": p}, x, keep=k, train=False, mutable=["density"]))
  x_NHWC, batch, rows, notes = jnp.asarray(x_NCHW.transpose(0, 2, 3, 1)), x_NCHW.shape[0], [], []
  for keep in FORWARD_KEEPS:
    want_logits, stats = torch_forward(script, tmodel, x_NCHW, keep)
    logits, state = apply(params, x_NHWC, jnp.float32(keep))
    densities = models.site_densities(state["density"])
    assert sorted(densities) == sorted(stats), "the sites differ"
    counts = {s: round(float(d) * stats[s]["units"] * batch) for s, d in densities.items()}
    tied = any(st["ties"] for st in stats.values())
    rows.append(
      Row(f"(a) logits, keep {keep}: max abs diff", float(np.max(np.abs(logits - want_logits))), LOGIT_TOL, tied)
    )
    excess = [abs(counts[s] - st["kept"] - st["ties"]) - st["ambiguous"] for s, st in stats.items()]
    rows.append(Row(f"(b) kept units, 25 sites, keep {keep}: max abs diff", max(0, *excess), 0))
    notes += [
      f"keep {keep}, {s}: kept {counts[s]} (script {st['kept']}, with ties {st['kept'] + st['ties']}; "
      f"{st['ambiguous']} units within {SLACK:g} of 0 or of the k-th value)"
      for s, st in stats.items()
      if counts[s] != st["kept"]
    ]
    if tied:
      left_out = {s: st["ties"] for s, st in stats.items() if st["ties"]}
      notes.append(
        f"keep {keep}: the script left out units tied with the k-th value (jaxsparse keeps them): {left_out}"
      )
  return rows, {s: st["units"] for s, st in stats.items()}, notes


def accuracy_trace(steps: int, seed: int, batch: int = 128) -> np.ndarray:
  """Batch accuracies (multiples of 1/batch) that rise with noise and collapse for a while every ~600 steps."""
  rng = np.random.default_rng(seed)
  t = np.arange(steps)
  rise = 0.9 - 0.7 * np.exp(-t / 500)
  collapse = 0.4 * ((t % 613) > 540)
  return np.round(np.clip(rise - collapse + rng.normal(0, 0.04, steps), 0, 1) * batch) / batch


def script_controller_run(script, cfg, accs: np.ndarray, interval: int):
  """The script controller's keep after each step, and its action at each step ("relax", "hold", "tighten" or "")."""
  options = {name: getattr(cfg, name) for name in CONTROLLER_OPTIONS}
  ctrl = script.AdaptiveKeepRatioController(**options, tighten_every_n_batches=interval)
  keeps, holds_before, holds_after = [], [], []
  for a in accs.tolist():
    holds_before.append(ctrl.cooldown_left)
    ctrl.step_batch(a)
    keeps.append(ctrl.keep)
    holds_after.append(ctrl.cooldown_left)
  return np.asarray(keeps), actions(interval, cfg.cooldown_epochs, holds_before, holds_after)


def our_controller_run(cfg, accs: np.ndarray, interval: int):
  """Our tighten_relax with the script's CFG values, run under jit by lax.scan: keeps and actions as above."""
  options = {ours: getattr(cfg, name) for name, ours in CONTROLLER_OPTIONS.items()}
  ctrl = controllers.get("tighten_relax", interval=interval, **options)

  def body(state, inputs):
    new = ctrl.step(state, *inputs)
    return new, (new.keep, state.holds, new.holds)

  run = jax.jit(lambda a: jax.lax.scan(body, ctrl.init(), (a, jnp.arange(a.size, dtype=jnp.int32)))[1])
  keeps, before, after = (np.asarray(v) for v in run(jnp.asarray(accs, jnp.float32)))
  return keeps, actions(interval, cfg.cooldown_epochs, before.tolist(), after.tolist())


def actions(interval: int, cooldown: int, holds_before, holds_after) -> list[str]:
  """Each step's action, from the cooldown counter: a relax restarts it, a hold counts it down, a tighten needs 0."""
  assert cooldown > 0, "relaxes are told apart by the cooldown they start"
  out = []
  for t, (before, after) in enumerate(zip(holds_before, holds_after)):
    if (t + 1) % interval:
      out.append("")
    else:
      out.append("relax" if after == cooldown else "hold" if before > 0 else "tighten")
  return out


def check_controller(script, cfg, accs: np.ndarray, interval: int, units: list[int]):
  """Rows (c) for one interval, and a one-line summary."""
  want_keeps, want_actions = script_controller_run(script, cfg, accs, interval)
  keeps, got_actions = our_controller_run(cfg, accs, interval)
  mismatched = sum(a != b for a, b in zip(want_actions, got_actions))
  # The kept count floor(keep * n) of our float32 keep against the script's float64 one, at each site size.
  k32 = np.floor(keeps[:, None] * np.asarray(units, np.float32)[None, :])
  k64 = np.floor(want_keeps[:, None] * np.asarray(units, np.float64)[None, :])
  summary = (
    f"interval {interval}: {sum(a != '' for a in want_actions)} decisions, {want_actions.count('relax')} relaxes, "
    f"{want_actions.count('hold')} holds, {want_actions.count('tighten')} tightens; min keep {want_keeps.min():.4f}; "
    f"floor(keep * units) differs at {int(np.sum(k32 != k64))} of {k32.size} (step, site size) pairs"
  )
  return [
    Row(f"(c) controller, interval {interval}: steps with a different action", mismatched, 0),
    Row(f"(c) controller, interval {interval}: max abs keep diff", float(np.max(np.abs(keeps - want_keeps))), KEEP_TOL),
  ], summary


def sgd_runs(script, cfg, tmodel, model, x_NCHW: np.ndarray, labels: np.ndarray, dtype, seed: int):
  """{keep: (ours, script's, start)}: parameter trees (numpy) after SGD_STEPS steps on one batch from the same
  weights in `dtype`, torch's SGD against `train.train_step` (under jit, float64 with x64 enabled)."""
  import copy  # pylint: disable=import-outside-toplevel

  import torch  # pylint: disable=import-outside-toplevel

  out = {}
  with jax.enable_x64(dtype == np.float64):
    ours = model.clone(dtype=dtype, param_dtype=dtype)
    tx = train.make_optimizer(cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    state0 = train.create_train_state(jax.random.key(seed), ours, tx, controllers.get("dense"))
    step = jax.jit(train.train_step)
    batch = {"image": jnp.asarray(x_NCHW.transpose(0, 2, 3, 1), dtype), "label": jnp.asarray(labels, jnp.int32)}
    for keep in SGD_KEEPS:
      net = copy.deepcopy(tmodel).to(getattr(torch, np.dtype(dtype).name)).train()
      set_keep(script, net, keep)
      opt = torch.optim.SGD(
        net.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov
      )
      start = to_flax_params({n: p.detach().numpy().copy() for n, p in net.named_parameters()}, dtype)
      state = state0.replace(params=start, opt_state=tx.init(start))
      for _ in range(SGD_STEPS):
        opt.zero_grad(set_to_none=True)
        logits = net(torch.from_numpy(x_NCHW.astype(dtype)))
        torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels)).backward()
        opt.step()
        state, _ = step(state, batch, jnp.float32(keep))
      want = to_flax_params({n: p.detach().numpy() for n, p in net.named_parameters()}, dtype)
      out[keep] = (jax.tree.map(np.asarray, state.params), want, start)
  return out


def check_sgd(script, cfg, tmodel, model, x_NCHW: np.ndarray, labels: np.ndarray, seed: int) -> list[Row]:
  """Rows (d): per tensor, the largest parameter difference over the largest update, in float64 (the exact check)
  and in float32 (loose: the CPU convolutions of both lose about 3 digits in this net's gradients)."""
  rows = []
  for dtype, tol in ((np.float64, UPDATE_TOL_F64), (np.float32, UPDATE_TOL_F32)):
    for keep, (got, want, start) in sgd_runs(script, cfg, tmodel, model, x_NCHW, labels, dtype, seed).items():
      diff = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), got, want)
      moved = jax.tree.map(lambda b, a: float(np.max(np.abs(b - a))), want, start)
      rel = max(jax.tree.leaves(jax.tree.map(lambda d, m: d / max(m, 1e-30), diff, moved)))
      name = f"(d) {SGD_STEPS} SGD steps, {np.dtype(dtype).name}, keep {keep}: max diff / max update (max abs diff"
      rows.append(Row(f"{name} {max(jax.tree.leaves(diff)):.2g})", rel, tol))
  return rows


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--script", required=True, help="path of the author's script (not in this repository)")
  p.add_argument("--steps", type=int, default=4000, help="steps of the synthetic accuracy trace for (c)")
  p.add_argument("--batch", type=int, default=8, help="images per batch for (a), (b) and (d)")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  import torch  # pylint: disable=import-outside-toplevel

  start = time.time()
  script = load_script(args.script)
  cfg, tmodel = build_script_model(script, args.seed)
  model = our_model(cfg)
  state_dict = {n: v.detach().numpy() for n, v in tmodel.state_dict().items()}
  params = jax.tree.map(jnp.asarray, to_flax_params(state_dict))
  rng = np.random.default_rng(args.seed)
  images = rng.uniform(0, 1, (args.batch, 32, 32, 3))
  x_NCHW = ((images - CIFAR_MEAN) / CIFAR_STD).transpose(0, 3, 1, 2).astype(np.float32)
  labels = rng.integers(0, 10, args.batch)

  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, shapes), "the mapped tree differs from ours"
  rows, site_units, notes = check_forward(script, tmodel, model, params, x_NCHW)
  units = sorted(set(site_units.values()))
  accs = accuracy_trace(args.steps, args.seed)
  for interval in INTERVALS:
    more, note = check_controller(script, cfg, accs, interval, units)
    rows, notes = rows + more, notes + [note]
  rows += check_sgd(script, cfg, tmodel, model, x_NCHW, labels, args.seed)

  print(f"# Parity with {args.script}\n")
  print(f"torch {torch.__version__}, jax {jax.__version__}, batch {args.batch}, seed {args.seed}\n")
  print("| check | measured | tolerance | result |\n|---|---|---|---|")
  for row in rows:
    print(f"| {row.check} | {row.value:.3g} | {row.tol:g} | {row.result()} |")
  print("\n" + "\n".join(f"- {n}" for n in notes))
  failed = sum(row.result() == "FAIL" for row in rows)
  tied = sum(row.result() == "TIES" for row in rows)
  print(f"\n{failed} of {len(rows)} checks fail, {tied} inconclusive (TIES); {time.time() - start:.0f} s")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
