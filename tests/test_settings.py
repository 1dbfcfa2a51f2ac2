"""The settings model (``equicsp_core.settings``): one line naming the knob for every refusal, one default each,
and no torch on the AiiDA side."""

import re
import subprocess
import sys

import pytest

from equicsp_core.domain import check_cells
from equicsp_core.settings import (
    DFT_RELAX_TYPES,
    DFTSettings,
    FormulaError,
    PotentialError,
    RankSettings,
    RelaxSettings,
    SampleSettings,
    ScreenSettings,
    SettingsError,
)

REFUSED_SAMPLE_SETTINGS = {
    "a bare string as formulas": ({"formulas": "CO"}, "formulas: a list of formulas is required, got the string 'CO'"),
    "a zero count": ({"formulas": ["NaCl0"]}, "formula 'NaCl0': Cl count 0 is not a positive integer"),
    "a zero count with a dot": ({"formulas": ["Na1Cl0.0"]}, "formula 'Na1Cl0.0': Cl count 0.0"),
    "lattice_bound 0": ({"formulas": ["SrTiO3"], "lattice_bound": 0}, "lattice_bound: Input should be greater than 0"),
    "step_lr inf": ({"formulas": ["SrTiO3"], "step_lr": float("inf")}, "step_lr: Input should be a finite number"),
    "step_lr 0": ({"formulas": ["SrTiO3"], "step_lr": 0}, "step_lr: Input should be greater than 0"),
    "seed 1e23": ({"formulas": ["SrTiO3"], "seed": 1e23}, "seed: Input should be a valid integer"),
    "seed beyond 64 bits": ({"formulas": ["SrTiO3"], "seed": 2**64}, "seed: Input should be less than or equal"),
    "num_samples true": ({"formulas": ["SrTiO3"], "num_samples": True}, "num_samples: Input should be a valid integer"),
    "device meta": ({"formulas": ["SrTiO3"], "device": "meta"}, "device must be one of auto, cpu, cuda, cuda:N or mps"),
    "a misspelt key": ({"formulas": ["SrTiO3"], "num_sample": 2}, "unknown setting(s) num_sample; known: formulas"),
}


@pytest.mark.parametrize("name", list(REFUSED_SAMPLE_SETTINGS))
def test_refused_sample_settings_name_the_knob_in_one_line(name):
    values, message = REFUSED_SAMPLE_SETTINGS[name]
    with pytest.raises(SettingsError) as error:
        SampleSettings(**values)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_formula_errors_keep_their_kind():
    """A refused formula is a FormulaError even through the model (the CLI and parsers tell it apart)."""
    with pytest.raises(FormulaError):
        SampleSettings(formulas=["NaCl0"])
    with pytest.raises(PotentialError):
        RelaxSettings(potential="chgnett")


def test_each_formula_is_parsed_into_its_cell():
    settings = SampleSettings(formulas=["SrTiO3", "Sr2Ti2O6"])
    assert settings.cells == {"SrTiO3": (38, 22, 8, 8, 8), "Sr2Ti2O6": (38, 38, 22, 22, 8, 8, 8, 8, 8, 8)}


@pytest.mark.parametrize(("formula", "reason"), [("Si40", "40 atoms, more than the 20 of mp_20"),
                                                 ("Fm2O3", "element(s) Fm absent from mp_20")])
def test_formulas_outside_the_training_domain_are_refused_unless_allowed(formula, reason):
    """mp_20 given Si40 or Fm2O3: refused with the reason and the way to insist; allowed with the flag."""
    refused = SampleSettings(formulas=[formula])
    with pytest.raises(FormulaError, match=re.escape(f"outside the model's training domain ({reason}); set "
                                                     "allow_outside_domain")):
        check_cells(refused.cells, "equicsp", "mp_20", refused.allow_outside_domain)
    allowed = SampleSettings(formulas=[formula], allow_outside_domain=True)
    check_cells(allowed.cells, "equicsp", "mp_20", allowed.allow_outside_domain)


def test_the_hard_size_limit_holds_even_when_insisting():
    with pytest.raises(FormulaError, match="has 60 atoms; the model supports at most 52"):
        check_cells(SampleSettings(formulas=["C60"]).cells, "equicsp", "carbon_24", True)


