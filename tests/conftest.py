"""Shared test setup: tiny data fixtures and an isolated preprocessing cache.

Every test runs with ``EQUICSP_CACHE_DIR`` pointing at a per-session temporary folder (never
``~/.cache``) and ``EQUICSP_DATA_DIR`` pointing at ``tests/fixtures/data`` (a few rows of each split),
so nothing reads the full datasets or writes outside pytest's temporary folders by accident.
"""

from pathlib import Path

import pytest

FIXTURE_DATA_DIR = Path(__file__).parent / "fixtures" / "data"


@pytest.fixture(scope="session")
def fixture_data_dir() -> Path:
    """Folder of the tiny ``<dataset>/<split>.csv.gz`` fixtures."""
    return FIXTURE_DATA_DIR


@pytest.fixture(scope="session", autouse=True)
def _isolated_equicsp_env(tmp_path_factory):
    """Point the data and cache folders at the fixtures and a session tmp dir for the whole run."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EQUICSP_CACHE_DIR", str(tmp_path_factory.mktemp("equicsp-cache")))
        patch.setenv("EQUICSP_DATA_DIR", str(FIXTURE_DATA_DIR))
        yield


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, _isolated_equicsp_env) -> Path:
    """best.pt of a 1-epoch run of the ``tiny`` preset, trained once per session (a few seconds).

    Its lattices mostly diverge, so most of its candidates are invalid; it is for plumbing, not chemistry.
    """
    from equicsp_core.cli import main

    run = tmp_path_factory.mktemp("tiny-model") / "run"
    assert main(["--quiet", "train", "--preset", "tiny", "--out", str(run), "--set", "train.epochs=1"]) == 0
    return run / "best.pt"
