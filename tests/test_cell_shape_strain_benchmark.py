"""``benchmarks/cell_shape_strain.py``: its perturbed starts and its summary."""

from __future__ import annotations

import json
import math
import random

import pytest
from pymatgen.core import Lattice, Structure

from equicsp_core.cell_shape import cell_shape_strain
from equicsp_core.metrics import PAPERS_MATCHER_TOLERANCES
from tests.scripts import load_script


def load_benchmark():
    return load_script("benchmarks/cell_shape_strain.py")


def test_a_perturbed_start_keeps_the_volume_has_the_stretch_and_moves_each_site_by_a_tenth_of_an_angstrom():
    structure = Structure(Lattice.from_parameters(4.1, 4.6, 5.3, 80, 95, 101), ["Na", "Cl"],
                          [[0, 0, 0], [0.4, 0.5, 0.6]])
    moved = load_benchmark().perturbed(structure, 0.05, random.Random("0-x"))
    assert moved.volume == pytest.approx(structure.volume, rel=1e-9)
    unmoved = Structure(moved.lattice, moved.species, structure.frac_coords)
    assert cell_shape_strain(unmoved, structure, **PAPERS_MATCHER_TOLERANCES) == pytest.approx(0.05, abs=1e-9)
    assert [site.distance(start) for site, start in zip(moved, unmoved)] == pytest.approx([0.1, 0.1], abs=1e-9)
    again = load_benchmark().perturbed(structure, 0.05, random.Random("0-x"))
    assert again.lattice == moved.lattice and again.frac_coords.tolist() == moved.frac_coords.tolist()


def test_the_summary_gives_percentiles_over_the_relaxed_entries_and_counts_the_matcher_s_misses(tmp_path):
    lines = [{"relaxation": "converged", "volume_change": 0.0, "strain_default": strain, "strain_papers": strain}
             for strain in [i / 100 for i in range(15)]]
    lines[0]["strain_default"] = None  # the default matcher does not match the relaxed cell
    lines.append({"relaxation": "failed", "volume_change": None, "strain_default": None, "strain_papers": None})
    path = tmp_path / "strains.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = load_benchmark().summary(path)
    assert (result["entries"], result["relaxed"], result["converged"]) == (16, 15, 15)
    assert result["strain_default"]["matched"] == 14 and result["strain_default"]["unmatched"] == 1
    assert result["strain_papers"]["p50"] == pytest.approx(0.07) and result["strain_papers"]["max"] == 0.14
    assert math.isclose(result["strain_default"]["p50"], 0.075)
    assert result["strain_papers"]["above_0.1"] == 4  # 0.11-0.14 lie above SAME_PHASE_SHAPE_STRAIN
