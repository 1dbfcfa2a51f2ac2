"""``equicsp_core.relax`` and ``equicsp relax``: settings, potentials, relaxations that converge or fail.

The potentials here are cheap ASE calculators behind module-level factories, named ``"tests.test_relax:<factory>"``
as a user names their own potential; the AiiDA tests (``tests/aiida/test_relax_calculation.py``,
``tests/aiida/test_predict_relax_units.py``) use them too. EMT knows Cu, Al, Ag, Au, Ni, Pd, Pt (and H, C, N, O);
Lennard-Jones takes any element.
"""

import json
import math
import re

import numpy as np
import pytest
import yaml
from ase.calculators.emt import EMT
from ase.calculators.lj import LennardJones
from pymatgen.core import Lattice, Structure
from pymatgen.io.ase import AseAtomsAdaptor

from equicsp_core.cli import main
from equicsp_core.relax import load_calculator, relax_structure, relax_structures
from equicsp_core.settings import POTENTIALS, RelaxSettings

EMT_POTENTIAL = "tests.test_relax:emt"


# ------------------------------------------------------------------------------------------------
# potentials for the tests: module-level factories ``factory(device=...) -> ASE calculator``


def emt(device="cpu"):
    """ASE's effective-medium theory: Cu, Al, Ni, Ag, Au, Pd, Pt in milliseconds."""
    return EMT()


class EMTFailingForAl(EMT):
    """EMT that raises for any structure containing Al, as a potential fails on a structure it cannot handle."""

    def calculate(self, atoms=None, properties=("energy",), system_changes=None, **kwargs):
        if "Al" in atoms.get_chemical_symbols():
            raise RuntimeError("this potential refuses aluminium")
        return super().calculate(atoms, properties, system_changes, **kwargs)


def emt_failing_for_al(device="cpu"):
    """:class:`EMTFailingForAl`."""
    return EMTFailingForAl()


def lennard_jones(device="cpu"):
    """A soft Lennard-Jones pair potential for any element (the same for all), for plumbing tests."""
    return LennardJones(sigma=2.0, epsilon=0.01, rc=5.0, smooth=True)


class LennardJonesFailingForCa(LennardJones):
    """:func:`lennard_jones` that raises for any structure containing Ca."""

    def calculate(self, atoms=None, properties=None, system_changes=None, **kwargs):
        if "Ca" in atoms.get_chemical_symbols():
            raise RuntimeError("this potential refuses calcium")
        return super().calculate(atoms, properties or ["energy"], system_changes or [], **kwargs)


def lennard_jones_failing_for_ca(device="cpu"):
    """:class:`LennardJonesFailingForCa` with the parameters of :func:`lennard_jones`."""
    return LennardJonesFailingForCa(sigma=2.0, epsilon=0.01, rc=5.0, smooth=True)


class LennardJonesFailingForElements(LennardJones):
    """:func:`lennard_jones` that raises for a structure of one element (a reference set's elemental entries)."""

    def calculate(self, atoms=None, properties=None, system_changes=None, **kwargs):
        if len(set(atoms.get_chemical_symbols())) == 1:
            raise RuntimeError("this potential refuses pure elements")
        return super().calculate(atoms, properties or ["energy"], system_changes or [], **kwargs)


def lennard_jones_failing_for_elements(device="cpu"):
    """:class:`LennardJonesFailingForElements` with the parameters of :func:`lennard_jones`."""
    return LennardJonesFailingForElements(sigma=2.0, epsilon=0.01, rc=5.0, smooth=True)


def not_installed(device="cpu"):
    """A potential whose package is missing."""
    raise ImportError("No module named 'some_potential_package'")


# ------------------------------------------------------------------------------------------------
# structures


def fcc(element: str = "Cu", a: float = 3.75) -> Structure:
    """The conventional 4-atom fcc cell; EMT's Cu is at a ≈ 3.59 Å, so 3.75 is a strained one."""
    return Structure(Lattice.cubic(a), [element] * 4, [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])


