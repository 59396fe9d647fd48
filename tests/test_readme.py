"""README.md stays true: its model table is the registry's, and its quick start is what CI runs."""
import pathlib
import re
import runpy

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_model_table_is_current():
    mod = runpy.run_path(str(ROOT / "scripts" / "model_table.py"))
    readme = (ROOT / "README.md").read_text()
    assert mod["replace_table"](readme, mod["model_table"]()) == readme, \
        "README model table is stale: run `make model-table`"


def test_quick_start_is_two_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start.*?```(?:bash|sh)?\n(.*?)```", readme, re.S)
    assert block, "README needs a Quick start code block"
    commands = [line for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]
    assert len(commands) == 2, commands
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1].strip() in ci.splitlines()


def test_the_project_speaks_for_itself():
    """Code, docs and notebooks cite papers, official code and the project's own files, never notes
    outside the repository that a user of the package does not have."""
    outside = re.compile(r"shared/(anchors|papers|research|DESIGN)|\.\./shared|\bthe issue\b|issue's", re.I)
    offenders = []
    for folder in ("jaxformers", "train", "benchmarks", "colabs", "scripts", "tests"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in (".py", ".md", ".ipynb", ".sh") and path.name != "test_readme.py":
                offenders += [f"{path.relative_to(ROOT)}:{i}" for i, line in
                              enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if outside.search(line)]
    offenders += [f"README.md:{i}" for i, line in enumerate((ROOT / "README.md").read_text().splitlines(), 1)
                  if outside.search(line)]
    assert not offenders, offenders
