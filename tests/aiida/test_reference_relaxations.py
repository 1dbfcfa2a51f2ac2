"""The ML hull's reference entries are relaxed by an ``EquiCSPRelaxCalculation``, found again in the provenance, and
never in the daemon (``aiida_equicsp.workchains.reference_energies``, the work chain's stability steps).

The daemon side (the query, ``collect_reference_energies``, ``assess_stability``) runs here on hand-made nodes and,
once, in a fresh interpreter where ``torch`` and the potentials cannot be imported; two short real work chains
(Lennard-Jones stub potentials, the small pinned Sr-Ca-Ti-O reference set of ``tests/conftest.py``) show that a
second run relaxes no reference again and that a failed reference relaxation leaves a reason in the row.
"""

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from aiida import orm
from aiida.common.links import LinkType, validate_link_label
from aiida.engine import run_get_node
from aiida.engine.processes import ProcessState
from pymatgen.core import Lattice, Structure

from aiida_equicsp.calculations.relax import EquiCSPRelaxCalculation
from aiida_equicsp.queries import stable_candidates
from aiida_equicsp.workchains.predict_relax import EquiCSPPredictRelaxWorkChain, assess_stability, rank_candidates
from aiida_equicsp.workchains.reference_energies import (
    ML_LEVEL_EXTRA,
    REFERENCE_SET_EXTRA,
    collect_reference_energies,
    collection_inputs,
    known_records,
    missing_references,
    reference_id,
    reference_link_label,
    reference_relaxations,
)
from equicsp_core import pipeline, reference
from equicsp_core.settings import RelaxSettings, StabilitySettings

REPO_ROOT = Path(__file__).resolve().parents[2]
RELAX_OPTIONS = {"options": {"environment_variables": {"PYTHONPATH": str(REPO_ROOT)}}}
SITES = [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]]
#: The hull of Sr-Ti-O in the fixture's reference set: ASE's Sr and Ti, the O2 crystal, cubic SrTiO3.
SRTIO_REFERENCES = ["ase-Sr", "ase-Ti", "mp-12957", "mp-5229"]
LEVEL = "ML (stub, fmax 0.05 eV/Å, 10 steps)"


def record(energy, status="converged", error=None):
    return {"energy_per_atom": energy, "status": status, "error": error}


def reference_relaxation(sha256: str, level: str, records: dict, exit_status: int = 0) -> orm.CalcJobNode:
    """A finished EquiCSPRelaxCalculation of reference entries as the work chain leaves one: extras and ``results``."""
    node = orm.CalcJobNode()
    node.set_process_type(EquiCSPRelaxCalculation.build_process_type())
    node.set_process_state(ProcessState.FINISHED)
    node.set_exit_status(exit_status)
    node.store()
    node.base.extras.set_many({REFERENCE_SET_EXTRA: sha256, ML_LEVEL_EXTRA: level})
    results = orm.Dict({reference_link_label(entry_id): {**value, "steps": 3, "seconds": 0.1}
                        for entry_id, value in records.items()})
    results.base.links.add_incoming(node, LinkType.CREATE, "results")
    results.store()
    return node


@pytest.mark.parametrize("entry_id", ["mp-1234", "perov_5-12", "C-148264-7891-51", "ase-Sr", "x_-y", "é-1"])
def test_reference_link_labels_are_valid_and_give_the_id_back(entry_id):
    label = reference_link_label(entry_id)
    validate_link_label(label)
    assert "__" not in label  # AiiDA would read a namespace
    assert reference_id(label) == entry_id


@pytest.mark.parametrize("label", ["ref", "mp_2d1", "ref_2", "refa_", "ref_zz", "ref_2D1", "ref_ff"])
def test_a_label_not_made_by_reference_link_label_is_refused(label):
    with pytest.raises(ValueError, match="is not a reference link label"):
        reference_id(label)


