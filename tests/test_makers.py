"""The jobflow Makers (equicsp_jobflow), run for real with run_locally at small scale.

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

from atomate2.forcefields.jobs import ForceFieldRelaxMaker, ForceFieldStaticMaker  # noqa: E402
from jobflow import Flow, JobStore, run_locally  # noqa: E402
from maggma.stores import MemoryStore  # noqa: E402
from monty.json import MontyDecoder  # noqa: E402
from pymatgen.core import Composition, Structure  # noqa: E402

from equicsp_core.checkpoint import resolve_checkpoint  # noqa: E402
from equicsp_core.dft import symmetrisation_note  # noqa: E402
from equicsp_jobflow import (  # noqa: E402
    CandidateDocument,
    ChemicalSystemMaker,
    EquiCSPRelaxMaker,
    EquiCSPSampleMaker,
    PredictRelaxMaker,
    RankingDocument,
    SampleDocument,
    ScreenCandidatesMaker,
    ScreenDocument,
    StableCandidatesDocument,
)
from equicsp_core.settings import RelaxSettings, StabilitySettings  # noqa: E402
from equicsp_jobflow.makers import collect_stable  # noqa: E402

FORMULA = "SrTiO3"
FORMULAS = [FORMULA]
#: seed 1 gives three valid SrTiO3 candidates with perov_5 at 20 steps, all plausible (so all relaxed).
SEED = 1


pytestmark = pytest.mark.usefixtures("one_thread")


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


def _sample_and_screen(sample_maker, root) -> tuple[SampleDocument, ScreenDocument]:
    sample = sample_maker.make(FORMULAS)
    screen = ScreenCandidatesMaker().make(sample.output.candidates)
    store, _ = _run(Flow([sample, screen]), root)
    return _output(store, sample.uuid), _output(store, screen.uuid)


def test_predict_relax_flow_ranks_by_energy_and_runs_dft_on_the_symmetrised_best(tmp_path):
    # A CHGNet static calculation stands in for DFT: any Maker with make(structure) fits.
    maker = PredictRelaxMaker(sample_maker=_sample_maker(), relax_maker=_relax_maker(), top_k=1,
                              dft_maker=ForceFieldStaticMaker(force_field_name="CHGNet"))
    flow = maker.make(FORMULAS)
    store, responses = _run(flow, tmp_path)

    sample = _output(store, flow.jobs[0].uuid)
    assert isinstance(sample, SampleDocument) and sample.formulas == FORMULAS
    assert sample.num_requested == 3
    assert sample.checkpoint == "perov_5"
    assert sample.checkpoint_sha256 == _sha256(resolve_checkpoint("perov_5"))
    assert sample.settings["steps"] == 20 and sample.settings["seed"] == SEED

    ranking = _output(store, flow.output.uuid)
    assert isinstance(ranking, RankingDocument)
    rows = ranking.rows
    assert len(rows) == 3 and {row["status"] for row in rows} <= {"duplicate", "ml_relaxed", "dft_relaxed"}
    # nothing was dropped before relaxation; each relaxed candidate is in exactly one representative's members
    assert all(row["ml_energy_per_atom"] is not None and row["formula_units"] == 1 for row in rows)
    members = [label for row in rows if row["members"] is not None for label in row["members"]]
    assert sorted(members) == sorted(row["label"] for row in rows)
    ranked = [row for row in rows if row["ml_rank"] is not None]
    assert len(ranked) >= 2 and [row["ml_rank"] for row in ranked] == list(range(1, len(ranked) + 1))
    energies = [row["ml_energy_per_atom"] for row in ranked]
    assert energies == sorted(energies) and all(np.isfinite(energies))
    for row in ranked:
        assert row["space_group_sampled"] and row["space_group_ml"] and row["ml_rms_displacement"] >= 0

    # DFT ran on the top_k = 1 best structure only, symmetrised first; its row leads the table.
    best = rows[0]
    assert best["status"] == "dft_relaxed" and best["ml_rank"] == 1 and ranking.winners == [best["label"]]
    assert np.isfinite(best["dft_energy_per_atom"]) and best["space_group_dft"]
    # what the DFT number is, beside it (the Maker's own settings), and the symmetry it was held to
    assert best["dft_level"] == f"{maker.dft_maker.name} (atomate2 ForceFieldStaticMaker)"
    assert all(row["dft_level"] is None and row["notes"] is None for row in rows[1:])
    assert [doc.label for doc in ranking.dft_relaxed] == [best["label"]]
    symmetrised = [r.output for job in responses.values() for r in job.values() if isinstance(r.output, Structure)]
    assert len(symmetrised) == 1 and symmetrised[0].composition == Composition(FORMULA)
    assert best["notes"] == symmetrisation_note(symmetrised[0], 0.01)
    for document in ranking.ml_relaxed:
        assert document.structure.composition == Composition(FORMULA) and document.chemsys == "O-Sr-Ti"


def test_failed_relax_is_a_status_not_a_crash(tmp_path):
    pytest.importorskip("chgnet")
    _, screen = _sample_and_screen(_sample_maker(), tmp_path)
    victim = screen.survivors[0]
    relax_maker = FailingRelaxMaker(force_field_name="CHGNet", relax_cell=True, steps=20, fail_for=victim.structure)
    flow = PredictRelaxMaker(sample_maker=_sample_maker(), relax_maker=relax_maker).make(FORMULAS)
    store, _ = _run(flow, tmp_path, ensure_success=False)

    rows = {row["label"]: row for row in _output(store, flow.output.uuid).rows}
    failed = rows[victim.label]
    assert failed["status"] == "ml_failed" and failed["ml_rank"] is None and failed["ml_energy_per_atom"] is None
    assert failed["space_group_sampled"] and failed["space_group_ml"] is None
    assert all(row["status"] != "ml_failed" for label, row in rows.items() if label != victim.label)

    # The manager still reports the flow as not fully successful.
    with pytest.raises(RuntimeError, match="did not finish"):
        _run(PredictRelaxMaker(sample_maker=_sample_maker(), relax_maker=relax_maker).make(FORMULAS), tmp_path)


def test_same_seed_same_structures(tmp_path):
    first, _ = _sample_and_screen(_sample_maker(seed=3), tmp_path)
    again, _ = _sample_and_screen(_sample_maker(seed=3), tmp_path)
    other, _ = _sample_and_screen(_sample_maker(seed=4), tmp_path)
    assert [c.label for c in first.candidates] == [c.label for c in again.candidates]
    for a, b in zip(first.candidates, again.candidates, strict=True):
        assert np.array_equal(a.structure.lattice.matrix, b.structure.lattice.matrix)
        assert np.array_equal(a.structure.frac_coords, b.structure.frac_coords)
    assert not np.allclose(first.candidates[0].structure.lattice.matrix, other.candidates[0].structure.lattice.matrix)


def test_tiny_checkpoint_flow_when_nothing_survives(tiny_checkpoint, tmp_path):
    """The tiny model's candidates are all invalid or implausible: nothing is relaxed, every one has its row."""
    maker = PredictRelaxMaker(sample_maker=_sample_maker(checkpoint=str(tiny_checkpoint), seed=0),
                              relax_maker=_relax_maker(steps=5))
    flow = maker.make(FORMULAS)
    store, _ = _run(flow, tmp_path)

    sample = _output(store, flow.jobs[0].uuid)
    assert sample.checkpoint == str(tiny_checkpoint) and sample.checkpoint_sha256 == _sha256(tiny_checkpoint)
    ranking = _output(store, flow.output.uuid)
    assert len(ranking.rows) == 3 and ranking.ml_relaxed == [] and ranking.winners == []
    assert {row["status"] for row in ranking.rows} <= {"invalid_sample", "implausible"}
    assert all(row["reason"] for row in ranking.rows)


