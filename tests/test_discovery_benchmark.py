"""``benchmarks/discovery.py``: the per-candidate records of its lines, a tiny run (perov_5, a Lennard-Jones
potential) and ``--summary`` over lines written before and after the records."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from equicsp_core.checkpoint import read_checkpoint
from equicsp_core.settings import RelaxSettings
from tests.scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
OLD_LINES = ROOT / "benchmarks" / "results" / "discovery_mp20_stage2_e35.jsonl"


def load_benchmark():
    return load_script("benchmarks/discovery.py")


def cubic_srtio3(a=3.9):
    from pymatgen.core import Lattice, Structure

    return Structure(Lattice.cubic(a), ["Sr", "Ti", "O", "O", "O"],
                     [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])


def test_candidate_details_name_z_energy_space_group_match_and_the_group_s_rank():
    """Four candidates: two relax into one structure (the lower-energy one ranked 1, the other its duplicate, rank 1
    too), one screened out, one invalid; the duplicate's match and energy are its own."""
    from equicsp_core.pipeline import rank
    from equicsp_core.predict import Candidate
    from equicsp_core.relax import RelaxResult
    from equicsp_core.screening import space_group

    structures = {"S_000": cubic_srtio3(), "S_001": cubic_srtio3(), "S_002": cubic_srtio3(1.0)}
    candidates = {label: Candidate("SrTiO3", int(label[-1]), 1, "SrTiO3", structure)
                  for label, structure in structures.items()}
    candidates["S_003"] = Candidate("SrTiO3", 3, 2, "Sr2Ti2O6", None)
    decisions = {"S_000": {"kept": True}, "S_001": {"kept": True}, "S_002": {"kept": False}}
    results = {"S_000": RelaxResult("converged", cubic_srtio3(), -2.0, steps=12),
               "S_001": RelaxResult("not_converged", cubic_srtio3(), -1.0, steps=200)}
    ranking = rank({label: r.as_dict() for label, r in results.items()},
                   {label: r.structure for label, r in results.items()}, top_k=1).ranking
    records = load_benchmark().candidate_details(candidates, decisions, results, ranking, {"S_001"}, {"S_001": 0.02},
                                                 {"S_001": 0.01}, lambda structure: str(space_group(structure)))
    assert [(r["label"], r["z"], r["stage"], r["rank"], r["duplicate_of"], r["match"]) for r in records] == [
        ("S_000", 1, "ml_relaxed", 1, None, False), ("S_001", 1, "duplicate", 1, "S_000", True),
        ("S_002", 1, "implausible", None, None, False), ("S_003", 2, "invalid", None, None, False)]
    assert [r["ml_energy_per_atom"] for r in records] == [-2.0, -1.0, None, None]
    assert [(r["relaxation"], r["relax_steps"]) for r in records] == [("converged", 12), ("not_converged", 200),
                                                                      (None, None), (None, None)]
    assert records[0]["space_group"] == str(space_group(cubic_srtio3())) and "221" in records[0]["space_group"]
    assert [r["sampled_match"] for r in records] == [False, True, False, False]
    assert [r["match_rms"] for r in records] == [None, 0.02, None, None]
    assert [r["match_strain"] for r in records] == [None, 0.01, None, None]


