"""The papers' ab initio generation metrics (docs/method.md §8.3) on hand-made crystals, checked by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest
from ase.calculators.calculator import Calculator, all_changes
from pymatgen.core import Composition, Lattice, Structure

from equicsp_core.cli import main
from equicsp_core.generation_metrics import (COVERAGE_CUTOFFS, ENERGY_NOTE, CrystalFeatures, coverage,
                                             crystal_features, draw_valid, generation_metrics, magpie_scaler,
                                             standardised_compositions, wasserstein)

AVOGADRO_AMU_PER_A3_TO_G_PER_CM3 = 1.66053906660  # 1 amu/Å³ in g/cm³


def rocksalt(a: float = 5.64) -> Structure:
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(a), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def cesium_chloride(a: float = 4.12) -> Structure:
    return Structure(Lattice.cubic(a), ["Cs", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def perovskite(a: float = 3.905) -> Structure:
    return Structure(Lattice.cubic(a), ["Sr", "Ti", "O", "O", "O"],
                     [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])


def copper(a: float = 3.61) -> Structure:
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(a), ["Cu"], [[0, 0, 0]])


def scaled(structure: Structure, volume_factor: float) -> Structure:
    larger = structure.copy()
    larger.scale_lattice(structure.volume * volume_factor)
    return larger


def test_two_atoms_closer_than_half_an_angstrom_are_structurally_invalid():
    features = crystal_features(Structure(Lattice.cubic(4.0), ["Na", "Cl"], [[0, 0, 0], [0.075, 0, 0]]))  # 0.3 Å
    assert not features.structurally_valid and features.compositionally_valid and not features.valid


def test_nacl2_is_compositionally_invalid_and_nacl_valid():
    nacl2 = crystal_features(Structure(Lattice.cubic(5.0), ["Na", "Cl", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5],
                                                                               [0, 0.5, 0.5]]))
    nacl = crystal_features(rocksalt())
    assert nacl2.structurally_valid and not nacl2.compositionally_valid and not nacl2.valid
    assert nacl.structurally_valid and nacl.compositionally_valid and nacl.valid


def test_a_single_element_crystal_is_compositionally_valid():
    assert crystal_features(copper()).valid


def test_a_failed_sample_is_structurally_invalid_and_its_composition_still_tested():
    assert crystal_features(Composition("NaCl")) == CrystalFeatures(False, True, None, None, None, None)
    assert not crystal_features(Composition("NaCl2")).compositionally_valid
    assert crystal_features(None) == CrystalFeatures(False, False, None, None, None, None)


def test_density_is_mass_over_volume_by_hand():
    """Rock salt, a = 5.64 Å, 4 NaCl per cell: ρ = 4 (22.98977 + 35.453) amu / 5.64³ Å³ = 2.164 g/cm³ (handbook 2.165)."""
    by_hand = 4 * (22.98977 + 35.453) / 5.64**3 * AVOGADRO_AMU_PER_A3_TO_G_PER_CM3
    assert crystal_features(rocksalt()).density == pytest.approx(by_hand, rel=1e-4)
    assert by_hand == pytest.approx(2.165, abs=2e-3)


def test_the_reference_set_against_itself_covers_everything_at_zero_distance():
    reference = [rocksalt(), cesium_chloride(), perovskite(), copper()]
    report = generation_metrics(reference, reference, "perov_5", num_eval=4, energy=None)
    assert report["structural_validity"] == report["compositional_validity"] == report["validity"] == 100.0
    assert report["cov_recall"] == report["cov_precision"] == 100.0
    assert report["d_density"] == report["d_num_elements"] == 0.0
    assert report["amsd_recall"] == report["amcd_precision"] == 0.0
    assert report["num_eval"] == 4 and report["d_energy"] is None and report["energy_note"] == ENERGY_NOTE


def test_scaled_volumes_give_the_density_distance_by_hand():
    """Every volume × 2 halves every density; with equal counts and the same order, W₁ = mean(ρ_i − ρ_i / 2)."""
    reference = [rocksalt(), cesium_chloride(), perovskite()]
    densities = [s.composition.weight / s.volume * AVOGADRO_AMU_PER_A3_TO_G_PER_CM3 for s in reference]
    report = generation_metrics([scaled(s, 2.0) for s in reference], reference, "perov_5", num_eval=3, energy=None)
    assert report["d_density"] == pytest.approx(np.mean(densities) / 2, rel=1e-4)
    assert report["d_num_elements"] == 0.0


def test_element_count_distance_by_hand():
    """Generated element counts {1, 2, 2} against the reference's {2, 2, 3}: W₁ = (1 + 0 + 1) / 3."""
    generated = [copper(), rocksalt(), cesium_chloride()]
    reference = [rocksalt(), cesium_chloride(), perovskite()]
    assert generation_metrics(generated, reference, "perov_5", num_eval=3, energy=None)["d_num_elements"] == \
        pytest.approx(2 / 3)


