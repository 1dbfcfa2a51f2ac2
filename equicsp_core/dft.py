"""What the DFT stage is asked to do and what its numbers mean, once, for every route (no DFT code here).

Three decisions of the DFT stage and their descriptions live here, so the AiiDA work chain, the jobflow flow and
the docs say the same thing:

- **spin** (:func:`initial_moments`): a structure is relaxed spin-polarised (collinear, ferromagnetic start) when
  it holds an element of :data:`MAGNETIC_ELEMENTS` whose d or f shell is *partially* filled in some oxidation
  state that pymatgen finds likely for the composition (``Fe2O3``: Fe³⁺ d⁵, yes; ``SrTiO3``: Ti⁴⁺ d⁰, no;
  ``LaTiO3``: Ti³⁺ d¹, yes), or when no ionic picture fits (metals, intermetallics: ``Fe``, ``FeAl``, yes).
  The starting moment of such an element is its high-spin moment in that state (d⁵: 5 μB, d⁸: 2 μB), in a
  metal the largest of its shell (5 μB for d, 7 μB for f); every other atom starts at 0.
- **level** (:func:`dft_level`): what a DFT energy is (functional, code, protocol, spin), and whether it is only
  a quick look (:func:`quick_look_reasons`): the ``fast`` protocol, a k-point spacing above
  :data:`MAX_KPOINTS_DISTANCE`, or a plane-wave cut-off below the pseudopotential family's recommendation.
  Energies of different levels must not be compared; the ranking table puts the level beside each energy.
- **notes** (:func:`magnetisation_note`, :func:`symmetrisation_note`): what a user should read about a DFT
  result: its final magnetisation, the symmetry it was held to, handled events of the DFT code.

Units: magnetic moments in Bohr magnetons (μB) per cell or per atom as named, k-point spacings in 1/Å with the 2π
of the reciprocal lattice included (aiida-quantumespresso's ``kpoints_distance``: the mesh has ``ceil(|b_i| /
spacing)`` points along reciprocal vector ``b_i``, ``|b_i| = 2π / a_i`` for an orthogonal cell; VASP's
``KSPACING`` is the same convention), cut-offs in Ry.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pymatgen.core import Composition, Structure

#: Elements that may carry a magnetic moment: the d-block metals with a d shell that can be partially filled
#: (3d Ti-Cu, 4d Zr-Ag, 5d Hf-Au) and the lanthanides and actinides with a partially fillable f shell
#: (Ce-Yb, Th-Am). Sc, Y, La, Lu and the group-12 metals are left out: their ions are d⁰, f⁰, f¹⁴ or d¹⁰.
#: Whether such an element is magnetic in a given composition is decided by :func:`initial_moments`.
MAGNETIC_ELEMENTS = frozenset(
    "Ti V Cr Mn Fe Co Ni Cu "
    "Zr Nb Mo Tc Ru Rh Pd Ag "
    "Hf Ta W Re Os Ir Pt Au "
    "Ce Pr Nd Pm Sm Eu Gd Tb Dy Ho Er Tm Yb "
    "Th Pa U Np Pu Am".split())

#: The starting moment (μB) of a magnetic element where no oxidation state is known (a metal): a full high-spin
#: half shell, as aiida-quantumespresso's own default for these elements (``magnetization.yaml``).
METAL_MOMENTS = {"d": 5.0, "f": 7.0}

#: The largest k-point spacing (1/Å, 2π included) at which DFT energies resolve polymorphs: aiida-quantumespresso's
#: ``fast`` protocol uses exactly this, ``balanced`` 0.15, ``stringent`` 0.10. For a 4 Å cubic cell 0.3 gives a
#: 6×6×6 mesh, 0.15 an 11×11×11 one.
MAX_KPOINTS_DISTANCE = 0.3

#: Protocols that are a quick look whatever their parameters (the DFT protocols of ``predict_relax.yaml``).
QUICK_LOOK_PROTOCOLS = ("fast",)

#: Below this total and absolute magnetisation (μB per cell) a spin-polarised result is reported non-magnetic.
NON_MAGNETIC_BELOW = 0.01


def _shell(element: str) -> tuple[str, int]:
    """The magnetic shell of ``element`` (``"d"`` or ``"f"``) and its electron count for oxidation state 0
    before any is given to the s shell: the d count is the group number, the f count that of the f-block
    position (Ce: 2, U: 3)."""
    from pymatgen.core import Element

    z = Element(element).Z
    if 57 <= z <= 71:
        return "f", z - 54  # f electrons of Ln³⁺: z - 57 (La³⁺ f⁰, Gd³⁺ f⁷, Yb³⁺ f¹³)
    if 89 <= z <= 103:
        return "f", z - 86  # U⁴⁺: f², Th⁴⁺: f⁰
    return "d", Element(element).group


def shell_electrons(element: str, oxidation_state: float) -> tuple[str, float]:
    """``(shell, electrons)`` of an ion: ``("d", 5.0)`` for Fe³⁺, ``("d", 0.0)`` for Ti⁴⁺, ``("f", 7.0)`` for Gd³⁺.

    The count is the group electrons less the oxidation state (fractional for mixed valence, Fe₃O₄: 5.33),
    clipped to the shell (0 to 10 for d, 0 to 14 for f).
    """
    shell, electrons = _shell(element)
    full = 10 if shell == "d" else 14
    return shell, min(max(electrons - oxidation_state, 0.0), float(full))


def high_spin_moment(shell: str, electrons: float) -> float:
    """The high-spin moment (μB) of a shell holding ``electrons``: unpaired electrons by Hund's rule."""
    half = 5.0 if shell == "d" else 7.0
    return float(min(electrons, 2 * half - electrons))


