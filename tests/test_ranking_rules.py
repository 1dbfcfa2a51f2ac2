"""``benchmarks/ranking_rules.py``: each rule's pick on hand-made candidate records, and the ``energy`` rule
reproducing the top-1 that ``benchmarks/discovery.py`` recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
RECORDED = ROOT / "benchmarks" / "results" / "discovery_mp20_stage2_e100_prior.jsonl"


def load_rules():
    return load_script("benchmarks/ranking_rules.py")


def record(label, energy, group, rank, duplicate_of=None, match=False):
    return {"label": label, "ml_energy_per_atom": energy, "space_group": group, "rank": rank,
            "duplicate_of": duplicate_of, "match": match}


# Lowest: a P1 cell; 20 meV/atom above it a cubic one sampled twice; 60 above it a tetragonal one sampled three times.
LINE = {"relaxed_match": True, "candidate_details": [
    record("A", -5.000, "P1 (1)", 1),
    record("B", -4.980, "Pm-3m (221)", 2, match=True), record("B2", -4.979, "Pm-3m (221)", 2, duplicate_of="B"),
    record("C", -4.940, "P4/mmm (123)", 3), record("C2", -4.93, "P4/mmm (123)", 3, duplicate_of="C"),
    record("C3", -4.92, "P4/mmm (123)", 3, duplicate_of="C"),
    record("X", None, None, None),  # screened out: no relaxed structure, no group
]}


@pytest.mark.parametrize(("rule", "window", "picked"), [
    ("energy", 0, "A"),
    ("symmetry", 10, "A"), ("symmetry", 25, "B"), ("symmetry", 100, "B"),
    ("population", 25, "B"), ("population", 100, "C"),
    ("not_p1", 10, "A"), ("not_p1", 25, "B"), ("not_p1", 100, "B"),
])
def test_each_rule_picks_within_its_energy_window(rule, window, picked):
    rules = load_rules()
    representatives = rules.groups(LINE)
    assert {c["label"]: c["members"] for c in representatives} == {"A": 1, "B": 2, "C": 3}
    assert rules.pick(representatives, rule, window)["label"] == picked


# The model's denoising loss at t = 5 and 400: B is the most typical at small t, C over the whole grid.
LOSSES = {"A": {"5": 3.0, "400": 1.0}, "B": {"5": 1.0, "400": 2.0}, "C": {"5": 2.0, "400": 0.2}}


@pytest.mark.parametrize(("rule", "window", "picked"), [
    ("denoising", 10, "A"), ("denoising", 25, "B"), ("denoising", 100, "C"),
    ("denoising_small_t", 25, "B"), ("denoising_small_t", 100, "B"),
])
def test_the_denoising_rules_pick_the_lowest_loss_within_the_window(rule, window, picked):
    rules = load_rules()
    line = {**LINE, "candidate_details": [{**c, "denoising_loss": LOSSES.get(c["label"])}
                                          for c in LINE["candidate_details"]]}
    assert rules.pick(rules.groups(line), rule, window)["label"] == picked


def test_population_ties_are_broken_by_the_denoising_loss_instead_of_the_energy():
    """Two single-member groups 10 meV/atom apart: ``population`` takes the lower energy, ``population_denoising``
    the lower denoising loss; a group with more members still comes first."""
    rules = load_rules()
    singles = {"relaxed_match": True, "candidate_details": [
        {**record("A", -5.000, "P1 (1)", 1), "denoising_loss": {"5": 3.0}},
        {**record("D", -4.990, "Fm-3m (225)", 2, match=True), "denoising_loss": {"5": 1.0}}]}
    assert rules.pick(rules.groups(singles), "population", 25)["label"] == "A"
    assert rules.pick(rules.groups(singles), "population_denoising", 25)["label"] == "D"
    line = {**LINE, "candidate_details": [{**c, "denoising_loss": LOSSES.get(c["label"])}
                                          for c in LINE["candidate_details"]]}
    assert rules.pick(rules.groups(line), "population_denoising", 100)["label"] == "C"  # three members


def test_population_ties_are_broken_by_the_fewest_relaxation_steps_then_the_energy():
    """Three single-member groups within 25 meV/atom: ``population_steps`` takes the one that relaxed in fewest
    steps, the lower energy of two with equal steps; a group with more members still comes first."""
    rules = load_rules()
    singles = {"relaxed_match": True, "candidate_details": [
        {**record("A", -5.000, "P1 (1)", 1), "relax_steps": 80},
        {**record("D", -4.990, "Fm-3m (225)", 2, match=True), "relax_steps": 12},
        {**record("E", -4.985, "Fm-3m (225)", 3), "relax_steps": 12}]}
    assert rules.pick(rules.groups(singles), "population", 25)["label"] == "A"
    assert rules.pick(rules.groups(singles), "population_steps", 25)["label"] == "D"
    line = {**LINE, "candidate_details": [{**c, "relax_steps": 5 if c["label"] == "A" else 50}
                                          for c in LINE["candidate_details"]]}
    assert rules.pick(rules.groups(line), "population_steps", 100)["label"] == "C"  # three members


def test_the_polish_replaces_a_candidate_by_its_lower_symmetrised_self_up_to_the_tolerance():
    """B's duplicate B2, symmetrised at 0.25 Å and relaxed again, falls 40 meV/atom below A: from 0.25 Å the group
    B (its representative now carrying B2's polished energy, group and match) is first; at 0.1 Å nothing changes.
    A polish that ends higher than the relaxed candidate is ignored."""
    rules = load_rules()
    polish = {"A": {"0.1": {"energy_per_atom": -4.9, "space_group": "Pm (6)", "match": True}},
              "B2": {"0.1": None, "0.25": {"energy_per_atom": -5.02, "space_group": "Pm-3m (221)", "match": True}}}
    line = {**LINE, "relaxed_match": False, "candidate_details": [
        {**c, "match": False, "polished": polish.get(c["label"], {})} for c in LINE["candidate_details"]]}
    assert rules.pick(rules.groups(rules.polished(line, 0.1)), "energy", 0)["label"] == "A"
    after = rules.polished(line, 0.25)
    first = rules.pick(rules.groups(after), "energy", 0)
    assert (first["label"], first["ml_energy_per_atom"], first["match"]) == ("B", -5.02, True)
    assert after["relaxed_match"] and not line["relaxed_match"]
    assert rules.score([line], "energy", 0, polish=0.25)["top1"] == 1
    assert rules.score([line], "energy", 0)["top1"] == 0


def test_a_composition_without_relaxed_candidates_counts_as_a_miss():
    rules = load_rules()
    refused = {"relaxed_match": False, "refused": "no cell size fits"}
    scored = rules.score([LINE, refused], "symmetry", 25)
    assert (scored["compositions"], scored["found"], scored["top1"], scored["top1_percent"]) == (2, 1, 1, 50.0)


def test_the_energy_rule_reproduces_the_recorded_top1():
    rules = load_rules()
    lines = [json.loads(text) for text in RECORDED.read_text().splitlines() if text.strip()]
    assert rules.score(lines, "energy", 0)["top1"] == sum(line["top1"] for line in lines) == 5


def test_two_rules_are_paired_row_by_row_with_a_sign_test():
    """On LINE, population picks the cubic group (a match) and energy the P1 cell (not); on a copy where only the P1
    cell matches, the reverse: one gained and one lost by going from energy to population, p = 1."""
    swapped = {**LINE, "formula": "Y", "candidate_details": [
        {**c, "match": c["label"] == "A"} for c in LINE["candidate_details"]]}
    result = load_rules().paired([{**LINE, "formula": "X"}, swapped], "energy", "population", 25)
    assert (result["top1"], result["gained"], result["lost"], result["sign_test_p"]) == ([1, 1], ["X"], ["Y"], 1.0)


def test_an_unknown_rule_to_pair_is_refused_by_name(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["ranking_rules.py", "--pair", "energy", "popularity", str(tmp_path / "r.jsonl")])
    with pytest.raises(SystemExit) as stopped:
        load_rules().main()
    assert stopped.value.code == 2 and "--pair: unknown rule 'popularity'" in capsys.readouterr().err