def test_a_tiny_run_writes_one_record_per_candidate(fixture_data_dir, one_thread):
    """A perov_5 row, 3 candidates at 5 steps, Lennard-Jones for 10 steps: one record per candidate, consistent
    with the line's flags, a denoising loss at every t of the grid and a polish at every tolerance for each relaxed
    one, a second round of 2 copies of each of the 2 best groups and a fresh one of 4 samples, each with flags that
    agree with its records and the first round's, and the line is JSON."""
    from equicsp_core.checkpoint import load_model
    from equicsp_core.splits import Row, load_cifs
    from tests.test_relax import lennard_jones

    model, card = load_model("perov_5")
    cif = load_cifs("perov_5", [Row("test", 0)], fixture_data_dir)[0]
    options = argparse.Namespace(num_samples=3, steps=5, seed=0, fmax=0.05, relax_steps=10, denoising_loss=True,
                                 symmetry_polish=True, resample_from=300, resample_top=2, resample_copies=2,
                                 resample_steps=5, rerank_potential="lennard-jones", rerank_top=2)
    benchmark = load_benchmark()
    line = benchmark.run_row(0, cif, model, card, lennard_jones(), lennard_jones(), options)
    details = line["candidate_details"]
    assert [c["sample"] for c in details] == [0, 1, 2] and {c["z"] for c in details} == {1}
    assert line["relaxed_match"] == any(c["match"] for c in details)
    assert all((c["match_rms"] is not None) == c["match"] and (c["match_rms"] or 0) <= 0.5 for c in details)
    assert all((c["match_strain"] is not None) == c["match"] for c in details)
    assert line["sampled"] == any(c["sampled_match"] for c in details)
    ranked = [c for c in details if c["rank"] == 1 and c["duplicate_of"] is None]
    assert [c["label"] for c in ranked] == ([line["winner"]] if line["winner"] else [])
    assert all((c["ml_energy_per_atom"] is None) == (c["space_group"] is None) for c in details)
    assert all((c["denoising_loss"] is None) == (c["ml_energy_per_atom"] is None) for c in details)
    assert all(list(c["denoising_loss"]) == [str(t) for t in benchmark.T_GRID] for c in details if c["denoising_loss"])
    assert all(("polished" in c) == (c["ml_energy_per_atom"] is not None) for c in details)
    assert all(list(c["polished"]) == [str(s) for s in benchmark.POLISH_SYMPRECS] for c in details if "polished" in c)
    best = sorted((c["rank"], c["label"]) for c in details if c["rank"] and c["duplicate_of"] is None)[:2]
    resampled, fresh = line["resampled"]["candidates"], line["fresh"]["candidates"]
    assert [(c["label"], c["parent"]) for c in resampled] == [(f"{label}~{copy}", label) for _, label in best
                                                              for copy in (0, 1)]
    assert [(c["label"], c["parent"]) for c in fresh] == [(f"fresh~{index}", None) for index in range(4)]
    for kind in ("resampled", "fresh"):
        second = line[kind]
        assert second["relaxed_match"] == (line["relaxed_match"] or any(c["match"] for c in second["candidates"]))
        assert second["winner_second"] == ("~" in (second["winner"] or ""))
        assert all((c["ml_energy_per_atom"] is None) == (c["rank"] is None) for c in second["candidates"])
    groups = line["rerank"]["groups"]
    assert [(g["first_rank"], g["label"]) for g in groups] == (best if len(best) > 1 else [])
    assert line["rerank"]["winner"] in ([g["label"] for g in groups] or [line["winner"]])
    assert line["rerank"]["top1"] == (any(g["match"] and g["label"] == line["rerank"]["winner"] for g in groups)
                                      if groups else line["top1"])
    assert json.loads(json.dumps(line)) == line


def copper(lattice: str):
    """Copper's cubic cell, fcc or bcc, at EMT's lattice constant (3.589 and 2.854 Å)."""
    from ase.build import bulk
    from pymatgen.io.ase import AseAtomsAdaptor

    return AseAtomsAdaptor.get_structure(bulk("Cu", lattice, a=3.589 if lattice == "fcc" else 2.854, cubic=True))


