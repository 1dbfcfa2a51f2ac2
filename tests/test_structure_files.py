"""``equicsp relax --structures PATH``: JSON, CIF, extended XYZ and the output folder of ``equicsp sample``."""

import json

import pytest
from ase.io import write
from pymatgen.core import Lattice, Structure
from pymatgen.io.ase import AseAtomsAdaptor

from equicsp_core.cli import main
from equicsp_core.structure_files import read_structure_set, read_structures

EMT_SETTINGS = "potential: tests.test_relax:emt\nsteps: 5\ndevice: cpu\n"


def fcc(element: str = "Cu", a: float = 3.6) -> Structure:
    return Structure(Lattice.cubic(a), [element] * 4, [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])


def same(left: Structure, right: Structure) -> bool:
    return left.composition == right.composition and left.lattice.abc == pytest.approx(right.lattice.abc)


def test_json_of_pymatgen_dicts(tmp_path):
    path = tmp_path / "candidates.json"
    path.write_text(json.dumps({"a": fcc().as_dict(), "b": fcc("Ni", 3.5).as_dict()}))
    structures = read_structures(path)
    assert list(structures) == ["a", "b"] and same(structures["b"], fcc("Ni", 3.5))


def test_cif_with_one_structure_is_labelled_by_its_stem(tmp_path):
    fcc().to(filename=str(tmp_path / "copper.cif"))
    structures = read_structures(tmp_path / "copper.cif")
    assert list(structures) == ["copper"] and same(structures["copper"], fcc())


def test_extxyz_frames_are_labelled_by_their_label_or_their_index(tmp_path):
    first, second = (AseAtomsAdaptor.get_atoms(s) for s in (fcc(), fcc("Ni", 3.5)))
    first.info["label"] = "copper"
    write(tmp_path / "frames.extxyz", [first, second], format="extxyz")
    structures = read_structures(tmp_path / "frames.extxyz")
    assert list(structures) == ["copper", "frames_001"]
    assert same(structures["frames_001"], fcc("Ni", 3.5))


def sample_folder(tmp_path, valid=(True, False)):
    """A folder as ``equicsp sample`` writes it: a CIF per valid sample, ``index.json`` and ``run.json``."""
    folder = tmp_path / "sampled"
    folder.mkdir()
    samples = []
    for sample, is_valid in enumerate(valid):
        file = f"Cu4_{sample:03d}.cif" if is_valid else None
        if is_valid:
            fcc().to(filename=str(folder / file))
        samples.append({"formula": "Cu", "sample": sample, "formula_units": 4, "cell_formula": "Cu4",
                        "valid": is_valid, "file": file})
    (folder / "index.json").write_text(json.dumps({"checkpoint": "x", "steps": None, "seed": 3, "samples": samples}))
    (folder / "run.json").write_text(json.dumps({"steps": 1000}))
    return folder


def test_sample_folder_gives_its_valid_candidates(tmp_path):
    structures = read_structures(sample_folder(tmp_path))
    assert list(structures) == ["Cu4_000"] and same(structures["Cu4_000"], fcc())


def test_a_folder_s_set_names_its_unwritten_samples_and_its_settings_with_the_steps_as_run(tmp_path):
    found = read_structure_set(sample_folder(tmp_path))
    assert list(found.structures) == ["Cu4_000"] and found.unwritten == ["Cu4"]
    assert found.settings == {"checkpoint": "x", "steps": 1000, "seed": 3}


def test_a_folder_whose_samples_all_failed_is_a_set_of_unwritten_samples_but_no_structures(tmp_path):
    """What ``evaluate-generation`` scores as invalid crystals is no input for ``relax``."""
    folder = sample_folder(tmp_path, valid=(False, False))
    found = read_structure_set(folder)
    assert found.structures == {} and found.unwritten == ["Cu4", "Cu4"]
    with pytest.raises(ValueError, match=f"no structures in {folder}"):
        read_structures(folder)


def test_a_file_s_set_has_no_unwritten_samples_and_no_settings(tmp_path):
    fcc().to(filename=str(tmp_path / "copper.cif"))
    found = read_structure_set(tmp_path / "copper.cif")
    assert list(found.structures) == ["copper"] and found.unwritten == [] and found.settings is None


@pytest.mark.filterwarnings("ignore::UserWarning")  # pymatgen's CIF parser on the broken file
@pytest.mark.parametrize(("name", "content", "message"), [
    ("notes.txt", "hello", r"cannot tell the format of .*notes.txt"),
    ("broken.json", "{", r"cannot read structures from .*broken.json"),
    ("list.json", "[1, 2]", r"list.json: the file must hold a JSON object"),
    ("empty.json", "{}", r"no structures in .*empty.json"),
    ("broken.cif", "data_x\n_cell_length_a 3\n", r"cannot read structures from .*broken.cif"),
])
def test_unreadable_inputs_are_refused_naming_the_path(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=message):
        read_structures(tmp_path / name)


def test_a_folder_not_written_by_sample_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no index.json: it is not an output folder of `equicsp sample`"):
        read_structures(tmp_path)


def test_repeated_labels_are_refused(tmp_path):
    atoms = AseAtomsAdaptor.get_atoms(fcc())
    atoms.info["label"] = "same"
    write(tmp_path / "twice.extxyz", [atoms, atoms], format="extxyz")
    with pytest.raises(ValueError, match="the label 'same' is given more than once"):
        read_structures(tmp_path / "twice.extxyz")


def test_relax_reads_what_sample_wrote(tiny_checkpoint, tmp_path, monkeypatch):
    """``equicsp sample`` then ``equicsp relax`` on its folder: a result per valid candidate, by file stem.

    The tiny model's lattices mostly diverge, so its candidates are made valid as in ``tests/test_cli.py``.
    """
    import torch

    from equicsp_core import predict, sampler

    def fixed_cell_sample(*args, **kwargs):
        result = sampler.sample(*args, **kwargs)
        result.batch.lengths = torch.full_like(result.batch.lengths, 4.0)
        result.batch.angles = torch.full_like(result.batch.angles, 90.0)
        return sampler.SampleResult(result.batch, torch.ones_like(result.finite))

    monkeypatch.setattr(predict, "sample", fixed_cell_sample)
    sampled = tmp_path / "sampled"
    assert main(["--quiet", "sample", "--checkpoint", str(tiny_checkpoint), "--formula", "SrTiO3",
                 "--num-samples", "2", "--steps", "2", "--device", "cpu", "--out", str(sampled)]) == 0
    (tmp_path / "relax.yaml").write_text(EMT_SETTINGS)
    relaxed = tmp_path / "relaxed"
    assert main(["--quiet", "relax", "--structures", str(sampled), "--input", str(tmp_path / "relax.yaml"),
                 "--out", str(relaxed)]) == 0
    results = json.loads((relaxed / "relax.json").read_text())["results"]
    assert list(results) == ["SrTiO3_000", "SrTiO3_001"]


def test_relax_reads_a_cif_file(tmp_path):
    fcc(a=3.7).to(filename=str(tmp_path / "copper.cif"))
    (tmp_path / "relax.yaml").write_text(EMT_SETTINGS)
    assert main(["--quiet", "relax", "--structures", str(tmp_path / "copper.cif"), "--input",
                 str(tmp_path / "relax.yaml"), "--out", str(tmp_path / "out")]) == 0
    results = json.loads((tmp_path / "out" / "relax.json").read_text())["results"]
    assert list(results) == ["copper"] and results["copper"]["status"] in {"converged", "not_converged"}