def initial_moments(composition: Composition | str) -> dict[str, float]:
    """Starting magnetic moments (μB per atom) of the elements of ``composition``; ``{}`` if it is non-magnetic.

    Non-empty when an element of :data:`MAGNETIC_ELEMENTS` has a partially filled shell in one of pymatgen's
    likely oxidation states of the composition (``Composition.oxi_state_guesses``), or when pymatgen finds none
    or only zero (a metal or an intermetallic). Every element of the composition is then a key: a magnetic one
    with its high-spin moment in the first such state (in a metal :data:`METAL_MOMENTS`), the others 0.

    >>> initial_moments("Fe2O3")
    {'Fe': 5.0, 'O': 0.0}
    >>> initial_moments("SrTiO3")
    {}
    """
    from pymatgen.core import Composition

    composition = Composition(composition)
    elements = [str(element) for element in composition]
    candidates = [element for element in elements if element in MAGNETIC_ELEMENTS]
    if not candidates:
        return {}
    guesses = composition.oxi_state_guesses()
    moments: dict[str, float] = {}
    for element in candidates:
        states = [guess[element] for guess in guesses]
        if not states or all(state == 0 for state in states):
            moments[element] = METAL_MOMENTS[_shell(element)[0]]
            continue
        for state in states:
            moment = high_spin_moment(*shell_electrons(element, state))
            if moment > 0:
                moments[element] = moment
                break
    if not moments:
        return {}
    return {element: moments.get(element, 0.0) for element in elements}


def spin_moments(composition: Composition | str, spin: str = "auto") -> dict[str, float]:
    """The starting moments (μB per atom, every element a key) of a spin-polarised run; ``{}``: not spin-polarised.

    ``spin`` is :class:`~equicsp_core.settings.DFTSettings`' knob: ``auto`` is :func:`initial_moments`,
    ``none`` never polarises, ``collinear`` always does (a composition without a magnetic element starting at
    1 μB on every atom, since a spin-polarised run needs a starting moment somewhere).
    """
    from pymatgen.core import Composition

    if spin == "none":
        return {}
    moments = initial_moments(composition)
    if spin == "auto" or moments:
        return moments
    if spin != "collinear":
        raise ValueError(f"spin must be auto, collinear or none, got {spin!r}")
    return {str(element): 1.0 for element in Composition(composition)}