def test_a_second_potential_reorders_the_shortlist_and_carries_the_first_populations():
    """A first ranking puts bcc copper first (two members, lower first energies) and fcc second; EMT puts fcc 33
    meV/atom below bcc (beyond the consensus window), so the rerank winner is fcc, by consensus and by energy alone,
    and each group record carries its first rank and population; with a shortlist of one, nothing is relaxed and
    the first winner stands."""
    from ase.calculators.emt import EMT

    from equicsp_core.metrics import rms_distance
    from equicsp_core.pipeline import rank

    relaxed = {"bcc_a": copper("bcc"), "bcc_b": copper("bcc"), "fcc": copper("fcc")}
    energies = {"bcc_a": -2.0, "bcc_b": -1.99, "fcc": -1.0}
    ranking = rank({label: {"status": "converged", "energy_per_atom": energy} for label, energy in energies.items()},
                   relaxed, top_k=1)

    def matches(structures):
        distances = {label: rms_distance(structure, copper("fcc")) for label, structure in structures.items()}
        return {label: distance for label, distance in distances.items() if distance is not None}

    benchmark = load_benchmark()
    result = benchmark.rerank(ranking, relaxed, EMT(), RelaxSettings(fmax=0.01, steps=100), matches, top=3)
    assert (result["winner"], result["top1"], result["winner_by_energy"], result["top1_by_energy"]) == (
        "fcc", True, "fcc", True)
    assert [(g["label"], g["first_rank"], g["members"], g["match"]) for g in result["groups"]] == [
        ("bcc_a", 1, 2, False), ("fcc", 2, 1, True)]
    assert result["groups"][1]["energy_per_atom"] == pytest.approx(-0.00703, abs=1e-4)
    alone = benchmark.rerank(ranking, relaxed, EMT(), RelaxSettings(fmax=0.01, steps=100), matches, top=1)
    assert (alone["reranked"], alone["winner"], alone["top1"], alone["groups"]) == (0, "bcc_a", False, [])


def test_the_denoising_loss_of_a_known_perovskite_is_below_that_of_its_rattled_copy():
    """The shipped perov_5 model on a cubic perovskite and on the same cell with every atom moved by 0.3 Å: the
    known structure is the more typical one at every t of the grid (each t: the same noise for both crystals)."""
    from equicsp_core.checkpoint import load_model

    model, _ = load_model("perov_5")
    rattled = cubic_srtio3()
    rattled.perturb(0.3)
    losses = load_benchmark().denoising_losses(model, {"known": cubic_srtio3(), "rattled": rattled})
    assert all(losses["known"][t] < losses["rattled"][t] for t in losses["known"])


def test_the_symmetry_polish_relaxes_a_distorted_cell_again_from_its_symmetric_self():
    """fcc Cu (EMT) with every atom moved by up to 0.08 Å: P1 at 0.1 Å (no rung), C2/m at 0.25 and Fm-3m at 0.5, so
    the two looser rungs each symmetrise it and relax it again, and the Fm-3m one matches the known cell; the same
    cell at 0.02 Å is Fm-3m from 0.1 Å, and the looser rungs repeat that first outcome."""
    import numpy as np
    from ase.calculators.emt import EMT
    from pymatgen.core import Lattice, Structure
    from pymatgen.io.ase import AseAtomsAdaptor

    from equicsp_core.screening import space_group

    known = Structure(Lattice.cubic(3.59), ["Cu"] * 4, [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])

    def moved(amount):
        moves = np.random.default_rng(0).uniform(-amount, amount, (4, 3))
        return Structure(known.lattice, known.species, known.cart_coords + moves, coords_are_cartesian=True)

    settings = RelaxSettings(potential="ase.calculators.emt:EMT", fmax=0.01, steps=100)
    distorted = moved(0.08)
    assert [space_group(distorted, symprec).number for symprec in (0.1, 0.25, 0.5)] == [1, 12, 225]
    outcomes = load_benchmark().symmetry_polish(distorted, EMT(), settings, known)
    assert list(outcomes) == ["0.1", "0.25", "0.5"] and outcomes["0.1"] is None
    assert outcomes["0.25"] is not outcomes["0.5"] and outcomes["0.25"]["status"] == "converged"
    assert outcomes["0.5"]["match"] and "225" in outcomes["0.5"]["space_group"]
    as_relaxed = AseAtomsAdaptor.get_atoms(distorted)
    as_relaxed.calc = EMT()
    assert outcomes["0.5"]["energy_per_atom"] < as_relaxed.get_potential_energy() / 4
    slightly = load_benchmark().symmetry_polish(moved(0.02), EMT(), settings, known)
    assert slightly["0.1"]["match"] and slightly["0.25"] is slightly["0.1"] and slightly["0.5"] is slightly["0.1"]


