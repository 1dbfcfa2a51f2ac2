"""Every user-facing knob of a prediction, once: its type, bounds and single default.

One model per stage of the pipeline (:mod:`equicsp_core.pipeline`)::

    SampleSettings   formulas, num_samples, max_formula_units, steps, step_lr, lattice_bound, seed,
                     batch_size, device, threads, allow_outside_domain  (equicsp sample, the sample CalcJob)
    GenerateSettings num_samples, num_atoms, steps, step_lr, lattice_bound, seed, batch_size, device, threads
                                                                        (equicsp generate: ab initio)
    ScreenSettings   min_distance, max_volume_per_atom                  (before relaxation)
    RelaxSettings    potential, fmax, steps, relax_cell, device, threads, phonons
                                                                        (equicsp relax, the relax CalcJob)
    RankSettings     top_k, phonons                                     (which winners get phonons and DFT)
    StabilitySettings stability, reference_cutoff, references_per_composition
                                                                        (ML E_hull and novelty, after ranking)
    DFTSettings      protocol, relax_type, symprec, spin, hull          (the DFT stage of the AiiDA route)
    ExploreSettings  chemical_system, max_atoms, ehull_max             (the compositions of a chemical system,
                                                                        the candidates reported stable)

Every entry point derives from these models instead of repeating them: the ``equicsp sample`` flags
(:func:`equicsp_core.cli.build_parser`), the ``parameters`` keys of the CalcJobs, the protocol files of
``aiida_equicsp/protocols`` (checked by a test), the fields of the jobflow Makers
(:mod:`equicsp_jobflow.makers`) and the work chain's validation at submission. A new knob is one field here.

Why pydantic v2 (``extra="forbid"``, frozen): the jobflow route is built on pydantic already (task documents,
``output_schema``) and aiida-core depends on it, so it costs the engine no new install on any route; it gives
unknown-key refusal, bounds, ``None``-able fields, JSON schemas and field descriptions (the CLI's help) for
free, where dataclasses would need a coercion helper of our own. Two choices on top of pydantic's defaults:

- integers and booleans are strict (``3.0``, ``"3"``, ``1e23`` and ``1`` for ``true`` are refused): a count
  or a switch given as something else is a mistake;
- numbers accept numeric text, because YAML 1.1 (PyYAML) reads ``5e-6`` (no dot) as a string, but never a
  boolean; every bound is explicit (``step_lr: .inf`` and ``lattice_bound: 0`` are refused).

Errors are :class:`SettingsError`, a ``ValueError`` of one line naming the knob:
``step_lr: Input should be greater than 0, got 0.0``.

This module imports no torch: the AiiDA daemon validates work-chain inputs with it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictBool,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from equicsp_core.screening import MAX_VOLUME_PER_ATOM, MIN_DISTANCE

#: Langevin step scale γ of the corrector (the papers' value).
DEFAULT_STEP_LR = 5e-6
#: γ of ab initio generation per dataset (the official generation scripts, docs/method.md §7.6); others: the default.
GENERATION_STEP_LR = {"perov_5": 1e-6, "carbon_24": 1e-5, "mp_20": 5e-6}
#: Size of the element-embedding table (docs/method.md §5.1): atomic numbers 1..100 (H to Fm).
MAX_ATOMIC_NUMBER = 100
#: Largest seed: torch's generators take 64-bit seeds.
MAX_SEED = 2**63 - 1
#: Potentials known by name: ``"module:factory"`` of a callable ``factory(device=...) -> ASE calculator``.
POTENTIALS = {
    "chgnet": "equicsp_core.relax:chgnet_calculator",
    "sevennet": "equicsp_core.relax:sevennet_calculator",
    "sevennet-l3i5": "equicsp_core.relax:sevennet_l3i5_calculator",
}
#: Relaxation types of aiida-quantumespresso's ``RelaxType`` (a test keeps them in step).
DFT_RELAX_TYPES = ("none", "positions", "volume", "shape", "cell", "positions_volume", "positions_shape",
                   "positions_cell")
#: ``module:factory`` of a potential given by path: dotted Python names on both sides.
_FACTORY_PATTERN = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")
#: A device name the settings accept (:mod:`equicsp_core.hardware` resolves it on the machine that computes).
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?|mps")
#: What a refused device name is told to use instead.
DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"


class SettingsError(ValueError):
    """Settings refused: one line naming the knob and what is wrong."""


class FormulaError(SettingsError):
    """A formula the model cannot sample: unparsable, or beyond the model's limits or training domain."""