def test_documents_are_queryable_by_chemical_system_and_keep_structures_in_the_data_store(tmp_path):
    sample = _sample_maker().make(FORMULAS)
    store, _ = _run(Flow([sample]), tmp_path)
    store.connect()
    (found,) = store.query({"output.candidates.chemsys": "O-Sr-Ti"}, properties=["output.candidates"])
    candidates = found["output"]["candidates"]
    assert {c["formula_pretty"] for c in candidates} == {"SrTiO3"} and all(c["symmetry"]["number"] for c in candidates)
    assert all("blob_uuid" in c["structure"] for c in candidates)  # the structure itself: in the data store
    assert store.additional_stores["data"].count() == len(candidates)


def test_sample_documents_carry_z_and_the_cell(tmp_path):
    """Si (reduced) with max_formula_units 3: samples 0, 1, 2 at Z = 1, 2, 3, valid or not."""
    sample = _sample_maker(max_formula_units=3).make(["Si"])
    store, _ = _run(Flow([sample]), tmp_path)
    document = _output(store, sample.uuid)
    found = {(c.sample, c.formula_units, c.cell_formula) for c in document.candidates}
    found |= {(i["sample"], i["formula_units"], i["cell_formula"]) for i in document.invalid}
    assert found == {(0, 1, "Si"), (1, 2, "Si2"), (2, 3, "Si3")}
    for candidate in document.candidates:
        assert candidate.formula == "Si" and candidate.structure.composition == Composition(candidate.cell_formula)
    assert document.settings["max_formula_units"] == 3