def test_the_denoising_loss_is_for_equicsp_csp_models():
    from equicsp_core.diffusion import CrystalDiffusion, DiffusionConfig
    from equicsp_core.network import DenoiserConfig

    model = CrystalDiffusion(DenoiserConfig(mode="diffcsp", hidden_dim=8, num_layers=1, num_freqs=2, time_dim=8),
                             DiffusionConfig(lattice_perm="none"))
    with pytest.raises(ValueError, match="EquiCSP CSP models only"):
        load_benchmark().denoising_losses(model, {"known": cubic_srtio3()})


def test_the_summary_reads_lines_with_and_without_candidate_details(tmp_path):
    """A line written before the records (from the committed results) and two with them: the fractions over all
    three; over the two, the missed-rank histogram, the ML energy of the found structure above the winner's and
    whether the missing row's winner has no symmetry."""
    old = json.loads(OLD_LINES.read_text().splitlines()[0])
    assert "candidate_details" not in old

    def detailed(row, found_rank, top1):
        records = [{"label": f"X_00{rank}", "rank": rank, "match": rank == found_rank, "duplicate_of": None,
                    "ml_energy_per_atom": -5.0 + 0.01 * rank, "space_group": "P1 (1)" if rank == 1 else "Pm-3m (221)"}
                   for rank in (1, 2, 3)]
        return {**old, "row": row, "relaxed_match": True, "top1": top1, "candidate_details": records}

    first, second = tmp_path / "part0.jsonl", tmp_path / "part1.jsonl"  # the parts of one run
    first.write_text("".join(json.dumps(line) + "\n" for line in (old, detailed(7, 3, False))))
    second.write_text(json.dumps(detailed(8, 1, True)) + "\n")
    summary = load_benchmark().summary([first, second])
    assert summary["compositions"] == 3 and summary["with_candidate_details"] == 2
    assert summary["relaxed_match"] == round(100 * (old["relaxed_match"] + 2) / 3, 1)
    assert summary["found_not_top1_by_best_match_rank"] == {"3": 1} and summary["top3"] == 100.0
    assert summary["found_not_top1_energy_above_winner_meV"] == [20.0] and summary["found_not_top1_winner_p1"] == 1


def test_the_summary_counts_close_matches_where_the_records_hold_their_rms(tmp_path):
    """Three compositions: found at RMS 0.1 and ranked first; found at 0.45 only (a near miss) and ranked first;
    found at 0.2 but not ranked first (the winner a non-match). Close (RMS <= 0.25): found 2 of 3, first 1 of 3."""
    def line(row, rms_of_winner, rms_of_other):
        records = [{"label": "A", "rank": 1, "match": rms_of_winner is not None, "match_rms": rms_of_winner},
                   {"label": "B", "rank": 2, "match": rms_of_other is not None, "match_rms": rms_of_other}]
        return {"row": row, "winner": "A", "candidate_details": records}

    close = load_benchmark().close_matches([line(1, 0.1, None), line(2, 0.45, None), line(3, None, 0.2)])
    assert close == {"with_match_rms": 3, "relaxed_match_rms_0.25": 66.7, "top1_rms_0.25": 33.3,
                     "top1_over_any_rms_0.25": 50.0}
    assert load_benchmark().close_matches([json.loads(OLD_LINES.read_text().splitlines()[0])]) == {}


