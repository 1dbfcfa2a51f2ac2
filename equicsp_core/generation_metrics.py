"""The papers' ab initio generation metrics (docs/method.md §8.3) of generated crystals against a reference set.

Computed as CDVAE's ``scripts/compute_metrics.py`` computes them (DiffCSP and EquiCSP reuse that file). With G
generated crystals and R reference crystals (the test split, its CIFs as they are):

* **validity**, over all G: structural (:func:`equicsp_core.metrics.structural_validity`: distances ≥ 0.5 Å,
  volume ≥ 0.1 Å³, lattice vectors ≤ 40 Å), compositional (:func:`equicsp_core.metrics.compositional_validity`:
  SMACT charge neutrality + Pauling test; one element ⇒ valid). A crystal is *valid* when both hold and the
  CrystalNN fingerprint of every site can be computed. A sample that produced no structure is structurally
  invalid; its composition is still tested when known.
* **fingerprints**: structure s = mean over sites of matminer's ``CrystalNNFingerprint.from_preset("ops")``
  (61 values); composition c = matminer's ``ElementProperty.from_preset("magpie")`` (132 values) standardised
  with CDVAE's fixed statistics, ``(c - mean) / std`` with NaN → 0 (``resources/magpie_scaler.json``: one set for
  every dataset, as CDVAE; they are not the statistics of any split here).
* **coverage**, over the generated crystals whose fingerprints exist (valid or not, as CDVAE) against the
  reference crystals: with Euclidean distances D^s_ij = |s_i − s'_j| and D^c_ij = |c_i − c'_j| and cut-offs
  (δ_s, δ_c) of :data:`COVERAGE_CUTOFFS`::

      COV-R = #{j : min_i D^s_ij ≤ δ_s  and  min_i D^c_ij ≤ δ_c} / R
      COV-P = #{i : min_j D^s_ij ≤ δ_s  and  min_j D^c_ij ≤ δ_c} / G      (G counts every generated crystal)

  The two minima are taken separately (they need not be the same pair), as CDVAE does.
* **distribution distances**, on N = ``num_eval`` valid generated crystals drawn at random without replacement
  (seeded) against all R: d_ρ = W₁(densities, g/cm³), d_elem = W₁(numbers of distinct elements) and d_E =
  W₁(energies per atom, eV/atom), W₁ the 1-D Wasserstein distance (``scipy.stats.wasserstein_distance``).

  **d_E here is not the papers' d_E**: they predict a property (formation energy, or the dataset's energy) with a
  model trained on the dataset; we take the single-point energy per atom of a shipped machine-learned potential
  (CHGNet by default, :mod:`equicsp_core.relax`) of the unrelaxed crystals. Every report says so.

The reference set is a split of the data protocol (:mod:`equicsp_core.splits`); training rows are refused.
matminer is imported only here (the ``generation`` extra).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from multiprocessing import get_context
from typing import TYPE_CHECKING, Any, Sequence, Union

import numpy as np

from equicsp_core.metrics import compositional_validity, structural_validity

if TYPE_CHECKING:
    from pymatgen.core import Composition, Structure

logger = logging.getLogger(__name__)

#: (structure fingerprint cut-off δ_s, composition fingerprint cut-off δ_c) of each dataset (CDVAE's COV_Cutoffs).
COVERAGE_CUTOFFS: dict[str, tuple[float, float]] = {"perov_5": (0.2, 4.0), "carbon_24": (0.2, 4.0),
                                                    "mp_20": (0.4, 10.0)}
#: Valid generated crystals drawn for d_ρ, d_elem and d_E (the papers' 1,000).
NUM_EVAL = 1000
#: What every report says of d_E.
ENERGY_NOTE = ("d_E is the Wasserstein distance of single-point energies per atom (eV/atom) of the unrelaxed "
               "crystals from the machine-learned potential named in 'energy', not the papers' property model")

#: A generated crystal: its structure, or for a sample that produced none, its composition (or ``None``).
Generated = Union["Structure", "Composition", None]


def coverage_cutoffs(dataset: str) -> tuple[float, float]:
    """(δ_s, δ_c) of ``dataset``; a dataset without published cut-offs is refused."""
    if dataset not in COVERAGE_CUTOFFS:
        raise ValueError(f"no coverage cut-offs for {dataset!r}: the papers give them for "
                         f"{', '.join(COVERAGE_CUTOFFS)}")
    return COVERAGE_CUTOFFS[dataset]


@dataclass(frozen=True)
class CrystalFeatures:
    """What the metrics need of one crystal.

    ``structure_fingerprint`` (61,) and ``composition_fingerprint`` (132,, raw Magpie, not standardised) are
    ``None`` when a site's CrystalNN fingerprint cannot be computed (or there is no structure); ``density``
    (g/cm³) and ``num_elements`` are ``None`` without a structure.
    """

    structurally_valid: bool
    compositionally_valid: bool
    structure_fingerprint: np.ndarray | None
    composition_fingerprint: np.ndarray | None
    density: float | None
    num_elements: int | None

    @property
    def valid(self) -> bool:
        """Both validities, and a fingerprint (CDVAE counts a crystal whose fingerprint fails as invalid)."""
        return self.structurally_valid and self.compositionally_valid and self.structure_fingerprint is not None


@cache
def _featurizers():
    """matminer's CrystalNN site fingerprint ("ops") and Magpie composition featuriser (built once per process)."""
    from matminer.featurizers.composition.composite import ElementProperty
    from matminer.featurizers.site.fingerprint import CrystalNNFingerprint

    return CrystalNNFingerprint.from_preset("ops"), ElementProperty.from_preset("magpie")


