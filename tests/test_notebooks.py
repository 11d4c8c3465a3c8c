"""The notebooks run as written (their code cells, in order, in one namespace)."""

import json
from pathlib import Path

import pytest

SLOW = {"privacy.ipynb"}  # whole DP runs and an audit: CI runs it with the slow tests
NOTEBOOKS = [pytest.param(p, marks=[pytest.mark.slow] if p.name in SLOW else [], id=p.name)
             for p in sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))]


@pytest.mark.parametrize("path", NOTEBOOKS)
def test_notebook_runs(path, capsys):
    cells = json.loads(path.read_text())["cells"]
    namespace: dict = {}
    code = [c for c in cells if c["cell_type"] == "code"]
    assert code, f"{path.name} has no code cells"
    for cell in code:
        exec(compile("".join(cell["source"]), f"{path.name}", "exec"), namespace)  # noqa: S102
    assert "accuracy" in capsys.readouterr().out
