"""equicsp_core.dft: which structures are relaxed spin-polarised and from which moments, what a DFT level says."""

import pytest

from equicsp_core.dft import (
    MAGNETIC_ELEMENTS,
    MAX_KPOINTS_DISTANCE,
    dft_level,
    high_spin_moment,
    initial_moments,
    magnetisation_note,
    quick_look_reasons,
    shell_electrons,
    spin_moments,
)
from equicsp_core.settings import DFTSettings, SettingsError


@pytest.mark.parametrize(("formula", "expected"), [
    ("SrTiO3", {}),                                  # Ti4+: d0
    ("TiO2", {}),
    ("ZnO", {}),                                     # no magnetic element
    ("GaAs", {}),
    ("CeO2", {}),                                    # Ce4+: f0
    ("Fe2O3", {"Fe": 5.0, "O": 0.0}),                # Fe3+: d5, high spin
    ("NiO", {"Ni": 2.0, "O": 0.0}),                  # Ni2+: d8
    ("CuO", {"Cu": 1.0, "O": 0.0}),                  # Cu2+: d9
    ("LaTiO3", {"La": 0.0, "Ti": 1.0, "O": 0.0}),    # Ti3+: d1 (pymatgen's first guess)
    ("Gd2O3", {"Gd": 7.0, "O": 0.0}),                # Gd3+: f7
    ("UO2", {"U": 2.0, "O": 0.0}),                   # U4+: f2
    ("Fe", {"Fe": 5.0}),                             # a metal: the half-shell start
    ("FeAl", {"Fe": 5.0, "Al": 0.0}),                # no ionic picture: as a metal
])
def test_initial_moments_follow_the_open_shells(formula, expected):
    assert initial_moments(formula) == expected


def test_mixed_valence_gives_a_fractional_start():
    """Fe3O4: Fe at 8/3, 5.33 d electrons, 4.67 μB high spin."""
    assert initial_moments("Fe3O4")["Fe"] == pytest.approx(14 / 3)


def test_shell_counts():
    assert shell_electrons("Fe", 3) == ("d", 5.0)
    assert shell_electrons("Ti", 4) == ("d", 0.0)
    assert shell_electrons("Zn", 2) == ("d", 10.0)
    assert shell_electrons("Yb", 2) == ("f", 14.0)
    assert shell_electrons("Eu", 2) == ("f", 7.0)
    assert high_spin_moment("d", 6) == 4.0 and high_spin_moment("f", 7) == 7.0 and high_spin_moment("d", 10) == 0


def test_the_magnetic_set_holds_the_open_shell_metals_only():
    assert {"Fe", "Co", "Ni", "Mn", "Cr", "V", "Ti", "Cu", "Ru", "Ir", "Gd", "U"} <= MAGNETIC_ELEMENTS
    assert not {"Sc", "Y", "La", "Lu", "Zn", "Cd", "Hg", "O", "Sr", "Ba", "Si", "Ga"} & MAGNETIC_ELEMENTS


def test_spin_setting():
    assert spin_moments("Fe2O3", "none") == {}
    assert spin_moments("Fe2O3", "auto") == spin_moments("Fe2O3", "collinear") == {"Fe": 5.0, "O": 0.0}
    assert spin_moments("SrTiO3", "auto") == {}
    assert spin_moments("SrTiO3", "collinear") == {"Sr": 1.0, "Ti": 1.0, "O": 1.0}  # a start somewhere
    assert DFTSettings().spin == "auto"
    with pytest.raises(SettingsError, match="spin: Input should be 'auto', 'collinear' or 'none'"):
        DFTSettings(spin="ferro")


def test_symmetrisation_tolerance_is_noise_level():
    """0.01 Å by default: noise level (docs/aiida.md "DFT settings", benchmarks/symprec_before_dft.py)."""
    assert DFTSettings().symprec == 0.01


@pytest.mark.parametrize(("arguments", "expected"), [
    (("balanced", 0.15, 90, 90), []),
    (("stringent", 0.10, 100, 90), []),
    (("balanced", MAX_KPOINTS_DISTANCE, 90, 90), []),
    (("fast", 0.3, 90, 90), ["fast protocol"]),
    (("balanced", 0.8, 90, 90), ["k spacing 0.8 1/Å > 0.3"]),
    (("balanced", 0.15, 30, 90), ["cut-off 30 Ry < recommended 90"]),
    (("balanced", None, None, None), []),
])
def test_quick_look_reasons(arguments, expected):
    assert quick_look_reasons(*arguments) == expected


def test_dft_level_names_functional_code_protocol_spin_and_quick_look():
    assert dft_level("PBE", "QE", "balanced", True) == "PBE, QE, balanced, spin-polarised"
    assert dft_level("PBE", "QE", "fast", False, ["fast protocol"]) == "PBE, QE, fast (quick look)"
    assert dft_level("PBE", "QE", "balanced", False, ["k spacing 0.8 1/Å > 0.3"]) == \
        "PBE, QE, balanced (quick look: k spacing 0.8 1/Å > 0.3)"


def test_magnetisation_note():
    assert magnetisation_note(None, None, 2) is None
    assert magnetisation_note(0.001, 0.002, 2) == "spin-polarised, converged to no magnetic moment"
    assert magnetisation_note(4.4, 4.6, 2) == \
        "final magnetisation 4.40 μB/cell (2.20 μB/atom), absolute 4.60 μB/cell"


def test_symmetrisation_note_names_the_group_held_or_none():
    from pymatgen.core import Lattice, Structure

    from equicsp_core.dft import symmetrisation_note

    cubic = Structure(Lattice.cubic(3.9), ["Sr", "Ti", "O", "O", "O"],
                      [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    assert symmetrisation_note(cubic, 0.01) == \
        "symmetrised at 0.01 Å to Pm-3m (221) for DFT (the DFT relaxation keeps this symmetry)"
    skewed = Structure(Lattice([[3.9, 0.1, 0.2], [0.05, 4.1, 0.3], [0.1, 0.2, 4.3]]), ["Sr", "Ti", "O", "O", "O"],
                       [[0, 0, 0], [0.52, 0.47, 0.55], [0.5, 0.43, 0.02], [0.56, 0.04, 0.5], [0.03, 0.5, 0.41]])
    assert symmetrisation_note(skewed, 0.01) == "no symmetry at 0.01 Å: the DFT relaxation is held to none"