@pytest.mark.parametrize(("settings", "message"), [
    ({"num_samples": 0}, "num_samples"),
    ({"max_formula_units": 0}, "max_formula_units"),
    ({"num_samples": 1.5}, "num_samples"),
    ({"steps": 0}, "steps"),
    ({"step_lr": float("inf")}, "step_lr"),
    ({"lattice_bound": 0}, "lattice_bound"),
    ({"batch_size": 0}, "batch_size"),
    ({"device": "abacus"}, "device"),
])
def test_bad_sample_settings_are_refused_at_construction(settings, message):
    with pytest.raises(ValueError, match=message):
        EquiCSPSampleMaker(**settings)


def test_bad_top_k_is_refused_at_construction():
    with pytest.raises(ValueError, match="top_k"):
        PredictRelaxMaker(sample_maker=_sample_maker(), relax_maker=None, top_k=0)


@pytest.mark.parametrize("formulas", [["Xx2O3"], ["SrTi0.5O3"], [""], ["NaCl0"], "SrTiO3"])
def test_bad_formulas_are_refused_when_the_flow_is_built(formulas):
    with pytest.raises(ValueError, match="formula"):
        PredictRelaxMaker(sample_maker=_sample_maker(), relax_maker=None).make(formulas)


@pytest.mark.parametrize(("checkpoint", "formula", "message"), [
    ("perov_5", "Xx2O3", "formula"),
    ("perov_5", "Sr30Ti30O90", "at most"),  # beyond the model's largest cell
    ("perov_5", "Sr2Ti2O6", "outside the model's training domain"),  # beyond perov_5's 5 atoms
    ("perov_5", "SrTiO4", "outside the model's training domain"),  # a composition with no Z within 5 atoms
    ("no_such_model", FORMULA, "checkpoint"),
])
def test_bad_input_fails_the_sample_job_with_a_clear_error(checkpoint, formula, message):
    store = _store()
    store.connect()
    with pytest.raises(ValueError, match=message):
        _sample_maker(checkpoint=checkpoint).make([formula]).run(store)


# --- a chemical system ------------------------------------------------------------------------------------------


def test_chemical_system_flow_has_one_predict_relax_flow_per_composition():
    """mp_20 with max_atoms 7: SrTiO3 and Sr2TiO4, each its own predict-relax flow, then the collecting job."""
    maker = ChemicalSystemMaker(predict_relax_maker=PredictRelaxMaker(sample_maker=_sample_maker(checkpoint="mp_20")),
                                max_atoms=7, ehull_max=0.05)
    flow = maker.make("Sr-Ti-O")
    *predictions, collect = flow.jobs
    assert [prediction.jobs[0].function_args[0] for prediction in predictions] == [["SrTiO3"], ["Sr2TiO4"]]
    assert [prediction.name for prediction in predictions] == ["equicsp predict-relax SrTiO3",
                                                               "equicsp predict-relax Sr2TiO4"]
    assert collect.function_args[1:] == (["SrTiO3", "Sr2TiO4"], "Sr-Ti-O", 0.05, RelaxSettings().to_dict(),
                                         StabilitySettings().to_dict())  # the level and hull of the tables
    assert flow.output.uuid == collect.uuid


@pytest.mark.parametrize(("system", "message"), [
    ("Li-Xx-O", "unknown element Xx"),
    ("Li-Fe-P-O", "no charge-balanced composition"),  # perov_5: 5 atoms at most, LiFePO4 has 7
    ("LiFePO4", "is not element symbols joined by '-'"),
])
def test_bad_chemical_systems_are_refused_when_the_flow_is_built(system, message):
    with pytest.raises(ValueError, match=message):
        ChemicalSystemMaker(predict_relax_maker=PredictRelaxMaker(sample_maker=_sample_maker())).make(system)


@pytest.mark.parametrize("settings", [{"max_atoms": 0}, {"ehull_max": -1.0}])
def test_bad_explore_settings_are_refused_at_construction(settings):
    with pytest.raises(ValueError, match=next(iter(settings))):
        ChemicalSystemMaker(**settings)


