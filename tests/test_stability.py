"""The reference set (equicsp_core.reference), the ML hull and novelty (equicsp_core.stability) and their
columns of the ranking table (equicsp_core.pipeline.stability, table_rows)."""

import gzip
import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest
from pymatgen.core import Lattice, Structure

from equicsp_core import pipeline
from equicsp_core.cli import main
from equicsp_core.reference import (
    DATA_SHA256,
    ReferenceSet,
    ReferenceSetError,
    build_reference,
    data_sha256,
    entry_of,
    load_reference,
)
from equicsp_core.relax import RelaxResult
from equicsp_core.settings import RelaxSettings, SettingsError, StabilitySettings
from equicsp_core.stability import EnergyCache, e_above_hull, hull, known_energies, novelty, reference_energies

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def rocksalt(a: str, b: str, edge: float = 4.2) -> Structure:
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(edge), [a, b], [[0, 0, 0], [0.5, 0.5, 0.5]])


def fcc(element: str, edge: float = 4.0) -> Structure:
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(edge), [element], [[0, 0, 0]])


def cesium_chloride(a: str, b: str, edge: float = 3.0) -> Structure:
    return Structure(Lattice.cubic(edge), [a, b], [[0, 0, 0], [0.5, 0.5, 0.5]])


def write_split(folder: Path, dataset: str, split: str, rows: list[dict]) -> None:
    (folder / dataset).mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(folder / dataset / f"{split}.csv.gz", index=False)


