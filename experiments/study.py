"""Run a study: named variants x seeds, each one `experiments/run.py` process, several lanes at once.

  python experiments/study.py --out runs/study --seeds 0,1,2 --lanes 2 --pin \\
      -- --preset=study --data=../shared/data/cifar10-jpeg.tar.gz
  python experiments/compare.py runs/study/*_s* --out docs/study --title "CPU study"

On a scheduler (a SLURM job array, GNU parallel, a cloud batch service), --list prints one run.py command per
unfinished run (this interpreter and absolute paths, so it runs from any directory), and --shard=I/N keeps every
N-th run from the I-th (README, Studies on a scheduler). Flags that run.py would refuse are refused first, in one
line, before any run starts or any command is printed:

  python experiments/study.py --out runs/study --seeds 0,1,2 --list -- --preset=study | parallel -j 2

Every run goes to <out>/<variant>_s<seed> with its log beside it (<variant>_s<seed>.log). Arguments after `--`
go to every run. Runs that already have a summary.json are skipped and interrupted ones resume from their
checkpoints, so re-running the same command after a crash or Ctrl-C continues the study. With --pin each lane
is bound to its own CPU core (Linux): on a small CPU, two single-core runs side by side finish ~1.8x more runs
per hour than one run using both cores, because XLA's CPU convolutions use a second core poorly.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import queue
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

RUN = Path(__file__).resolve().parent / "run.py"
_FROM_DENSE = "--init-from={out}/dense_s{seed}"

# The study's variants: run.py flags. The dropout baseline is dense training with dropout between the convs.
VARIANTS = {
  "dense": ["--schedule=dense"],
  "dropout": ["--schedule=dense", "--dropout=0.3"],
  "cyclic": ["--schedule=cyclic", "--period=4"],
  "adaptive_a": ["--schedule=adaptive_a"],
  "adaptive_b": ["--schedule=adaptive_b"],
  # Follow-ups to the main study: gentler sparsity, and gradients through the masked units.
  "adaptive_b_min0.3": ["--schedule=adaptive_b", "--min-keep=0.3"],
  "adaptive_b_st": ["--schedule=adaptive_b", "--topk-gradient=straight_through"],
  # Keep relative to each example's active units, so that every keep < 1 drops units (README, Relative keep).
  "adaptive_a_rel": ["--schedule=adaptive_a", "--topk-keep=relative"],
  "adaptive_b_rel": ["--schedule=adaptive_b", "--topk-keep=relative"],
  "adaptive_b_rel_min0.3": ["--schedule=adaptive_b", "--topk-keep=relative", "--min-keep=0.3"],
  # Three regimes per step (keep 1.0, 0.1 and one random keep in between; 3 passes per step), without and with
  # in-place distillation from the dense pass (README, Several regimes per step).
  "sandwich": ["--schedule=constant", "--keep=0.1", "--regimes=3"],
  "sandwich_distill": ["--schedule=constant", "--keep=0.1", "--regimes=3", "--distill"],
  # The frontier study (docs/results.md, Frontier): a network trained for each keep, and joint training with dropout.
  **{f"keep{k}": ["--schedule=constant", f"--keep={k}"] for k in ("0.3", "0.2", "0.1", "0.05")},
  "sandwich_dropout": ["--schedule=constant", "--keep=0.1", "--regimes=3", "--dropout=0.3"],
  "adaptive_b_dropout": ["--schedule=adaptive_b", "--dropout=0.3"],
  "adaptive_b_w13": ["--schedule=adaptive_b", "--reset-warmup-steps=13"],
  # The dense network of the same seed fine-tuned at keep K for E epochs (docs/frontier/README.md): the preset's lr
  # without warm-up, and lr 0.01 with a one-epoch warm-up.
  **{
    f"ft{k}_e{e}": ["--schedule=constant", f"--keep={k}", f"--epochs={e}", "--warmup-epochs=0", _FROM_DENSE]
    for k, e in (("0.3", 5), ("0.2", 5), ("0.1", 2), ("0.1", 5), ("0.1", 10), ("0.05", 5))
  },
  **{
    f"ft{k}_e5_lr0.01w1": [
      "--schedule=constant",
      f"--keep={k}",
      "--epochs=5",
      "--warmup-epochs=1",
      "--learning-rate=0.01",
      _FROM_DENSE,
    ]
    for k in ("0.3", "0.2", "0.1", "0.05")
  },
}
MAIN = ("dense", "dropout", "cyclic", "adaptive_a", "adaptive_b")
# A frontier seed block (docs/frontier/README.md), the most informative comparisons first: the per-keep and joint
# networks, then the baselines and adaptive_b, then the fine-tunes of the block's dense network.
FRONTIER = (
  "sandwich", "sandwich_dropout", "keep0.3", "keep0.2", "keep0.1", "keep0.05", "dense", "dropout", "adaptive_b",
  "adaptive_b_w13", *(v for v in VARIANTS if v.startswith("ft")),
)  # fmt: skip


def plan(variants, seeds, out: Path):
  """(name, workdir, flags) per run, seed-major so that a partial study covers every variant. In a variant's
  flags, ``{out}`` and ``{seed}`` stand for the study directory and the run's seed (fine-tunes name their source)."""
  return [
    (f"{v}_s{s}", out / f"{v}_s{s}", [f.format(out=out, seed=s) for f in VARIANTS[v]] + [f"--seed={s}"])
    for s in seeds
    for v in variants
  ]