def _table(formula: str, energies: list[float | None], e_hulls: list[float | None]) -> RankingDocument:
    """A ranking table of ``formula`` with one merged candidate per energy (eV/atom) and E_hull, and their
    structures."""
    species = [str(element) for element, amount in Composition(formula).items() for _ in range(int(amount))]
    structure = Structure(np.eye(3) * 3.0 * len(species), species,
                          [[index / len(species), 0.5, 0.5] for index in range(len(species))])
    rows = [{"label": f"{formula}_{index:03d}", "formula": formula, "reduced_formula": formula, "ml_rank": index + 1,
             "ml_energy_per_atom": energy, "ml_e_above_hull": e_hull}
            for index, (energy, e_hull) in enumerate(zip(energies, e_hulls, strict=True))]
    return RankingDocument(rows=rows, statuses={}, units={}, winners=[],
                           ml_relaxed=[CandidateDocument.of(row["label"], formula, index, structure)
                                       for index, row in enumerate(rows)])


def test_collect_stable_places_the_candidates_on_the_system_s_hull(perovskite_reference_set):
    """Cached reference energies (eV/atom) Sr -1.6, Ti -7.8, O2 -4.9, SrTiO3 -8.0: the references' hull at Sr2TiO4
    (SrTiO3 + Sr + O) is -46.5/7. A SrTiO3 candidate at -8.05 lowers it to -46.75/7, so Sr2TiO4 at -6.6 moves from
    0.043 to 0.079 above it, beyond the 0.05 threshold; nothing is relaxed."""
    from equicsp_core.pipeline import ml_level
    from equicsp_core.stability import EnergyCache, default_cache_path

    reference = perovskite_reference_set
    relax = RelaxSettings().to_dict()  # the references' energies below are cached at this level
    cache = EnergyCache(default_cache_path(), ml_level(RelaxSettings()), reference.sha256)
    by_formula = {"Sr": -1.6, "Ti": -7.8, "O2": -4.9, "SrTiO3": -8.0}
    for entry in reference.entries:
        formula = entry.structure.composition.reduced_formula
        if formula in by_formula:
            cache.add(entry.id, {"energy_per_atom": by_formula[formula], "status": "converged", "error": None})
    sr2tio4 = -46.5 / 7
    tables = [_table("SrTiO3", [-8.05, -7.8], [-0.05, 0.2]), None, _table("Sr2TiO4", [-6.6], [-6.6 - sr2tio4])]
    document = collect_stable.original(tables, ["SrTiO3", "Sr3Ti2O7", "Sr2TiO4"], "Sr-Ti-O", 0.05,
                                       relax, StabilitySettings().to_dict())
    assert isinstance(document, StableCandidatesDocument)
    assert [row["label"] for row in document.candidates] == ["SrTiO3_000"]
    assert document.candidates[0]["ml_e_above_system_hull"] == pytest.approx(0.0)
    assert [candidate.label for candidate in document.structures] == ["SrTiO3_000"]
    assert document.missing == ["Sr3Ti2O7"] and document.ehull_max == 0.05
    wider = collect_stable.original(tables, ["SrTiO3", "Sr3Ti2O7", "Sr2TiO4"], "Sr-Ti-O", 0.1,
                                    relax, StabilitySettings().to_dict())
    assert [(row["label"], row["ml_e_above_system_hull"]) for row in wider.candidates] == [
        ("SrTiO3_000", pytest.approx(0.0)), ("Sr2TiO4_000", pytest.approx(-6.6 + 46.75 / 7))]


@pytest.mark.slow
def test_chemical_system_flow_runs_and_reports_its_stable_candidates(tmp_path, perovskite_reference_set):
    """perov_5 on Sr-Ti-O (SrTiO3 only, 5 atoms at most), CHGNet for 20 steps, the small Sr-Ca-Ti-O reference set:
    the report holds exactly the merged rows of SrTiO3's table within the threshold (here wide: 10 eV/atom)."""
    pytest.importorskip("chgnet")
    relax = EquiCSPRelaxMaker(steps=20, threads=1)
    maker = ChemicalSystemMaker(predict_relax_maker=PredictRelaxMaker(sample_maker=_sample_maker(), relax_maker=relax),
                                ehull_max=10.0)
    flow = maker.make("Sr-Ti-O")
    store, _ = _run(flow, tmp_path)
    report = _output(store, flow.output.uuid)
    table = _output(store, flow.jobs[0].output.uuid)
    assert report.compositions == ["SrTiO3"] and report.missing == []
    expected = [row for row in table.rows if row["ml_rank"] is not None and row["ml_e_above_hull"] is not None]
    assert expected and sorted(row["label"] for row in report.candidates) == sorted(row["label"] for row in expected)
    assert all(row["novelty"] and row["ml_e_above_system_hull"] >= max(row["ml_e_above_hull"], 0.0) - 1e-9
               for row in report.candidates)
    assert [document.structure.composition.reduced_formula for document in report.structures] == ["SrTiO3"] * len(
        expected)
