"""The notebooks: committed without outputs, Colab-ready, and executed top to bottom on a tiny config.

Each notebook runs in a fresh kernel of this interpreter (a kernelspec written to a temp dir, so nothing is
registered globally), with its working directory in a temp dir (its runs/ land there) and these variables:
  JAXSPARSE_NOTEBOOK_SMALL=1   tiny sizes (smoke preset, 2 epochs)
  JAXSPARSE_DATA               the genuine CIFAR-10 subset beside the repository instead of TFDS
  JAXSPARSE_CACHE_DIR          a temp data cache
  JAX_COMPILATION_CACHE_DIR    a temp XLA cache shared by the runs (each run compiles the same steps)
  PYTHONPATH                   this checkout first, so the notebooks import the package under test
"""

import json
import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402  (after the skips)
from jupyter_client.manager import KernelManager  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
NAMES = ("quickstart", "replicate")
CELL_TIMEOUT_S = 600  # generous: the machine running the tests may be shared
KERNEL = "jaxsparse-notebook-test"


def _read(name: str):
  return nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)


@pytest.mark.parametrize("name", NAMES)
def test_committed_without_outputs_and_colab_ready(name):
  nb = _read(name)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(not c.outputs and c.execution_count is None for c in code), "strip outputs before committing"
  assert f"colab.research.google.com/github/ORG/REPO/blob/main/notebooks/{name}.ipynb" in nb.cells[0].source
  install = next(c.source for c in code if "REPO_URL" in c.source)
  assert "if IN_COLAB:" in install and "!pip install -q -e ." in install


@pytest.fixture(scope="module")
def kernel_env(cifar_npz, tmp_path_factory):
  """A kernelspec for this interpreter, with the notebook variables in its environment."""
  root = tmp_path_factory.mktemp("notebook-kernel")
  spec = root / "kernels" / KERNEL
  spec.mkdir(parents=True)
  env = {
    "JAXSPARSE_NOTEBOOK_SMALL": "1",
    "JAXSPARSE_DATA": str(cifar_npz),
    "JAXSPARSE_CACHE_DIR": str(root / "data-cache"),
    "JAX_COMPILATION_CACHE_DIR": str(root / "xla-cache"),
    "MPLBACKEND": "module://matplotlib_inline.backend_inline",
    # This checkout's package, whatever is installed (the kernel's cwd is a temp dir).
    "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
  }
  (spec / "kernel.json").write_text(
    json.dumps(
      {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "jaxsparse notebook test",
        "language": "python",
        "env": env,
      }
    )
  )
  return root / "kernels"


def _execute(name: str, kernels: Path, cwd: Path):
  nb = _read(name)
  km = KernelManager(kernel_name=KERNEL, kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)]))
  client = nbclient.NotebookClient(nb, km=km, timeout=CELL_TIMEOUT_S, resources={"metadata": {"path": str(cwd)}})
  client.execute()  # raises CellExecutionError (with the cell's traceback) if any cell fails
  return nb


def _images(nb) -> int:
  return sum("image/png" in out.get("data", {}) for c in nb.cells if c.cell_type == "code" for out in c.outputs)


def test_quickstart_runs(kernel_env, tmp_path):
  nb = _execute("quickstart", kernel_env, tmp_path)
  summary = json.loads((tmp_path / "runs" / "quickstart_adaptive_b" / "summary.json").read_text())
  assert summary["epochs"] == 2 and summary["schedule"] == "adaptive_b"
  assert set(summary["keep_curve"]) == {"1.0", "0.3", "0.1"}
  assert _images(nb) >= 4  # feature maps, schedules, controllers, training curves


def test_replicate_runs(kernel_env, tmp_path):
  nb = _execute("replicate", kernel_env, tmp_path)
  runs = sorted(p.parent.name for p in (tmp_path / "runs").glob("*/summary.json"))
  assert runs == [f"smoke_{s}_s0_e2" for s in ("adaptive_a", "adaptive_b", "cyclic", "dense")]
  table = "".join(
    out.get("data", {}).get("text/markdown", "") for c in nb.cells if c.cell_type == "code" for out in c.outputs
  )
  assert "| smoke_adaptive_b_s0_e2 | adaptive_b | 2 |" in table
  assert _images(nb) >= 2
