"""EquiCSP engine: equivariant diffusion for crystal structure prediction, in pure PyTorch + pymatgen.

Lin et al., "Equivariant Diffusion for Crystal Structure Prediction", ICML 2024; the DiffCSP baseline
(Jiao et al., NeurIPS 2023) is a mode of the same code. Method notes: ``docs/method.md``.
"""

import logging

__version__ = "0.1.0"

# A library logs and leaves the output to the application (the ``equicsp`` command configures it).
logging.getLogger(__name__).addHandler(logging.NullHandler())