def test_the_query_finds_earlier_relaxations_of_this_set_and_level_only():
    """Earlier reference relaxations are found by their extras: another level or set does not count, a finished
    calculation's relaxed energy beats a failure, and nothing is missing once every id has a record."""
    sha = uuid.uuid4().hex * 2  # a reference set of this test only (the profile is shared by the session)
    reference_relaxation(sha, "ML (other)", {"mp-1": record(-1.0)})
    reference_relaxation(uuid.uuid4().hex * 2, LEVEL, {"mp-1": record(-1.5)})
    failed = reference_relaxation(sha, LEVEL, {"mp-1": record(None, "failed", "boom"), "ase-O": record(-4.0)})
    assert missing_references(sha, LEVEL, ["mp-1", "ase-O", "mp-2"]) == ["mp-2"]
    records, nodes = known_records(sha, LEVEL, ["mp-1", "ase-O"])
    assert records["mp-1"] == record(None, "failed", "boom") and records["ase-O"] == record(-4.0)
    assert nodes == [failed]
    relaxed = reference_relaxation(sha, LEVEL, {"mp-1": record(-2.0), "mp-2": record(-3.0, "not_converged")})
    assert missing_references(sha, LEVEL, ["mp-1", "ase-O", "mp-2"]) == []
    records, nodes = known_records(sha, LEVEL, ["mp-1", "ase-O", "mp-2"])
    assert records == {"mp-1": record(-2.0), "ase-O": record(-4.0), "mp-2": record(-3.0, "not_converged")}
    assert nodes == [relaxed, failed]  # newest first
    collected = collect_reference_energies(references=orm.List(["mp-1", "ase-O", "mp-2", "mp-3"]),
                                           **collection_inputs(nodes))
    assert {key: value for key, value in collected.get_dict().items() if key != "mp-3"} == records
    assert collected["mp-3"]["status"] == "missing" and collected["mp-3"]["energy_per_atom"] is None
    incoming = {link.node.pk for link in collected.creator.base.links.get_incoming().all()}
    assert {relaxed.outputs.results.pk, failed.outputs.results.pk} <= incoming  # the provenance of the hull


def test_the_query_selects_in_the_database_the_relaxations_holding_the_asked_ids():
    """Only the calculations whose results hold one of the ids come back (the others are never loaded); no id,
    no calculation."""
    sha = uuid.uuid4().hex * 2
    oxygen = reference_relaxation(sha, LEVEL, {"ase-O": record(-4.9)})
    strontium = reference_relaxation(sha, LEVEL, {"ase-Sr": record(-1.6), "mp-5229": record(-8.0)})
    assert reference_relaxations(sha, LEVEL, ["mp-5229"]) == [strontium]
    assert reference_relaxations(sha, LEVEL, ["ase-O", "mp-5229", "mp-9"]) == [strontium, oxygen]
    assert reference_relaxations(sha, LEVEL, ["mp-9"]) == [] and reference_relaxations(sha, LEVEL, []) == []


def perovskite(a_site: str, a: float) -> Structure:
    return Structure(Lattice.cubic(a), [a_site, "Ti", "O", "O", "O"], SITES)


#: Hand-made reference energies of the Sr-Ti-O hull (eV/atom): SrTiO3 at -4 is on it (formation -1.6 eV/atom).
ENERGIES = {"ase-Sr": -1.0, "ase-Ti": -2.0, "mp-12957": -3.0, "mp-5229": -4.0}