def test_numeric_text_is_a_number_but_a_boolean_is_not():
    """YAML 1.1 reads 5e-2 as text: accepted for numbers (relax and sample alike); true is never a number."""
    assert RelaxSettings(fmax="5e-2").fmax == SampleSettings(formulas=["H"], step_lr="5e-2").step_lr == 0.05
    with pytest.raises(SettingsError, match="fmax: a number is required, not true/false"):
        RelaxSettings(fmax=True)


@pytest.mark.parametrize(("model", "values", "message"), [
    (ScreenSettings, {"min_distance": "far"}, "min_distance: a number is required"),
    (ScreenSettings, {"max_volume": 10}, "unknown setting(s) max_volume"),
    (RankSettings, {"top_k": 0}, "top_k: Input should be greater than or equal to 1"),
    (RelaxSettings, {"device": "tpu"}, "device must be one of auto"),
    (RelaxSettings, {"potential": "math.sqrt"}, "unknown potential 'math.sqrt'"),
    (DFTSettings, {"relax_type": "everything"}, "relax_type: Input should be"),
    (DFTSettings, {"symprec": -1}, "symprec: Input should be greater than or equal to 0"),
    (DFTSettings, {"spin": "ferro"}, "spin: Input should be 'auto', 'collinear' or 'none'"),
    (DFTSettings, {"hull": "yes"}, "hull: Input should be a valid boolean"),
])
def test_every_stage_refuses_bad_values(model, values, message):
    with pytest.raises(SettingsError, match=re.escape(message)):
        model(**values)


def test_dft_relax_types_are_those_of_aiida_quantumespresso():
    from aiida_quantumespresso.common.types import RelaxType

    assert set(DFT_RELAX_TYPES) == {member.value for member in RelaxType}


def test_one_default_number_of_samples_everywhere():
    """The engine, the AiiDA command and the jobflow Maker share SampleSettings' default."""
    from equicsp_core.cli import build_parser
    from equicsp_jobflow.makers import EquiCSPSampleMaker

    default = SampleSettings.default("num_samples")
    assert SampleSettings(formulas=["H"]).num_samples == EquiCSPSampleMaker().num_samples == default
    args = build_parser().parse_args(["sample", "--checkpoint", "x", "--formula", "H", "--out", "o"])
    assert args.num_samples is None  # unset: the settings' default applies


def test_importing_the_aiida_plugin_does_not_import_torch():
    """The daemon loads the plugin, its work chains, parsers and CLI: none of them may import torch."""
    modules = ["aiida_equicsp.cli", "aiida_equicsp.calculations.sample", "aiida_equicsp.calculations.relax",
               "aiida_equicsp.parsers.sample", "aiida_equicsp.parsers.relax", "aiida_equicsp.workchains.sample_base",
               "aiida_equicsp.workchains.predict_relax", "aiida_equicsp.campaign", "aiida_equicsp.queries",
               "aiida_equicsp.data.model"]
    code = f"import sys\nfor m in {modules!r}: __import__(m)\nprint('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_every_protocol_holds_only_valid_knobs():
    """The protocol files set knobs of the settings models only, with valid values (their keys derive from them)."""
    from importlib import resources

    import yaml

    from equicsp_core.settings import DFTSettings, RankSettings, StabilitySettings

    folder = resources.files("aiida_equicsp").joinpath("protocols")
    for name in ("sample", "predict_relax"):
        protocols = yaml.safe_load(folder.joinpath(f"{name}.yaml").read_text())["protocols"]
        for protocol in protocols.values():
            sample = protocol.get("sample", protocol)
            SampleSettings(formulas=["H"], num_samples=protocol.get("num_samples", 1), **sample.get("parameters", {}))
            RelaxSettings.from_mapping(protocol.get("relax", {}).get("parameters", {}))
            ScreenSettings.from_mapping(protocol.get("screening", {}))
            StabilitySettings.from_mapping(protocol.get("stability", {}))
            RankSettings.from_mapping({key: protocol[key] for key in RankSettings.keys() if key in protocol})
            DFTSettings.from_mapping({key: value for key, value in protocol.get("dft", {}).items()
                                      if key in DFTSettings.keys()})
