"""``benchmarks/chemical_system.py`` on a tiny case: Sr-Ti-O with perov_5, CHGNet for 20 steps, the small Sr-Ca-Ti-O
reference set (its SrTiO3 entry is the phase to find)."""

from __future__ import annotations

import argparse
import json

import pytest

from tests.scripts import load_script


def load_benchmark():
    return load_script("benchmarks/chemical_system.py")


@pytest.mark.slow
def test_the_system_s_own_entries_are_hidden_from_the_hull_and_scored(perovskite_reference_set, tmp_path, one_thread):
    pytest.importorskip("chgnet")
    from equicsp_core.checkpoint import load_model
    from equicsp_core.relax import load_calculator

    model, card = load_model("perov_5")
    options = argparse.Namespace(max_atoms=None, ehull_max=10.0, num_samples=3, steps=20, seed=1, fmax=0.05,
                                 relax_steps=20)
    cache = tmp_path / "energies.json"
    result = load_benchmark().explore("Sr-Ti-O", model, card, load_calculator("chgnet", "cpu"),
                                      perovskite_reference_set, options, cache)
    json.dumps(result)  # the file it writes
    assert result["compositions"] == ["SrTiO3"]  # perov_5: 5 atoms at most
    (hidden,) = result["hidden"]  # SrTiO3 (mp-5229); CaTiO3 is not of the system
    assert hidden["id"] == "mp-5229" and hidden["known_stable"] and hidden["enumerated"]
    assert result["known_stable"] == 1 and result["known_stable_enumerated"] == 1
    # the hidden entry was never relaxed for the hull: only the elements' references were
    relaxed_references = {key for level in json.loads(cache.read_text()).values() for records in level.values()
                          for key in records}
    assert relaxed_references and "mp-5229" not in relaxed_references
    assert result["merged"] >= 1 and result["no_hull"] == []
    predicted = result["predicted_stable"]  # ehull_max 10 eV/atom: every merged candidate with a hull
    assert len(predicted) == result["merged"]
    assert [line["ml_e_above_hull"] for line in predicted] == sorted(line["ml_e_above_hull"] for line in predicted)
    assert {label for line in predicted if line["matches"] != "new" for label in [line["label"]]} == set(
        hidden["matched_by"])
    assert hidden["found_stable"] == bool(hidden["matched_by"])
    assert result["compositions_per_hour"] > 0