def test_assess_stability_builds_the_hull_from_the_energies_it_receives(perovskite_reference_set, tmp_path):
    """``assess_stability`` relaxes nothing: the hull comes from the input Dict (SrTiO3 at -3.9 eV/atom lies
    0.1 eV/atom above cubic SrTiO3 at -4), as the engine's relax-and-cache route gives from the same energies;
    an element whose reference failed is named in the row's reason."""
    structures = {"SrTiO3_000": perovskite("Sr", 3.95)}
    ml_results = {"SrTiO3_000": {"status": "converged", "energy_per_atom": -3.9, "error": None}}
    settings = StabilitySettings()
    needed = pipeline.stability_references(ml_results, structures, settings)
    assert [entry.id for entry in needed] == SRTIO_REFERENCES
    relaxed = {label: orm.StructureData(pymatgen=structure) for label, structure in structures.items()}
    ranking = rank_candidates(ml_results=orm.Dict(ml_results), top_k=orm.Int(1), **relaxed)
    inputs = {"ml_results": orm.Dict(ml_results), "ml_ranking": ranking, "relax_parameters": orm.Dict({}),
              "parameters": orm.Dict({}), **relaxed}
    assessed = assess_stability(reference_energies=orm.Dict({key: record(value) for key, value in ENERGIES.items()}),
                                **inputs)["SrTiO3_000"]
    assert assessed["ml_e_above_hull"] == pytest.approx(0.1, abs=1e-9) and assessed["reason"] is None
    assert assessed["novelty"] == "matches mp-5229 (Pm-3m)"

    class Stub:
        def __init__(self, energy):
            self.status, self.energy_per_atom, self.error = "converged", energy, None

    def relax(structures):
        return [(entry_id, Stub(ENERGIES[entry_id])) for entry_id in structures]

    engine = pipeline.stability(ml_results, structures, ranking["ranking"], RelaxSettings(), settings, relax=relax,
                                cache_path=str(tmp_path / "energies.json"))
    # one hull implementation: the same numbers (a Dict keeps floats to 14 significant digits)
    assert engine["SrTiO3_000"] == {**assessed, "ml_e_above_hull": pytest.approx(assessed["ml_e_above_hull"],
                                                                                 rel=1e-12)}

    failed = {**{key: record(value) for key, value in ENERGIES.items()}, "ase-Sr": record(None, "failed", "boom")}
    gap = assess_stability(reference_energies=orm.Dict(failed), **inputs)["SrTiO3_000"]
    assert gap["ml_e_above_hull"] is None and gap["reason"].startswith("no ML E_hull: no elemental reference for Sr")


NO_TORCH = r"""
import json, sys

class Blocker:
    attempts = []
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "chgnet", "matgl", "mace", "sevenn", "ase.calculators.mace"):
            self.attempts.append(name)
            raise ImportError(f"{name} may not be imported by the daemon")
        return None

sys.meta_path.insert(0, Blocker())
import aiida
from aiida.storage.sqlite_temp import SqliteTempBackend
aiida.load_profile(SqliteTempBackend.create_profile("no-torch"), allow_switch=True)
from aiida import orm
from pymatgen.core import Lattice, Structure
from equicsp_core import reference
reference.DATA_SHA256 = json.loads(sys.argv[1])
from aiida_equicsp.workchains.predict_relax import assess_stability, rank_candidates, tabulate_ranking
from aiida_equicsp.workchains.reference_energies import collect_reference_energies, known_records

structure = Structure(Lattice.cubic(3.95), ["Sr", "Ti", "O", "O", "O"],
                      [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
relaxed = {"SrTiO3_000": orm.StructureData(pymatgen=structure)}
ml_results = orm.Dict({"SrTiO3_000": {"status": "converged", "energy_per_atom": -3.9, "error": None}})
ranking = rank_candidates(ml_results=ml_results, top_k=orm.Int(1), **relaxed)
ids = json.loads(sys.argv[2])
from equicsp_core.pipeline import ml_level
from equicsp_core.settings import RelaxSettings
records, nodes = known_records(reference.load_reference().sha256, ml_level(RelaxSettings()), ids)
energies = collect_reference_energies(references=orm.List(ids))
assessed = assess_stability(ml_results=ml_results, ml_ranking=ranking, relax_parameters=orm.Dict({}),
                            parameters=orm.Dict({}), reference_energies=energies, **relaxed)
print(json.dumps({"attempts": Blocker.attempts, "records": records,
                  "loaded": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "chgnet", "matgl")),
                  "assessed": assessed.get_dict()}))
"""


