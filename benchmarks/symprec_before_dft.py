"""How symmetric is a CHGNet-relaxed crystal, and what does symmetrising it before DFT impose?

The figures behind ``DFTSettings.symprec`` (0.01 Å) in docs/aiida.md "DFT settings": six 5-atom perovskite cells
(noisy cubic SrTiO3; BaTiO3 and PbTiO3 with Ti moved off-centre by 0.10 and 0.15 Å; two random starts each,
seed 0) relaxed with CHGNet (fmax 0.03 eV/Å, the ``balanced`` protocol's), then the space group spglib finds at
each tolerance and that of the cell :func:`equicsp_core.screening.symmetrized` makes at 0.01 and 0.05 Å. About
a minute on one CPU thread.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/symprec_before_dft.py
"""

import numpy as np
from pymatgen.core import Lattice, Structure

from equicsp_core.relax import chgnet_calculator, relax_structure
from equicsp_core.screening import space_group, symmetrized
from equicsp_core.settings import RelaxSettings

SITES = [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]]
CASES = [("SrTiO3 noisy cubic", ["Sr", "Ti", "O", "O", "O"], 3.9, None),
         ("BaTiO3 Ti +0.10 A", ["Ba", "Ti", "O", "O", "O"], 4.0, 0.10),
         ("PbTiO3 Ti +0.15 A", ["Pb", "Ti", "O", "O", "O"], 3.95, 0.15)]


def perturbed(rng: np.random.Generator, species: list[str], a: float, shift: float | None,
              noise: float = 0.03) -> Structure:
    """A cubic perovskite of lattice constant ``a`` (Å) with ``noise`` Å of Gaussian noise on the lattice and the
    positions, Ti moved by ``shift`` Å along c."""
    lattice = Lattice(np.eye(3) * a + rng.normal(0, noise, (3, 3)))
    frac = np.array(SITES, float) + rng.normal(0, noise / a, (5, 3))
    if shift is not None:
        frac[1, 2] += shift / a
    return Structure(lattice, species, frac % 1)


def main() -> None:
    calculator = chgnet_calculator()
    rng = np.random.default_rng(0)
    settings = RelaxSettings(fmax=0.03, steps=500)
    for name, species, a, shift in CASES:
        for trial in range(2):
            result = relax_structure(perturbed(rng, species, a, shift), calculator, settings)
            relaxed = result.structure
            found = {p: str(space_group(relaxed, symprec=p)) for p in (1e-4, 1e-3, 3e-3, 0.01, 0.02, 0.05, 0.1)}
            imposed = {p: str(space_group(symmetrized(relaxed, p), 1e-5)) for p in (0.01, 0.05)}
            print(f"{name} #{trial}: {result.status} E={result.energy_per_atom:.4f} eV/atom "
                  f"space group at symprec {found} symmetrised {imposed}", flush=True)


if __name__ == "__main__":
    main()
