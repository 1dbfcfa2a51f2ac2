"""Relaxation of predicted crystals with a machine-learned interatomic potential (an ASE calculator).

A potential is named by a key of :data:`~equicsp_core.settings.POTENTIALS` (``chgnet``, ``sevennet``,
``sevennet-l3i5``) or given as ``"module:factory"``, a callable taking ``device=`` and returning an ASE calculator,
so any potential with an ASE calculator plugs in. Relaxation is ASE's FIRE on the positions, and on the cell through
``FrechetCellFilter`` when ``relax_cell`` is set; the energy reported is the calculator's total energy of the
final structure divided by the number of atoms (eV/atom).

A structure whose relaxation fails (the potential raises, the energy is not finite) gets the status
``failed`` and its error message; the others go on. Potentials are imported only when asked for: CHGNet
(the default; its PyPI package ships its weights) and SevenNet's ``7net-0`` and ``7net-l3i5`` (likewise) are
optional dependencies of the engine.
"""

from __future__ import annotations

import importlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from equicsp_core.hardware import resolve_device
from equicsp_core.settings import POTENTIALS, PotentialError, RelaxSettings

if TYPE_CHECKING:
    from ase.calculators.calculator import Calculator
    from pymatgen.core import Structure

logger = logging.getLogger(__name__)

#: Statuses of a relaxation: converged below ``fmax``, stopped at ``steps`` without converging, or failed.
STATUSES = ("converged", "not_converged", "failed")


def chgnet_calculator(device: str = "cpu") -> Calculator:
    """CHGNet's pretrained universal potential (weights shipped in the ``chgnet`` package).

    torch's warning that CHGNet turns a tensor that requires grad into a scalar (the cell volume, in its stress
    computation) is silenced: it is CHGNet's own code, harmless, and it was the one warning of every relaxation log.
    """
    import warnings

    from chgnet.model.dynamics import CHGNetCalculator

    class QuietCHGNetCalculator(CHGNetCalculator):
        def calculate(self, *args: Any, **kwargs: Any) -> None:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True to a scalar",
                                        category=UserWarning)
                super().calculate(*args, **kwargs)

    return QuietCHGNetCalculator(use_device=device, on_isolated_atoms="ignore")


def sevennet_calculator(device: str = "cpu") -> Calculator:
    """SevenNet's pretrained ``7net-0`` (weights shipped in the ``sevenn`` package)."""
    return _sevennet("7net-0", device)


def sevennet_l3i5_calculator(device: str = "cpu") -> Calculator:
    """SevenNet's pretrained ``7net-l3i5`` (weights shipped in the ``sevenn`` package): l_max 3 and five interaction
    layers, more accurate than ``7net-0`` on Matbench Discovery and about twice its cost per force call on a CPU."""
    return _sevennet("7net-l3i5", device)


def _sevennet(model: str, device: str) -> Calculator:
    """A SevenNet calculator of a pretrained ``model``.

    On a CPU, SevenNet's warning that no tensor-product accelerator is enabled is silenced: its accelerators
    (cuEquivariance, FlashTP, OpenEquivariance) are GPU kernels, so there is nothing to enable; on a GPU it stays.
    """
    import warnings

    from sevenn.calculator import SevenNetCalculator

    with warnings.catch_warnings():
        if device == "cpu":
            warnings.filterwarnings("ignore", message="No tensor product accelerator", category=UserWarning)
        return SevenNetCalculator(model=model, device=device)