def test_the_stability_steps_import_neither_torch_nor_a_potential(perovskite_reference_set):
    """In a fresh interpreter that refuses torch and the potentials: the work chain's module, the query for earlier
    reference relaxations and both stability calcfunctions run (the default CHGNet level), and nothing tried an
    import of torch; with no reference relaxed yet the row says which elements lack a reference."""
    done = subprocess.run([sys.executable, "-c", NO_TORCH, json.dumps(reference.DATA_SHA256),
                           json.dumps(SRTIO_REFERENCES)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["attempts"] == [] and report["loaded"] == []
    assert report["records"] == {}
    row = report["assessed"]["SrTiO3_000"]
    assert row["ml_e_above_hull"] is None and "no elemental reference for O, Sr, Ti" in row["reason"]
    assert row["novelty"] == "matches mp-5229 (Pm-3m)"


def relax_overrides(potential: str) -> dict:
    return {"num_samples": 1, "top_k": 1, "sample": {"parameters": {"steps": 5}},
            "relax": {"parameters": {"potential": potential, "steps": 10, "fmax": 0.1}, "metadata": RELAX_OPTIONS}}


def calls(node) -> dict:
    return {link.link_label: link.node for link in node.base.links.get_outgoing(link_type=(
        LinkType.CALL_CALC, LinkType.CALL_WORK)).all()}


@pytest.mark.slow
def test_a_second_work_chain_relaxes_no_reference_again(fixed_cell_equicsp_code, model, perovskite_reference_set):
    """The first run relaxes the Sr-Ti-O references in one EquiCSPRelaxCalculation (extras: set and level); the
    second finds them by a query, launches no reference relaxation, and builds its hull from the first's results."""
    overrides = relax_overrides("tests.test_relax:lennard_jones")
    level = pipeline.ml_level(RelaxSettings.from_mapping(overrides["relax"]["parameters"]))

    outputs, first = run_get_node(EquiCSPPredictRelaxWorkChain.get_builder_from_protocol(
        fixed_cell_equicsp_code, model, ["SrTiO3"], overrides=overrides))
    assert first.exit_status == 0, first.exit_message
    references = calls(first)["reference_relax"]
    assert references.is_finished_ok
    assert references.base.extras.get(REFERENCE_SET_EXTRA) == perovskite_reference_set.sha256
    assert references.base.extras.get(ML_LEVEL_EXTRA) == level
    assert set(references.inputs.structures) == {reference_link_label(key) for key in SRTIO_REFERENCES}
    assert references.inputs.parameters["phonons"] is False
    (row,) = outputs["ranking"]["rows"]
    assert isinstance(row["ml_e_above_hull"], float) and row["reason"] is None

    second_outputs, second = run_get_node(EquiCSPPredictRelaxWorkChain.get_builder_from_protocol(
        fixed_cell_equicsp_code, model, ["SrTiO3"], overrides=overrides))
    assert second.exit_status == 0, second.exit_message
    called = calls(second)
    assert "reference_relax" not in called
    collect = called["collect_references"]
    assert references.outputs.results.pk in {link.node.pk for link in collect.base.links.get_incoming().all()}
    (again,) = second_outputs["ranking"]["rows"]
    assert isinstance(again["ml_e_above_hull"], float)
    assert missing_references(perovskite_reference_set.sha256, level, SRTIO_REFERENCES) == []
    # the query finds both work chains' candidates through their assess_stability calls and places them on one hull
    found = {c.workchain.pk: c.row for c in stable_candidates("Sr-Ti-O", ehull_max=1e3)
             if c.workchain.pk in (first.pk, second.pk)}
    assert sorted(found) == sorted([first.pk, second.pk])
    assert all(row["ml_e_above_system_hull"] >= max(row["ml_e_above_hull"], 0.0) - 1e-9 for row in found.values())


@pytest.mark.slow
def test_a_failed_reference_relaxation_is_a_reason_not_a_failed_work_chain(fixed_cell_equicsp_code, model,
                                                                          perovskite_reference_set):
    """A potential that refuses pure elements: the reference relaxation fails for Sr, Ti and O2; the work chain
    finishes, the row has no ML E_hull and says which elements lack a reference, and novelty is still given."""
    outputs, node = run_get_node(EquiCSPPredictRelaxWorkChain.get_builder_from_protocol(
        fixed_cell_equicsp_code, model, ["SrTiO3"],
        overrides=relax_overrides("tests.test_relax:lennard_jones_failing_for_elements")))
    assert node.exit_status == 0, node.exit_message
    results = calls(node)["reference_relax"].outputs.results.get_dict()
    assert {reference_id(label) for label, value in results.items() if value["status"] == "failed"} == {
        "ase-Sr", "ase-Ti", "mp-12957"}
    (row,) = outputs["ranking"]["rows"]
    assert row["status"] == "ml_relaxed" and row["ml_e_above_hull"] is None
    assert row["reason"].startswith("no ML E_hull: no elemental reference for O, Sr, Ti")
    assert row["novelty"] is not None