def rattled(structure: Structure, amount: float = 0.05, seed: int = 0) -> Structure:
    """``structure`` with every atom moved by up to ``amount`` Å in each direction (reproducibly)."""
    moved = structure.copy()
    shifts = np.random.default_rng(seed).uniform(-amount, amount, (len(moved), 3))
    for index, shift in enumerate(shifts):
        moved.translate_sites([index], shift, frac_coords=False)
    return moved


# ------------------------------------------------------------------------------------------------
# RelaxSettings


def test_default_settings():
    settings = RelaxSettings()
    assert (settings.potential, settings.fmax, settings.steps, settings.relax_cell, settings.device) == (
        "chgnet", 0.05, 500, True, "auto")
    assert RelaxSettings.from_mapping({}) == settings
    assert RelaxSettings.from_mapping({"fmax": 0.1, "steps": 0}) == RelaxSettings(fmax=0.1, steps=0)


@pytest.mark.parametrize("fmax", [0, -0.1, "small", None, True, float("inf")])
def test_fmax_must_be_a_positive_number(fmax):
    with pytest.raises(ValueError, match="^fmax: "):
        RelaxSettings(fmax=fmax)


@pytest.mark.parametrize("steps", [-1, 2.5, "10"])
def test_steps_must_be_a_non_negative_integer(steps):
    with pytest.raises(ValueError, match="^steps: "):
        RelaxSettings(steps=steps)


def test_unknown_keys_are_refused_by_name():
    with pytest.raises(ValueError, match=r"unknown setting\(s\) fmx, temperature; known: ") as error:
        RelaxSettings.from_mapping({"fmx": 0.1, "temperature": 300, "steps": 5})
    assert "fmax" in str(error.value)  # the known ones are listed


def test_settings_must_be_a_mapping():
    with pytest.raises(ValueError, match="must be a mapping"):
        RelaxSettings.from_mapping(["fmax", 0.1])


# ------------------------------------------------------------------------------------------------
# load_calculator


def test_known_potentials_are_module_factories():
    assert set(POTENTIALS) == {"chgnet", "sevennet", "sevennet-l3i5"}
    assert all(":" in target for target in POTENTIALS.values())


def test_module_factory_potential_is_loaded():
    assert isinstance(load_calculator(EMT_POTENTIAL), EMT)


@pytest.mark.parametrize(
    ("potential", "message"),
    [
        ("nope", "unknown potential 'nope'"),
        ("no_such_module_xyz:factory", "potential 'no_such_module_xyz:factory' cannot be loaded"),
        ("tests.test_relax:no_such_factory", "potential 'tests.test_relax:no_such_factory' cannot be loaded"),
        ("tests.test_relax:not_installed", "potential 'tests.test_relax:not_installed' is not installed"),
    ],
)
def test_unusable_potentials_are_refused_by_name(potential, message):
    with pytest.raises(ValueError, match=message):
        load_calculator(potential)


# ------------------------------------------------------------------------------------------------
# relax_structure, relax_structures


def test_strained_fcc_copper_relaxes_to_convergence():
    """EMT's Cu at a = 3.75 Å shrinks toward 3.59 Å; energy per atom finite and lower than at the start."""
    settings = RelaxSettings(potential=EMT_POTENTIAL, fmax=0.01, steps=300)
    initial = rattled(fcc("Cu", 3.75))
    calculator = load_calculator(settings.potential)
    start_atoms = AseAtomsAdaptor.get_atoms(initial)
    start_atoms.calc = emt()
    start_energy = start_atoms.get_potential_energy() / len(start_atoms)

    result = relax_structure(initial, calculator, settings)
    assert result.status == "converged", result.error
    assert result.error is None
    assert math.isfinite(result.energy_per_atom) and result.energy_per_atom < start_energy
    assert 0 < result.steps <= 300 and result.seconds > 0
    final = result.structure
    assert final.composition == initial.composition
    assert final.volume < 0.9 * initial.volume
    assert final.lattice.a == pytest.approx(3.59, abs=0.02)
    assert np.all((final.frac_coords >= 0) & (final.frac_coords < 1))
    assert set(result.as_dict()) == {"status", "structure", "energy_per_atom", "steps", "seconds", "error", "phonons"}
    assert result.phonons is None  # not asked for
    assert Structure.from_dict(result.as_dict()["structure"]) == final


