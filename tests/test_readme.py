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