@pytest.fixture
def data_dir(tmp_path) -> Path:
    """A small data folder: three mp_20 rows (one repeated in mpts_52), one perov_5 row."""
    folder = tmp_path / "data"
    mp = [{"material_id": "mp-22862", "cif": rocksalt("Na", "Cl").to(fmt="cif"), "e_above_hull": 0.0},
          {"material_id": "mp-22851", "cif": cesium_chloride("Na", "Cl").to(fmt="cif"), "e_above_hull": 0.05},
          {"material_id": "mp-974558", "cif": fcc("Na").to(fmt="cif"), "e_above_hull": 0.0}]
    write_split(folder, "mp_20", "test", mp)
    write_split(folder, "mpts_52", "val", [{"material_id": "mp-22862", "cif": rocksalt("Na", "Cl", 5.0).to(fmt="cif"),
                                            "energy_above_hull": 0.3}])
    perovskite = Structure(Lattice.cubic(3.9), ["Sr", "Ti", "O", "O", "O"],
                           [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    write_split(folder, "perov_5", "test", [{"material_id": 7, "cif": perovskite.to(fmt="cif")}])
    return folder


def content_sha256(path: Path) -> str:
    return hashlib.sha256(gzip.open(path).read()).hexdigest()


# --- the reference set ------------------------------------------------------------------------------------------


def test_reference_build_is_deterministic_deduplicated_and_adds_elements(data_dir, tmp_path):
    first = build_reference(data_dir, tmp_path / "a.jsonl.gz", pin=None)
    second = build_reference(data_dir, tmp_path / "b.jsonl.gz", pin=None)
    assert first.read_bytes() == second.read_bytes()
    reference = load_reference(first, pin=data_sha256(data_dir))
    assert reference.sha256 == content_sha256(first)
    ids = [entry.id for entry in reference.entries]
    assert ids == sorted(ids)
    # mp-22862 once, from mp_20 (the first source), with mp_20's e_above_hull; perov_5's integer id prefixed
    (salt,) = [entry for entry in reference.entries if entry.id == "mp-22862"]
    assert (salt.source, salt.e_above_hull, salt.lattice[0][0]) == ("mp_20", 0.0, 4.2)
    assert "perov_5-7" in ids
    # the elements without a single-element entry get ASE's crystal where ASE has one: Cl, O (gases) do not
    assert {"ase-Sr", "ase-Ti"} <= set(ids) and not {"ase-Cl", "ase-O", "ase-Na"} & set(ids)
    assert reference.like("Sr")[0].source == "ase" and reference.like("Sr2Ti2O6")[0].e_above_hull is None


def test_reference_build_is_refused_when_the_data_is_not_the_pinned(data_dir, tmp_path):
    out = tmp_path / "ref.jsonl.gz"
    pin = data_sha256(data_dir)
    with pytest.raises(ReferenceSetError, match="^the data folder .* is not the one the reference set is pinned to: "
                                                "mp_20/test.csv has SHA-256 [0-9a-f]{64}, not the pinned 0{64}$"):
        build_reference(data_dir, out, pin={**pin, "mp_20/test.csv": "0" * 64})
    with pytest.raises(ReferenceSetError, match="pinned to: carbon_24/val.csv is missing$"):
        build_reference(data_dir, out, pin={**pin, "carbon_24/val.csv": "0" * 64})
    with pytest.raises(ReferenceSetError, match="pinned to: perov_5/test.csv is not among the pinned files$"):
        build_reference(data_dir, out, pin={key: value for key, value in pin.items() if key != "perov_5/test.csv"})
    assert not out.exists()


def test_reference_load_checks_the_data_pin_and_the_layout_and_says_how_to_build(data_dir, tmp_path):
    path = build_reference(data_dir, tmp_path / "ref.jsonl.gz", pin=None)
    other = {**data_sha256(data_dir), "mp_20/test.csv": "1" * 64}
    with pytest.raises(ReferenceSetError, match=r"^the reference set .* is built from other data than the pinned "
                                                r"\(mp_20/test.csv has SHA-256 [0-9a-f]{64}, not the pinned 1{64}\): "
                                                r"delete it and run `equicsp reference build`"):
        load_reference(path, pin=other)
    lines = gzip.decompress(path.read_bytes()).splitlines(keepends=True)
    older = tmp_path / "older.jsonl.gz"  # the layout before the header line: entries only
    older.write_bytes(gzip.compress(b"".join(lines[1:])))
    with pytest.raises(ReferenceSetError, match=r"^the reference set .*older.jsonl.gz has another layout than this "
                                                r"version's \(format 2\): delete it and run `equicsp reference build`"):
        load_reference(older, pin=None)
    with pytest.raises(ReferenceSetError, match=r"^no reference set at .*missing.jsonl.gz: run `equicsp reference "
                                                r"build`"):
        load_reference(tmp_path / "missing.jsonl.gz")


def test_reference_is_built_on_first_use_and_refused_when_the_data_is_not_the_pinned(data_dir, monkeypatch, tmp_path):
    """No file in the cache folder: load_reference builds it from the data folder, checked against the pin."""
    monkeypatch.setenv("EQUICSP_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(ReferenceSetError, match="^no reference set at .*not the one the reference set is pinned to: "
                                                ".*: run `equicsp reference"):
        load_reference(data_dir=data_dir)
    assert not (tmp_path / "cache" / "reference_set.jsonl.gz").exists()
    assert len(load_reference(data_dir=data_dir, pin=data_sha256(data_dir))) == 6  # 4 rows (one twice), Sr, Ti
    assert (tmp_path / "cache" / "reference_set.jsonl.gz").is_file()


def test_a_default_set_of_the_older_layout_is_rebuilt_on_use(data_dir, monkeypatch, tmp_path):
    """The cache folder's set written before the header line (entries only) is rebuilt from the data on first use;
    the same file given by path is refused with the rebuild hint (test above)."""
    monkeypatch.setenv("EQUICSP_CACHE_DIR", str(tmp_path / "cache"))
    default = tmp_path / "cache" / "reference_set.jsonl.gz"
    built = build_reference(data_dir, default, pin=None)
    entries = gzip.decompress(built.read_bytes()).splitlines(keepends=True)[1:]
    default.write_bytes(gzip.compress(b"".join(entries)))
    reference = load_reference(data_dir=data_dir, pin=data_sha256(data_dir))
    assert len(reference) == 6 and reference.sha256 == content_sha256(default)
    assert json.loads(gzip.decompress(default.read_bytes()).splitlines()[0])["format"] == 2


def test_cli_reference_build_refuses_other_data_in_one_line(data_dir, tmp_path, capsys):
    out = tmp_path / "ref.jsonl.gz"
    assert main(["--quiet", "reference", "build", "--data-dir", str(data_dir), "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"equicsp reference: error: the data folder {data_dir} is not the one the reference set "
                            f"is pinned to: carbon_24/test.csv is missing")
    assert error.count("\n") == 0 and not out.exists()


@pytest.mark.skipif(not (SHARED_DATA / "mp_20" / "test.csv.gz").is_file(), reason="needs ../shared/data")
def test_the_pinned_data_is_the_shared_data_folder():
    """The pin is the data README's: every decompressed split file of ../shared/data has its pinned SHA-256."""
    assert data_sha256(SHARED_DATA) == DATA_SHA256


def test_hull_references_keep_the_lowest_below_the_cutoff(data_dir, tmp_path):
    reference = load_reference(build_reference(data_dir, tmp_path / "r.jsonl.gz", pin=None), pin=None)
    chosen = [entry.id for entry in reference.hull_references({"Na", "Cl"}, cutoff=0.0, per_composition=1)]
    assert chosen == ["mp-22862", "mp-974558"]  # NaCl rock salt, Na; the CsCl polymorph is 0.05 above
    chosen = [entry.id for entry in reference.hull_references({"Na", "Cl"}, cutoff=0.1, per_composition=2)]
    assert chosen == ["mp-22851", "mp-22862", "mp-974558"]
    assert [entry.id for entry in reference.hull_references({"Na", "Cl"}, 0.1, per_composition=1)][0] == "mp-22862"


# --- the hull -----------------------------------------------------------------------------------------------------


#: Energies per atom (eV/atom) that the stub potential gives each reference entry.
ENERGIES = {"cu": -1.0, "au": -2.0, "cuau": -2.0, "cuau-high": -1.0, "broken": None}


def hand_made_reference() -> ReferenceSet:
    """Cu, Au (elements), CuAu (rock salt; e_above_hull 0) and a CuAu polymorph above the data's hull."""
    entries = [entry_of("cu", "test", fcc("Cu", 3.6), 0.0), entry_of("au", "test", fcc("Au", 4.1), 0.0),
               entry_of("cuau", "test", rocksalt("Cu", "Au"), 0.0),
               entry_of("cuau-high", "test", cesium_chloride("Cu", "Au"), 0.2),
               entry_of("zn-cu", "test", cesium_chloride("Zn", "Cu"), 0.0)]
    return ReferenceSet(entries, "f" * 64)


class StubRelax:
    """Gives each reference entry its :data:`ENERGIES` value; counts what it relaxed."""

    def __init__(self):
        self.relaxed: list[str] = []

    def __call__(self, structures):
        for label, structure in structures.items():
            self.relaxed.append(label)
            energy = ENERGIES.get(label, -1.0)
            yield label, RelaxResult("failed" if energy is None else "converged", structure, energy,
                                     error="stub failure" if energy is None else None)


def cu3au(edge: float = 3.7) -> Structure:
    return Structure(Lattice.cubic(edge), ["Au", "Cu", "Cu", "Cu"],
                     [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])


def test_e_above_hull_by_hand(tmp_path):
    """Cu -1, Au -2, CuAu -2 eV/atom: the hull at x(Au) = 1/4 lies at -1.5 eV/atom (half way from Cu to CuAu)."""
    relax = StubRelax()
    cache = EnergyCache(tmp_path / "energies.json", "ML (stub)", "f" * 64)
    candidates = {"cu3au": (cu3au().composition, -1.6), "cuau": (rocksalt("Cu", "Au", 4.3).composition, -1.9),
                  "au": (fcc("Au", 4.2).composition, -1.95)}
    hull = e_above_hull(candidates, hand_made_reference(), relax, cache, cutoff=0.0, per_composition=1)
    assert hull["cu3au"].e_above_hull == pytest.approx(-1.6 - (-1.5))  # below the hull: negative
    assert hull["cuau"].e_above_hull == pytest.approx(-1.9 - (-2.0))
    assert hull["au"].e_above_hull == pytest.approx(0.05)
    assert all(result.reason is None for result in hull.values())
    # the polymorph above the data's hull (0.2 > cutoff 0) and Zn's system were not relaxed
    assert sorted(relax.relaxed) == ["au", "cu", "cuau"]


def test_competing_candidates_join_their_system_s_hull(tmp_path):
    """A CuAu candidate at -2.1 eV/atom, below the reference CuAu (-2.0), moves the hull at x(Au) = 1/4 down to
    -1.55 (half way from Cu to it): Cu3Au at -1.5, on the references' hull, is then 0.05 above; each candidate's value
    against the references alone is unchanged without ``compete``."""
    cache = EnergyCache(tmp_path / "energies.json", "ML (stub)", "f" * 64)
    candidates = {"cu3au": (cu3au().composition, -1.5), "cuau": (rocksalt("Cu", "Au", 4.3).composition, -2.1)}
    alone = e_above_hull(candidates, hand_made_reference(), StubRelax(), cache, cutoff=0.0, per_composition=1)
    assert alone["cu3au"].e_above_hull == pytest.approx(0.0) and alone["cuau"].e_above_hull == pytest.approx(-0.1)
    together = e_above_hull(candidates, hand_made_reference(), StubRelax(), cache, cutoff=0.0, per_composition=1,
                            compete=True)
    assert together["cu3au"].e_above_hull == pytest.approx(-1.5 - (-1.55))
    assert together["cuau"].e_above_hull == pytest.approx(0.0)


def test_competing_candidates_of_a_subsystem_join_the_hull_above_it():
    """Elements only (Cu -1, Au -2, Zn -1 eV/atom): Zn2CuAu at -1.4 lies 0.15 below their hull (-1.25). A CuAu
    candidate at -2.1 joins the Cu-Au-Zn hull too: half Zn and half CuAu is -1.55, so Zn2CuAu is 0.15 above it."""
    entries = [entry_of("cu", "test", fcc("Cu", 3.6), 0.0), entry_of("au", "test", fcc("Au", 4.1), 0.0),
               entry_of("zn", "test", fcc("Zn", 3.9), 0.0)]
    energies = known_energies({"cu": {"energy_per_atom": -1.0}, "au": {"energy_per_atom": -2.0},
                               "zn": {"energy_per_atom": -1.0}})
    ternary = Structure(Lattice.cubic(4.0), ["Zn", "Zn", "Cu", "Au"],
                        [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    candidates = {"zn2cuau": (ternary.composition, -1.4), "cuau": (rocksalt("Cu", "Au").composition, -2.1)}
    reference = ReferenceSet(entries, "d" * 64)
    alone = hull(candidates, reference, energies, cutoff=0.0, per_composition=1)
    assert alone["zn2cuau"].e_above_hull == pytest.approx(-0.15)
    together = hull(candidates, reference, energies, cutoff=0.0, per_composition=1, compete=True)
    assert together["zn2cuau"].e_above_hull == pytest.approx(0.15)
    assert together["cuau"].e_above_hull == pytest.approx(0.0)


def test_e_above_hull_without_an_elemental_reference_gives_a_reason(tmp_path):
    relax = StubRelax()
    cache = EnergyCache(tmp_path / "energies.json", "ML (stub)", "f" * 64)
    candidates = {"zncu": (cesium_chloride("Zn", "Cu").composition, -1.0), "cuau": (rocksalt("Cu", "Au").composition, -1.9)}
    hull = e_above_hull(candidates, hand_made_reference(), relax, cache, cutoff=0.0, per_composition=1)
    assert hull["zncu"].e_above_hull is None
    assert hull["zncu"].reason.startswith("no ML E_hull: no elemental reference for Zn ")
    assert hull["cuau"].e_above_hull == pytest.approx(0.1)  # the run goes on for the others


def test_a_failed_reference_relaxation_is_a_gap(tmp_path):
    entries = [entry_of("broken", "test", fcc("Cu", 3.6), 0.0), entry_of("au", "test", fcc("Au", 4.1), 0.0)]
    cache = EnergyCache(tmp_path / "energies.json", "ML (stub)", "e" * 64)
    hull = e_above_hull({"cuau": (rocksalt("Cu", "Au").composition, -1.9)}, ReferenceSet(entries, "e" * 64), StubRelax(), cache,
                        cutoff=0.0, per_composition=1)
    assert hull["cuau"].e_above_hull is None and "no elemental reference for Cu" in hull["cuau"].reason


def test_the_cache_relaxes_each_reference_once(tmp_path):
    reference = hand_made_reference()
    cache = EnergyCache(tmp_path / "energies.json", "ML (stub)", reference.sha256)
    first, second = StubRelax(), StubRelax()
    chosen = reference.hull_references({"Cu", "Au"}, 0.0, 1)
    assert reference_energies(chosen, first, cache) == {"au": -2.0, "cu": -1.0, "cuau": -2.0}
    assert reference_energies(chosen, second, cache) == {"au": -2.0, "cu": -1.0, "cuau": -2.0}
    assert sorted(first.relaxed) == ["au", "cu", "cuau"] and second.relaxed == []
    stored = json.loads((tmp_path / "energies.json").read_text())
    assert stored["ML (stub)"]["f" * 64]["cu"] == {"energy_per_atom": -1.0, "status": "converged", "error": None}
    # another level (potential, settings) or another reference set relaxes afresh
    third = StubRelax()
    reference_energies(chosen, third, EnergyCache(tmp_path / "energies.json", "ML (other)", reference.sha256))
    assert sorted(third.relaxed) == ["au", "cu", "cuau"]


# --- novelty ------------------------------------------------------------------------------------------------------


def test_novelty_matches_a_known_structure_or_says_new():
    reference = hand_made_reference()
    assert novelty(rocksalt("Au", "Cu", 4.35), reference) == "matches cuau (Fm-3m)"  # another cell size matches
    supercell = rocksalt("Cu", "Au").get_primitive_structure() * (2, 1, 1)  # Cu2Au2: same reduced formula
    assert novelty(supercell, reference) == "matches cuau (Fm-3m)"
    zincblende = Structure.from_spacegroup("F-43m", Lattice.cubic(5.0), ["Cu", "Au"], [[0, 0, 0], [0.25] * 3])
    assert novelty(zincblende, reference) == "new"
    assert novelty(fcc("Ag"), reference) == "new"  # nothing of the composition is known


def test_novelty_calls_a_strained_relative_of_a_known_phase_new_and_names_it():
    """A tetragonal CsCl CuAu cell matches the cubic entry under StructureMatcher's length tolerance at any c/a up to
    1.25; at c/a 1.02 it is that phase (shape strain 0.013), at 1.17 a strained relative (strain 0.105)."""
    reference = hand_made_reference()

    def tetragonal(c_over_a: float) -> Structure:
        edge = 3.0 / c_over_a ** (1 / 3)
        return Structure(Lattice.tetragonal(edge, edge * c_over_a), ["Cu", "Au"], [[0, 0, 0], [0.5, 0.5, 0.5]])

    assert novelty(tetragonal(1.02), reference) == "matches cuau-high (Pm-3m)"
    assert novelty(tetragonal(1.17), reference) == "new: cuau-high (Pm-3m) strained by 10 %"


# --- the pipeline -------------------------------------------------------------------------------------------------


def test_stability_settings_are_checked():
    assert StabilitySettings().stability is True
    with pytest.raises(SettingsError, match="^reference_cutoff: "):
        StabilitySettings(reference_cutoff=-0.1)
    with pytest.raises(SettingsError, match="^references_per_composition: "):
        StabilitySettings(references_per_composition=0)


def pipeline_inputs():
    relaxed = {"CuAu_000": rocksalt("Cu", "Au", 4.3), "CuAu_001": rocksalt("Cu", "Au", 4.31),
               "CuZn_000": cesium_chloride("Cu", "Zn")}
    results = {"CuAu_000": {"status": "converged", "energy_per_atom": -1.9, "error": None},
               "CuAu_001": {"status": "converged", "energy_per_atom": -1.8, "error": None},
               "CuZn_000": {"status": "converged", "energy_per_atom": -1.0, "error": None},
               "CuZn_001": {"status": "failed", "energy_per_atom": None, "error": "boom"}}
    ranking = pipeline.rank(results, relaxed, top_k=1).ranking  # CuAu_001 merges into CuAu_000
    return results, relaxed, ranking


def test_pipeline_stability_and_the_table_columns(tmp_path):
    reference = hand_made_reference()
    results, relaxed, ranking = pipeline_inputs()
    assessed = pipeline.stability(results, relaxed, ranking, RelaxSettings(), StabilitySettings(),
                                  relax=StubRelax(), reference=reference, cache_path=str(tmp_path / "e.json"))
    assert assessed["CuAu_000"] == {"ml_e_above_hull": pytest.approx(0.1), "novelty": "matches cuau (Fm-3m)",
                                    "reason": None}
    assert assessed["CuAu_001"]["ml_e_above_hull"] == pytest.approx(0.2) and assessed["CuAu_001"]["novelty"] is None
    assert assessed["CuZn_000"]["ml_e_above_hull"] is None
    assert assessed["CuZn_000"]["novelty"] == "matches zn-cu (Pm-3m)"
    assert "CuZn_001" not in assessed
    cached = json.loads((tmp_path / "e.json").read_text())
    assert list(cached) == [pipeline.ml_level(RelaxSettings())] == ["ML (chgnet, fmax 0.05 eV/Å, 500 steps)"]
    assert pipeline.stability(results, relaxed, ranking, RelaxSettings(), StabilitySettings(stability=False),
                              relax=StubRelax(), reference=reference) == {}

    sampled = dict(relaxed)
    screening = {label: {"kept": True, "status": None, "reason": None} for label in sampled}
    rows = {row["label"]: row for row in pipeline.table_rows(sampled, [], screening, ranking, results, relaxed,
                                                               stability=assessed)}
    columns = list(pipeline.ROW_COLUMNS)
    assert columns[columns.index("ml_volume_change") + 1: columns.index("ml_volume_change") + 3] == [
        "ml_e_above_hull", "novelty"]
    assert rows["CuAu_000"]["ml_e_above_hull"] == pytest.approx(0.1) and rows["CuAu_000"]["reason"] is None
    assert rows["CuAu_001"]["reason"] == "relaxed into the structure of CuAu_000"  # its own reason stays
    assert rows["CuZn_000"]["reason"].startswith("no ML E_hull: no elemental reference for Zn")


def test_pipeline_stability_without_a_reference_set_says_how_to_build_it(tmp_path, monkeypatch):
    monkeypatch.setenv("EQUICSP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("EQUICSP_DATA_DIR", str(tmp_path / "no-data"))
    results, relaxed, ranking = pipeline_inputs()
    assessed = pipeline.stability(results, relaxed, ranking, RelaxSettings(), StabilitySettings(), relax=StubRelax())
    assert set(assessed) == {"CuAu_000", "CuAu_001", "CuZn_000"}
    assert all(value["ml_e_above_hull"] is None and value["novelty"] is None
               and "run `equicsp reference build`" in value["reason"] for value in assessed.values())


# --- for real -----------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "mp_20" / "test.csv.gz").is_file(), reason="needs ../shared/data")
def test_chgnet_hull_of_silicon_from_the_real_data(tmp_path):
    """The Si entries of mp_20 (val, test) relaxed with CHGNet: diamond Si (mp-149) lies on the ML hull."""
    folder = tmp_path / "data"
    tables = [pd.read_csv(SHARED_DATA / "mp_20" / f"{split}.csv.gz") for split in ("val", "test")]
    silicon = pd.concat([table[table["pretty_formula"] == "Si"] for table in tables])
    write_split(folder, "mp_20", "test", silicon.to_dict("records"))
    path = build_reference(folder, tmp_path / "si.jsonl.gz", pin=None)
    reference = load_reference(path, pin=None)
    (diamond,) = [entry for entry in reference.entries if entry.id == "mp-149"]
    settings = RelaxSettings(potential="chgnet", fmax=0.05, steps=300, device="cpu")
    from equicsp_core.relax import relax_structure, relax_structures, load_calculator

    candidate = relax_structure(diamond.structure.perturb(0.05, 0.0), load_calculator("chgnet", "cpu"), settings)
    cache = EnergyCache(tmp_path / "e.json", pipeline.ml_level(settings), reference.sha256)
    hull = e_above_hull({"si": (candidate.structure.composition, candidate.energy_per_atom)}, reference,
                        lambda structures: relax_structures(structures, settings), cache, cutoff=0.0,
                        per_composition=1)
    assert abs(hull["si"].e_above_hull) < 0.01, hull  # measured: ~0 eV/atom
    assert novelty(candidate.structure, reference) == "matches mp-149 (Fd-3m)"


def test_an_element_keeps_a_reference_above_the_cutoff():
    """Sn's only entries lie 0.07 eV/atom above MP's hull: the element keeps its lowest rather than leave a gap."""
    entries = [entry_of("sn-a", "test", fcc("Sn", 4.6), 0.074), entry_of("sn-b", "test", fcc("Sn", 4.7), 0.066),
               entry_of("snna", "test", rocksalt("Sn", "Na"), 0.2), entry_of("na", "test", fcc("Na"), 0.0),
               entry_of("ase-Na", "ase", fcc("Na", 4.3), None)]
    chosen = ReferenceSet(entries, "a" * 64).hull_references({"Sn", "Na"}, cutoff=0.05, per_composition=1)
    assert [entry.id for entry in chosen] == ["ase-Na", "na", "sn-b"]  # SnNa (above the cut-off) is left out


def test_an_element_without_its_ground_state_gets_ases_crystal():
    """ASE's crystal is added for an element whose data entries are all metastable (Cu here), not for one whose
    ground state (e_above_hull 0) is in the data (Ag), nor for one ASE has no crystal for (Cl)."""
    from equicsp_core.reference import element_entries

    entries = [entry_of("cu-meta", "test", fcc("Cu", 3.7), 0.01), entry_of("ag", "test", fcc("Ag", 4.1), 0.0),
               entry_of("agcl", "test", rocksalt("Ag", "Cl"), 0.0)]
    added = element_entries(entries)
    assert [(entry.id, entry.source, entry.e_above_hull) for entry in added] == [("ase-Cu", "ase", None)]
    assert added[0].structure.composition.reduced_formula == "Cu"


def test_pipeline_stability_from_known_energies_relaxes_nothing_and_agrees(tmp_path):
    """Reference energies relaxed elsewhere (the AiiDA route's CalcJob) give the same rows as relaxing them here,
    for exactly the entries :func:`pipeline.stability_references` names; nothing is relaxed, no cache is written."""
    reference = hand_made_reference()
    results, relaxed, ranking = pipeline_inputs()
    needed = pipeline.stability_references(results, relaxed, StabilitySettings(), reference)
    assert [entry.id for entry in needed] == ["au", "cu", "cuau", "zn-cu"]  # no Zn element: CuZn's hull has a gap
    relax = StubRelax()
    here = pipeline.stability(results, relaxed, ranking, RelaxSettings(), StabilitySettings(), relax=relax,
                              reference=reference, cache_path=str(tmp_path / "e.json"))
    assert sorted(relax.relaxed) == [entry.id for entry in needed]
    records = {entry.id: {"energy_per_atom": ENERGIES.get(entry.id, -1.0), "status": "converged", "error": None}
               for entry in needed}
    untouched = StubRelax()
    known = pipeline.stability(results, relaxed, ranking, RelaxSettings(), StabilitySettings(), relax=untouched,
                               reference=reference, cache_path=str(tmp_path / "other.json"),
                               reference_energies=records)
    assert known == here and untouched.relaxed == [] and not (tmp_path / "other.json").exists()
    # an entry with no record is left out of its hull as a failed relaxation: Cu missing, CuAu has no hull
    partial = pipeline.stability(results, relaxed, ranking, RelaxSettings(), StabilitySettings(), reference=reference,
                                 reference_energies={key: value for key, value in records.items() if key != "cu"})
    assert partial["CuAu_000"]["ml_e_above_hull"] is None
    assert partial["CuAu_000"]["reason"].startswith("no ML E_hull: no elemental reference for Cu")
    assert pipeline.stability_references(results, relaxed, StabilitySettings(stability=False), reference) == []


# --- the DFT hull (the AiiDA route's dft.hull) ----------------------------------------------------------------------


def test_dft_hull_references_are_those_of_the_ml_hull():
    """The DFT hull of a candidate is built from the phases of its ML hull: the same entries, chosen by the same
    stability settings."""
    reference = hand_made_reference()
    results, relaxed, _ = pipeline_inputs()
    winners = {"CuAu_000": relaxed["CuAu_000"], "CuZn_000": relaxed["CuZn_000"]}
    ml = pipeline.stability_references(results, winners, StabilitySettings(), reference)
    dft = pipeline.dft_stability_references(winners, StabilitySettings(), reference)
    assert [entry.id for entry in dft] == [entry.id for entry in ml] == ["au", "cu", "cuau", "zn-cu"]
    wider = pipeline.dft_stability_references(winners, StabilitySettings(reference_cutoff=0.3), reference)
    assert "cuau-high" in [entry.id for entry in wider]


def test_dft_hull_by_hand_and_its_table_column():
    """DFT energies Cu -10, Au -20, CuAu -21 eV/atom (references): a CuAu candidate at -20.9 is 0.1 above the
    DFT hull, one at -21.05 0.05 below it; CuZn has no elemental Zn reference (a reason, the others go on); a DFT
    failure (no energy) gets no hull. The column stands beside dft_level and never holds an ML value."""
    reference = hand_made_reference()
    records = {"cu": {"energy_per_atom": -10.0, "status": "finished", "error": None},
               "au": {"energy_per_atom": -20.0, "status": "finished", "error": None},
               "cuau": {"energy_per_atom": -21.0, "status": "finished", "error": None},
               "zn-cu": {"energy_per_atom": -12.0, "status": "finished", "error": None}}
    outcomes = {"CuAu_000": pipeline.DFTOutcome(rocksalt("Cu", "Au", 4.3), -20.9),
                "CuAu_001": pipeline.DFTOutcome(rocksalt("Cu", "Au", 4.2), -21.05),
                "CuZn_000": pipeline.DFTOutcome(cesium_chloride("Cu", "Zn"), -12.0),
                "CuAu_002": pipeline.DFTOutcome(failure="PwRelaxWorkChain<7> exit status 401")}
    hulls = pipeline.dft_stability(outcomes, records, StabilitySettings(), reference)
    assert hulls["CuAu_000"] == {"dft_e_above_hull": pytest.approx(0.1), "reason": None}
    assert hulls["CuAu_001"]["dft_e_above_hull"] == pytest.approx(-0.05)
    assert hulls["CuZn_000"]["dft_e_above_hull"] is None
    assert hulls["CuZn_000"]["reason"].startswith("no DFT E_hull: no elemental reference for Zn")
    assert "CuAu_002" not in hulls
    # a failed reference calculation is left out: Au missing, CuAu has no DFT hull
    failed = {**records, "au": {"energy_per_atom": None, "status": "failed", "error": "exit status 401"}}
    assert pipeline.dft_stability(outcomes, failed, StabilitySettings(), reference)["CuAu_000"]["reason"].startswith(
        "no DFT E_hull: no elemental reference for Au")

    results, relaxed, ranking = pipeline_inputs()
    screening = {label: {"kept": True, "status": None, "reason": None} for label in relaxed}
    dft = {label: outcomes[label] for label in ("CuAu_000", "CuZn_000")}
    rows = {row["label"]: row for row in pipeline.table_rows(
        relaxed, [], screening, ranking, results, relaxed, dft=dft,
        dft_hulls=pipeline.dft_stability(dft, records, StabilitySettings(), reference))}
    columns = list(pipeline.ROW_COLUMNS)
    assert columns[columns.index("dft_energy_per_atom"):columns.index("dft_energy_per_atom") + 3] == [
        "dft_energy_per_atom", "dft_level", "dft_e_above_hull"]
    assert rows["CuAu_000"]["dft_e_above_hull"] == pytest.approx(0.1) and rows["CuAu_000"]["ml_e_above_hull"] is None
    assert rows["CuZn_000"]["reason"].startswith("no DFT E_hull")
    assert rows["CuAu_001"]["dft_e_above_hull"] is None  # a duplicate, never sent to DFT
    assert pipeline.levels(RelaxSettings(), dft_hull=True)["dft_e_above_hull"] == pipeline.DFT_HULL_LEVEL
    assert "dft_e_above_hull" not in pipeline.levels(RelaxSettings())
    assert pipeline.levels(None, dft_hull=True) == {"dft_e_above_hull": pipeline.DFT_HULL_LEVEL}