def command(workdir: Path, flags, common) -> list[str]:
  """The run.py command line (after the interpreter) of one run of the study."""
  return [str(RUN), *flags, f"--workdir={workdir}", "--no-progress", *common]


def _run_module():
  """experiments/run.py as a module (loaded from its file: the scripts are not an installed package)."""
  name = "jaxsparse_experiments_run"
  if name not in sys.modules:
    spec = importlib.util.spec_from_file_location(name, RUN)
    sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sys.modules[name])
  return sys.modules[name]


def check_flags(todo, common) -> str | None:
  """The first reason run.py would refuse one of the planned runs' flags (its own error line), else None. A
  fine-tune's source run is not checked: it may not have finished yet."""
  run = _run_module()

  for name, workdir, flags in todo:
    argv = [f for f in command(workdir, flags, common)[1:] if not f.startswith("--init-from=")]
    try:
      run.config_from_args(run.parse_args(argv))
    except SystemExit:  # argparse printed its one-line error
      return f"{name}: run.py refuses these flags (above)"
    except ValueError as e:
      return f"{name}: {run.in_flags(e)}"
  return None


def _absolute(arg: str) -> str:
  """A path flag (--data, --cache-dir, --init-from) naming an existing path, made absolute; anything else as is."""
  name, eq, value = arg.partition("=")
  if eq and name in ("--data", "--cache-dir", "--init-from") and Path(value).exists():
    return f"{name}={Path(value).resolve()}"
  return arg


def _source(flags) -> Path | None:
  """The run a fine-tune starts from (its --init-from), if any."""
  return next((Path(f.split("=", 1)[1]) for f in flags if f.startswith("--init-from=")), None)