def test_the_summary_counts_same_phase_matches_where_the_records_hold_their_strain():
    """Three compositions: the winner a match of shape strain 0.01 (the same phase); the winner a match of strain
    0.15 (a strained relative: the limit is 0.1) and no other; a non-winner of 0.02. Same phase: found 2 of 3, first
    1 of 3; lines written before the strain was recorded are not counted."""
    def line(row, strain_of_winner, strain_of_other):
        records = [{"label": "A", "match": strain_of_winner is not None, "match_strain": strain_of_winner},
                   {"label": "B", "match": strain_of_other is not None, "match_strain": strain_of_other}]
        return {"row": row, "winner": "A", "candidate_details": records}

    same = load_benchmark().same_phase_matches([line(1, 0.01, None), line(2, 0.15, None), line(3, None, 0.02)])
    assert same == {"with_match_strain": 3, "relaxed_match_same_phase": 66.7, "top1_same_phase": 33.3,
                    "top1_over_any_same_phase": 50.0}
    assert load_benchmark().same_phase_matches([json.loads(OLD_LINES.read_text().splitlines()[0])]) == {}


def test_the_summary_pairs_the_resampled_round_with_its_fresh_control(tmp_path):
    """Three rows with both second rounds: per round the found %, found within RMS 0.25 (the first round's
    candidates count for every round), top-1 %, the second-round winners and the round's own mean seconds; the rows
    only one second round ranks right, with the sign test; a line without second rounds is left out of them."""
    def line(row, first, resampled, fresh, first_rms=None, resampled_rms=None):
        def rounds(top1, seconds, rms):
            return {"relaxed_match": True, "top1": top1, "winner_second": top1, "seconds": seconds,
                    "candidates": [{"match_rms": rms}]}

        return {"row": row, "formula": f"X{row}", "sampled": True, "relaxed_match": True, "top1": first,
                "known_z": 1, "seconds": 100.0, "sampling_seconds": 1.0,
                "candidate_details": [{"label": "A", "match": True, "match_rms": first_rms or 0.4, "rank": 1,
                                       "duplicate_of": None, "ml_energy_per_atom": -1.0, "space_group": "P1 (1)"}],
                "winner": "A", "resampled": rounds(resampled, 20.0, resampled_rms), "fresh": rounds(fresh, 30.0, None)}

    path = tmp_path / "d.jsonl"
    lines = [line(1, True, True, False, first_rms=0.1), line(2, False, True, False, resampled_rms=0.2),
             line(3, False, False, True)]
    path.write_text("".join(json.dumps(one) + "\n" for one in lines) + json.dumps(
        {"row": 4, "formula": "X4", "sampled": False, "relaxed_match": False, "top1": False, "known_z": 1,
         "seconds": 5.0, "sampling_seconds": 1.0}) + "\n")
    rounds = load_benchmark().summary([path])["second_rounds"]
    assert rounds["rows"] == 3
    assert rounds["first"] == {"relaxed_match": 100.0, "relaxed_match_rms_0.25": 33.3, "top1": 33.3,
                               "winner_second": 0, "mean_seconds": 50.0}
    assert rounds["resampled"] == {"relaxed_match": 100.0, "relaxed_match_rms_0.25": 66.7, "top1": 66.7,
                                   "winner_second": 2, "mean_seconds": 20.0}
    assert rounds["fresh"] == {"relaxed_match": 100.0, "relaxed_match_rms_0.25": 33.3, "top1": 33.3,
                               "winner_second": 1, "mean_seconds": 30.0}
    assert rounds["top1_only_resampled"] == ["X1", "X2"] and rounds["top1_only_fresh"] == ["X3"]
    assert rounds["sign_test_p"] == 1.0


