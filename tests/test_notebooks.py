"""Every notebook in colabs/ runs top to bottom, headless, with SMOKE=1 (tiny sizes), and starts with the
one install cell (colabs/install_cell.py), which installs jaxformers from a path or URL the user sets."""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from tests.helpers import xla_flags

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "colabs").glob("*.ipynb"))
INSTALL_CELL = (ROOT / "colabs" / "install_cell.py").read_text(encoding="utf-8").rstrip("\n")


def _install_cell(path: pathlib.Path) -> str:
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    return "".join(next(c for c in cells if c["cell_type"] == "code")["source"])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.setenv("SMOKE", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # The devices of a fresh CPU runtime (one), not the eight the test run simulates: a notebook that
    # wants a mesh asks for its own (03 does, as it tells Colab users on a CPU runtime).
    monkeypatch.setenv("XLA_FLAGS", xla_flags(None))
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors


def test_every_notebook_starts_with_the_install_cell():
    for path in NOTEBOOKS:
        lines = _install_cell(path).split("\n")
        template = INSTALL_CELL.split("\n")
        extras = [i for i, line in enumerate(template) if line.startswith("EXTRA_PACKAGES = ")]
        assert len(lines) == len(template) and extras, path.name
        assert [x for i, x in enumerate(lines) if i not in extras] == [x for i, x in enumerate(template) if i not in extras], \
            f"{path.name}: the first code cell must be colabs/install_cell.py (only EXTRA_PACKAGES may differ)"
        assert "JAXFORMERS_SOURCE" in "".join(json.loads(path.read_text())["cells"][0]["source"]), path.name


def test_install_cell_installs_from_a_path_on_a_fresh_interpreter(tmp_path):
    """The cell, run in a new virtual environment (no jaxformers) with JAXFORMERS_SOURCE set to a copy of
    this checkout, installs the jaxformers and train packages (without dependencies: a Colab runtime has jax);
    without JAXFORMERS_SOURCE it says what to set."""
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(tmp_path / "venv")], check=True, capture_output=True)
    python = str(tmp_path / "venv" / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "JAXFORMERS_SOURCE", "VIRTUAL_ENV")}
    unset = subprocess.run([python, "-c", INSTALL_CELL], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert unset.returncode != 0 and "set JAXFORMERS_SOURCE" in unset.stderr
    source = tmp_path / "jaxformers-checkout"  # a copy: pip builds in the source tree (build/, *.egg-info)
    for part in ("jaxformers", "train"):
        shutil.copytree(ROOT / part, source / part, ignore=shutil.ignore_patterns("__pycache__"))
    for part in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / part, source / part)
    env.update(JAXFORMERS_SOURCE=str(source), PIP_NO_DEPS="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    done = subprocess.run([python, "-c", INSTALL_CELL], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    site = next((tmp_path / "venv" / "lib").glob("python3*/site-packages"))
    for module in ("jaxformers/models/bert.py", "jaxformers/kernels/local_global/api.py", "train/main.py",
                   "train/configs/quickstart.py"):
        assert (site / module).is_file(), module