@cache
def magpie_scaler() -> tuple[np.ndarray, np.ndarray]:
    """CDVAE's fixed (means, stds), each (132,), checked against matminer's Magpie feature order."""
    scaler = json.loads(files("equicsp_core.resources").joinpath("magpie_scaler.json").read_text())
    labels = _featurizers()[1].feature_labels()
    if scaler["labels"] != labels:
        raise RuntimeError("matminer's Magpie features are not those magpie_scaler.json was written for")
    return np.asarray(scaler["means"], dtype=float), np.asarray(scaler["stds"], dtype=float)


def standardised_compositions(fingerprints: np.ndarray) -> np.ndarray:
    """``(c − mean) / std`` with CDVAE's statistics, NaN → 0: (n, 132) → (n, 132)."""
    means, stds = magpie_scaler()
    scaled = (np.asarray(fingerprints, dtype=float).reshape(-1, len(means)) - means) / stds
    return np.where(np.isnan(scaled), 0.0, scaled)


def crystal_features(crystal: Generated) -> CrystalFeatures:
    """Validity, fingerprints, density and element count of a structure, or of a composition without one."""
    from pymatgen.core import Structure

    if crystal is None:
        return CrystalFeatures(False, False, None, None, None, None)
    structure = crystal if isinstance(crystal, Structure) else None
    composition = crystal.composition if structure is not None else crystal
    numbers = [element.Z for element, amount in composition.items() for _ in range(int(round(amount)))]
    compositionally_valid = compositional_validity(numbers)
    if structure is None:
        return CrystalFeatures(False, compositionally_valid, None, None, None, None)
    site_featurizer, composition_featurizer = _featurizers()
    try:
        with warnings.catch_warnings():  # CrystalNN warns of every site without oxidation states
            warnings.simplefilter("ignore")
            sites = np.array([site_featurizer.featurize(structure, i) for i in range(len(structure))])
    except Exception:  # matminer/pymatgen fail on degenerate cells: no fingerprint (invalid, as CDVAE)
        sites = None
    return CrystalFeatures(
        structurally_valid=structural_validity(structure),
        compositionally_valid=compositionally_valid,
        structure_fingerprint=None if sites is None else sites.mean(axis=0),
        composition_fingerprint=None if sites is None else np.array(composition_featurizer.featurize(composition)),
        density=float(structure.density),
        num_elements=len(structure.composition.elements),
    )


def features_of(crystals: Sequence[Generated], processes: int = 1) -> list[CrystalFeatures]:
    """:func:`crystal_features` of each crystal, in order, on ``processes`` worker processes."""
    if processes > 1 and len(crystals) > 1:
        with get_context("fork").Pool(processes) as pool:
            return pool.map(crystal_features, crystals, chunksize=16)
    return [crystal_features(crystal) for crystal in crystals]


