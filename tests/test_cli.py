"""experiments/run.py as a new user meets it: one-line argparse errors, a finished run left alone, a file as
--workdir, flag names in the library's errors."""

import json
import shutil

import pytest

from conftest import TINY_FLAGS, experiment

run_cli = experiment("run")


@pytest.mark.parametrize(
  "flags, message",
  [
    (["--schedule=cyclc"], "run.py: error: argument --schedule: invalid choice: 'cyclc'"),
    (["--epochs=2.5"], "run.py: error: argument --epochs: invalid int value: '2.5' (see --help)"),
    (["--eval-keeps=1,0.5,"], "expected comma-separated keep ratios like 1,0.5,0.1; got '1,0.5,' (see --help)"),
  ],
)
def test_a_flag_mistake_is_one_line_with_a_pointer_to_help(capsys, flags, message):
  with pytest.raises(SystemExit) as e:
    run_cli.main(flags)
  err = capsys.readouterr().err
  assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1 and "usage:" not in err


def test_library_errors_name_the_flags(capsys, tmp_path, cifar_npz, cache):
  assert run_cli.main(["--preset=smoke", "--schedule=dense", "--regimes=3", f"--workdir={tmp_path}"]) == 2
  assert "use --schedule 'constant' with --keep" in capsys.readouterr().err
  (tmp_path / "file").write_text("")
  assert run_cli.main([*TINY_FLAGS, f"--workdir={tmp_path / 'file'}"]) == 1
  assert f"error: --workdir {tmp_path / 'file'} is a file, not a directory" in capsys.readouterr().err
  data = [f"--data={cifar_npz}", f"--cache-dir={cache}", f"--workdir={tmp_path / 'run'}"]
  assert run_cli.main([*TINY_FLAGS, *data, "--train-size=100000"]) == 1  # found when the data is loaded
  assert "error: --train-size=100000 must be in [1, " in capsys.readouterr().err
  from jaxsparse.data import DataError

  assert run_cli.in_flags(DataError("offline: set {data} to a local copy")) == "offline: set --data to a local copy"


def test_a_finished_run_is_left_alone_unless_asked(cifar_npz, cache, tmp_path, capsys):
  flags = [*TINY_FLAGS, "--epochs=1", f"--data={cifar_npz}", f"--cache-dir={cache}", f"--workdir={tmp_path}"]
  assert run_cli.main(flags) == 0
  summary = json.loads((tmp_path / "summary.json").read_text())
  capsys.readouterr()
  assert run_cli.main(flags) == 0
  err = capsys.readouterr().err
  assert f"holds this run, finished: dense test accuracy {summary['test_accuracy']:.4f}" in err
  assert len((tmp_path / "provenance.jsonl").read_text().splitlines()) == 1  # no start recorded: nothing ran
  assert run_cli.main([*flags, "--reevaluate"]) == 0
  assert len((tmp_path / "provenance.jsonl").read_text().splitlines()) == 2
  assert json.loads((tmp_path / "summary.json").read_text())["test_accuracy"] == summary["test_accuracy"]
  assert run_cli.main([*flags, "--epochs=2"]) == 1  # another config: the guard, not "finished"
  assert "holds a run with a different config (epochs: 1 -> 2)" in capsys.readouterr().err
  shutil.rmtree(tmp_path / "checkpoints" / str(summary["steps"]))  # a summary without its final checkpoint
  assert run_cli.main(flags) == 0
  assert "holds this run, finished" not in capsys.readouterr().err
  assert (tmp_path / "checkpoints" / str(summary["steps"])).is_dir()  # trained again
