"""EquiCSP engine: equivariant diffusion for crystal structure prediction, in pure PyTorch + pymatgen.

Lin et al., "Equivariant Diffusion for Crystal Structure Prediction", ICML 2024; the DiffCSP baseline
(Jiao et al., NeurIPS 2023) is a mode of the same code. Method notes: ``docs/method.md``.
"""

__version__ = "0.1.0"
