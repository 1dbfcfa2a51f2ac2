"""Dataset loading, preprocessing cache, and Crystal <-> pymatgen/ase conversions."""

import gzip
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from equicsp_core import data
from equicsp_core.crystal import Crystal
from equicsp_core.data import load_split

RNG_SEED = 1234


def _cache_files(cache_dir, prefix):
    return sorted(cache_dir.glob(f"{prefix}_*.pt"))


def _assert_same_crystals(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert torch.equal(a.atomic_numbers, b.atomic_numbers)
        assert torch.equal(a.frac_coords, b.frac_coords)
        assert torch.equal(a.lengths, b.lengths)
        assert torch.equal(a.angles, b.angles)


def _structure_from_fixture(fixture_data_dir, dataset, split, row):
    from pymatgen.core import Structure

    cif = pd.read_csv(fixture_data_dir / dataset / f"{split}.csv.gz")["cif"][row]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Structure.from_str(cif, fmt="cif")


def _random_rotation(rng):
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def _random_triclinic_lattice(rng):
    from pymatgen.core import Lattice

    lengths = rng.uniform(3.0, 8.0, size=3)
    angles = rng.uniform(70.0, 110.0, size=3)
    matrix = Lattice.from_parameters(*lengths, *angles).matrix
    return matrix @ _random_rotation(rng).T  # an arbitrary orientation, not the canonical one


def _periodic_diff(a, b):
    d = np.asarray(a) - np.asarray(b)
    return d - np.round(d)


# ------------------------------------------------------------------------------------------------
# load_split on the fixtures


def test_load_split_perov_train_gives_24_five_atom_crystals(fixture_data_dir):
    """The perov_5 train fixture loads as 24 crystals of 5 atoms each."""
    crystals = load_split("perov_5", "train", fixture_data_dir, progress=False)
    assert len(crystals) == 24
    assert all(c.num_atoms == 5 for c in crystals)


def test_load_split_frac_coords_in_unit_interval(fixture_data_dir):
    """Every fractional coordinate of the loaded crystals lies in [0, 1)."""
    for dataset, split in (("perov_5", "train"), ("mp_20", "val")):
        for crystal in load_split(dataset, split, fixture_data_dir, progress=False):
            assert crystal.frac_coords.dtype == torch.float64
            assert bool((crystal.frac_coords >= 0).all()) and bool((crystal.frac_coords < 1).all())


def test_load_split_lattices_are_canonical(fixture_data_dir):
    """Loaded lattices are in the canonical orientation: c along z, a in the xz plane."""
    for crystal in load_split("mp_20", "val", fixture_data_dir, progress=False):
        lattice = crystal.lattice
        assert lattice[2, 0] == 0 and lattice[2, 1] == 0
        assert lattice[0, 1] == 0
        assert float(lattice[2, 2]) > 0


def test_load_split_applies_niggli_reduction(fixture_data_dir):
    """A non-reduced mp_20 cell comes back with pymatgen's Niggli-reduced lattice and coordinates."""
    row = 9  # a cell that Niggli reduction changes substantially
    structure = _structure_from_fixture(fixture_data_dir, "mp_20", "val", row)
    reduced = structure.get_reduced_structure()
    assert not np.allclose(structure.lattice.parameters, reduced.lattice.parameters, atol=1e-2)

    crystal = load_split("mp_20", "val", fixture_data_dir, progress=False)[row]
    np.testing.assert_allclose(crystal.lengths.numpy(), reduced.lattice.abc, atol=1e-6)
    np.testing.assert_allclose(crystal.angles.numpy(), reduced.lattice.angles, atol=1e-6)
    assert crystal.atomic_numbers.tolist() == list(reduced.atomic_numbers)
    assert np.abs(_periodic_diff(crystal.frac_coords.numpy(), reduced.frac_coords)).max() < 1e-9


def test_load_split_without_niggli_keeps_cif_cell(fixture_data_dir):
    """With ``niggli=False`` the crystal keeps the CIF's own cell parameters."""
    row = 9
    structure = _structure_from_fixture(fixture_data_dir, "mp_20", "val", row)
    crystal = load_split("mp_20", "val", fixture_data_dir, niggli=False, progress=False)[row]
    np.testing.assert_allclose(crystal.lengths.numpy(), structure.lattice.abc, atol=1e-6)
    np.testing.assert_allclose(crystal.angles.numpy(), structure.lattice.angles, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# The preprocessing cache


def test_second_load_is_served_from_cache(fixture_data_dir, tmp_path, monkeypatch):
    """The first load writes a cache file; the second is read from it without parsing any CIF."""
    cache_dir = tmp_path / "cache"
    monkeypatch.setenv("EQUICSP_CACHE_DIR", str(cache_dir))
    first = load_split("perov_5", "train", fixture_data_dir, progress=False)
    assert len(_cache_files(cache_dir, "perov_5_train")) == 1

    def no_parsing(*args, **kwargs):
        raise AssertionError("parse_cifs called although the cache is fresh")

    monkeypatch.setattr(data, "parse_cifs", no_parsing)
    _assert_same_crystals(first, load_split("perov_5", "train", fixture_data_dir, progress=False))


@pytest.mark.parametrize("corruption", ["random bytes", "wrong payload"])
def test_corrupt_cache_is_rebuilt(fixture_data_dir, tmp_path, monkeypatch, corruption):
    """A corrupt cache file is discarded and rebuilt from the CSV, giving the same crystals."""
    cache_dir = tmp_path / "cache"
    monkeypatch.setenv("EQUICSP_CACHE_DIR", str(cache_dir))
    first = load_split("perov_5", "val", fixture_data_dir, progress=False)
    (cache,) = _cache_files(cache_dir, "perov_5_val")
    if corruption == "random bytes":
        cache.write_bytes(np.random.default_rng(0).bytes(512))
    else:
        torch.save({"num_atoms": torch.tensor([5])}, cache)

    rebuilt = load_split("perov_5", "val", fixture_data_dir, progress=False)
    _assert_same_crystals(first, rebuilt)
    assert torch.load(cache, weights_only=True)["num_atoms"].tolist() == [5] * 12


def test_unknown_dataset_is_a_value_error_naming_it(fixture_data_dir):
    """An unknown dataset name raises ValueError naming it."""
    with pytest.raises(ValueError, match="perov_6"):
        load_split("perov_6", "train", fixture_data_dir, progress=False)


def test_missing_split_is_file_not_found(fixture_data_dir):
    """mp_20 has no train split in the fixtures: FileNotFoundError naming dataset and split."""
    with pytest.raises(FileNotFoundError, match="mp_20/train"):
        load_split("mp_20", "train", fixture_data_dir, progress=False)


def test_missing_data_dir_is_file_not_found(tmp_path, monkeypatch):
    """A data directory that does not exist raises FileNotFoundError, as argument or via the env."""
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        load_split("perov_5", "train", tmp_path / "no-such-dir", progress=False)
    monkeypatch.setenv("EQUICSP_DATA_DIR", str(tmp_path / "no-such-dir"))
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        load_split("perov_5", "train", progress=False)


def test_data_dir_comes_from_environment(fixture_data_dir):
    """Without a data_dir argument, $EQUICSP_DATA_DIR (the fixtures, set in conftest) is used."""
    assert len(load_split("perov_5", "test", progress=False)) == 12


def test_malformed_cif_names_its_row(fixture_data_dir, tmp_path):
    """A split whose second CIF is malformed raises ValueError naming row 1."""
    good = pd.read_csv(fixture_data_dir / "perov_5" / "val.csv.gz")["cif"][0]
    (tmp_path / "perov_5").mkdir()
    with gzip.open(tmp_path / "perov_5" / "val.csv.gz", "wt") as handle:
        pd.DataFrame({"cif": [good, "data_broken\n_cell_length_a 3.0\n"]}).to_csv(handle, index=False)
    with pytest.raises(ValueError, match=r"row 1\b"):
        load_split("perov_5", "val", tmp_path, progress=False)


# ------------------------------------------------------------------------------------------------
# Conversions


def test_structure_round_trip_is_exact():
    """Structure -> Crystal -> Structure keeps cell parameters, frac coords and distances."""
    from pymatgen.core import Lattice, Structure

    rng = np.random.default_rng(RNG_SEED)
    species = ["Sr", "Ti", "O", "O", "Li", "Fe"]
    structure = Structure(Lattice(_random_triclinic_lattice(rng)), species, rng.uniform(-0.2, 1.2, size=(6, 3)))

    back = Crystal.from_structure(structure).to_structure()
    assert [str(s) for s in back.species] == species
    np.testing.assert_allclose(back.lattice.abc, structure.lattice.abc, rtol=0, atol=1e-9)
    np.testing.assert_allclose(back.lattice.angles, structure.lattice.angles, rtol=0, atol=1e-9)
    assert np.abs(_periodic_diff(back.frac_coords, structure.frac_coords)).max() < 1e-9
    np.testing.assert_allclose(back.distance_matrix, structure.distance_matrix, rtol=0, atol=1e-6)


def test_atoms_round_trip_is_exact():
    """ase Atoms -> Crystal -> Atoms keeps numbers, cell parameters, scaled positions and distances."""
    import ase

    rng = np.random.default_rng(RNG_SEED + 1)
    numbers = [8, 8, 22, 38, 1]
    atoms = ase.Atoms(numbers=numbers, scaled_positions=rng.uniform(0, 1, size=(5, 3)),
                      cell=_random_triclinic_lattice(rng), pbc=True)

    back = Crystal.from_atoms(atoms).to_atoms()
    assert back.get_atomic_numbers().tolist() == numbers
    assert back.pbc.all()
    np.testing.assert_allclose(back.cell.cellpar(), atoms.cell.cellpar(), rtol=0, atol=1e-9)
    diff = _periodic_diff(back.get_scaled_positions(wrap=False), atoms.get_scaled_positions(wrap=False))
    assert np.abs(diff).max() < 1e-9
    np.testing.assert_allclose(back.get_all_distances(mic=True), atoms.get_all_distances(mic=True), rtol=0, atol=1e-6)


def test_from_arrays_discards_orientation_and_wraps_coords():
    """from_arrays rebuilds the canonical lattice and wraps coordinates into [0, 1)."""
    rng = np.random.default_rng(RNG_SEED + 2)
    lattice = _random_triclinic_lattice(rng)
    crystal = Crystal.from_arrays([3, 9], [[1.25, -0.5, 0.1], [0.3, 2.75, -1.2]], lattice)
    np.testing.assert_allclose(crystal.frac_coords.numpy(), [[0.25, 0.5, 0.1], [0.3, 0.75, 0.8]], atol=1e-12)
    gram = crystal.lattice.numpy() @ crystal.lattice.numpy().T
    np.testing.assert_allclose(gram, lattice @ lattice.T, atol=1e-9)


def test_from_arrays_tiny_negative_coordinate_stays_below_one():
    """A coordinate of -1e-17 wraps to a value in [0, 1), as the Crystal docstring promises."""
    crystal = Crystal.from_arrays([1], [[-1e-17, 0.5, 0.0]], np.eye(3) * 3.0)
    assert bool((crystal.frac_coords < 1).all())


def _empty_structure():
    from pymatgen.core import Lattice, Structure

    return Crystal.from_structure(Structure(Lattice.cubic(3.0), [], []))


def _dummy_species_structure():
    from pymatgen.core import DummySpecies, Lattice, Structure

    return Crystal.from_structure(Structure(Lattice.cubic(3.0), [DummySpecies("X")], [[0, 0, 0]]))


def _disordered_structure():
    from pymatgen.core import Lattice, Structure

    return Crystal.from_structure(Structure(Lattice.cubic(3.0), [{"Fe": 0.5, "Co": 0.5}, "O"], [[0, 0, 0], [0.5] * 3]))


def _empty_atoms():
    import ase

    return Crystal.from_atoms(ase.Atoms(cell=np.eye(3) * 3.0, pbc=True))


def _ghost_atom_atoms():
    import ase

    return Crystal.from_atoms(ase.Atoms(numbers=[0, 8], scaled_positions=[[0, 0, 0], [0.5] * 3], cell=np.eye(3) * 3.0))


BAD_INPUTS = {
    "empty structure": (_empty_structure, "no atoms"),
    "dummy species X": (_dummy_species_structure, "unsupported element"),
    "disordered structure": (_disordered_structure, "disordered"),
    "empty atoms": (_empty_atoms, "no atoms"),
    "atomic number 0 in ase": (_ghost_atom_atoms, "unsupported atomic numbers"),
    "atomic number 101": (lambda: Crystal.from_arrays([101], [[0, 0, 0]], np.eye(3) * 3.0), "unknown atomic numbers"),
    "NaN coordinate": (lambda: Crystal.from_arrays([1], [[np.nan, 0, 0]], np.eye(3) * 3.0), "NaN"),
    "NaN lattice": (lambda: Crystal.from_arrays([1], [[0, 0, 0]], np.diag([3.0, np.nan, 3.0])), "NaN"),
    "zero lattice row": (lambda: Crystal.from_arrays([1, 1], [[0, 0, 0], [0.5] * 3], np.diag([3.0, 3.0, 0.0])),
                         "singular"),
    "coplanar lattice": (lambda: Crystal.from_arrays([1], [[0, 0, 0]], [[3, 0, 0], [0, 3, 0], [3, 3, 0]]), "singular"),
    "lattice not 3x3": (lambda: Crystal.from_arrays([1], [[0, 0, 0]], np.eye(2)), "3x3"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_raises_value_error(name):
    """Each malformed crystal input raises ValueError with a message saying what is wrong."""
    build, message = BAD_INPUTS[name]
    with pytest.raises(ValueError, match=message):
        build()