def quick_look_reasons(protocol: str | None, kpoints_distance: float | None = None, ecutwfc: float | None = None,
                       recommended_ecutwfc: float | None = None) -> list[str]:
    """Why a DFT energy at these settings is only a quick look (``[]``: it resolves polymorphs).

    Args:
        protocol: the DFT protocol's name (``fast`` is a quick look by design).
        kpoints_distance: the k-point spacing used, 1/Å with 2π included; ``None``: an explicit mesh.
        ecutwfc: the wave-function cut-off used, Ry.
        recommended_ecutwfc: the pseudopotential family's recommended (default stringency) cut-off, Ry.
    """
    reasons = []
    if protocol in QUICK_LOOK_PROTOCOLS:
        reasons.append(f"{protocol} protocol")
    if kpoints_distance is not None and kpoints_distance > MAX_KPOINTS_DISTANCE + 1e-12:
        reasons.append(f"k spacing {kpoints_distance:g} 1/Å > {MAX_KPOINTS_DISTANCE:g}")
    if ecutwfc is not None and recommended_ecutwfc is not None and ecutwfc < recommended_ecutwfc - 1e-9:
        reasons.append(f"cut-off {ecutwfc:g} Ry < recommended {recommended_ecutwfc:g}")
    return reasons


def dft_level(functional: str, code: str, protocol: str | None, spin_polarised: bool,
              quick_look: Sequence[str] = (), single_point: bool = False) -> str:
    """What a DFT energy is, for the ranking table's ``dft_level`` column; ``single_point``: the energy of the
    ML-relaxed structure as it is (``relax_type`` ``none``), not of a DFT minimum, a level of its own.

    >>> dft_level("PBE", "QE", "balanced", True)
    'PBE, QE, balanced, spin-polarised'
    >>> dft_level("PBE", "QE", "fast", False, ["fast protocol", "k spacing 0.8 1/Å > 0.3"])
    'PBE, QE, fast (quick look: k spacing 0.8 1/Å > 0.3)'
    >>> dft_level("PBE", "QE", "balanced", False, single_point=True)
    'PBE, QE, balanced, single point at the ML geometry'
    """
    details = [reason for reason in quick_look if reason != f"{protocol} protocol"]
    level = f"{functional}, {code}, {protocol or 'default protocol'}"
    if quick_look:
        level += f" (quick look{': ' + ', '.join(details) if details else ''})"
    return level + (", spin-polarised" if spin_polarised else "") + (
        ", single point at the ML geometry" if single_point else "")


def magnetisation_note(total: float | None, absolute: float | None, atoms: int) -> str | None:
    """The final magnetisation of a spin-polarised result (μB per cell, ``atoms`` in the cell), or ``None`` when
    the result has none (a non-spin-polarised run)."""
    if total is None and absolute is None:
        return None
    total, absolute = total or 0.0, absolute or 0.0
    if abs(total) < NON_MAGNETIC_BELOW and absolute < NON_MAGNETIC_BELOW:
        return "spin-polarised, converged to no magnetic moment"
    return (f"final magnetisation {total:.2f} μB/cell ({total / atoms:.2f} μB/atom), "
            f"absolute {absolute:.2f} μB/cell")


def symmetrisation_note(symmetrised: Structure, symprec: float) -> str:
    """What the symmetrisation before DFT did: the space group the DFT code then keeps."""
    from equicsp_core.screening import space_group

    group = space_group(symmetrised, symprec=1e-4)
    if group.number == 1:
        return f"no symmetry at {symprec:g} Å: the DFT relaxation is held to none"
    return f"symmetrised at {symprec:g} Å to {group} for DFT (the DFT relaxation keeps this symmetry)"


def moments_note(moments: Mapping[str, float]) -> str:
    """The starting moments of a spin-polarised run, for its notes."""
    magnetic = ", ".join(f"{element} {moment:g}" for element, moment in moments.items() if moment)
    return f"spin-polarised (collinear), starting moments {magnetic} μB"