class PotentialError(SettingsError):
    """A potential that cannot be used: unknown, not installed, not a factory of ASE calculators."""


def _number(value: Any) -> Any:
    """Numeric text as a float (YAML 1.1 reads ``5e-6`` as text); a boolean is never a number."""
    if isinstance(value, bool):
        raise ValueError("a number is required, not true/false")
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"a number is required, not the text {value!r}") from None
    return value


#: A real number, finite unless a field allows infinity.
Number = Annotated[float, BeforeValidator(_number)]


def check_device_name(name: object) -> str:
    """``name`` if it is a device name of :data:`DEVICE_PATTERN`; a ValueError naming the choices otherwise.

    Checks the name only, not whether this machine has the device
    (:func:`equicsp_core.hardware.resolve_device` does, where the work runs).
    """
    if not isinstance(name, str) or not DEVICE_PATTERN.fullmatch(name):
        raise ValueError(f"device must be one of {DEVICE_CHOICES}, got {name!r}")
    return name


#: The device of a job: ``auto`` (CUDA if present, else the CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
Device = Annotated[str, BeforeValidator(check_device_name)]


def one_line(error: ValidationError, known: Iterable[str]) -> str:
    """A pydantic error as one line: ``knob: message, got value`` per problem, joined by ``; ``.

    Unknown keys are named together, with the ``known`` ones.
    """
    unknown = [str(item["loc"][0]) for item in error.errors() if item["type"] == "extra_forbidden"]
    problems = [f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(known)}"] if unknown else []
    for item in error.errors():
        if item["type"] == "extra_forbidden":
            continue
        message = item["msg"].removeprefix("Value error, ")
        # the knob, unless the message already starts with it (or a whole-model check names its own)
        where = "".join(f"{part}: " for part in item["loc"][:1] if not message.startswith(f"{part} "))
        got = "" if item["type"] in ("missing", "value_error") else f", got {item['input']!r}"
        problems.append(f"{where}{message}{got}")
    return "; ".join(problems)


def _scalar_type(annotation: Any) -> type | None:
    """The Python type behind an annotation (``Annotated[int, Strict()] | None`` → ``int``), ``None`` if none."""
    if annotation in (bool, int, float, str):
        return annotation
    for argument in get_args(annotation):
        found = _scalar_type(argument)
        if found is not None:
            return found
    return None


def _is_tuple(annotation: Any) -> bool:
    """Whether an annotation is a tuple, or an optional one (``tuple[int, ...] | None``)."""
    return get_origin(annotation) is tuple or any(get_origin(argument) is tuple for argument in get_args(annotation))