def _lane(lane: int, jobs: queue.Queue, common: list[str], pin: bool, results: dict, lock: threading.Lock):
  cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
  while True:
    try:
      name, workdir, flags = jobs.get_nowait()
    except queue.Empty:
      return
    if (workdir / "summary.json").exists():
      with lock:
        results[name] = "done before"
        print(f"[lane {lane}] {name}: already finished, skipped", flush=True)
      continue
    source = _source(flags)
    if source is not None and not (source / "summary.json").exists():
      with lock:
        results[name] = "waiting"
        print(f"[lane {lane}] {name}: skipped, {source} has not finished (run the study again after it)", flush=True)
      continue
    cmd = [sys.executable, *command(workdir, flags, common)]
    preexec = None
    if pin and cpus:
      cpu = cpus[lane % len(cpus)]
      preexec = lambda: os.sched_setaffinity(0, {cpu})  # noqa: E731
    with lock:
      print(f"[lane {lane}] {name}: start  {' '.join(cmd[1:])}", flush=True)
    t0 = time.time()
    workdir.parent.mkdir(parents=True, exist_ok=True)
    with open(workdir.parent / f"{name}.log", "a") as log:
      rc = subprocess.call(
        cmd, stdout=log, stderr=subprocess.STDOUT, preexec_fn=preexec, env={**os.environ, "PYTHONUNBUFFERED": "1"}
      )
    with lock:
      results[name] = rc
      print(f"[lane {lane}] {name}: exit {rc} after {(time.time() - t0) / 60:.1f} min", flush=True)


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  common = argv[argv.index("--") + 1 :] if "--" in argv else []
  argv = argv[: argv.index("--")] if "--" in argv else argv
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True, help="study directory")
  p.add_argument(
    "--variants",
    default=",".join(MAIN),
    help=f"comma-separated, from: {', '.join(VARIANTS)}; or 'frontier', a frontier seed block (default: %(default)s)",
  )
  p.add_argument("--seeds", default="0,1,2", help="comma-separated integers (default: %(default)s)")
  p.add_argument("--lanes", type=int, default=1, help="runs at once (default: %(default)s)")
  p.add_argument("--pin", action="store_true", help="bind each lane to one CPU core (Linux)")
  p.add_argument(
    "--shard", default="0/1", help="I/N: only the runs whose index in the plan is I modulo N (default: %(default)s)"
  )
  p.add_argument(
    "--list",
    action="store_true",
    help="print one run.py command per unfinished run of the shard (for a scheduler or GNU parallel) and exit",
  )
  args = p.parse_args(argv)
  variants = [w for v in args.variants.split(",") if v for w in (FRONTIER if v == "frontier" else [v])]
  unknown = [v for v in variants if v not in VARIANTS]
  if unknown or not variants:
    p.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
  try:
    seeds = [int(s) for s in args.seeds.split(",")]
  except ValueError:
    p.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
  if args.lanes < 1:
    p.error("--lanes must be >= 1")
  if args.pin and not hasattr(os, "sched_setaffinity"):
    p.error("--pin needs Linux (os.sched_setaffinity)")
  try:
    index, count = (int(x) for x in args.shard.split("/"))
  except ValueError:
    index, count = -1, 0
  if not 0 <= index < count:
    p.error(f"--shard must be I/N with 0 <= I < N, got {args.shard!r}")
  todo = plan(variants, seeds, Path(args.out).resolve())[index::count]
  problem = check_flags(todo, common)
  if problem:
    print(f"error: {problem}", file=sys.stderr)
    return 2
  if args.list:
    for name, workdir, flags in todo:
      if not (workdir / "summary.json").exists():
        print(shlex.join([sys.executable, *map(_absolute, command(workdir, flags, common))]))
    return 0
  jobs: queue.Queue = queue.Queue()
  for job in todo:
    jobs.put(job)
  results: dict = {}
  lock = threading.Lock()
  threads = [
    threading.Thread(target=_lane, args=(i, jobs, common, args.pin, results, lock), daemon=True)
    for i in range(args.lanes)
  ]
  for t in threads:
    t.start()
  try:
    for t in threads:
      while t.is_alive():
        t.join(timeout=1.0)
  except KeyboardInterrupt:  # the runs got the same SIGINT from the terminal and save a checkpoint each
    print("interrupted: running runs save a checkpoint; run the same command to continue", file=sys.stderr)
    return 130
  failed = {n: rc for n, rc in results.items() if rc not in (0, "done before", "waiting")}
  waiting = [n for n, rc in results.items() if rc == "waiting"]
  print(
    f"{len(results) - len(failed) - len(waiting)}/{len(results)} runs finished"
    + (f"; failed: {failed}" if failed else "")
    + (f"; waiting for their source run: {', '.join(waiting)}" if waiting else "")
  )
  return 1 if failed or waiting else 0


if __name__ == "__main__":
  sys.exit(main())
