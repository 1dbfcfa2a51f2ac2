"""A stub interatomic potential for pipeline tests: Lennard-Jones for every element (ASE), milliseconds per step.

Named ``tests.stub_potential:lennard_jones`` where a potential is a setting (the ``equicsp relax`` program, the
relax CalcJob, the jobflow relax Maker).
"""

from ase.calculators.lj import LennardJones


def lennard_jones(device: str = "cpu") -> LennardJones:
    """Lennard-Jones with σ = 2 Å, ε = 0.1 eV, smoothly cut at 5 Å, whatever the elements."""
    return LennardJones(sigma=2.0, epsilon=0.1, rc=5.0, smooth=True)


#: The stub's name as a ``potential`` setting.
STUB_POTENTIAL = "tests.stub_potential:lennard_jones"