def validity(features: Sequence[CrystalFeatures]) -> dict[str, float]:
    """Percentages of structurally, compositionally and fully valid crystals among ``features``."""
    count = len(features)
    return {"structural_validity": 100.0 * sum(f.structurally_valid for f in features) / count,
            "compositional_validity": 100.0 * sum(f.compositionally_valid for f in features) / count,
            "validity": 100.0 * sum(f.valid for f in features) / count}


def coverage(generated: Sequence[CrystalFeatures], reference: Sequence[CrystalFeatures],
             structure_cutoff: float, composition_cutoff: float) -> dict[str, float]:
    """COV-R and COV-P (%) and the mean nearest distances (see the module docstring for the formulas).

    Generated crystals without fingerprints are left out of the distances but counted in COV-P's G (none with
    one: both coverages 0, no mean distances); reference crystals without them are left out (R counts those with). Also returned, as CDVAE: ``amsd_*`` / ``amcd_*``,
    the mean over the reference (recall) or the generated (precision) crystals of the nearest structure /
    composition distance.
    """
    from scipy.spatial.distance import cdist

    kept = [f for f in generated if f.structure_fingerprint is not None]
    references = [f for f in reference if f.structure_fingerprint is not None]
    if not references:
        raise ValueError("coverage needs at least one reference crystal with a fingerprint")
    if not kept:  # nothing generated has a structure: nothing covered
        return {"cov_recall": 0.0, "cov_precision": 0.0, "amsd_recall": None, "amsd_precision": None,
                "amcd_recall": None, "amcd_precision": None, "reference_with_fingerprints": len(references)}
    structure_distances = cdist(np.stack([f.structure_fingerprint for f in kept]),
                                np.stack([f.structure_fingerprint for f in references]))  # (G', R)
    composition_distances = cdist(standardised_compositions(np.stack([f.composition_fingerprint for f in kept])),
                                  standardised_compositions(np.stack([f.composition_fingerprint for f in references])))
    recall_s, recall_c = structure_distances.min(axis=0), composition_distances.min(axis=0)  # (R,)
    precision_s, precision_c = structure_distances.min(axis=1), composition_distances.min(axis=1)  # (G',)
    covered = (recall_s <= structure_cutoff) & (recall_c <= composition_cutoff)
    precise = (precision_s <= structure_cutoff) & (precision_c <= composition_cutoff)
    return {"cov_recall": 100.0 * covered.mean(), "cov_precision": 100.0 * precise.sum() / len(generated),
            "amsd_recall": float(recall_s.mean()), "amsd_precision": float(precision_s.mean()),
            "amcd_recall": float(recall_c.mean()), "amcd_precision": float(precision_c.mean()),
            "reference_with_fingerprints": len(references)}


def wasserstein(values: Sequence[float], reference: Sequence[float]) -> float:
    """W₁ between two empirical 1-D distributions: ∫ |F(x) − F_ref(x)| dx."""
    from scipy.stats import wasserstein_distance

    return float(wasserstein_distance(values, reference))


def draw_valid(features: Sequence[CrystalFeatures], num_eval: int, seed: int) -> list[int]:
    """Positions of ``num_eval`` valid crystals drawn without replacement (all valid ones when fewer), sorted."""
    valid = [i for i, f in enumerate(features) if f.valid]
    if len(valid) <= num_eval:
        return valid
    drawn = np.random.default_rng(seed).choice(len(valid), size=num_eval, replace=False)
    return sorted(valid[i] for i in drawn)


def single_point_energies(structures: Sequence[Structure], calculator) -> list[float | None]:
    """Energy per atom (eV/atom) of each structure as it is (no relaxation) from an ASE ``calculator``, ``None``
    where it fails (:func:`equicsp_core.relax.relax_structure` with no step)."""
    from equicsp_core.relax import relax_structure
    from equicsp_core.settings import RelaxSettings

    settings = RelaxSettings(steps=0, relax_cell=False)
    return [relax_structure(structure, calculator, settings).energy_per_atom for structure in structures]


