"""The jobflow Makers (equicsp_core.makers), run for real with run_locally at small scale.

Flows that relax use the shipped ``perov_5`` checkpoint: the session's ``tiny_checkpoint`` samples only
invalid or implausible crystals (atoms ~0.1 Å apart, volumes below 1 Å³), so nothing of it would survive
screening; it serves the flow's nothing-survives path. CHGNet relaxes 5-atom cells for 20 steps.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("jobflow")
pytest.importorskip("atomate2")

import torch  # noqa: E402
from atomate2.forcefields.jobs import ForceFieldRelaxMaker, ForceFieldStaticMaker  # noqa: E402
from jobflow import Flow, JobStore, run_locally  # noqa: E402
from maggma.stores import MemoryStore  # noqa: E402
from monty.json import MontyDecoder  # noqa: E402
from pymatgen.core import Composition, Structure  # noqa: E402

from equicsp_core.checkpoint import resolve_checkpoint  # noqa: E402
from equicsp_core.makers import (  # noqa: E402
    EquiCSPSampleMaker,
    PredictRelaxMaker,
    RankingDocument,
    SampleDocument,
    ScreenCandidatesMaker,
    ScreenDocument,
)

FORMULA = "SrTiO3"
#: seed 1 gives three valid SrTiO3 candidates with perov_5 at 20 steps, one a duplicate of another.
SEED = 1


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """CHGNet and the sampler on one thread (the machine's other core is busy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass
class FailingRelaxMaker(ForceFieldRelaxMaker):
    """CHGNet relax that raises for one given structure, as a crashed relaxation would.

    At module level because jobflow round-trips a job's arguments (this Maker) through MSON.
    """

    fail_for: Structure | None = None

    def run_ase(self, structure, prev_dir=None):
        if self.fail_for is not None and structure == self.fail_for:
            raise RuntimeError("simulated relaxation failure")
        return super().run_ase(structure, prev_dir=prev_dir)


def _store() -> JobStore:
    # atomate2's force-field jobs put their ionic steps into an additional store named "data".
    return JobStore(MemoryStore(), additional_stores={"data": MemoryStore()})


def _run(flow, root, ensure_success: bool = True) -> tuple[JobStore, dict]:
    """Run ``flow`` in the folder ``root`` (ASE relaxers write files into the working directory)."""
    store = _store()
    responses = run_locally(flow, store=store, root_dir=root, ensure_success=ensure_success, log=False)
    return store, responses


def _output(store: JobStore, uuid: str):
    """A job's latest output, decoded back into its document class."""
    return MontyDecoder().process_decoded(store.get_output(uuid, load=True))


def _sample_maker(**kwargs) -> EquiCSPSampleMaker:
    return EquiCSPSampleMaker(**{"checkpoint": "perov_5", "num_samples": 3, "steps": 20, "seed": SEED, **kwargs})


def _relax_maker(**kwargs) -> ForceFieldRelaxMaker:
    pytest.importorskip("chgnet")
    return ForceFieldRelaxMaker(**{"force_field_name": "CHGNet", "relax_cell": True, "steps": 20, **kwargs})


def _sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _sample_and_screen(sample_maker: EquiCSPSampleMaker, root) -> tuple[SampleDocument, ScreenDocument]:
    sample = sample_maker.make(FORMULA)
    screen = ScreenCandidatesMaker().make(sample.output.candidates)
    store, _ = _run(Flow([sample, screen]), root)
    return _output(store, sample.uuid), _output(store, screen.uuid)


def test_predict_relax_flow_ranks_by_energy_and_runs_dft_on_the_best(tmp_path):
    # A CHGNet static calculation stands in for DFT: any Maker with make(structure) fits.
    maker = PredictRelaxMaker(sample_maker=_sample_maker(), relax_maker=_relax_maker(), top_k=1,
                              dft_maker=ForceFieldStaticMaker(force_field_name="CHGNet"))
    flow = maker.make(FORMULA)
    store, responses = _run(flow, tmp_path)

    sample, screen = _output(store, flow.jobs[0].uuid), _output(store, flow.jobs[1].uuid)
    assert isinstance(sample, SampleDocument) and sample.formula == FORMULA
    assert sample.num_requested == 3
    assert sample.checkpoint == "perov_5"
    assert sample.checkpoint_sha256 == _sha256(resolve_checkpoint("perov_5"))
    assert sample.settings["steps"] == 20 and sample.settings["seed"] == SEED
    dropped = {d["index"] for d in screen.dropped}
    survivors = {c.index for c in screen.survivors}
    assert not dropped & survivors
    assert len(dropped) + len(survivors) + sample.num_invalid == 3
    assert any(d["reason"].startswith("duplicate of candidate") for d in screen.dropped)

    ranking = _output(store, flow.output.uuid)
    assert isinstance(ranking, RankingDocument) and ranking.formula == FORMULA
    table = ranking.table
    assert len(table) == len(survivors) >= 2
    assert {row["candidate"] for row in table} == survivors
    energies = [row["energy_per_atom"] for row in table]
    assert energies == sorted(energies) and all(np.isfinite(energies))
    assert [row["rank"] for row in table] == list(range(1, len(table) + 1))
    assert {row["status"] for row in table} <= {"relaxed", "not converged"}
    for row in table:
        assert row["space_group_before"] and row["space_group_after"]
        assert row["rms_displacement"] >= 0 and row["max_displacement"] >= row["rms_displacement"]
    for structure in ranking.structures:
        assert isinstance(structure, Structure) and structure.composition == Composition(FORMULA)

    # DFT ran on the top_k = 1 best structure only, after the ranking.
    assert ranking.dft_candidates == [table[0]["candidate"]]
    documents = [r.output for job in responses.values() for r in job.values()
                 if type(r.output).__name__ == "ForceFieldTaskDocument"]
    assert len(documents) == len(survivors) + 1
    assert all(doc.structure.composition == Composition(FORMULA) for doc in documents)


def test_failed_relax_is_a_status_not_a_crash(tmp_path):
    pytest.importorskip("chgnet")
    _, screen = _sample_and_screen(_sample_maker(), tmp_path)
    victim = screen.survivors[0]
    relax_maker = FailingRelaxMaker(force_field_name="CHGNet", relax_cell=True, steps=20, fail_for=victim.structure)
    flow = PredictRelaxMaker(sample_maker=_sample_maker(), relax_maker=relax_maker).make(FORMULA)
    store, _ = _run(flow, tmp_path, ensure_success=False)

    ranking = _output(store, flow.output.uuid)
    assert len(ranking.table) == len(screen.survivors)
    failed = ranking.table[-1]
    assert failed["candidate"] == victim.index and failed["status"] == "failed"
    assert failed["rank"] is None and failed["energy_per_atom"] is None
    assert failed["space_group_before"] and failed["space_group_after"] is None
    assert all(row["status"] != "failed" for row in ranking.table[:-1])
    assert len(ranking.structures) == len(screen.survivors) - 1

    # The manager still reports the flow as not fully successful.
    with pytest.raises(RuntimeError, match="did not finish"):
        _run(PredictRelaxMaker(sample_maker=_sample_maker(), relax_maker=relax_maker).make(FORMULA), tmp_path)


def test_same_seed_same_structures(tmp_path):
    first, _ = _sample_and_screen(_sample_maker(seed=3), tmp_path)
    again, _ = _sample_and_screen(_sample_maker(seed=3), tmp_path)
    other, _ = _sample_and_screen(_sample_maker(seed=4), tmp_path)
    assert [c.index for c in first.candidates] == [c.index for c in again.candidates]
    for a, b in zip(first.candidates, again.candidates, strict=True):
        assert np.array_equal(a.structure.lattice.matrix, b.structure.lattice.matrix)
        assert np.array_equal(a.structure.frac_coords, b.structure.frac_coords)
    assert not np.allclose(first.candidates[0].structure.lattice.matrix, other.candidates[0].structure.lattice.matrix)


def test_tiny_checkpoint_flow_when_nothing_survives(tiny_checkpoint, tmp_path):
    maker = PredictRelaxMaker(sample_maker=_sample_maker(checkpoint=str(tiny_checkpoint), seed=0),
                              relax_maker=_relax_maker(steps=5))
    flow = maker.make(FORMULA)
    store, _ = _run(flow, tmp_path)

    sample, screen = _output(store, flow.jobs[0].uuid), _output(store, flow.jobs[1].uuid)
    assert sample.checkpoint == str(tiny_checkpoint)
    assert sample.checkpoint_sha256 == _sha256(tiny_checkpoint)
    assert screen.survivors == []
    assert len(screen.dropped) + sample.num_invalid == 3
    assert all(d["reason"] for d in screen.dropped)
    ranking = _output(store, flow.output.uuid)
    assert ranking.table == []


@pytest.mark.parametrize(("settings", "message"), [
    ({"num_samples": 0}, "num_samples"),
    ({"num_samples": 1.5}, "num_samples"),
    ({"steps": 0}, "steps"),
    ({"batch_size": 0}, "batch_size"),
    ({"device": "abacus"}, "device"),
])
def test_bad_sample_settings_are_refused_at_construction(settings, message):
    with pytest.raises(ValueError, match=message):
        EquiCSPSampleMaker(**settings)


def test_bad_top_k_is_refused_at_construction():
    with pytest.raises(ValueError, match="top_k"):
        PredictRelaxMaker(sample_maker=_sample_maker(), relax_maker=None, top_k=0)


@pytest.mark.parametrize("formula", ["Xx2O3", "SrTi0.5O3", ""])
def test_bad_formula_is_refused_when_the_flow_is_built(formula):
    with pytest.raises(ValueError, match="formula"):
        PredictRelaxMaker(sample_maker=_sample_maker(), relax_maker=None).make(formula)


@pytest.mark.parametrize(("checkpoint", "formula", "message"), [
    ("perov_5", "Xx2O3", "formula"),
    ("perov_5", "Sr30Ti30O90", "at most"),  # beyond the model's largest cell
    ("no_such_model", FORMULA, "checkpoint"),
])
def test_bad_input_fails_the_sample_job_with_a_clear_error(checkpoint, formula, message):
    store = _store()
    store.connect()
    with pytest.raises(ValueError, match=message):
        _sample_maker(checkpoint=checkpoint).make(formula).run(store)