def test_wasserstein_of_shifted_samples_is_the_shift():
    assert wasserstein([1.0, 2.0, 4.0], [1.5, 2.5, 4.5]) == pytest.approx(0.5)


def fingerprinted(structure_fp: list[float], standardised_composition: list[float]) -> CrystalFeatures:
    """A valid crystal with a given structure fingerprint and standardised composition fingerprint
    (the raw Magpie vector is mean + std · z, zero-padded to 132 values)."""
    means, stds = magpie_scaler()
    z = np.zeros(len(means))
    z[:len(standardised_composition)] = standardised_composition
    return CrystalFeatures(True, True, np.array(structure_fp, dtype=float), means + stds * z, 1.0, 1)


def test_standardised_compositions_undo_the_fixed_statistics_and_zero_nan():
    means, stds = magpie_scaler()
    raw = np.stack([means + 2 * stds, np.full(len(means), np.nan)])
    assert np.allclose(standardised_compositions(raw), [np.full(len(means), 2.0), np.zeros(len(means))])


@pytest.mark.parametrize(("structure_distance", "composition_distance", "covered"),
                         [(0.19, 3.9, True), (0.2, 4.0, True), (0.21, 3.9, False), (0.19, 4.1, False)])
def test_coverage_cutoffs_of_perov_5_are_inclusive(structure_distance, composition_distance, covered):
    structure_cutoff, composition_cutoff = COVERAGE_CUTOFFS["perov_5"]
    reference = [fingerprinted([0.0, 0.0], [0.0])]
    generated = [fingerprinted([structure_distance, 0.0], [composition_distance])]
    report = coverage(generated, reference, structure_cutoff, composition_cutoff)
    assert report["cov_recall"] == report["cov_precision"] == (100.0 if covered else 0.0)
    assert report["amsd_recall"] == pytest.approx(structure_distance)
    assert report["amcd_precision"] == pytest.approx(composition_distance)


def test_coverage_by_hand_counts_unfingerprinted_crystals_in_precision_only():
    """References A, B; g1 near A, g2 0.5 away in structure, g3 without a fingerprint:
    COV-R = 1/2 (A only), COV-P = 1/3 (g1 of three generated)."""
    reference = [fingerprinted([0.0, 0.0], [0.0]), fingerprinted([1.0, 0.0], [0.0, 10.0])]
    generated = [fingerprinted([0.1, 0.0], [1.0]), fingerprinted([0.0, 0.5], [0.0]),
                 CrystalFeatures(False, True, None, None, None, None)]
    report = coverage(generated, reference, 0.2, 4.0)
    assert report["cov_recall"] == pytest.approx(50.0)
    assert report["cov_precision"] == pytest.approx(100 / 3)


def test_coverage_takes_the_structure_and_composition_minima_separately():
    """g is near A in structure only and near B in composition only: covered, as CDVAE counts it."""
    reference = [fingerprinted([0.0], [10.0]), fingerprinted([1.0], [0.0])]
    report = coverage([fingerprinted([0.1], [1.0])], reference, 0.2, 4.0)
    assert report["cov_precision"] == 100.0


def test_draw_valid_is_seeded_and_takes_every_valid_crystal_when_too_few():
    features = [crystal_features(s) for s in (rocksalt(), copper(), cesium_chloride(), perovskite())]
    features.insert(1, crystal_features(None))
    assert draw_valid(features, 2, seed=3) == draw_valid(features, 2, seed=3)
    assert len(draw_valid(features, 2, seed=3)) == 2 and 1 not in draw_valid(features, 2, seed=3)
    assert draw_valid(features, 10, seed=0) == [0, 2, 3, 4]


def test_validity_percentages_count_every_generated_crystal():
    generated = [rocksalt(), Structure(Lattice.cubic(5.0), ["Na", "Cl", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5],
                                                                                [0, 0.5, 0.5]]),
                 Structure(Lattice.cubic(4.0), ["Na", "Cl"], [[0, 0, 0], [0.075, 0, 0]]), None]
    report = generation_metrics(generated, [rocksalt()], "perov_5", num_eval=1, energy=None)
    assert (report["structural_validity"], report["compositional_validity"], report["validity"]) == (50.0, 50.0, 25.0)


