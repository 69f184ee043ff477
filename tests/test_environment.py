"""environment.yml (conda users) and pyproject.toml (pip, CI) must install the same things."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pyproject_requirements() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return set(project["dependencies"]) | set(project["optional-dependencies"]["dev"])


def environment_yml() -> tuple[list[str], list[str]]:
    """(conda dependencies, pip requirements) read from the simple layout we use."""
    conda, pip, in_pip = [], [], False
    for line in (ROOT / "environment.yml").read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        item = re.match(r"^(\s*)- (.+)$", line)
        if not item:
            in_pip = in_pip and line.startswith(" ")
            continue
        indent, value = len(item.group(1)), item.group(2).strip()
        if value == "pip:":
            in_pip = True
        elif in_pip and indent > 2:
            pip.append(value)
        else:
            in_pip = False
            conda.append(value)
    return conda, pip


def test_environment_yml_lists_exactly_the_pyproject_pins():
    conda, pip = environment_yml()
    assert "python=3.11" in conda and "pip" in conda
    assert set(pip) - {"-e ."} == pyproject_requirements()
    assert "-e ." in pip, "environment.yml must install the course package itself"


def test_every_requirement_is_pinned_and_torch_is_the_cpu_release():
    for requirement in pyproject_requirements():
        assert re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[0-9][0-9A-Za-z.]*", requirement), requirement
    # An unpinned or newer torch pulls a multi-GB CUDA build on the course machines.
    assert "torch==2.13.0" in pyproject_requirements()
