"""``benchmarks/discovery_dft.py`` (level (c) of the discovery benchmark): how a work chain's outputs are scored
against the known structure, and the summary over compositions."""

from __future__ import annotations

from tests.scripts import load_script


def load_benchmark():
    return load_script("benchmarks/discovery_dft.py")


class Stored:
    """What ``score`` reads of a StructureData output: its pymatgen structure."""

    def __init__(self, structure):
        self.structure = structure

    def get_pymatgen(self):
        return self.structure


def rock_salt(a=5.64):
    from pymatgen.core import Lattice, Structure

    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(a), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def caesium_chloride(a=3.4):
    from pymatgen.core import Lattice, Structure

    return Structure(Lattice.cubic(a), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def row(label, ml_rank, status, dft_energy):
    return {"label": label, "ml_rank": ml_rank, "status": status, "formula_units": 1, "ml_energy_per_atom": -3.0,
            "dft_energy_per_atom": dft_energy, "dft_level": "PBE, QE, fast" if dft_energy is not None else None,
            "space_group_ml": "x", "space_group_dft": None, "reason": None, "ml_e_above_hull": None,
            "dft_e_above_hull": None}


def test_dft_picks_the_known_structure_that_the_ml_ranking_put_second():
    """The ML winner is CsCl-type, the runner-up rock salt (the known structure) and lower in DFT energy; a third
    shortlisted candidate failed its DFT: found, not ML top-1, DFT top-1."""
    benchmark = load_benchmark()
    known = rock_salt()
    outputs = {
        "ranking": {"rows": [row("NaCl_000", 1, "dft_relaxed", -5.0), row("NaCl_001", 2, "dft_relaxed", -5.2),
                             row("NaCl_002", 3, "dft_failed", None), row("NaCl_003", 4, "ml_relaxed", None)]},
        "ml_relaxed": {"NaCl_000": Stored(caesium_chloride()), "NaCl_001": Stored(rock_salt(5.5)),
                       "NaCl_002": Stored(caesium_chloride(3.6)), "NaCl_003": Stored(rock_salt(5.7))},
        "dft_relaxed": {"NaCl_000": Stored(caesium_chloride(3.5)), "NaCl_001": Stored(rock_salt(5.6))},
    }
    result = benchmark.score(outputs, known)
    assert result["relaxed_match"] and result["shortlist_match"]
    assert not result["top1_ml"] and result["top1_dft"]
    assert (result["winner_ml"], result["winner_dft"], result["dft_finished"]) == ("NaCl_000", "NaCl_001", 2)
    assert [record["label"] for record in result["shortlist"]] == ["NaCl_000", "NaCl_001", "NaCl_002"]
    failed = result["shortlist"][2]
    assert failed["status"] == "dft_failed" and failed["dft_match_rms"] is None and failed["ml_match_rms"] is None


def test_no_finished_dft_is_no_dft_top1():
    benchmark = load_benchmark()
    outputs = {"ranking": {"rows": [row("NaCl_000", 1, "dft_failed", None)]},
               "ml_relaxed": {"NaCl_000": Stored(rock_salt())}}
    result = benchmark.score(outputs, rock_salt())
    assert result["top1_ml"] and not result["top1_dft"] and result["winner_dft"] is None


def test_summary_counts_the_compositions_run_and_names_the_disagreements():
    benchmark = load_benchmark()
    lines = [{"formula": "A", "relaxed_match": True, "shortlist_match": True, "top1_ml": False, "top1_dft": True,
              "seconds": 100.0},
             {"formula": "B", "relaxed_match": True, "shortlist_match": True, "top1_ml": True, "top1_dft": True,
              "seconds": 300.0},
             {"formula": "C", "skipped": "spin-polarised DFT"}]
    result = benchmark.summary(lines)
    assert result["compositions"] == 2 and result["skipped"] == 1
    assert (result["top1_ml"], result["top1_dft"], result["relaxed_match"]) == (50.0, 100.0, 100.0)
    assert result["top1_only_dft"] == ["A"] and result["top1_only_ml"] == [] and result["mean_seconds"] == 200.0


def test_a_line_made_before_a_setting_existed_has_its_old_value():
    """Lines (and work chain extras) written before ``dft_hull`` existed compare equal to a run without it, and unequal
    to a run with it, so --out files of earlier sessions resume and are not mixed with hull runs."""
    benchmark = load_benchmark()
    old = {"checkpoint": "mp_20", "num_samples": 20, "max_formula_units": 1, "fmax": 0.05, "relax_steps": 200,
           "top_k": 3, "dft_protocol": "fast", "relax_type": "none", "magnetic": False, "seed": 0, "row": 97}
    assert benchmark.run_settings(old) == benchmark.run_settings({**old, "dft_hull": False})
    assert benchmark.run_settings(old) != benchmark.run_settings({**old, "dft_hull": True})
    assert "row" not in benchmark.run_settings(old)
