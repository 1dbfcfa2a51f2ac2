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


@pytest.fixture(scope="session")
def tiny_generation_checkpoint(tmp_path_factory, _isolated_equicsp_env) -> Path:
    """best.pt of a 1-epoch ``tiny`` run with ``--task generation`` (ab initio), trained once per session."""
    from equicsp_core.cli import main

    run = tmp_path_factory.mktemp("tiny-generation-model") / "run"
    assert main(["--quiet", "train", "--preset", "tiny", "--task", "generation", "--out", str(run),
                 "--set", "train.epochs=1"]) == 0
    return run / "best.pt"


@pytest.fixture(scope="module")
def one_thread():
    """The module's tests on one torch thread (the machine's other core is busy with CHGNet or a background job)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def reference_set_of(tmp_path, monkeypatch):
    """Builds a pinned reference set from ``rows`` of an mp_20 test split (``material_id``, ``e_above_hull``,
    ``cif``) in a fresh cache folder: ``$EQUICSP_CACHE_DIR`` points at it and the pin is its data's digests.
    Returns the loaded set (equicsp_core.reference adds ASE's crystal of each element with no ground state in
    the rows)."""
    import pandas as pd

    from equicsp_core import reference

    def build(rows):
        (tmp_path / "reference-data" / "mp_20").mkdir(parents=True)
        pd.DataFrame(rows).to_csv(tmp_path / "reference-data" / "mp_20" / "test.csv.gz", index=False)
        cache = tmp_path / "reference-cache"
        reference.build_reference(tmp_path / "reference-data", cache / reference.REFERENCE_FILE, pin=None)
        monkeypatch.setattr(reference, "DATA_SHA256", reference.data_sha256(tmp_path / "reference-data"))
        monkeypatch.setenv("EQUICSP_CACHE_DIR", str(cache))
        return reference.load_reference()

    return build


@pytest.fixture
def perovskite_reference_set(reference_set_of):
    """A pinned reference set of Sr-Ca-Ti-O (``reference_set_of``): cubic SrTiO3 and CaTiO3, an O2
    crystal, and ASE's Sr, Ca and Ti."""
    from pymatgen.core import Lattice, Structure

    sites = [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]]
    rows = [{"material_id": f"mp-{i}", "e_above_hull": 0.0,
             "cif": Structure(Lattice.cubic(3.9), [a, "Ti", "O", "O", "O"], sites).to(fmt="cif")}
            for i, a in ((5229, "Sr"), (4019, "Ca"))]
    rows.append({"material_id": "mp-12957", "e_above_hull": 0.0,
                 "cif": Structure(Lattice.cubic(4.0), ["O", "O"], [[0, 0, 0], [0.3, 0, 0]]).to(fmt="cif")})
    return reference_set_of(rows)