def test_the_summary_pairs_the_rerank_with_the_first_ranking(tmp_path):
    """Three rows with a rerank and one without: top-1 of the first ranking, of the rerank's consensus and of its
    energy alone over the three, the rows only one of the first and the consensus ranks first, the sign test and the
    step's mean seconds."""
    def line(row, first, consensus, by_energy, seconds):
        return {"row": row, "formula": f"X{row}", "sampled": True, "relaxed_match": True, "top1": first, "known_z": 1,
                "seconds": 100.0, "sampling_seconds": 1.0,
                "rerank": {"top1": consensus, "top1_by_energy": by_energy, "seconds": seconds}}

    path = tmp_path / "d.jsonl"
    lines = [line(1, True, True, False, 10.0), line(2, False, True, True, 20.0), line(3, True, False, True, 30.0),
             {"row": 4, "formula": "X4", "sampled": False, "relaxed_match": False, "top1": False, "known_z": 1,
              "seconds": 5.0, "sampling_seconds": 1.0}]
    path.write_text("".join(json.dumps(one) + "\n" for one in lines))
    assert load_benchmark().summary([path])["rerank"] == {
        "rows": 3, "top1_first": 66.7, "top1_rerank": 66.7, "top1_rerank_by_energy": 66.7,
        "top1_only_rerank": ["X2"], "top1_only_first": ["X3"], "sign_test_p": 1.0, "mean_seconds": 20.0}


def test_an_output_file_holds_one_split(tmp_path, monkeypatch, capsys):
    """Rows of the selection split are never written into a file of reserved rows (nor the reverse): the row
    indices of the two splits are of different files."""
    out = tmp_path / "d.jsonl"
    out.write_text(json.dumps({"row": 4, "formula": "Cu1Ni1"}) + "\n")  # a line from before --split: reserved
    monkeypatch.setattr("sys.argv", ["discovery.py", "--split", "selection", "--out", str(out)])
    with pytest.raises(SystemExit) as stopped:
        load_benchmark().main()
    assert stopped.value.code == 2
    assert f"{out} holds rows with split reserved, not selection: use another --out" in capsys.readouterr().err


def test_an_output_file_holds_one_potential(tmp_path, monkeypatch, capsys):
    """Rows relaxed with one potential are never mixed with another's: the two rankings are what is compared."""
    out = tmp_path / "d.jsonl"
    out.write_text(json.dumps({"row": 4, "split": "selection", "formula": "Cu1Ni1"}) + "\n")  # before --potential
    monkeypatch.setattr("sys.argv",
                        ["discovery.py", "--split", "selection", "--potential", "sevennet", "--out", str(out)])
    with pytest.raises(SystemExit) as stopped:
        load_benchmark().main()
    assert stopped.value.code == 2
    assert f"{out} holds rows with potential chgnet, not sevennet: use another --out" in capsys.readouterr().err


def test_an_output_file_holds_one_number_of_candidates(tmp_path, monkeypatch, capsys):
    """Resuming with another k would mix two runs in one file (the figures are per k); a setting a line does not
    record (the seed, before it was recorded) is not held against it."""
    out = tmp_path / "d.jsonl"
    out.write_text(json.dumps({"row": 4, "split": "reserved", "potential": "chgnet", "checkpoint": "mp_20",
                               "num_samples": 8, "steps": 100, "formula": "Cu1Ni1"}) + "\n")
    monkeypatch.setattr("sys.argv", ["discovery.py", "--num-samples", "20", "--steps", "100", "--out", str(out)])
    with pytest.raises(SystemExit) as stopped:
        load_benchmark().main()
    assert stopped.value.code == 2
    assert f"{out} holds rows with num_samples 8, not 20: use another --out" in capsys.readouterr().err


