"""The AiiDA route and the jobflow route give the same ranking table from the same candidates.

Both call :mod:`equicsp_core.pipeline` and :func:`equicsp_core.relax.relax_structures`; this runs both for real
on SrTiO3, CaTiO3 and NaF (the shipped perov_5 model, 20 sampling steps; NaF is sampled at Z = 1 and 2, the
cells of perov_5's 5-atom domain), with a stub Lennard-Jones potential for the ML relaxation, the phonon check and
the reference entries of the hull (a small pinned reference set). The jobflow flow starts from the AiiDA route's
sampled candidates, so the two tables must agree in every column (floats to 1e-8: structures pass through
StructureData in one route and through JSON in the other).
"""

from pathlib import Path

import pytest
from aiida.engine import run_get_node

pytest.importorskip("jobflow")

from jobflow import JobStore, run_locally  # noqa: E402
from maggma.stores import MemoryStore  # noqa: E402
from monty.json import MontyDecoder  # noqa: E402

from aiida_equicsp.data.model import EquiCSPModelData  # noqa: E402
from aiida_equicsp.workchains.predict_relax import EquiCSPPredictRelaxWorkChain  # noqa: E402
from equicsp_jobflow import CandidateDocument, EquiCSPRelaxMaker, PredictRelaxMaker, SampleDocument  # noqa: E402

pytestmark = pytest.mark.slow

FORMULAS = ["SrTiO3", "CaTiO3", "NaF"]
#: A Lennard-Jones stub for every element (tests/test_relax.py), milliseconds per step.
RELAX = {"potential": "tests.test_relax:lennard_jones", "fmax": 0.05, "steps": 20}


def rounded(rows: list[dict]) -> list[dict]:
    return [{key: round(value, 8) if isinstance(value, float) else value for key, value in row.items()} for row in rows]


def test_aiida_and_jobflow_routes_give_the_same_table(equicsp_code, tmp_path, perovskite_reference_set):
    model = EquiCSPModelData.from_shipped("perov_5")
    # the job imports the stub from the repository's tests: PYTHONPATH points there
    options = {"options": {"environment_variables": {"PYTHONPATH": str(Path(__file__).parents[2])}}}
    overrides = {"num_samples": 3, "top_k": 1, "phonons": True, "relax": {"parameters": RELAX, "metadata": options},
                 "sample": {"parameters": {"steps": 20, "seed": 1}}}
    builder = EquiCSPPredictRelaxWorkChain.get_builder_from_protocol(equicsp_code, model, FORMULAS,
                                                                     overrides=overrides)
    outputs, node = run_get_node(builder)
    assert node.exit_status == 0, node.exit_message
    aiida_rows = outputs["ranking"]["rows"]

    sampling = next(child for child in node.called if child.process_label == "EquiCSPSampleBaseWorkChain")
    entries = sampling.outputs.candidates["candidates"]
    samples = SampleDocument(
        formulas=FORMULAS, num_requested=len(entries), checkpoint="perov_5", checkpoint_sha256=model.sha256,
        settings={}, invalid=[{key: e[key] for key in ("formula", "sample", "formula_units", "cell_formula")}
                              for e in entries if not e["valid"]],
        candidates=[CandidateDocument.of(e["link_label"], e["formula"], e["sample"],
                                         outputs["sampled"][e["link_label"]].get_pymatgen())
                    for e in entries if e["valid"]])
    maker = PredictRelaxMaker(relax_maker=EquiCSPRelaxMaker(**RELAX), top_k=1, phonons=True)
    flow = maker.make_from_samples(samples)
    store = JobStore(MemoryStore(), additional_stores={"data": MemoryStore()})
    run_locally(flow, store=store, root_dir=tmp_path, ensure_success=True, log=False)
    jobflow_table = MontyDecoder().process_decoded(store.get_output(flow.output.uuid, load=True))
    jobflow_rows = jobflow_table.rows

    assert rounded(jobflow_rows) == rounded(aiida_rows)
    # the AiiDA route relaxed the reference entries in a CalcJob (the jobflow one in its stability job)
    called = {link.link_label for link in node.base.links.get_outgoing().all()}
    assert {"reference_relax", "collect_references", "stability"} <= called
    assert jobflow_table.levels == outputs["ranking"]["levels"]
    level = "ML (tests.test_relax:lennard_jones, fmax 0.05 eV/Å, 20 steps)"
    assert outputs["ranking"]["levels"]["ml_energy_per_atom"] == level
    # the comparison covers every stage: ranked rows, a duplicate or implausible one, and the phonon columns
    statuses = {row["status"] for row in aiida_rows}
    assert "ml_relaxed" in statuses and statuses - {"ml_relaxed"}
    assert [row["ml_imaginary_modes"] is not None for row in aiida_rows].count(True) == len(FORMULAS)
    # ... and the cell sizes and merged members: NaF at Z = 1 and 2, every ranked row listing its group
    assert {(row["reduced_formula"], row["formula_units"]) for row in aiida_rows if row["formula"]} >= {
        ("NaF", 1), ("NaF", 2), ("SrTiO3", 1)}
    assert all(row["label"] in row["members"] for row in aiida_rows if row["ml_rank"] is not None)
    # and the stability columns: an ML E_hull (Lennard-Jones level) and a novelty verdict per representative
    # (the small reference set has Sr-Ca-Ti-O only: NaF's rows name the missing elemental references instead)
    representatives = [row for row in aiida_rows if row["status"] == "ml_relaxed"]
    perovskites = [row for row in representatives if row["reduced_formula"] != "NaF"]
    assert perovskites and all(isinstance(row["ml_e_above_hull"], float) for row in perovskites), perovskites
    assert all(row["ml_e_above_hull"] is None and row["reason"].startswith("no ML E_hull: no elemental reference for "
                                                                            "F, Na")
               for row in representatives if row["reduced_formula"] == "NaF")
    assert all(row["novelty"].startswith(("new", "matches mp-")) for row in representatives)