def test_the_shipped_statistics_standardise_materials_project_compositions(fixture_data_dir):
    """A check of the transcribed CDVAE constants: the fixture's 40 mp_20 compositions, standardised with them, have
    every feature's mean within ±0.5 and spread below 1.5 (on all 9,047 mp_20 val rows: ±0.24, 0.89-1.18); a
    mistyped digit moves a feature by more. The feature order is matminer's (checked on load)."""
    from equicsp_core.generation_metrics import _featurizers
    from equicsp_core.splits import load_cifs, split_rows

    rows = split_rows("mp_20", "val", fixture_data_dir) + split_rows("mp_20", "test", fixture_data_dir)
    compositions = [Structure.from_str(cif, fmt="cif").composition
                    for cif in load_cifs("mp_20", rows, fixture_data_dir)]
    z = standardised_compositions(np.stack([_featurizers()[1].featurize(c) for c in compositions]))  # (40, 132)
    assert z.shape == (40, 132)
    assert (np.abs(z.mean(axis=0)) <= 0.5).all() and (z.std(axis=0) <= 1.5).all()


def test_unknown_dataset_is_refused_before_any_work(monkeypatch):
    from equicsp_core import generation_metrics as module

    monkeypatch.setattr(module, "features_of", lambda *_: pytest.fail("featurised a dataset without cut-offs"))
    with pytest.raises(ValueError, match="no coverage cut-offs for 'mpts_52'"):
        generation_metrics([rocksalt()], [rocksalt()], "mpts_52", num_eval=1, energy=None)