class Settings(BaseModel):
    """Base of the settings models: unknown keys refused, values frozen, errors as :class:`SettingsError`."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as error:
            # a check that raised a more specific error (a formula, a potential) keeps its kind
            kinds = {type(item.get("ctx", {}).get("error")) for item in error.errors()}
            kind = kinds.pop() if len(kinds) == 1 and issubclass(next(iter(kinds)), SettingsError) else SettingsError
            raise kind(one_line(error, self.keys())) from None

    @classmethod
    def from_mapping(cls, values: Any, where: str = "") -> Settings:
        """Settings from a mapping (a parsed YAML file, a ``Dict`` node); ``where`` prefixes the message."""
        if not isinstance(values, Mapping):
            raise SettingsError(f"{where}settings must be a mapping of {', '.join(cls.keys())}; got {values!r}")
        try:
            return cls(**values)
        except SettingsError as error:
            raise type(error)(f"{where}{error}") from None

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The knob names, in declaration order."""
        return tuple(cls.model_fields)

    @classmethod
    def default(cls, key: str) -> Any:
        """The default of one knob."""
        return cls.model_fields[key].default

    @classmethod
    def describe(cls, key: str) -> str:
        """The help text of one knob (its field description) with its default."""
        info = cls.model_fields[key]
        if info.is_required():
            return f"{info.description} (required)"
        return f"{info.description} (default {info.default})" if info.default is not None else info.description

    @classmethod
    def flag(cls, key: str) -> str:
        """The command-line flag of a knob: ``num_samples`` → ``--num-samples``; a list, given once per value, by its
        singular: ``formulas`` → ``--formula``, ``elements`` → ``--element``."""
        return {"formulas": "--formula", "elements": "--element"}.get(key, "--" + key.replace("_", "-"))

    @classmethod
    def repeatable(cls, key: str) -> bool:
        """Whether a knob holds several values (a tuple): a flag given once per value on a command line."""
        return _is_tuple(cls.model_fields[key].annotation)

    @classmethod
    def scalar_type(cls, key: str) -> type:
        """The Python type of a knob's values, for a command-line parser: ``StrictInt | None`` → ``int``."""
        return _scalar_type(cls.model_fields[key].annotation) or str

    def to_dict(self) -> dict[str, Any]:
        """Plain values (tuples as lists), ready for YAML or JSON."""
        return self.model_dump(mode="json")


# --- formulas -----------------------------------------------------------------------------------------------

#: An element written with an explicit zero count: ``Cl0``, ``Cl0.0`` (pymatgen would silently drop it).
_ZERO_COUNT = re.compile(r"([A-Z][a-z]?)(0+(\.0*)?|\.0+)(?![\d.])")


def parse_formula(formula: str, max_atoms: int | None = None) -> list[int]:
    """Atomic numbers of the cell a formula describes (``"SrTiO3"`` → 5 atoms), with clear errors.

    The formula fixes the cell contents, so ``"Sr2Ti2O6"`` asks for a 10-atom cell. ``max_atoms`` is a hard
    limit of the model (EquiCSP's normalisation tables); ``None``: no limit.
    """
    from pymatgen.core import Composition

    if not isinstance(formula, str):
        raise FormulaError(f"a formula must be a string, got {formula!r}")
    zero = _ZERO_COUNT.search(formula)
    if zero:
        raise FormulaError(f"formula {formula!r}: {zero.group(1)} count {zero.group(2)} is not a positive integer")
    try:
        composition = Composition(formula)
    except Exception as error:
        raise FormulaError(f"cannot parse formula {formula!r}: {error}") from error
    numbers: list[int] = []
    for element, amount in composition.items():
        z = getattr(element, "Z", None)
        if z is None or not 1 <= z <= MAX_ATOMIC_NUMBER:
            raise FormulaError(f"formula {formula!r}: unsupported element {element}")
        if abs(amount - round(amount)) > 1e-8 or amount < 1:
            raise FormulaError(f"formula {formula!r}: {element} count {amount} is not a positive integer")
        numbers += [z] * round(amount)
    if not numbers:
        raise FormulaError(f"formula {formula!r} has no atoms")
    if max_atoms is not None and len(numbers) > max_atoms:
        raise FormulaError(f"formula {formula!r} has {len(numbers)} atoms; the model supports at most {max_atoms}")
    return numbers


def formula_units(numbers: Sequence[int]) -> int:
    """Z, the formula units of a cell (atomic numbers): the gcd of its element counts (``Sr2Ti2O6`` → 2).

    A formula written with Z = 1 (``SrTiO3``, ``ZnO``) is *reduced*: :func:`equicsp_core.domain.sampling_cells`
    samples it at every Z the model supports; one written with Z > 1 (``Zn2O2``) is an explicit cell.
    """
    return math.gcd(*(list(numbers).count(z) for z in set(numbers)))


def formula_of(numbers: Sequence[int]) -> str:
    """A cell (atomic numbers) written as a formula, elements in order of first appearance: ``Sr2Ti2O6``."""
    from pymatgen.core import Element

    counts = {z: list(numbers).count(z) for z in dict.fromkeys(numbers)}
    return "".join(f"{Element.from_Z(z).symbol}{'' if count == 1 else count}" for z, count in counts.items())