def generation_metrics(generated: Sequence[Generated], reference: Sequence[Structure], dataset: str,
                       num_eval: int = NUM_EVAL, energy: str | None = "chgnet", seed: int = 0,
                       processes: int = 1, device: str = "cpu") -> dict[str, Any]:
    """Every metric of the module docstring, as a JSON-ready dict (validity and coverage in %).

    Args:
        generated: the G generated crystals (a structure, or a composition / ``None`` for a failed sample).
        reference: the R reference structures (the test split).
        dataset: names the coverage cut-offs (:data:`COVERAGE_CUTOFFS`).
        num_eval: valid crystals drawn for the distribution distances (fewer valid ⇒ all of them, and a warning).
        energy: the potential of d_E (a name of ``equicsp_core.settings.POTENTIALS`` or ``module:factory``), or
            ``None`` for no d_E.
        seed: of the draw.
    """
    cutoffs = coverage_cutoffs(dataset)
    if num_eval < 1:
        raise ValueError(f"num_eval must be >= 1, got {num_eval}")
    if not generated or not reference:
        raise ValueError("nothing to evaluate: the generated and the reference sets must both be non-empty")
    calculator = None
    if energy is not None:  # a potential that cannot load is refused before the featurising
        from equicsp_core.relax import load_calculator

        calculator = load_calculator(energy, device)
    started = time.perf_counter()
    logger.info("fingerprinting %d generated and %d reference crystals on %d process(es)", len(generated),
                len(reference), processes)
    generated_features = features_of(generated, processes)
    reference_features = features_of(reference, processes)
    featurising_seconds = time.perf_counter() - started
    drawn = draw_valid(generated_features, num_eval, seed)
    if len(drawn) < num_eval:
        logger.warning("only %d of the %d generated crystals are valid; the distribution distances use them all "
                       "(the papers draw %d)", len(drawn), len(generated), num_eval)
    report: dict[str, Any] = {"dataset": dataset, "generated": len(generated), "reference": len(reference),
                              **validity(generated_features), "num_eval": len(drawn), "seed": seed,
                              "coverage_cutoffs": dict(zip(("structure", "composition"), cutoffs))}
    report.update(coverage(generated_features, reference_features, *cutoffs))
    if drawn:
        sample = [generated_features[i] for i in drawn]
        report["d_density"] = wasserstein([f.density for f in sample], [f.density for f in reference_features])
        report["d_num_elements"] = wasserstein([f.num_elements for f in sample],
                                               [f.num_elements for f in reference_features])
    else:
        report["d_density"] = report["d_num_elements"] = None
    report.update(energy=energy, d_energy=None, energy_note=ENERGY_NOTE)
    report["featurising_seconds"] = round(featurising_seconds, 1)
    if calculator is not None and drawn:
        started = time.perf_counter()
        logger.info("single-point energies of %d drawn and %d reference crystals with %s", len(drawn), len(reference),
                    energy)
        sample_energies = single_point_energies([generated[i] for i in drawn], calculator)
        reference_energies = single_point_energies(reference, calculator)
        finite = [[e for e in values if e is not None and math.isfinite(e)]
                  for values in (sample_energies, reference_energies)]
        report["energy_failures"] = {"generated": len(sample_energies) - len(finite[0]),
                                     "reference": len(reference_energies) - len(finite[1])}
        report["d_energy"] = wasserstein(*finite) if all(finite) else None
        report["energy_seconds"] = round(time.perf_counter() - started, 1)
    return report


def reference_structures(dataset: str, split: str | None = None,
                         data_dir: str | os.PathLike | None = None) -> tuple[str, list[Structure]]:
    """The split's name and its structures, parsed from the ``cif`` column as is (default: the reported split)."""
    from pymatgen.core import Structure

    from equicsp_core.splits import check_not_trained_on, load_cifs, report_split, split_rows

    split = split or report_split(dataset, data_dir)
    rows = split_rows(dataset, split, data_dir)
    check_not_trained_on(dataset, rows, data_dir)
    return split, [Structure.from_str(cif, fmt="cif") for cif in load_cifs(dataset, rows, data_dir)]

