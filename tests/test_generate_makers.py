"""Ab initio generation on the jobflow route (equicsp_jobflow's GenerateMaker and GenerateRelaxMaker), run for real
with run_locally on the session's tiny generation model (1 epoch on the perov_5 fixture: every training crystal
has 5 atoms, so the card's distribution of atom counts is {"5": 24}), and the refusals before any job runs.

The tiny model's lattices diverge, so its crystals are all invalid; the relaxing flow uses the
``fixed_cell_generator`` fixture (the sampled types and coordinates in a 4 Å cubic cell) and a Lennard-Jones stub
potential, so that generated crystals go through screening, relaxation and ranking.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

pytest.importorskip("jobflow")

from jobflow import Flow, JobStore, run_locally  # noqa: E402
from maggma.stores import MemoryStore  # noqa: E402
from monty.json import MontyDecoder  # noqa: E402
from pymatgen.core import Composition  # noqa: E402

from equicsp_core.checkpoint import CheckpointError, read_checkpoint  # noqa: E402
from equicsp_core.settings import GENERATION_STEP_LR  # noqa: E402
from equicsp_jobflow import (  # noqa: E402
    ChemicalSystemMaker,
    EquiCSPRelaxMaker,
    EquiCSPSampleMaker,
    GenerateDocument,
    GenerateMaker,
    GenerateRelaxMaker,
    PredictRelaxMaker,
    RankingDocument,
)
from tests import test_cli_generate  # noqa: E402

#: Every generated crystal valid (the fixture of tests/test_cli_generate.py).
fixed_cell_generator = test_cli_generate.fixed_cell_generator

#: The Lennard-Jones stub of tests/test_relax.py: any element, milliseconds per relaxation.
STUB_POTENTIAL = "tests.test_relax:lennard_jones"


pytestmark = pytest.mark.usefixtures("one_thread")


def _run(flow, root) -> JobStore:
    store = JobStore(MemoryStore(), additional_stores={"data": MemoryStore()})
    run_locally(flow, store=store, root_dir=root, ensure_success=True, log=False)
    return store


def _output(store: JobStore, uuid: str):
    return MontyDecoder().process_decoded(store.get_output(uuid, load=True))


def _generate(checkpoint: Path, **kwargs) -> GenerateMaker:
    return GenerateMaker(**{"checkpoint": str(checkpoint), "steps": 10, "seed": 0, **kwargs})


def _atoms(formula: str) -> int:
    return round(Composition(formula).num_atoms)


def _generated(document: GenerateDocument) -> dict[int, tuple[str, str]]:
    """``{sample: (formula, cell_formula)}`` of every crystal, valid or not."""
    found = {c.sample: (c.formula, c.cell_formula) for c in document.candidates}
    found |= {entry["sample"]: (entry["formula"], entry["cell_formula"]) for entry in document.invalid}
    return found


def test_generate_maker_outputs_every_crystal_with_its_formula_and_the_model_that_made_it(
        tiny_generation_checkpoint, tmp_path):
    generate = _generate(tiny_generation_checkpoint).make(6)
    store = _run(Flow([generate]), tmp_path)
    document = _output(store, generate.uuid)

    assert isinstance(document, GenerateDocument) and document.num_requested == 6
    generated = _generated(document)
    assert sorted(generated) == list(range(6)) and len(document.candidates) + len(document.invalid) == 6
    # atom counts drawn from the card's distribution: only 5-atom crystals were trained on
    card = read_checkpoint(tiny_generation_checkpoint)["card"]
    assert card["num_atoms_counts"] == {"5": card["rows"]["train"]}
    assert all(_atoms(cell) == 5 for _, cell in generated.values())
    # each crystal's formula is the reduced formula of its cell, drawn by the model
    for formula, cell in generated.values():
        assert Composition(formula) == Composition(cell).reduced_composition
    assert len({formula for formula, _ in generated.values()}) > 1  # not one composition for all
    # the provenance: which model (file digest and card) and settings; γ the dataset's generation value
    assert document.checkpoint == str(tiny_generation_checkpoint)
    assert document.checkpoint_sha256 == hashlib.sha256(tiny_generation_checkpoint.read_bytes()).hexdigest()
    assert document.card == card and document.step_lr == GENERATION_STEP_LR["perov_5"]
    assert document.settings["num_samples"] == 6 and document.settings["num_atoms"] is None
    assert document.settings["steps"] == 10


@pytest.mark.usefixtures("fixed_cell_generator")
def test_generate_maker_with_num_atoms_fixes_every_crystal_and_keeps_valid_ones_as_documents(
        tiny_generation_checkpoint, tmp_path):
    generate = _generate(tiny_generation_checkpoint, num_atoms=3, seed=1).make(4)
    store = _run(Flow([generate]), tmp_path)
    document = _output(store, generate.uuid)

    assert document.invalid == [] and [c.sample for c in document.candidates] == [0, 1, 2, 3]
    assert document.settings["num_atoms"] == [3]  # one count is a list of one
    for candidate in document.candidates:
        structure = candidate.structure
        assert len(structure) == 3 and structure.composition == Composition(candidate.cell_formula)
        assert Composition(candidate.formula) == structure.composition.reduced_composition
        assert candidate.label == f"{candidate.formula}_{candidate.sample:03d}"
        assert candidate.formula_pretty == structure.composition.reduced_formula  # emmet's metadata, for queries


@pytest.mark.usefixtures("fixed_cell_generator")
def test_generate_maker_restricted_to_a_chemical_system_gives_only_its_elements(tiny_generation_checkpoint, tmp_path):
    generate = _generate(tiny_generation_checkpoint, num_atoms=5, elements=("Sr", "Ti", "O"), seed=2).make(4)
    document = _output(_run(Flow([generate]), tmp_path), generate.uuid)
    assert len(document.candidates) == 4 and document.settings["elements"] == ["Sr", "Ti", "O"]
    assert all({str(e) for e in c.structure.composition.elements} <= {"Sr", "Ti", "O"} for c in document.candidates)


def test_same_seed_same_crystals(tiny_generation_checkpoint, tmp_path):
    jobs = [_generate(tiny_generation_checkpoint, seed=seed).make(4) for seed in (3, 3, 4)]
    store = _run(Flow(jobs), tmp_path)
    first, again, other = (_generated(_output(store, job.uuid)) for job in jobs)
    assert first == again and first != other


@pytest.mark.usefixtures("fixed_cell_generator")
def test_generate_relax_flow_screens_relaxes_and_ranks_the_generated_crystals(tiny_generation_checkpoint, tmp_path):
    relax = EquiCSPRelaxMaker(potential=STUB_POTENTIAL, fmax=0.05, steps=20, device="cpu", threads=1)
    maker = GenerateRelaxMaker(generate_maker=_generate(tiny_generation_checkpoint, seed=2), relax_maker=relax,
                               stability=False, top_k=1)
    flow = maker.make(5)
    store = _run(flow, tmp_path)

    generated = _output(store, flow.jobs[0].uuid)
    assert isinstance(generated, GenerateDocument)
    ranking = _output(store, flow.output.uuid)
    assert isinstance(ranking, RankingDocument)
    # one row per generated crystal, under the formula it came out with
    rows = {row["label"]: row for row in ranking.rows}
    assert sorted(rows) == sorted(c.label for c in generated.candidates)
    for candidate in generated.candidates:
        row = rows[candidate.label]
        assert (row["formula"], row["sample"]) == (candidate.cell_formula, candidate.sample)
        assert row["reduced_formula"] == Composition(candidate.formula).reduced_formula
    # the plausible ones were relaxed with the stub and ranked within their reduced composition
    relaxed = [row for row in ranking.rows if row["ml_energy_per_atom"] is not None]
    assert relaxed and {row["status"] for row in relaxed} <= {"ml_relaxed", "duplicate"}
    assert {doc.label for doc in ranking.ml_relaxed} == {row["label"] for row in relaxed}
    assert ranking.levels and all(row["ml_rank"] == 1 for row in ranking.rows if row["label"] in ranking.winners)
    compositions = {row["reduced_formula"] for row in relaxed}
    assert len(ranking.winners) == len(compositions)  # top_k = 1 of each composition generated


# --- refused before anything runs ---------------------------------------------------------------------------


def test_a_csp_checkpoint_is_refused_by_the_generate_makers():
    message = "the checkpoint is a structure prediction \\(CSP\\) model"
    with pytest.raises(CheckpointError, match=message):
        GenerateMaker(checkpoint="perov_5").make(2)
    with pytest.raises(CheckpointError, match=message):
        GenerateRelaxMaker(generate_maker=GenerateMaker(checkpoint="perov_5")).make(2)


def test_a_generation_checkpoint_is_refused_by_the_csp_makers(tiny_generation_checkpoint, tmp_path):
    message = "the checkpoint is an ab initio generation model"
    sample = EquiCSPSampleMaker(checkpoint=str(tiny_generation_checkpoint), num_samples=1, steps=5)
    with pytest.raises(CheckpointError, match=message):  # the chemical system's flow is not built
        ChemicalSystemMaker(predict_relax_maker=PredictRelaxMaker(sample_maker=sample)).make("Sr-Ti-O")
    store = JobStore(MemoryStore(), additional_stores={"data": MemoryStore()})
    store.connect()
    with pytest.raises(CheckpointError, match=message):  # the sampling job stops before it samples
        sample.make(["SrTiO3"]).run(store)


@pytest.mark.parametrize(("settings", "num_samples", "message"), [
    ({"num_atoms": 6}, 2, "num_atoms: 6 atoms, more than the 5 of the largest crystal the model was trained on"),
    ({"num_atoms": 10_000}, 2, "num_atoms: 10000 atoms; the model supports at most"),  # the mode's hard limit
    ({"steps": 1001}, 2, "steps"),  # beyond the model's T = 1000
    ({"elements": ("Sr", "C")}, 2, "elements: C is not among the elements of the perov_5 crystals"),
    ({}, 0, "num_samples: Input should be greater than or equal to 1, got 0"),
    ({}, 2.0, "num_samples: Input should be a valid integer, got 2.0"),
])
def test_bad_requests_are_refused_when_the_job_is_made(tiny_generation_checkpoint, settings, num_samples, message):
    maker = _generate(tiny_generation_checkpoint, **settings)
    with pytest.raises(ValueError, match=message):
        maker.make(num_samples)
    with pytest.raises(ValueError, match=message):
        GenerateRelaxMaker(generate_maker=maker).make(num_samples)


@pytest.mark.parametrize(("settings", "message"), [
    ({"num_atoms": 0}, "num_atoms"),
    ({"steps": 0}, "steps"),
    ({"step_lr": 0}, "step_lr"),
    ({"lattice_bound": 0}, "lattice_bound"),
    ({"batch_size": 0}, "batch_size"),
    ({"device": "abacus"}, "device"),
    ({"max_formula_units": 2}, "max_formula_units"),  # a CSP knob: not a field
    ({"elements": ("Sr", "Xx")}, "elements: unknown element 'Xx'"),
])
def test_bad_generate_settings_are_refused_at_construction(settings, message):
    with pytest.raises((ValueError, TypeError), match=message):
        GenerateMaker(checkpoint="any.pt", **settings)


def test_the_generation_checkpoint_is_required():
    with pytest.raises(TypeError, match="checkpoint"):
        GenerateMaker()
    with pytest.raises(TypeError, match="generate_maker"):
        GenerateRelaxMaker()