def test_an_output_file_holds_one_model(tmp_path, monkeypatch, capsys):
    """A shipped name stands for other weights once a new model is shipped under it: rows sampled by the earlier
    weights are not resumed with the new ones."""
    out = tmp_path / "d.jsonl"
    out.write_text(json.dumps({"row": 4, "split": "reserved", "potential": "chgnet", "checkpoint": "perov_5",
                               "model_sha256": "0" * 64, "formula": "Cu1Ni1"}) + "\n")
    monkeypatch.setattr("sys.argv", ["discovery.py", "--checkpoint", "perov_5", "--out", str(out)])
    with pytest.raises(SystemExit) as stopped:
        load_benchmark().main()
    assert stopped.value.code == 2
    shipped = read_checkpoint("perov_5")["model_sha256"]
    assert f"{out} holds rows with model_sha256 {'0' * 64}, not {shipped}: use another --out" in capsys.readouterr().err


def test_the_summary_refuses_parts_that_share_a_row(tmp_path):
    """Two files holding the same row are not the parts of one run: counting both would weigh that row twice."""
    line = json.loads(OLD_LINES.read_text().splitlines()[0])
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for path in (first, second):
        path.write_text(json.dumps(line) + "\n")
    with pytest.raises(SystemExit, match="a row is in more than one line: not the parts of one run"):
        load_benchmark().summary([first, second])


@pytest.mark.parametrize("part, message", [("2/2", "--part 2/2: needs 0 <= i < n"),
                                           ("1-2", "--part '1-2': expected i/n, two integers")])
def test_a_part_outside_its_run_is_refused(tmp_path, monkeypatch, capsys, part, message):
    monkeypatch.setattr("sys.argv", ["discovery.py", "--part", part, "--out", str(tmp_path / "d.jsonl")])
    with pytest.raises(SystemExit) as stopped:
        load_benchmark().main()
    assert stopped.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "d.jsonl").exists()


def test_two_runs_are_compared_on_their_common_rows_with_a_sign_test(tmp_path):
    """Run A ranks the known structure first in rows 1-3, run B in rows 3-4 (row 5 only in A): on the four common
    rows A alone wins two and B alone one, a split whose two-sided sign-test chance is 1 (3 trials, 1 the fewer:
    2 × (1 + 3) / 8); the samples agree where the sampled-match patterns do."""
    def line(row, top1, pattern=(True, False)):
        return {"row": row, "formula": f"X{row}", "sampled": any(pattern), "relaxed_match": True, "top1": top1,
                "seconds": 10.0 * row, "candidate_details": [{"sampled_match": flag} for flag in pattern]}

    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text("".join(json.dumps(line(row, row <= 3)) + "\n" for row in (1, 2, 3, 4, 5)))
    second.write_text("".join(json.dumps(line(row, row >= 3, (True, row == 4))) + "\n" for row in (1, 2, 3, 4)))
    result = load_benchmark().compare([first], [second])
    assert result["rows"] == 4 and result["same_samples"] == 3
    assert result["top1"] == [3, 2] and result["relaxed_match"] == [4, 4]
    assert result["top1_only_first"] == ["X1", "X2"] and result["top1_only_second"] == ["X4"]
    assert result["sign_test_p"] == 1.0 and result["mean_seconds"] == [25.0, 25.0]


def test_a_lopsided_split_has_a_small_sign_test_chance(tmp_path):
    """Six rows that only the first run ranks right: 2 / 2**6 = 0.03125."""
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for path, top1 in ((first, True), (second, False)):
        path.write_text("".join(json.dumps({"row": row, "formula": f"X{row}", "sampled": True, "relaxed_match": True,
                                            "top1": top1, "seconds": 1.0}) + "\n" for row in range(6)))
    result = load_benchmark().compare([first], [second])
    assert result["sign_test_p"] == 0.0312 and result["same_samples"] == 0  # no candidate records to compare


def test_against_without_summary_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["discovery.py", "--out", str(tmp_path / "a.jsonl"), "--against", "b.jsonl"])
    with pytest.raises(SystemExit) as stopped:
        load_benchmark().main()
    assert stopped.value.code == 2 and "--against compares two finished runs" in capsys.readouterr().err