def formula_list(value: Any) -> tuple[str, ...]:
    """A list of formulas as a tuple; a bare string is refused (``"CO"`` is not ``["C", "O"]``)."""
    if isinstance(value, str):
        raise SettingsError(f"a list of formulas is required, got the string {value!r} (write [{value!r}])")
    if not isinstance(value, Iterable) or isinstance(value, Mapping):
        raise SettingsError(f"a list of formulas is required, got {value!r}")
    return tuple(value)


# --- the stages ---------------------------------------------------------------------------------------------


class SampleSettings(Settings):
    """How to sample: ``equicsp sample``'s flags or ``--input`` file, the sample CalcJob's inputs.

    The model itself (a checkpoint) is not a setting: it is a file, given beside them.
    """

    formulas: tuple[str, ...] = Field(
        description="compositions: a reduced formula (SrTiO3, ZnO) is sampled at every cell size Z the model "
                    "supports; one written with Z > 1 (Zn2O2) is that cell only")
    num_samples: StrictInt = Field(20, ge=1, description="candidates per formula (the papers' k), shared among its "
                                  "cell sizes Z by the training prior")
    max_formula_units: StrictInt | None = Field(
        None, ge=1, description="largest Z (formula units per cell) of a reduced formula (None: as many as the "
                                "model's training domain holds; 1: only the written cell)")
    steps: StrictInt | None = Field(None, ge=1, description="predictor-corrector steps (None: the model's T)")
    step_lr: Number = Field(DEFAULT_STEP_LR, gt=0, allow_inf_nan=False, description="Langevin step scale")
    lattice_bound: Number | None = Field(
        None, gt=0, description="clamp of the predicted clean lattice (None: the mode's; inf, or the text "
                                "'inf' where JSON or AiiDA holds it: the papers' update)")
    seed: StrictInt = Field(0, ge=0, le=MAX_SEED, description="seed of all randomness")
    batch_size: StrictInt = Field(256, ge=1, description="crystals sampled together; results saved after each")
    device: Device = Field("auto", description=f"torch device: {DEVICE_CHOICES} (auto: CUDA if present, else CPU)")
    threads: StrictInt | None = Field(None, ge=1, description="CPU threads of torch (None: every CPU the job may use)")
    allow_outside_domain: StrictBool = Field(
        False, description="sample formulas beyond the model's training data (more atoms, unseen elements)")

    _cells: dict[str, tuple[int, ...]] = PrivateAttr()

    @field_validator("formulas", mode="before")
    @classmethod
    def _formulas(cls, value: Any) -> tuple[str, ...]:
        formulas = formula_list(value)
        if not formulas:
            raise ValueError("no formula given")
        repeated = sorted({formula for formula in formulas if formulas.count(formula) > 1})
        if repeated:
            raise ValueError(f"formula {repeated[0]!r} is given more than once (use num_samples for more candidates)")
        return formulas

    @model_validator(mode="after")
    def _parse_formulas(self) -> SampleSettings:
        """Parse every formula, once: :attr:`cells` are the cells as written (Z = 1 for a reduced formula)."""
        self._cells = {formula: tuple(parse_formula(formula)) for formula in self.formulas}
        return self

    @property
    def cells(self) -> dict[str, tuple[int, ...]]:
        """Each formula's cell as written, as atomic numbers, e.g. ``{"SrTiO3": (38, 22, 8, 8, 8)}``.

        The cells the sampler gets, Z = 1..Zmax of each reduced formula, depend on the model:
        :func:`equicsp_core.domain.sampling_cells`.
        """
        return dict(self._cells)