def test_cli_writes_a_report_of_val_crystals_against_test(tmp_path, fixture_data_dir, capsys):
    from equicsp_core.splits import load_cifs, split_rows

    cifs = load_cifs("perov_5", split_rows("perov_5", "val", fixture_data_dir), fixture_data_dir)
    generated = tmp_path / "generated.json"
    generated.write_text(json.dumps({f"val_{i}": Structure.from_str(cif, fmt="cif").as_dict()
                                     for i, cif in enumerate(cifs)}))
    out = tmp_path / "metrics.json"
    assert main(["--quiet", "evaluate-generation", "--generated", str(generated), "--dataset", "perov_5",
                 "--num-eval", "5", "--energy", "none", "--processes", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["split"] == "test" and report["generated"] == len(cifs) and report["reference"] == 12
    assert report["num_eval"] == 5 and report["structural_validity"] == 100.0 and report["d_energy"] is None
    assert report["energy_note"] == ENERGY_NOTE and "matminer" in report["versions"]
    assert report["generated_with"] == [None]  # a file, not a folder of `equicsp generate`


def test_cli_counts_the_failed_samples_of_a_sample_folder(tmp_path):
    folder = tmp_path / "sampled"
    folder.mkdir()
    rocksalt().to(filename=str(folder / "NaCl_000.cif"))
    (folder / "index.json").write_text(json.dumps({"samples": [
        {"formula": "NaCl", "sample": 0, "cell_formula": "Na4Cl4", "valid": True, "file": "NaCl_000.cif"},
        {"formula": "NaCl", "sample": 1, "cell_formula": "Na4Cl4", "valid": False, "file": None}]}))
    out = tmp_path / "metrics.json"
    assert main(["--quiet", "evaluate-generation", "--generated", str(folder), "--dataset", "perov_5",
                 "--num-eval", "1", "--energy", "none", "--processes", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert (report["generated"], report["structural_validity"], report["compositional_validity"]) == (2, 50.0, 100.0)


@pytest.mark.parametrize(("args", "message"), [
    (["--dataset", "mpts_52"], "no coverage cut-offs for 'mpts_52'"),
    (["--dataset", "perov_5", "--num-eval", "5"], "1 generated crystals, fewer than --num-eval 5"),
    (["--dataset", "perov_5", "--split", "train"], "training rows of perov_5"),
])
def test_cli_refuses_bad_input_in_one_line_and_writes_nothing(tmp_path, capsys, args, message):
    generated = tmp_path / "one.json"
    generated.write_text(json.dumps({"NaCl": rocksalt().as_dict()}))
    out = tmp_path / "metrics.json"
    status = main(["--quiet", "evaluate-generation", "--generated", str(generated), "--num-eval", "1",
                   "--energy", "none", "--out", str(out), *args])
    error = capsys.readouterr().err.strip()
    assert status == 2 and message in error and len(error.splitlines()) == 1 and not out.exists()


class VolumeCalculator(Calculator):
    """Energy per atom = volume per atom (eV/atom = Å³/atom), no forces: energies known by hand."""

    implemented_properties = ["energy", "forces"]

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        self.results = {"energy": float(self.atoms.get_volume()), "forces": np.zeros((len(self.atoms), 3))}


def volume_calculator(device: str = "cpu") -> VolumeCalculator:
    """The potential factory of :class:`VolumeCalculator` (``module:factory`` for ``load_calculator``)."""
    return VolumeCalculator()


def test_energy_distance_by_hand_with_a_volume_potential():
    """E/atom = V/n: doubling every volume shifts every energy by V_i/n_i, so d_E = mean(V_i / n_i)."""
    reference = [rocksalt(), cesium_chloride(), perovskite()]
    report = generation_metrics([scaled(s, 2.0) for s in reference], reference, "perov_5", num_eval=3,
                                energy=f"{__name__}:volume_calculator")
    assert report["d_energy"] == pytest.approx(np.mean([s.volume / len(s) for s in reference]), rel=1e-6)
    assert report["energy_failures"] == {"generated": 0, "reference": 0}
    assert report["energy"] == f"{__name__}:volume_calculator" and report["energy_note"] == ENERGY_NOTE


def test_an_unloadable_potential_is_refused_before_any_featurising(monkeypatch):
    from equicsp_core import generation_metrics as module
    from equicsp_core.settings import PotentialError

    monkeypatch.setattr(module, "features_of", lambda *_: pytest.fail("featurised before the potential loaded"))
    with pytest.raises(PotentialError, match="cannot be loaded"):
        generation_metrics([rocksalt()], [rocksalt()], "perov_5", num_eval=1, energy="no_such_module:factory")


def test_cli_d_energy_with_chgnet(tmp_path):
    """CHGNet single points of two rock-salt cells against the fixture's perov_5 test split: finite, positive d_E."""
    generated = tmp_path / "generated.json"
    generated.write_text(json.dumps({"a": rocksalt().as_dict(), "b": scaled(rocksalt(), 1.1).as_dict()}))
    out = tmp_path / "metrics.json"
    assert main(["--quiet", "evaluate-generation", "--generated", str(generated), "--dataset", "perov_5",
                 "--num-eval", "2", "--processes", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["energy"] == "chgnet" and report["energy_failures"] == {"generated": 0, "reference": 0}
    assert report["d_energy"] > 0 and report["energy_note"] == ENERGY_NOTE


def test_a_set_without_any_structure_scores_zero_without_failing():
    report = generation_metrics([None, Composition("NaCl")], [rocksalt()], "perov_5", num_eval=1, energy=None)
    assert (report["validity"], report["cov_recall"], report["cov_precision"], report["num_eval"]) == (0.0, 0.0, 0.0, 0)
    assert report["d_density"] is None and report["amsd_recall"] is None


def test_cli_scores_what_equicsp_generate_wrote(tmp_path):
    """A tiny generation model's folder (its lattices mostly diverge): every requested crystal counts, the unwritten
    ones as structurally invalid."""
    from tests.test_cli import run_cli

    run = tmp_path / "run"
    assert run_cli("train", "--preset", "tiny", "--task", "generation", "--out", run, "--set", "train.epochs=1") == 0
    assert run_cli("generate", "--checkpoint", run / "best.pt", "--num-samples", "6", "--steps", "5",
                   "--out", tmp_path / "gen") == 0
    written = len(list((tmp_path / "gen").glob("*.cif")))
    out = tmp_path / "metrics.json"
    assert main(["--quiet", "evaluate-generation", "--generated", str(tmp_path / "gen"), "--dataset", "perov_5",
                 "--num-eval", "1", "--energy", "none", "--processes", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["generated"] == 6 and report["structural_validity"] <= 100.0 * written / 6
    assert report["num_eval"] <= written
    index = json.loads((tmp_path / "gen" / "index.json").read_text())
    (settings,) = report["generated_with"]  # what the card of a shipped generation model shows
    assert (settings["steps"], settings["seed"], settings["num_samples"], settings["task"]) == (5, 0, 6, "generation")
    assert settings["checkpoint_sha256"] == index["checkpoint_sha256"] and "samples" not in settings

