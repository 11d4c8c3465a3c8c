"""The README's Colab badges and the notebooks' Colab cells point at notebooks and a repository
that exist; the notebooks' execution is `make test-notebooks`, the docs' build `make docs`."""

import json
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
REPOSITORY = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Repository"]
BADGE = re.compile(r"\[!\[Open In Colab\]\(https://colab\.research\.google\.com/assets/"
                   r"colab-badge\.svg\)\]\(https://colab\.research\.google\.com/github/"
                   r"(?P<repo>[^/]+/[^/]+)/blob/(?P<branch>[^/]+)/(?P<path>[^)]+)\)")


def badges() -> list[re.Match]:
    return list(BADGE.finditer((ROOT / "README.md").read_text()))


def code_cells(path: Path) -> list[str]:
    cells = json.loads(path.read_text())["cells"]
    return ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]


def test_every_notebook_has_a_badge_and_every_badge_a_notebook():
    assert NOTEBOOKS, "no notebooks found"
    linked = [m["path"] for m in badges()]
    missing = [p for p in linked if not (ROOT / p).is_file()]
    assert not missing, f"README badges point at notebooks that do not exist: {missing}"
    unlinked = sorted({str(p.relative_to(ROOT)) for p in NOTEBOOKS} - set(linked))
    assert not unlinked, f"notebooks without a Colab badge in the README: {unlinked}"


def test_badges_open_the_repository_main_branch():
    repo = REPOSITORY.removeprefix("https://github.com/")
    for m in badges():
        assert (m["repo"], m["branch"]) == (repo, "main"), m[0]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_installs_only_on_colab_and_reports_its_devices(path):
    cells = code_cells(path)
    install = cells[0]
    # The install runs only on Colab, from the project's repository; nothing else installs.
    assert 'if "google.colab" in sys.modules:' in install, install
    assert f"@ git+{REPOSITORY}" in install, install
    assert not any("pip" in c for c in cells[1:]), f"{path.name}: pip outside the install cell"
    assert any("print(jax.devices())" in c and "jax.default_backend()" in c for c in cells), (
        f"{path.name}: no cell reports the devices and sizes the run by backend")
    outputs = [c.get("outputs") for c in json.loads(path.read_text())["cells"]
               if c["cell_type"] == "code"]
    assert not any(outputs), f"{path.name}: committed with outputs (clear them)"