def test_fixed_cell_keeps_the_cell():
    settings = RelaxSettings(potential=EMT_POTENTIAL, fmax=0.01, steps=200, relax_cell=False)
    initial = rattled(fcc("Cu", 3.6))
    result = relax_structure(initial, load_calculator(settings.potential), settings)
    assert result.status == "converged"
    assert np.allclose(result.structure.lattice.matrix, initial.lattice.matrix)


def test_step_cap_reached_is_not_converged():
    settings = RelaxSettings(potential=EMT_POTENTIAL, fmax=1e-6, steps=2)
    result = relax_structure(rattled(fcc("Cu", 3.75)), emt(), settings)
    assert result.status == "not_converged"
    assert result.steps == 2 and math.isfinite(result.energy_per_atom) and result.structure is not None


def test_a_failing_relaxation_does_not_stop_the_others():
    """The potential raises for the second structure (Al): that one fails with the error, the others relax."""
    settings = RelaxSettings(potential="tests.test_relax:emt_failing_for_al", fmax=0.05, steps=100)
    structures = {"cu": fcc("Cu", 3.7), "al": fcc("Al", 4.1), "cu_again": fcc("Cu", 3.5)}
    results = dict(relax_structures(structures, settings))
    assert list(results) == ["cu", "al", "cu_again"]
    failed = results["al"]
    assert failed.status == "failed"
    assert failed.error == "RuntimeError: this potential refuses aluminium"
    assert failed.structure is None and failed.energy_per_atom is None
    assert failed.as_dict()["structure"] is None
    for label in ("cu", "cu_again"):
        assert results[label].status == "converged", results[label].error
        assert math.isfinite(results[label].energy_per_atom)


def test_the_calculator_is_built_once():
    built = []

    def factory(potential, device):
        built.append((potential, device))
        return emt()

    settings = RelaxSettings(potential="any.module:anything", steps=5)
    results = list(relax_structures({"a": fcc(), "b": fcc()}, settings, factory))
    assert len(results) == 2 and built == [("any.module:anything", "auto")]