def load_calculator(potential: str, device: str = "auto") -> Calculator:
    """The ASE calculator of ``potential`` (a key of :data:`POTENTIALS` or ``"module:factory"``) on ``device``.

    The factory gets the resolved torch device as text (``"cpu"``, ``"cuda:0"``; :func:`resolve_device`), so
    a device this machine lacks raises :class:`~equicsp_core.hardware.DeviceUnavailableError` before any
    weights load.
    """
    from ase.calculators.calculator import BaseCalculator

    device = str(resolve_device(device))
    target = POTENTIALS.get(potential, potential)
    module_name, _, attribute = target.partition(":")
    if not attribute:
        raise PotentialError(f"unknown potential {potential!r}: use one of {sorted(POTENTIALS)} or 'module:factory'")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise PotentialError(f"potential {potential!r} cannot be loaded: {error}") from error
    try:
        calculator = factory(device=device)
    except ImportError as error:
        raise PotentialError(f"potential {potential!r} is not installed: {error}") from error
    except TypeError as error:  # not callable as factory(device=...)
        raise PotentialError(f"potential {potential!r} is not a calculator factory: {error}") from error
    if not isinstance(calculator, BaseCalculator):
        raise PotentialError(f"potential {potential!r} is not a calculator factory: it returned a "
                             f"{type(calculator).__name__}, not an ASE calculator")
    return calculator


@dataclass
class RelaxResult:
    """Outcome of one relaxation; ``structure`` and ``energy_per_atom`` (eV/atom) are ``None`` when it failed."""

    status: str
    structure: Structure | None = None
    energy_per_atom: float | None = None
    steps: int = 0
    seconds: float = 0.0
    error: str | None = None
    phonons: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: the structure as pymatgen's dict."""
        return {
            "status": self.status,
            "structure": None if self.structure is None else self.structure.as_dict(),
            "energy_per_atom": self.energy_per_atom,
            "steps": self.steps,
            "seconds": round(self.seconds, 3),
            "error": self.error,
            "phonons": self.phonons,
        }


def relax_structure(structure: Structure, calculator: Calculator, settings: RelaxSettings) -> RelaxResult:
    """Relax one structure with ``calculator``; never raises for a failure of the potential or optimiser."""
    from ase.filters import FrechetCellFilter
    from ase.optimize import FIRE
    from pymatgen.io.ase import AseAtomsAdaptor

    started = time.perf_counter()
    try:
        atoms = AseAtomsAdaptor.get_atoms(structure)
        atoms.calc = calculator
        target = FrechetCellFilter(atoms) if settings.relax_cell else atoms
        optimizer = FIRE(target, logfile=None)
        converged = bool(optimizer.run(fmax=settings.fmax, steps=settings.steps))
        energy = float(atoms.get_potential_energy()) / len(atoms)
        if not math.isfinite(energy):
            raise FloatingPointError(f"energy is {energy}")
        final = AseAtomsAdaptor.get_structure(atoms)
        # ASE may leave fractional coordinates outside [0, 1) after cell moves; wrap for clean CIF files.
        final = final.__class__(final.lattice, final.species, final.frac_coords % 1.0)
    except Exception as error:  # a potential or optimiser failure ends this relaxation, not the run
        return RelaxResult("failed", steps=0, seconds=time.perf_counter() - started,
                           error=f"{type(error).__name__}: {error}")
    result = RelaxResult("converged" if converged else "not_converged", final, energy, optimizer.nsteps)
    if settings.phonons:
        from equicsp_core.phonons import dynamical_stability

        try:
            result.phonons = dynamical_stability(final, calculator)
        except Exception as error:  # a failed phonon check is reported; the relaxation stands
            result.phonons = {"error": f"{type(error).__name__}: {error}"}
    result.seconds = time.perf_counter() - started
    return result


def relax_structures(
    structures: Mapping[str, Structure],
    settings: RelaxSettings,
    calculator_factory: Callable[[str, str], Calculator] = load_calculator,
) -> Iterator[tuple[str, RelaxResult]]:
    """Relax each labelled structure in turn, yielding ``(label, result)`` as each finishes.

    The calculator is built once (loading a potential's weights costs seconds) and reused.
    """
    calculator = calculator_factory(settings.potential, settings.device)
    for label, structure in structures.items():
        result = relax_structure(structure, calculator, settings)
        energy = "-" if result.energy_per_atom is None else f"{result.energy_per_atom:.4f} eV/atom"
        logger.info("%s: %s after %d steps, %s", label, result.status, result.steps, energy)
        if result.error is not None:
            logger.warning("%s: %s", label, result.error)
        yield label, result
