"""Packaging: ``setup.json`` (the AiiDA plugin registry's format) says what ``pyproject.toml`` says, every entry
point resolves, and the built wheel holds the shipped data files and nothing of ``training/``."""

import importlib
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
SETUP_JSON = json.loads((ROOT / "setup.json").read_text())

#: The folders of shipped data (checkpoints, presets, tables, protocols), relative to the repository root.
DATA_FOLDERS = ("equicsp_core/checkpoints", "equicsp_core/presets", "equicsp_core/resources",
                "aiida_equicsp/protocols", "aiida_equicsp/resources")
#: What the copied tree leaves out: build outputs, environments, and the lead's run folders other than training/.
NOT_COPIED = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                    "runs", "training", "*.tmp")


def _entry_points_of_pyproject() -> dict[str, list[str]]:
    groups = {"console_scripts": [f"{name} = {target}" for name, target in PROJECT["scripts"].items()]}
    for group, items in PROJECT["entry-points"].items():
        groups[group] = [f"{name} = {target}" for name, target in items.items()]
    return groups


@pytest.mark.parametrize(("setup_key", "value"), [
    ("name", PROJECT["name"]),
    ("version", PROJECT["version"]),
    ("description", PROJECT["description"]),
    ("author", PROJECT["authors"][0]["name"]),
    ("license", PROJECT["license"]),
    ("url", PROJECT["urls"]["Homepage"]),
    ("classifiers", PROJECT["classifiers"]),
    ("python_requires", PROJECT["requires-python"]),
    ("install_requires", PROJECT["dependencies"]),
    ("extras_require", PROJECT["optional-dependencies"]),
    ("entry_points", _entry_points_of_pyproject()),
])
def test_setup_json_says_what_pyproject_says(setup_key, value):
    assert SETUP_JSON[setup_key] == value


def test_torch_is_a_range_not_a_pin():
    torch_requirements = [r for r in PROJECT["dependencies"] if r.startswith("torch")]
    assert torch_requirements and all("==" not in r for r in torch_requirements)


@pytest.mark.parametrize("entry_point", [line for lines in _entry_points_of_pyproject().values() for line in lines])
def test_every_entry_point_resolves(entry_point):
    module_name, _, attribute = entry_point.split(" = ")[1].partition(":")
    assert getattr(importlib.import_module(module_name), attribute)


@pytest.fixture(scope="module")
def wheel_files(tmp_path_factory) -> list[str]:
    """The file names in a wheel built from a copy of the tree whose ``training/`` holds a run (a checkpoint)."""
    source = tmp_path_factory.mktemp("tree") / "aiida-equicsp"
    shutil.copytree(ROOT, source, ignore=NOT_COPIED)
    run = source / "training" / "perov_5-cpu"
    run.mkdir(parents=True)
    shutil.copy(ROOT / "equicsp_core" / "checkpoints" / "perov_5.pt", run / "best.pt")
    (run / "log.jsonl").write_text("{}\n")
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(out), str(source)], check=True)
    (wheel,) = out.glob("aiida_equicsp-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        return archive.namelist()


def test_wheel_holds_the_shipped_data_files(wheel_files):
    shipped = sorted(str(path.relative_to(ROOT)) for folder in DATA_FOLDERS for path in (ROOT / folder).iterdir()
                     if path.is_file() and path.suffix != ".tmp")
    assert [name for name in shipped if name not in wheel_files] == []
    assert any(name.endswith(".pt") for name in shipped)  # the checkpoints and tables are among them


def test_wheel_holds_the_work_chains_under_the_plugin_and_the_licence(wheel_files):
    assert "aiida_equicsp/workchains/sample_base.py" in wheel_files
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in wheel_files)


def test_wheel_holds_nothing_from_training(wheel_files):
    assert [name for name in wheel_files
            if "training" in name.split("/") or name.endswith(("best.pt", "log.jsonl"))] == []
