"""Predict crystal structures for compositions, relax them with CHGNet and the best with DFT, rank them.

Run on the AiiDA profile that `bash scripts/setup.sh` made (a `verdi presto` SQLite profile)::

    verdi run examples/predict_and_relax.py                          # ZnO and SrTiO3 with the general model
    verdi run examples/predict_and_relax.py --formula BaTiO3 --model perov_5 --num-samples 8 --top-k 2
    verdi run examples/predict_and_relax.py --no-dft                  # sampling and CHGNet only
    verdi run examples/predict_and_relax.py --computer my-cluster --equicsp-code equicsp@my-cluster \\
        --pw-code pw@my-cluster                                       # existing codes on another computer

It sets up what is missing on the chosen computer (default ``localhost``): the ``equicsp`` code (this
environment's program), the ``pw`` code (``pw.x`` on the PATH) and the PseudoDojo pseudopotential family
(built offline, ``aiida-equicsp install-pseudos``). Then it runs ``equicsp.predict_relax`` and reads the
results back from the database with QueryBuilder: the ranking table, and every structure the run produced
with the level it was relaxed at.

DFT here is a quick look, not production settings: the family's ``low`` cutoff stringency, a coarse k-point
spacing and aiida-quantumespresso's ``fast`` protocol, one cell-volume cycle; the table's ``dft_level`` column
says so. For energies that resolve polymorphs: ``--protocol balanced --stringency normal --kpoints-distance
0.15`` (the ``balanced`` protocol's own values; k spacing in 1/Å with 2π included).

The ML and DFT energies are printed in separate columns, each labelled with its level: they are on different
scales (see ``equicsp_core.pipeline.ENERGY_SCALES``) and are never compared. pw.x failures that
aiida-quantumespresso's restart handlers recover from are logged by AiiDA as ``Error:`` lines while the run goes
on; each is listed under ``notes``, with the action taken.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from aiida import orm
from aiida.engine import run_get_node

from aiida_equicsp.data.model import EquiCSPModelData
from aiida_equicsp.pseudos import PSEUDODOJO_LABEL, install_pseudodojo_family
from aiida_equicsp.workchains.predict_relax import EquiCSPPredictRelaxWorkChain
from equicsp_core.pipeline import ENERGY_SCALES


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="verdi run examples/predict_and_relax.py", description=__doc__.split("\n")[0])
    parser.add_argument("--formula", action="append", default=None,
                        help="a composition, sampled at every cell size Z the model supports (up to "
                             "--max-formula-units), or an explicit cell such as Zn2O2; repeatable (default: ZnO and "
                             "SrTiO3: wurtzite ZnO has Z = 2, so a Z search is what finds it)")
    parser.add_argument("--model", default="mp_20", help="shipped checkpoint name or file (default mp_20, the "
                        "general model)")
    parser.add_argument("--num-samples", type=int, default=8, help="candidates per composition, shared among Z by "
                        "the training prior (default 8)")
    parser.add_argument("--max-formula-units", type=int, default=4, help="largest Z sampled (default 4)")
    parser.add_argument("--top-k", type=int, default=1, help="DFT-relax the best k after CHGNet (default 1)")
    parser.add_argument("--dft", action=argparse.BooleanOptionalAction, default=True, help="run the DFT stage")
    parser.add_argument("--protocol", default="fast", choices=["fast", "balanced", "stringent"])
    parser.add_argument("--stringency", default="low", choices=["low", "normal", "high"],
                        help="PseudoDojo cutoff hints to use (default low)")
    parser.add_argument("--kpoints-distance", type=float, default=0.8,
                        help="k-point spacing in 1/Å, 2π included (default 0.8: a quick look; the DFT protocols use "
                             "0.30 fast, 0.15 balanced, 0.10 stringent)")
    parser.add_argument("--computer", default="localhost", help="where the codes run (default localhost)")
    parser.add_argument("--equicsp-code", default=None, help="label of an equicsp code (default: set one up)")
    parser.add_argument("--pw-code", default=None, help="label of a pw.x code (default: set one up)")
    args = parser.parse_args(sys.argv[1:])
    args.formula = args.formula or ["ZnO", "SrTiO3"]
    return args


def installed_code(label: str | None, name: str, executable: str | None, plugin: str, computer: str) -> orm.Code:
    """The code ``label``, or ``name@computer``, created from ``executable`` on the first run."""
    try:
        return orm.load_code(label or f"{name}@{computer}")
    except Exception:  # NotExistent
        if label is not None:
            sys.exit(f"code {label} does not exist: create it with `verdi code create core.code.installed`")
    if executable is None:
        sys.exit(f"no {name} program found on the PATH to set up code {name}@{computer}: for pw.x install Quantum "
                 "ESPRESSO (apt-get install quantum-espresso) or give --pw-code, or run with --no-dft")
    code = orm.InstalledCode(computer=orm.load_computer(computer), filepath_executable=executable, label=name,
                             default_calc_job_plugin=plugin)
    return code.store()


def main() -> None:
    args = parse_args()
    equicsp_code = installed_code(args.equicsp_code, "equicsp", shutil.which("equicsp")
                                  or str(Path(sys.executable).with_name("equicsp")), "equicsp.sample", args.computer)
    model = EquiCSPModelData.from_shipped(args.model) if not Path(args.model).exists() else \
        EquiCSPModelData.get_or_create(args.model)
    overrides: dict = {"num_samples": args.num_samples, "top_k": args.top_k,
                       "sample": {"parameters": {"max_formula_units": args.max_formula_units}}}
    pw_code = family = None
    if args.dft:
        pw_code = installed_code(args.pw_code, "pw", shutil.which("pw.x"), "quantumespresso.pw", args.computer)
        try:
            family = install_pseudodojo_family()
        except FileNotFoundError as error:
            sys.exit(str(error))
        from pymatgen.core import Composition

        elements = tuple(sorted({str(element) for formula in args.formula for element in Composition(formula)}))
        ecutwfc, ecutrho = family.get_recommended_cutoffs(elements=elements, stringency=args.stringency, unit="Ry")
        overrides["dft"] = {"overrides": {"meta_convergence": False, "base_relax": {
            "kpoints_distance": args.kpoints_distance,
            "pw": {"parameters": {"SYSTEM": {"ecutwfc": ecutwfc, "ecutrho": ecutrho}}}}}}
        print(f"DFT: pw.x with {PSEUDODOJO_LABEL}, {args.stringency} cutoffs {ecutwfc:g}/{ecutrho:g} Ry, "
              f"k-point spacing {args.kpoints_distance} 1/Å")

    builder = EquiCSPPredictRelaxWorkChain.get_builder_from_protocol(
        equicsp_code, model, args.formula, protocol=args.protocol, pw_code=pw_code,
        pseudo_family=None if family is None else family.label, overrides=overrides)
    print(f"predicting {', '.join(args.formula)} with model {model.filename} ({args.num_samples} candidates each, "
          f"Z <= {args.max_formula_units}) ...")
    if args.dft:
        print("(an `Error:` line from aiida.parser.PwParser is a pw.x failure; the notes below say how it was "
              "handled)")
    _, node = run_get_node(builder)
    print(f"{node.process_label}<{node.pk}> finished: exit status {node.exit_status}"
          + (f" ({node.exit_message})" if node.exit_status else ""))
    report(node.pk)


def report(pk: int) -> None:
    """Read the results of work chain ``pk`` back from the database and print them."""
    query = orm.QueryBuilder()
    query.append(orm.WorkflowNode, filters={"id": pk}, tag="run")
    query.append(orm.Dict, with_incoming="run", edge_filters={"label": "ranking"}, project="attributes.rows")
    rows = query.one()[0] if query.count() else []
    run = orm.load_node(pk)
    potential = run.inputs.relax.parameters.get_dict().get("potential", "chgnet") if "parameters" in run.inputs.relax \
        else "chgnet"
    columns = [("label", "label", "{}"), ("formula_units", "Z", "{}"), ("status", "status", "{}"),
               ("ml_rank", "ml_rank", "{}"), ("ml_energy_per_atom", f"E_ML ({potential})", "{:.4f}"),
               ("ml_e_above_hull", "E_hull_ML", "{:.3f}"), ("dft_energy_per_atom", "E_DFT", "{:.4f}"),
               ("space_group_sampled", "space_group_sampled", "{}"), ("space_group_ml", "space_group_ml", "{}"),
               ("space_group_dft", "space_group_dft", "{}"), ("novelty", "novelty", "{}"), ("reason", "reason", "{}"),
               ("members", "members", "{}")]
    table = [[title for _, title, _ in columns]]
    table += [["-" if row.get(name) is None else fmt.format(", ".join(row[name]) if name == "members" else row[name])
               for name, _, fmt in columns] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    print("\nranking (energies in eV/atom, displacement in Å):")
    for line in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)))
    print(f"\nE_ML: {potential} energy per atom. {ENERGY_SCALES}")
    levels = sorted({row["dft_level"] for row in rows if row.get("dft_level")})
    for level in levels:
        print(f"E_DFT level: {level}")
    noted = [row for row in rows if row.get("notes")]
    if noted:
        print("\nnotes:")
        for row in noted:
            print(f"  {row['label']}: {row['notes']}")

    query = orm.QueryBuilder()
    query.append(orm.WorkflowNode, filters={"id": pk}, tag="run")
    query.append(orm.StructureData, with_incoming="run", project=["id", "attributes.cell"],
                 edge_project="label", edge_filters={"label": {"like": "%relaxed%"}})
    print("\nrelaxed structures in the database (QueryBuilder):")
    for pk_, _, label in sorted(query.all(), key=lambda r: r[2]):
        structure = orm.load_node(pk_)
        print(f"  {label:28s} StructureData<{pk_}>  {structure.get_formula()}  {structure.get_cell_volume():.2f} Å³")


if __name__ == "__main__":
    main()
