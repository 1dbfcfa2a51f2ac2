"""The data protocol (equicsp_core/splits.py): train, selection and reserved rows never overlap."""

from pathlib import Path

import pytest

from equicsp_core.splits import (
    Row,
    check_not_trained_on,
    report_split,
    reserved_test_rows,
    selection_val_rows,
    split_rows,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_fixture_splits_are_disjoint_and_cover_both_files(fixture_data_dir):
    """mp_20 fixture (30 val, 10 test, rows 2 and 9 reserved): the three sets are disjoint and cover every row."""
    train, selection, reserved = (set(split_rows("mp_20", name, fixture_data_dir))
                                  for name in ("train", "selection", "reserved"))
    assert reserved == {Row("test", 2), Row("test", 9)}
    assert len(selection) == 3 and all(row.file == "val" for row in selection)
    assert not train & selection and not train & reserved and not selection & reserved
    everything = {Row("val", i) for i in range(30)} | {Row("test", i) for i in range(10)}
    assert train | selection | reserved == everything


def test_selection_rows_are_the_earlier_runs_held_out_rows():
    """The first round(0.1 N) of randperm(N) seeded 42: what every run before the protocol held out."""
    import torch

    order = torch.randperm(9047, generator=torch.Generator().manual_seed(42)).tolist()
    assert selection_val_rows(9047) == sorted(order[:905])


def test_dataset_with_a_train_file_uses_its_files(fixture_data_dir):
    """perov_5: train = the train file, selection = val; it has no reserved rows and reports on test."""
    assert {row.file for row in split_rows("perov_5", "train", fixture_data_dir)} == {"train"}
    assert {row.file for row in split_rows("perov_5", "selection", fixture_data_dir)} == {"val"}
    assert report_split("perov_5", fixture_data_dir) == "test"
    assert report_split("mp_20", fixture_data_dir) == "reserved"
    with pytest.raises(ValueError, match="no reserved rows"):
        split_rows("perov_5", "reserved", fixture_data_dir)


def test_training_rows_are_refused_for_reporting(fixture_data_dir):
    """Whole mp_20 files hold training rows: refused with a message naming the split to use."""
    for name in ("val", "test", "train"):
        with pytest.raises(ValueError, match="training rows of mp_20.*--split reserved"):
            check_not_trained_on("mp_20", split_rows("mp_20", name, fixture_data_dir), fixture_data_dir)
    for name in ("selection", "reserved"):
        check_not_trained_on("mp_20", split_rows("mp_20", name, fixture_data_dir), fixture_data_dir)


def test_reserved_row_with_another_material_id_is_refused(fixture_data_dir, tmp_path):
    """A reserved list that does not belong to the test file (wrong id at a row) is refused, naming the line."""
    data = tmp_path / "data"
    (data / "mp_20").mkdir(parents=True)
    for name in ("val.csv.gz", "test.csv.gz"):
        (data / "mp_20" / name).write_bytes((fixture_data_dir / "mp_20" / name).read_bytes())
    (data / "mp_20" / "reserved_test_rows.txt").write_text("# header\n2\tmp-1225695\n3\tmp-0\n")
    with pytest.raises(ValueError, match=r"reserved_test_rows.txt:3: row 3 of mp_20/test is not mp-0"):
        reserved_test_rows("mp_20", data)
    (data / "mp_20" / "reserved_test_rows.txt").write_text("2\tmp-1225695\n2\tmp-1225695\n")
    with pytest.raises(ValueError, match="lists a row twice"):
        reserved_test_rows("mp_20", data)


def test_unknown_split_is_refused_naming_the_choices(fixture_data_dir):
    with pytest.raises(ValueError, match="unknown split 'nope'; choose one of train, selection, reserved, val, test"):
        split_rows("mp_20", "nope", fixture_data_dir)


@pytest.mark.skipif(not (SHARED_DATA / "mp_20" / "reserved_test_rows.txt").is_file(),
                    reason="the shared benchmark data is not beside this checkout")
@pytest.mark.parametrize(("dataset", "sizes"), [
    ("mp_20", (15_188, 905, 2_000)),
    ("mpts_52", (11_596, 500, 1_000)),
    ("carbon_24", (3_359, 203, 500)),
])
def test_shared_data_protocol_sizes(dataset, sizes):
    """On the real files: the sizes of shared/data/README.md (mp_20: 15,188 training rows), all disjoint."""
    train, selection, reserved = (set(split_rows(dataset, name, SHARED_DATA))
                                  for name in ("train", "selection", "reserved"))
    assert (len(train), len(selection), len(reserved)) == sizes
    assert not train & selection and not train & reserved and not selection & reserved


def test_load_rows_reads_each_file_once(fixture_data_dir, monkeypatch):
    """Loading the protocol's train rows parses val and test once each, not once per row."""
    import equicsp_core.splits as splits

    calls = []
    real = splits.load_split
    monkeypatch.setattr(splits, "load_split", lambda dataset, file, *a, **k: calls.append(file) or real(dataset, file, *a, **k))
    rows = split_rows("mp_20", "train", fixture_data_dir)
    crystals = splits.load_rows("mp_20", rows, fixture_data_dir, progress=False)
    assert len(crystals) == len(rows) == 35
    assert sorted(calls) == ["test", "val"]
