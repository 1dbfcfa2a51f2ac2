"""The papers' CSP metrics (docs/method.md §8): validity, StructureMatcher match rate and RMSE, k = 1 and k = N.

Validity follows CDVAE's definitions:

* structural: every interatomic distance ≥ 0.5 Å, volume ≥ 0.1 Å³, longest lattice vector ≤ 40 Å;
* compositional: SMACT charge neutrality plus the Pauling electronegativity test over oxidation-state
  combinations (element counts reduced by their gcd; threshold = largest reduced count; one element or
  all metals ⇒ valid; > 1e7 combinations ⇒ invalid).

Matching: ``StructureMatcher(stol=0.5, angle_tol=10, ltol=0.3)``; a match's RMS displacement is
normalised by ``(V/n)^{1/3}`` (pymatgen's ``get_rms_dist``). k = 1 compares a pair only when both
prediction and ground truth are valid; k = N takes, per crystal, the smallest RMS over valid predictions.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from dataclasses import dataclass
from functools import reduce
from multiprocessing import get_context
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    from pymatgen.analysis.structure_matcher import StructureMatcher

MIN_DISTANCE = 0.5  # Å
MIN_VOLUME = 0.1  # Å³
MAX_LENGTH = 40.0  # Å
MAX_OXIDATION_COMBINATIONS = 1e7
#: The papers' StructureMatcher tolerances (CDVAE's, which DiffCSP and EquiCSP reuse).
PAPERS_MATCHER_TOLERANCES = {"stol": 0.5, "angle_tol": 10, "ltol": 0.3}


def structural_validity(structure) -> bool:
    """CDVAE's structural test on a pymatgen ``Structure``."""
    if structure is None or structure.volume < MIN_VOLUME or max(structure.lattice.abc) > MAX_LENGTH:
        return False
    if len(structure) == 1:
        return True
    distances = structure.distance_matrix
    return bool(distances[~np.eye(len(structure), dtype=bool)].min() >= MIN_DISTANCE)


def compositional_validity(atomic_numbers: Sequence[int]) -> bool:
    """CDVAE's SMACT test (charge neutrality + Pauling electronegativity) on a cell's atomic numbers."""
    import smact
    from pymatgen.core import Element
    from smact.screening import pauling_test

    counts = Counter(int(z) for z in atomic_numbers)
    symbols = [Element.from_Z(z).symbol for z in counts]
    if len(symbols) == 1:
        return True
    if all(symbol in smact.metals for symbol in symbols):
        return True
    divisor = reduce(math.gcd, counts.values())
    stoichiometry = [count // divisor for count in counts.values()]
    elements = smact.element_dictionary(tuple(symbols))
    electronegativities = [elements[s].pauling_eneg for s in symbols]
    # SMACT knows no oxidation state of some elements (He, Ne, Ar, Pm, At, Rn, Fr, Ra): none to balance with.
    oxidation_states = [elements[s].oxidation_states or [] for s in symbols]
    if math.prod(len(states) for states in oxidation_states) > MAX_OXIDATION_COMBINATIONS:
        return False
    threshold = max(stoichiometry)
    for states in itertools.product(*oxidation_states):
        if smact.neutral_ratios(states, stoichs=[(c,) for c in stoichiometry], threshold=threshold):
            try:
                if pauling_test(states, electronegativities):
                    return True
            except TypeError:  # missing electronegativity data: the test passes (CDVAE)
                return True
    return False


def is_valid(structure) -> bool:
    """Structural and compositional validity of a predicted or reference structure (``None`` ⇒ invalid)."""
    if structure is None:
        return False
    return structural_validity(structure) and compositional_validity(structure.atomic_numbers)


def _matcher() -> StructureMatcher:
    from pymatgen.analysis.structure_matcher import StructureMatcher

    return StructureMatcher(**PAPERS_MATCHER_TOLERANCES)


def rms_distance(predicted, reference) -> float | None:
    """Normalised RMS displacement of a StructureMatcher match, or ``None`` for no match."""
    try:
        result = _matcher().get_rms_dist(predicted, reference)
    except Exception:  # pymatgen can fail on degenerate cells: no match
        return None
    return None if result is None else float(result[0])


def _evaluate_one(job: tuple) -> tuple[bool, float | None]:
    """(ground truth, predictions, require_valid_reference) → (any valid prediction, best RMS)."""
    reference, predictions, require_valid_reference = job
    if require_valid_reference and not is_valid(reference):
        return False, None
    best = None
    any_valid = False
    for predicted in predictions:
        if not is_valid(predicted):
            continue
        any_valid = True
        rms = rms_distance(predicted, reference)
        if rms is not None and (best is None or rms < best):
            best = rms
    return any_valid, best


@dataclass(frozen=True)
class MatchResult:
    """Match rate (fraction, not %) and mean RMS over matched crystals, with counts."""

    match_rate: float
    rmse: float | None
    matched: int
    total: int
    valid_predictions: int
    per_crystal_rms: list[float | None]

    def to_dict(self) -> dict:
        return {"match_rate": self.match_rate, "rmse": self.rmse, "matched": self.matched, "total": self.total,
                "valid_predictions": self.valid_predictions}


def match_rate(references: list, predictions: list[list], processes: int = 1) -> MatchResult:
    """The papers' CSP metric.

    Args:
        references: ground-truth pymatgen structures (one per test crystal).
        predictions: per test crystal, its k predicted structures (``None`` for failed samples). With
            k = 1 the reference must be valid too (docs/method.md §8.2, as the official scripts).
        processes: worker processes for validity and matching (CPU heavy).
    """
    if len(references) != len(predictions):
        raise ValueError(f"{len(references)} references but {len(predictions)} prediction lists")
    if not references:
        raise ValueError("nothing to evaluate")
    single = all(len(p) == 1 for p in predictions)
    jobs = [(ref, preds, single) for ref, preds in zip(references, predictions)]
    if processes > 1:
        with get_context("fork").Pool(processes) as pool:
            results = pool.map(_evaluate_one, jobs, chunksize=8)
    else:
        results = [_evaluate_one(job) for job in jobs]
    rms = [best for _, best in results]
    matched = [r for r in rms if r is not None]
    return MatchResult(
        match_rate=len(matched) / len(references),
        rmse=float(np.mean(matched)) if matched else None,
        matched=len(matched),
        total=len(references),
        valid_predictions=sum(valid for valid, _ in results),
        per_crystal_rms=rms,
    )