@pytest.mark.parametrize("potential", ["chgnet", "sevennet", "sevennet-l3i5"])
def test_pretrained_potential_relaxes_a_perturbed_perovskite(potential):
    """The shipped potentials, for real (their weights come with their packages; loading takes seconds)."""
    perovskite = Structure(Lattice.cubic(3.95), ["Sr", "Ti", "O", "O", "O"],
                           [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    settings = RelaxSettings(potential=potential, fmax=0.1, steps=200)
    result = relax_structure(rattled(perovskite, 0.05), load_calculator(potential), settings)
    assert result.status == "converged", result.error
    assert -9.5 < result.energy_per_atom < -7.0  # SrTiO3 measured: CHGNet -8.42, 7net-0 -8.02, 7net-l3i5 -8.02 eV/atom
    assert result.structure.composition == perovskite.composition


def test_sevennet_on_a_cpu_does_not_warn_of_gpu_accelerators():
    """SevenNet's "no tensor product accelerator" warning names GPU kernels: on a CPU it is noise in every log."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_calculator("sevennet", "cpu")
    assert not [w for w in caught if "tensor product accelerator" in str(w.message)]


def test_chgnet_computes_energy_and_stress_without_warnings():
    """torch's "requires_grad ... to a scalar" warning from inside CHGNet's stress computation is not shown."""
    import warnings

    atoms = AseAtomsAdaptor.get_atoms(fcc("Cu", 3.6))
    atoms.calc = load_calculator("chgnet", "cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        energy, stress = atoms.get_potential_energy(), atoms.get_stress()
    assert np.isfinite(energy) and np.isfinite(stress).all()
    assert not [str(w.message) for w in caught]


# ------------------------------------------------------------------------------------------------
# equicsp relax


def write_structures(path, structures: dict[str, Structure]):
    path.write_text(json.dumps({label: structure.as_dict() for label, structure in structures.items()}))
    return path


def write_input(path, settings):
    path.write_text(yaml.safe_dump(settings))
    return path


def test_cli_relaxes_every_structure(tmp_path, capsys):
    structures = write_structures(tmp_path / "structures.json",
                                  {"cu_big": fcc("Cu", 3.75), "cu_small": fcc("Cu", 3.45)})
    settings = write_input(tmp_path / "relax.yaml", {"potential": EMT_POTENTIAL, "steps": 50})
    out = tmp_path / "out"
    assert main(["--quiet", "relax", "--structures", str(structures), "--input", str(settings), "--out", str(out)]) == 0
    assert sorted(path.name for path in out.iterdir()) == ["relax.json", "run.json"]

    relax = json.loads((out / "relax.json").read_text())
    assert relax["settings"] == {"potential": EMT_POTENTIAL, "fmax": 0.05, "steps": 50, "relax_cell": True,
                                 "device": "auto", "threads": None, "phonons": False}
    assert list(relax["results"]) == ["cu_big", "cu_small"]
    for entry in relax["results"].values():
        assert entry["status"] in {"converged", "not_converged"}
        assert math.isfinite(entry["energy_per_atom"]) and entry["error"] is None
        assert Structure.from_dict(entry["structure"]).composition.reduced_formula == "Cu"
    # the two starts relax to the same crystal
    energies = [entry["energy_per_atom"] for entry in relax["results"].values()]
    assert energies[0] == pytest.approx(energies[1], abs=1e-3)

    run = json.loads((out / "run.json").read_text())
    assert run["complete"] is True
    counts = {status: sum(e["status"] == status for e in relax["results"].values())
              for status in ("converged", "not_converged", "failed")}
    assert run["counts"] == counts and run["counts"]["failed"] == 0
    assert "relaxed 2 structures" in capsys.readouterr().out


def test_cli_reports_a_failed_structure_and_goes_on(tmp_path, capsys):
    structures = write_structures(tmp_path / "s.json", {"cu": fcc("Cu"), "al": fcc("Al", 4.1)})
    settings = write_input(tmp_path / "relax.yaml", {"potential": "tests.test_relax:emt_failing_for_al", "steps": 20})
    out = tmp_path / "out"
    assert main(["relax", "--structures", str(structures), "--input", str(settings), "--out", str(out)]) == 0
    results = json.loads((out / "relax.json").read_text())["results"]
    assert results["al"]["status"] == "failed" and "aluminium" in results["al"]["error"]
    assert results["al"]["structure"] is None and results["al"]["energy_per_atom"] is None
    assert results["cu"]["status"] in {"converged", "not_converged"}
    assert json.loads((out / "run.json").read_text())["counts"]["failed"] == 1
    logged = capsys.readouterr().err  # the engine's log, on stderr
    assert "al: failed after 0 steps, -" in logged and "this potential refuses aluminium" in logged


def test_cli_without_input_uses_the_defaults(tmp_path, monkeypatch):
    """No --input: the default settings (CHGNet); the refusal of a broken default shows they were used."""
    monkeypatch.setitem(POTENTIALS, "chgnet", "tests.test_relax:emt")
    structures = write_structures(tmp_path / "s.json", {"cu": fcc("Cu", 3.6)})
    out = tmp_path / "out"
    assert main(["--quiet", "relax", "--structures", str(structures), "--out", str(out)]) == 0
    relax = json.loads((out / "relax.json").read_text())
    assert relax["settings"]["potential"] == "chgnet" and relax["settings"]["steps"] == 500


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("malformed_json", "cannot read structures from .*s.json"),
        ("not_structures", "cannot read structures from .*s.json"),
        ("empty_mapping", "no structures in .*s.json"),
        ("unknown_potential", "unknown potential 'nope'"),
        ("missing_module", "potential 'no_such_module_xyz:make' cannot be loaded"),
        ("unknown_key", r"--input .*relax.yaml: unknown setting\(s\) fmx; known: "),
        ("bad_fmax", r"--input .*relax.yaml: fmax: Input should be greater than 0, got 0"),
        ("not_a_mapping", r"--input .*relax.yaml: settings must be a mapping"),
        ("missing_structures", "No such file or directory: .*missing.json"),
        ("missing_input", "No such file or directory: .*missing.yaml"),
        ("broken_yaml", r"^equicsp relax: error: --input \S*relax.yaml is not valid YAML"),
        ("non_empty_out", "output folder .*out already exists and is not empty"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line_and_no_output(tmp_path, capsys, case, message):
    structures = tmp_path / "s.json"
    write_structures(structures, {"cu": fcc("Cu")})
    settings = {"potential": EMT_POTENTIAL, "steps": 5}
    out = tmp_path / "out"
    if case == "malformed_json":
        structures.write_text('{"cu": {"lattice": ')
    elif case == "not_structures":
        structures.write_text('{"cu": {"hello": 1}}')
    elif case == "empty_mapping":
        structures.write_text("{}")
    elif case == "unknown_potential":
        settings["potential"] = "nope"
    elif case == "missing_module":
        settings["potential"] = "no_such_module_xyz:make"
    elif case == "unknown_key":
        settings["fmx"] = 0.1
    elif case == "bad_fmax":
        settings["fmax"] = 0
    elif case == "missing_structures":
        structures = tmp_path / "missing.json"
    elif case == "non_empty_out":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    input_file = write_input(tmp_path / "relax.yaml", settings)
    if case == "not_a_mapping":
        input_file.write_text("- potential\n- emt\n")
    elif case == "missing_input":
        input_file = tmp_path / "missing.yaml"
    elif case == "broken_yaml":
        input_file.write_text("potential: [emt\n")

    status = main(["--quiet", "relax", "--structures", str(structures), "--input", str(input_file), "--out", str(out)])

    assert status == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("equicsp relax: error: ")
    assert re.search(message, lines[0]), lines[0]
    if case == "non_empty_out":
        assert sorted(path.name for path in out.iterdir()) == ["keep.txt"]
    else:
        assert not out.exists()


def test_cli_broken_yaml_names_the_file_once(tmp_path, capsys):
    """Exit 2, no output, and the error names the --input file once (not "--input F: --input F is ...")."""
    structures = write_structures(tmp_path / "s.json", {"cu": fcc("Cu")})
    input_file = tmp_path / "relax.yaml"
    input_file.write_text("potential: [emt\n")
    out = tmp_path / "out"
    flags = ["--structures", str(structures), "--input", str(input_file), "--out", str(out)]
    assert main(["--quiet", "relax", *flags]) == 2
    first = capsys.readouterr().err.splitlines()[0]
    assert first.startswith(f"equicsp relax: error: --input {input_file} is not valid YAML")
    assert first.count(str(input_file)) == 1
    assert not out.exists()


def test_cli_refuses_an_existing_file_as_output(tmp_path, capsys):
    structures = write_structures(tmp_path / "s.json", {"cu": fcc("Cu")})
    settings = write_input(tmp_path / "relax.yaml", {"potential": EMT_POTENTIAL})
    out = tmp_path / "out"
    out.write_text("a file")
    assert main(["--quiet", "relax", "--structures", str(structures), "--input", str(settings), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert out.read_text() == "a file"


@pytest.mark.parametrize(("values", "message"), [
    ({"device": "meta"}, "device must be one of auto, cpu, cuda, cuda:N or mps, got 'meta'"),
    ({"threads": 0}, "threads: Input should be greater than or equal to 1, got 0"),
])
def test_device_and_threads_are_checked_with_the_settings(values, message):
    with pytest.raises(ValueError, match=message):
        RelaxSettings.from_mapping(values)