class GenerateSettings(Settings):
    """How to generate crystals ab initio (atom types drawn too): ``equicsp generate``'s flags.

    The sampler's knobs are :class:`SampleSettings`' own; ``step_lr`` defaults to the γ of the model's dataset.
    """

    num_samples: StrictInt = Field(ge=1, description="crystals to generate")
    num_atoms: tuple[Annotated[StrictInt, Field(ge=1)], ...] | None = Field(
        None, description="atoms of each crystal: one count for all, or several that the crystals take "
                                        "in turn (None: drawn from the model's training distribution)")
    elements: tuple[str, ...] | None = Field(
        None, description="the elements the crystals may hold, a chemical system (None: any the model knows)")
    steps: StrictInt | None = SampleSettings.model_fields["steps"]
    step_lr: Number | None = Field(
        None, gt=0, allow_inf_nan=False,
        description=f"Langevin step scale (None: {', '.join(f'{k} {v:g}' for k, v in GENERATION_STEP_LR.items())}, "
                    f"else {DEFAULT_STEP_LR:g}, by the model's dataset)")
    lattice_bound: Number | None = SampleSettings.model_fields["lattice_bound"]
    seed: StrictInt = SampleSettings.model_fields["seed"]
    batch_size: StrictInt = SampleSettings.model_fields["batch_size"]
    device: Device = SampleSettings.model_fields["device"]
    threads: StrictInt | None = SampleSettings.model_fields["threads"]

    @field_validator("num_atoms", mode="before")
    @classmethod
    def _one_count(cls, value: Any) -> Any:
        """One count (``num_atoms: 5``, ``num_atoms=5``) means the same as a list of one."""
        return (value,) if isinstance(value, int) else value

    @field_validator("num_atoms")
    @classmethod
    def _some_count(cls, value: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if value is not None and not value:
            raise ValueError("no atom count given (None: drawn from the model's training distribution)")
        return value

    @field_validator("elements")
    @classmethod
    def _known_elements(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        """Element symbols, each once (``Sr``, ``Ti``, ``O``); an empty system is refused."""
        from pymatgen.core import Element

        if value is None:
            return None
        if not value:
            raise ValueError("no element given (None: any element the model knows)")
        unknown = [symbol for symbol in value if not Element.is_valid_symbol(symbol)]
        if unknown:
            raise ValueError(f"unknown element {unknown[0]!r}")
        repeated = [symbol for symbol in dict.fromkeys(value) if value.count(symbol) > 1]
        if repeated:
            raise ValueError(f"element {repeated[0]!r} given twice")
        return value

    def step_lr_for(self, dataset: str | None) -> float:
        """γ: the setting, else the generation value of ``dataset`` (:data:`GENERATION_STEP_LR`)."""
        return self.step_lr if self.step_lr is not None else GENERATION_STEP_LR.get(dataset, DEFAULT_STEP_LR)


class ScreenSettings(Settings):
    """Which sampled candidates are worth relaxing (:func:`equicsp_core.screening.implausibility`)."""

    min_distance: Number = Field(MIN_DISTANCE, gt=0, allow_inf_nan=False,
                                 description="closest allowed approach of two atoms, Å")
    max_volume_per_atom: Number = Field(MAX_VOLUME_PER_ATOM, gt=0, allow_inf_nan=False,
                                        description="largest allowed volume per atom, Å³")


class RelaxSettings(Settings):
    """How to relax with a machine-learned potential: ``equicsp relax --input``, the relax CalcJob's parameters."""

    potential: str = Field("chgnet", description=f"{', '.join(POTENTIALS)} or module:factory")
    fmax: Number = Field(0.05, gt=0, allow_inf_nan=False, description="force threshold, eV/Å")
    steps: StrictInt = Field(500, ge=0, description="optimiser step cap (0: evaluate only)")
    relax_cell: StrictBool = Field(True, description="relax the cell too (FrechetCellFilter)")
    device: Device = Field("auto", description=f"torch device of the potential: {DEVICE_CHOICES}")
    threads: StrictInt | None = Field(None, ge=1, description="CPU threads of torch (None: every CPU the job may use)")
    phonons: StrictBool = Field(False, description="check each relaxed structure for imaginary phonon modes")

    @field_validator("potential")
    @classmethod
    def _potential(cls, value: str) -> str:
        if value not in POTENTIALS and not _FACTORY_PATTERN.match(value):
            raise PotentialError(f"unknown potential {value!r}: use one of {', '.join(POTENTIALS)} or 'module:factory'")
        return value


class RankSettings(Settings):
    """Which ML-relaxed candidates go on: the best ``top_k`` per composition, phonon-checked if asked."""

    top_k: StrictInt = Field(3, ge=1, description="phonon-check and DFT-relax the best k of each composition")
    phonons: StrictBool = Field(False, description="check the best k for imaginary phonon modes (phonopy)")


class StabilitySettings(Settings):
    """ML energy above the hull and novelty of the relaxed candidates (:mod:`equicsp_core.stability`)."""

    stability: StrictBool = Field(True, description="energy above the hull (ML level) and novelty of each relaxed "
                                                    "candidate against the reference set")
    reference_cutoff: Number = Field(0.05, ge=0, allow_inf_nan=False,
                                     description="hull references: entries whose data e_above_hull is at most "
                                                 "this, eV/atom")
    references_per_composition: StrictInt = Field(
        2, ge=1, description="hull references: at most this many per reduced formula, lowest data e_above_hull first")


class DFTSettings(Settings):
    """The DFT stage (aiida-quantumespresso's PwRelaxWorkChain); its code and pseudopotentials are nodes.

    ``symprec`` is 0.01 Å, not more, because the DFT relaxation keeps the symmetry it starts with (pw.x
    symmetrises forces and stress): symmetrising only removes what is noise, so that pw.x finds the symmetry
    the ML minimum has, and the relaxation stays free to break any higher one. Measured on CHGNet-relaxed
    perovskites (fmax 0.03 eV/Å, docs/aiida.md "DFT settings"): 0.05 Å raised the space group of all six
    (SrTiO3 to P4mm, BaTiO3 to Cm, PbTiO3 to P4mm), imposing symmetry on 0.01-0.05 Å deviations that only a
    relaxation free to keep them could judge; at 0.01 Å their groups were subgroups of those (Pm, P1, Pm), from
    which the relaxation can still reach the higher symmetry. A distortion under 0.01 Å is worth under
    ~1 meV per mode (½ k x², k ≲ 10 eV/Å²), below the DFT protocols' energy resolution.
    """

    protocol: str | None = Field(None, description="a PwRelaxWorkChain protocol (None: its default)")
    relax_type: Literal[DFT_RELAX_TYPES] = Field("positions_cell", description="a RelaxType value")  # type: ignore
    symprec: Number = Field(0.01, ge=0, allow_inf_nan=False,
                            description="symmetrise at this tolerance (Å) before DFT; 0: as it is")
    spin: Literal["auto", "collinear", "none"] = Field(
        "auto", description="spin polarisation: auto (collinear when a magnetic element has an open shell, "
                            "equicsp_core.dft.initial_moments), collinear (always), none (never)")
    hull: StrictBool = Field(
        False, description="DFT energy above the hull: the reference entries of each DFT candidate's chemical system "
                           "(the ML hull's, StabilitySettings) computed with these DFT settings in the same work "
                           "chain, one pw.x run per entry, reused by later runs with the same settings")


class ExploreSettings(Settings):
    """Exploring a chemical system (:mod:`equicsp_core.chemical_system`): which compositions are predicted, which
    candidates are reported as stable or near-stable."""

    chemical_system: str = Field(description="elements joined by '-', e.g. Li-Fe-P-O: its charge-balanced "
                                             "compositions with every element present are predicted")
    max_atoms: StrictInt | None = Field(
        None, ge=1, description="largest formula unit (atoms of the reduced formula) of a composition; each is "
                                "sampled at every Z the model supports (None: the model's largest cell)")
    ehull_max: Number = Field(0.1, ge=0, allow_inf_nan=False,
                              description="stable and near-stable: ML energy above the hull at most this, eV/atom")

    @field_validator("chemical_system")
    @classmethod
    def _chemical_system(cls, value: str) -> str:
        from equicsp_core.chemical_system import parse_chemical_system

        return "-".join(parse_chemical_system(value))
