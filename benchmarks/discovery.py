"""Discovery benchmark: from a composition alone to the known structure, through the engine's pipeline.

For each of the first ``--rows`` reserved mp_20 test rows (never trained on, never used for selection; ``--split
selection``: the val rows held out from training, where a ranking rule may be chosen), only the
reduced composition is given (``Sr4Ti4O12`` → ``SrTiO3``): the model samples ``--num-samples`` candidates shared
among every cell size Z it supports (:func:`equicsp_core.domain.sampling_cells`) by the training prior of
:mod:`equicsp_core.formula_unit_prior` (lines written before it: round-robin), the pipeline screens them
(implausible cells only), relaxes every plausible one with the ML potential (``--potential``, CHGNet by default),
merges the relaxed duplicates and
ranks them as the pipeline does (:func:`equicsp_core.pipeline.rank`: by consensus within 25 meV/atom of the lowest
ML energy per atom, then by energy; lines written before session 11: by energy alone; the rules are compared on the
recorded candidates by ``benchmarks/ranking_rules.py``). Scored against the known structure with
the papers' StructureMatcher tolerances (:func:`equicsp_core.metrics.rms_distance`):

- ``sampled``: the known structure is among the sampled candidates (before relaxation);
- ``relaxed``: among the ML-relaxed candidates (the discovery benchmark's "any match");
- ``top1``: it is the ML ranking's winner.

One JSON line per composition in ``--out`` (resumable: rows already there are skipped; ``--part i/n`` runs every
n-th row from the i-th, so that n processes share the rows, each into its own ``--out``), with its wall time and,
per candidate, its Z, ML energy, space group after relaxation, match and rank (``candidate_details``: why the
ranking misses a found structure; lines written before it lack them); ``--summary`` prints the fractions and, over
the lines with details where the winner is not a match, the ML rank of the best-ranked match, its ML energy above
the winner's and how many of those winners have no symmetry, and, where the records hold each match's RMS
(``match_rms``), the found and top-1 fractions counting only matches within RMS 0.25 (``close_matches``). DFT on
the shortlist (the issue's level (c)) is ``benchmarks/discovery_dft.py``, through the AiiDA work chain: pw.x costs
minutes to hours per structure on this CPU, so it runs on a few small compositions.

    python benchmarks/discovery.py --checkpoint mp_20 --rows 100 --num-samples 10 --steps 100 \\
        --out benchmarks/results/discovery_mp20.jsonl
    python benchmarks/discovery.py --out benchmarks/results/discovery_mp20.jsonl --summary
    python benchmarks/discovery.py --out part0.jsonl part1.jsonl --summary     # parts run with --part 0/2, 1/2
    python benchmarks/discovery.py --out sevennet.jsonl --against chgnet.jsonl --summary   # two runs, row by row
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import Counter
from pathlib import Path

from equicsp_core.settings import RelaxSettings, SampleSettings, ScreenSettings, SettingsError


def reduced_formula_of(cif: str) -> tuple[str, object]:
    """The known structure of a data row and its reduced formula written as a request (``Sr1Ti1O3``; pymatgen's
    ``reduced_formula`` may group, ``InGa(AgTe2)2``, which is no request)."""
    from pymatgen.core import Structure

    structure = Structure.from_str(cif, fmt="cif")
    return structure.composition.reduced_composition.formula.replace(" ", ""), structure  # In1Ga1Ag2Te4


def run_row(index: int, cif: str, model, card, calculator, rerank_calculator, args: argparse.Namespace) -> dict:
    """Sample, screen, relax, rank and score one composition; ``candidate_details`` per candidate (see
    :func:`candidate_details`)."""
    from equicsp_core.cell_shape import cell_shape_strain
    from equicsp_core.metrics import PAPERS_MATCHER_TOLERANCES, rms_distance
    from equicsp_core.pipeline import candidate_label, rank, screen
    from equicsp_core.predict import predict_with_settings
    from equicsp_core.relax import relax_structures
    from equicsp_core.screening import space_group

    started = time.perf_counter()
    formula, known = reduced_formula_of(cif)
    settings = SampleSettings(formulas=[formula], num_samples=args.num_samples, steps=args.steps, seed=args.seed)
    try:
        batches = list(predict_with_settings(model, card, settings))
    except SettingsError as error:  # no cell size Z of the composition fits the model: a row that says so
        return {"row": index, "formula": formula, "known_atoms": len(known), "refused": str(error),
                "sampled": False, "relaxed_match": False, "top1": False, "known_z": len(known) // formula_unit_atoms(
                    formula), "sampling_seconds": 0.0, "seconds": round(time.perf_counter() - started, 1)}
    every = {candidate_label(formula, c.sample_index): c for batch in batches for c in batch}
    sampled = {label: candidate for label, candidate in every.items() if candidate.structure is not None}
    sampling_seconds = time.perf_counter() - started
    decisions = screen({label: c.structure for label, c in sampled.items()}, ScreenSettings())
    plausible = {label: sampled[label].structure for label, decision in decisions.items() if decision["kept"]}
    relax_settings = RelaxSettings(fmax=args.fmax, steps=args.relax_steps, device="cpu")
    results = dict(relax_structures(plausible, relax_settings, lambda potential, device: calculator))
    relaxed = {label: result.structure for label, result in results.items() if result.structure is not None}
    ranking = rank({label: result.as_dict() for label, result in results.items()}, relaxed, top_k=1)

    def matches(structures: dict) -> dict[str, float]:
        """The labels whose structure matches the known one, with the normalised RMS distance of the match."""
        distances = {label: rms_distance(structure, known) for label, structure in structures.items()}
        return {label: distance for label, distance in distances.items() if distance is not None}

    matched_sampled, matched_relaxed = matches({k: c.structure for k, c in sampled.items()}), matches(relaxed)
    strains = {label: cell_shape_strain(relaxed[label], known, **PAPERS_MATCHER_TOLERANCES)
               for label in matched_relaxed}
    winner = ranking.winners[0] if ranking.winners else None
    details = candidate_details(every, decisions, results, ranking.ranking, set(matched_sampled), matched_relaxed,
                                strains, lambda structure: str(space_group(structure)))
    if args.denoising_loss:
        losses = denoising_losses(model, relaxed, seed=args.seed)
        for record in details:
            record["denoising_loss"] = losses.get(record["label"])
    if args.symmetry_polish:
        for record in details:
            if record["label"] in relaxed:
                record["polished"] = symmetry_polish(relaxed[record["label"]], calculator, relax_settings, known)
    extra = {}
    if args.rerank_potential:
        extra["rerank"] = rerank(ranking, relaxed, rerank_calculator, relax_settings, matches, args.rerank_top)
    for kind in ("resampled", "fresh") if args.resample_from else ():
        extra[kind] = second_round(kind, model, card, formula, ranking, results, relaxed, calculator, relax_settings,
                                   matches, args)
    return {
        "row": index, "formula": formula, "known_atoms": len(known),
        "known_z": len(known) // formula_unit_atoms(formula), "known_space_group": str(space_group(known)),
        "candidates": len(sampled), "plausible": len(plausible), "relaxed": len(relaxed),
        "z_sampled": sorted({c.formula_units for c in sampled.values()}),
        "sampled": bool(matched_sampled), "relaxed_match": bool(matched_relaxed),
        "top1": winner is not None and winner in matched_relaxed, "winner": winner,
        "winner_z": sampled[winner].formula_units if winner else None,
        "matched_z": sorted({sampled[label].formula_units for label in matched_relaxed}),
        "candidate_details": details,
        "sampling_seconds": round(sampling_seconds, 1), **extra, "seconds": round(time.perf_counter() - started, 1),
    }


def second_round(kind: str, model, card, formula: str, ranking, results: dict, relaxed: dict, calculator,
                 relax_settings: RelaxSettings, matches, args: argparse.Namespace) -> dict:
    """A second round of ``--resample-top`` × ``--resample-copies`` candidates, screened, relaxed and ranked with the
    first round's (an experimental step):

    - ``kind="resampled"`` explores around the first round's best structures (SDEdit, Meng et al. 2022): the
      ``--resample-top`` best-ranked relaxed structures are each noised ``--resample-copies`` times to the time
      ``--resample-from`` and denoised again by the CSP model (``--resample-steps`` steps,
      :func:`equicsp_core.sampler.sample` with ``start``); labels ``<parent>~<copy>``;
    - ``kind="fresh"``, its control at the same cost: as many new samples of the composition (seed + 1, the first
      round's steps and prior over Z); labels ``fresh~<sample>``.

    Returns ``top1``, ``relaxed_match`` and ``winner`` of the joint ranking (``winner_second``: the winner is a
    second-round candidate), and one record per second-round candidate: ``label``, ``parent`` (``None`` for fresh),
    ``stage``, ``ml_energy_per_atom``, ``space_group``, ``rank`` (of its group in the joint ranking), ``match`` and
    ``match_rms``; ``seconds`` of the round.
    """
    from equicsp_core.pipeline import rank, screen
    from equicsp_core.relax import relax_structures
    from equicsp_core.screening import space_group

    started = time.perf_counter()
    sampled, parents = (resampled_candidates(model, ranking, relaxed, args) if kind == "resampled"
                        else fresh_candidates(model, card, formula, args))
    decisions = screen({label: structure for label, structure in sampled.items() if structure is not None},
                       ScreenSettings())
    plausible = {label: sampled[label] for label, decision in decisions.items() if decision["kept"]}
    new_results = dict(relax_structures(plausible, relax_settings, lambda potential, device: calculator))
    new_relaxed = {label: r.structure for label, r in new_results.items() if r.structure is not None}
    every_relaxed = {**relaxed, **new_relaxed}
    joint = rank({label: r.as_dict() for label, r in {**results, **new_results}.items()}, every_relaxed, top_k=1)
    matched = matches(every_relaxed)
    group_of = {member: label for label, entry in joint.ranking.items() for member in entry["members"] or ()}
    records = []
    for label, structure in sampled.items():
        relaxed_one = new_relaxed.get(label)
        stage = ("invalid" if structure is None else "implausible" if not decisions[label]["kept"]
                 else joint.ranking[label]["status"])
        records.append({
            "label": label, "parent": parents.get(label), "stage": stage,
            "ml_energy_per_atom": new_results[label].energy_per_atom if relaxed_one is not None else None,
            "space_group": str(space_group(relaxed_one)) if relaxed_one is not None else None,
            "rank": joint.ranking[group_of[label]]["ml_rank"] if label in group_of else None,
            "match": label in matched, "match_rms": matched.get(label),
        })
    winner = joint.winners[0] if joint.winners else None
    return {"top1": winner in matched, "relaxed_match": bool(matched), "winner": winner,
            "winner_second": winner in sampled, "candidates": records,
            "seconds": round(time.perf_counter() - started, 1)}


def rerank(ranking, relaxed: dict, calculator, relax_settings: RelaxSettings, matches, top: int) -> dict:
    """The first ranking's best ``top`` groups relaxed again with a second potential and ranked by its energies (an
    experimental step: a cheap potential relaxes every candidate, a costlier one orders the shortlist).

    Each group's representative is relaxed again from its first-potential minimum; every member of the group carries
    the result, so the consensus rule of :func:`equicsp_core.pipeline.rank` counts the first ranking's populations
    (and merges groups that the second potential relaxes into one structure). Returns ``top1`` and ``winner`` of that
    consensus, ``top1_by_energy`` and ``winner_by_energy`` (the lowest second-potential energy alone), and per
    shortlisted group ``label``, ``first_rank``, ``members``, ``energy_per_atom``, ``status``, ``relax_steps``,
    ``match`` and ``match_rms`` of its re-relaxed structure; ``seconds`` of the step. With fewer than two groups
    nothing is relaxed: the first winner stands (``reranked`` 0).
    """
    from equicsp_core.pipeline import rank
    from equicsp_core.relax import relax_structures

    started = time.perf_counter()
    groups = sorted((entry["ml_rank"], label, entry["members"]) for label, entry in ranking.ranking.items()
                    if entry["ml_rank"] is not None)[:top]
    if len(groups) < 2:
        winner = groups[0][1] if groups else None
        found = matches({winner: relaxed[winner]}) if winner else {}
        return {"reranked": 0, "top1": bool(found), "winner": winner, "top1_by_energy": bool(found),
                "winner_by_energy": winner, "groups": [], "seconds": round(time.perf_counter() - started, 1)}
    results = dict(relax_structures({label: relaxed[label] for _, label, _ in groups}, relax_settings,
                                    lambda potential, device: calculator))
    representative_of = {member: label for _, label, members in groups for member in members}
    carried = {member: results[label] for member, label in representative_of.items()}
    again = rank({member: result.as_dict() for member, result in carried.items()},
                 {member: result.structure for member, result in carried.items() if result.structure is not None},
                 top_k=1)
    matched = matches({label: result.structure for label, result in results.items() if result.structure is not None})
    winner = representative_of[again.winners[0]] if again.winners else None
    energies = {label: result.energy_per_atom for label, result in results.items() if result.structure is not None}
    by_energy = min(energies, key=energies.get) if energies else None
    records = [{"label": label, "first_rank": first_rank, "members": len(members),
                "energy_per_atom": results[label].energy_per_atom, "status": results[label].status,
                "relax_steps": results[label].steps, "match": label in matched, "match_rms": matched.get(label)}
               for first_rank, label, members in groups]
    return {"reranked": len(groups), "top1": winner in matched, "winner": winner,
            "top1_by_energy": by_energy in matched, "winner_by_energy": by_energy, "groups": records,
            "seconds": round(time.perf_counter() - started, 1)}


def resampled_candidates(model, ranking, relaxed: dict, args: argparse.Namespace) -> tuple[dict, dict]:
    """The resampled round's structures by label (``None``: no crystal) and each label's parent."""
    import torch

    from equicsp_core.crystal import Crystal, CrystalBatch
    from equicsp_core.sampler import sample

    order = sorted((entry["ml_rank"], label) for label, entry in ranking.ranking.items() if entry["ml_rank"])
    parents = {f"{label}~{copy}": label for _, label in order[:args.resample_top] for copy in range(args.resample_copies)}
    if not parents:
        return {}, {}
    start = CrystalBatch.collate([Crystal.from_structure(relaxed[parent]) for parent in parents.values()])
    result = sample(model, start.atomic_numbers, start.num_atoms, steps=args.resample_steps, start=start,
                    start_step=args.resample_from, generator=torch.Generator().manual_seed(args.seed))
    structures = {label: crystal.to_structure() if crystal is not None else None
                  for label, crystal in zip(parents, result.crystals(), strict=True)}
    return structures, parents


def fresh_candidates(model, card, formula: str, args: argparse.Namespace) -> tuple[dict, dict]:
    """The fresh round's structures by label (``None``: no crystal), and no parents."""
    from equicsp_core.predict import predict_with_settings

    settings = SampleSettings(formulas=[formula], num_samples=args.resample_top * args.resample_copies,
                              steps=args.steps, seed=args.seed + 1)
    candidates = [c for batch in predict_with_settings(model, card, settings) for c in batch]
    return {f"fresh~{c.sample_index}": c.structure for c in candidates}, {}


#: The time steps (of the model's T = 1000) the loss is evaluated at: small and moderate noise, where the denoiser's
#: output depends on the structure; at large t it sees mostly noise.
T_GRID = (5, 10, 25, 50, 100, 200, 400)


def denoising_losses(model, structures: dict, draws: int = 8, seed: int = 0) -> dict[str, dict[str, float]]:
    """``{label: {"t": loss_t}}``: the CSP model's own verdict on each relaxed candidate of ``structures`` (pymatgen),
    its denoising loss at each t of :data:`T_GRID` (an EquiCSP CSP model; an experimental ranking signal, replayed by
    ``benchmarks/ranking_rules.py``'s rule ``denoising``; not in the pipeline).

    The training loss of docs/method.md §6.2 without its lattice-permutation terms, per crystal, over ``draws``
    noise draws at each t: for a clean crystal (L, F) of N atoms,

        loss_t = mean_k ‖ε̂_C(C_t, F_t, t) − ε_C‖²/6 + (‖ĉ − c‖² + ‖ŝ − s‖²) / (3N)

    with C_t = sqrt(ᾱ_t) C + sqrt(1 − ᾱ_t) ε_C, F_t = F + σ_t z (mod 1), and c, s the normalised coordinate and
    score targets of training. Lower: the denoiser finds the crystal more typical of its training data (the
    diffusion ELBO is a weighted sum of such terms). The noise comes from one generator seeded alike for every
    crystal, so the candidates of a composition see the same t, lattice noise and (for equal N) coordinate noise:
    common random numbers make their differences far less noisy than the losses themselves.
    """
    import torch

    from equicsp_core.crystal import Crystal, CrystalBatch
    from equicsp_core.lattice import lattice_to_equicsp
    from equicsp_core.torus import TWO_PI, com_free, wrap_centered

    if model.mode != "equicsp" or model.task != "csp":
        raise ValueError("the denoising loss is measured for EquiCSP CSP models only")
    losses = {}
    times = torch.tensor(T_GRID).repeat_interleave(draws)  # (K,) for K = len(T_GRID) · draws copies
    with torch.no_grad():
        for label, structure in structures.items():
            crystal = Crystal.from_structure(structure)
            copies = CrystalBatch.collate([crystal] * len(times))
            generator = torch.Generator().manual_seed(seed)
            lattice_noise = torch.randn((len(times), 6), generator=generator)
            z = torch.randn(copies.frac_coords.shape, generator=generator)
            batch, num_atoms = copies.batch, copies.num_atoms
            lattice_t = model._noisy_lattice(lattice_to_equicsp(copies.lengths, copies.angles), lattice_noise, times)
            sigma = model.schedules.sigmas.to(z)[times]
            eps = sigma[batch, None] * z
            frac_t = torch.remainder(copies.frac_coords + eps, 1.0)
            out = model.denoise(copies.atomic_numbers, frac_t, lattice_t, times, num_atoms, batch,
                                model.graph_for(num_atoms))
            per_copy = (out.lattice - lattice_noise).square().mean(1)
            if crystal.num_atoms > 1:  # one atom: no coordinate target (docs/method.md §10.1)
                kappa, kappa_norm, sample_norm = model.tables.lookup(num_atoms, sigma)
                eps_bar = com_free(eps, batch, num_atoms)
                target_coord = wrap_centered(eps_bar) / sample_norm.to(z).sqrt()[batch, None]
                target_score = ((TWO_PI * kappa.to(z))[batch, None] * torch.sin(TWO_PI * eps_bar)
                                / kappa_norm.to(z).sqrt()[batch, None])
                atom_terms = (model.config.coord_weight * (out.coord - target_coord).square()
                              + (out.score - target_score).square())
                per_atom = torch.zeros(len(times)).index_add_(0, batch, atom_terms.sum(1))
                per_copy = per_copy + per_atom / (3 * crystal.num_atoms)
            by_time = per_copy.reshape(len(T_GRID), draws).mean(1)
            losses[label] = {str(t): float(value) for t, value in zip(T_GRID, by_time)}  # keys as JSON has them
    return losses


#: The symmetry tolerances (Å) of ``--symmetry-polish``, tight to loose.
POLISH_SYMPRECS = (0.1, 0.25, 0.5)


def symmetry_polish(structure, calculator, settings: RelaxSettings, known) -> dict[str, dict | None]:
    """``{symprec: outcome}``: a relaxed candidate made exactly symmetric at each tolerance of
    :data:`POLISH_SYMPRECS` (:func:`equicsp_core.screening.symmetrized`) and relaxed again with the same potential
    and settings (an experimental step, replayed by ``benchmarks/ranking_rules.py``; not in the pipeline).

    A relaxation from a sample can stop in a distorted, shallow minimum next to a symmetric one: the known structure,
    relaxed from its own cell, is often lower in ML energy than the candidate that matches it. Each outcome holds the
    re-relaxed ``energy_per_atom``, ``space_group`` (at 0.1 Å), ``steps``, ``status`` and ``match`` (the known
    structure, papers' tolerances); ``None`` where spglib finds no symmetry but P1 at that tolerance, and a rung whose
    space group is the previous rung's repeats its outcome.
    """
    from equicsp_core.metrics import rms_distance
    from equicsp_core.relax import relax_structure
    from equicsp_core.screening import space_group, symmetrized

    outcomes, previous = {}, (None, None)
    for symprec in POLISH_SYMPRECS:
        group = space_group(structure, symprec)
        if group.number == 1:
            outcomes[str(symprec)] = None
            continue
        if group.number == previous[0]:
            outcomes[str(symprec)] = previous[1]
            continue
        try:
            result = relax_structure(symmetrized(structure, symprec), calculator, settings)
        except Exception as error:  # noqa: BLE001 - spglib or ASE's refinement may give up on a cell
            outcome = {"error": f"{type(error).__name__}: {error}"}
        else:
            outcome = {"energy_per_atom": result.energy_per_atom, "status": result.status, "steps": result.steps,
                       "space_group": str(space_group(result.structure)) if result.structure else None,
                       "match": result.structure is not None and rms_distance(result.structure, known) is not None}
        outcomes[str(symprec)] = outcome
        previous = (group.number, outcome)
    return outcomes


def candidate_details(candidates: dict, decisions: dict, results: dict, ranking: dict, matched_sampled: set,
                      matched_relaxed: dict[str, float], strains: dict[str, float | None],
                      space_group_of) -> list[dict]:
    """One record per sampled candidate (``candidates``: label → :class:`~equicsp_core.predict.Candidate`, valid
    or not), in sample order, so that why the ML ranking misses a found structure can be read off later:

    - ``label``, ``sample``, ``z`` (its cell's formula units);
    - ``stage``: ``invalid`` (no crystal), ``implausible`` (screened out), else the ranking's status
      (``ml_relaxed``, ``duplicate``, ``ml_failed``);
    - ``ml_energy_per_atom`` (eV/atom) and ``space_group`` (after ML relaxation, ``screening.space_group``),
      ``None`` without a relaxed structure; ``relaxation`` (the relaxation's status: ``converged``, ...) and
      ``relax_steps``, ``None`` where none ran;
    - ``rank``: the ML rank of its merged group (a duplicate: its representative's; 1 = the winner), and
      ``duplicate_of`` (the representative, for a duplicate);
    - ``sampled_match``, ``match``: the known structure, before and after relaxation (``matched_relaxed``: label →
      normalised RMS distance of the match), and ``match_rms``, that distance (``None``: no match). The papers'
      tolerances accept a match up to 0.5: a relaxed candidate at 0.4-0.5 is often another structure, above the known
      one in energy, which no ranking should pick;
    - ``match_strain``: the cell shape strain of the match (``strains``,
      :func:`equicsp_core.cell_shape.cell_shape_strain` with the papers' tolerances; ``None``: no match). The papers'
      matcher also accepts a strained relative of the known phase (a cubic cell for a tetragonal one of c/a 1.17 at
      RMS 0).
    """
    group_of = {member: label for label, entry in ranking.items() for member in entry["members"] or ()}
    records = []
    for label, candidate in sorted(candidates.items(), key=lambda item: item[1].sample_index):
        result = results.get(label)
        stage = ("invalid" if candidate.structure is None else "implausible" if not decisions[label]["kept"]
                 else ranking[label]["status"])
        representative = group_of.get(label)
        relaxed = result is not None and result.structure is not None
        records.append({
            "label": label, "sample": candidate.sample_index, "z": candidate.formula_units, "stage": stage,
            "ml_energy_per_atom": result.energy_per_atom if relaxed else None,
            "space_group": space_group_of(result.structure) if relaxed else None,
            "relaxation": result.status if result is not None else None,
            "relax_steps": result.steps if result is not None else None,
            "rank": ranking[representative]["ml_rank"] if representative else None,
            "duplicate_of": representative if representative not in (None, label) else None,
            "sampled_match": label in matched_sampled, "match": label in matched_relaxed,
            "match_rms": matched_relaxed.get(label), "match_strain": strains.get(label),
        })
    return records


def formula_unit_atoms(formula: str) -> int:
    """Atoms in one formula unit of a reduced formula."""
    from pymatgen.core import Composition

    return int(Composition(formula).num_atoms)


def read_lines(paths: list[Path]) -> list[dict]:
    """The composition lines of ``paths``, the parts of one run (a row in two lines is refused)."""
    lines = [json.loads(line) for path in paths for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise SystemExit(f"{', '.join(map(str, paths))}: no rows yet")
    if len({line["row"] for line in lines}) < len(lines):
        raise SystemExit(f"{', '.join(map(str, paths))}: a row is in more than one line: not the parts of one run")
    return lines


def summary(paths: list[Path]) -> dict:
    """Fractions over the composition lines of ``paths`` (the parts of one run)."""
    lines = read_lines(paths)
    count = len(lines)
    relaxed = sum(line["relaxed_match"] for line in lines)
    top1 = sum(line["top1"] for line in lines)
    return {
        "compositions": count,
        "sampled_match": round(100 * sum(line["sampled"] for line in lines) / count, 1),
        "relaxed_match": round(100 * relaxed / count, 1),
        "top1": round(100 * top1 / count, 1),
        "top1_over_any": round(100 * top1 / relaxed, 1) if relaxed else None,
        "known_z_above_1": sum(line["known_z"] > 1 for line in lines),
        "refused": sum("refused" in line for line in lines),
        "mean_seconds": round(sum(line["seconds"] for line in lines) / count, 1),
        "mean_sampling_seconds": round(sum(line["sampling_seconds"] for line in lines) / count, 1),
        **missed_ranks(lines),
        **close_matches(lines),
        **same_phase_matches(lines),
        **second_rounds(lines),
        **reranks(lines),
    }


def reranks(lines: list[dict]) -> dict:
    """Over the lines with a second potential's ranking (``--rerank-potential``): top-1 of the first ranking, of the
    second potential's consensus and of its energy alone, the compositions only one of the first and the consensus
    ranks first, with the sign test, and the step's mean seconds."""
    reranked = [line for line in lines if "rerank" in line]
    if not reranked:
        return {}
    count = len(reranked)
    gains = [line["formula"] for line in reranked if line["rerank"]["top1"] and not line["top1"]]
    losses = [line["formula"] for line in reranked if line["top1"] and not line["rerank"]["top1"]]
    return {"rerank": {
        "rows": count,
        "top1_first": round(100 * sum(line["top1"] for line in reranked) / count, 1),
        "top1_rerank": round(100 * sum(line["rerank"]["top1"] for line in reranked) / count, 1),
        "top1_rerank_by_energy": round(100 * sum(line["rerank"]["top1_by_energy"] for line in reranked) / count, 1),
        "top1_only_rerank": gains, "top1_only_first": losses, "sign_test_p": sign_test_p(len(gains), len(losses)),
        "mean_seconds": round(sum(line["rerank"]["seconds"] for line in reranked) / count, 1),
    }}


def second_rounds(lines: list[dict]) -> dict:
    """Over the lines with both second rounds (``--resample-from``): per round (the first alone, then with the
    resampled round, then with the fresh one of the same cost) the % found, found within :data:`CLOSE_RMS`, top-1,
    how many winners are second-round candidates and the round's own mean seconds; and the two second rounds paired
    row by row: the compositions only one of them ranks first, with the sign test."""
    both = [line for line in lines if "resampled" in line and "fresh" in line]
    if not both:
        return {}

    def close(candidates: list[dict]) -> bool:
        return any(c["match_rms"] is not None and c["match_rms"] <= CLOSE_RMS for c in candidates)

    def outcome(line: dict, name: str) -> dict:
        """The round's flags; the first round's seconds are the line's less those of the second rounds."""
        if name == "first":
            seconds = line["seconds"] - line["resampled"]["seconds"] - line["fresh"]["seconds"]
            return {"relaxed_match": line["relaxed_match"], "close": close(line["candidate_details"]),
                    "top1": line["top1"], "winner_second": False, "seconds": seconds}
        second = line[name]
        return {"relaxed_match": second["relaxed_match"],
                "close": close(line["candidate_details"]) or close(second["candidates"]),
                "top1": second["top1"], "winner_second": second["winner_second"], "seconds": second["seconds"]}

    result: dict = {"rows": len(both)}
    for name in ("first", "resampled", "fresh"):
        outcomes = [outcome(line, name) for line in both]
        result[name] = {
            "relaxed_match": round(100 * sum(o["relaxed_match"] for o in outcomes) / len(both), 1),
            f"relaxed_match_rms_{CLOSE_RMS}": round(100 * sum(o["close"] for o in outcomes) / len(both), 1),
            "top1": round(100 * sum(o["top1"] for o in outcomes) / len(both), 1),
            "winner_second": sum(o["winner_second"] for o in outcomes),
            "mean_seconds": round(sum(o["seconds"] for o in outcomes) / len(both), 1),
        }
    gains = [line["formula"] for line in both if line["resampled"]["top1"] and not line["fresh"]["top1"]]
    losses = [line["formula"] for line in both if line["fresh"]["top1"] and not line["resampled"]["top1"]]
    result.update(top1_only_resampled=gains, top1_only_fresh=losses, sign_test_p=sign_test_p(len(gains), len(losses)))
    return {"second_rounds": result}


#: A match this close (normalised RMS, the papers' StructureMatcher) is the known structure, not a near miss.
CLOSE_RMS = 0.25


def close_matches(lines: list[dict]) -> dict:
    """Over the lines whose records hold ``match_rms``: the % whose known structure is among the relaxed candidates
    within :data:`CLOSE_RMS`, the % whose winner is that close, and the second over the first. The papers' tolerances
    accept matches up to 0.5, and a relaxed candidate at 0.4-0.5 is often another, higher minimum (BENCHMARKS.md)."""
    return _strict_matches(lines, "match_rms", CLOSE_RMS, f"rms_{CLOSE_RMS}")


def same_phase_matches(lines: list[dict]) -> dict:
    """Over the lines whose records hold ``match_strain``: the found and top-1 fractions as :func:`close_matches`
    gives them, counting only matches whose cell shape strain is within
    :data:`~equicsp_core.cell_shape.SAME_PHASE_SHAPE_STRAIN` (the same phase, not a strained relative)."""
    from equicsp_core.cell_shape import SAME_PHASE_SHAPE_STRAIN

    return _strict_matches(lines, "match_strain", SAME_PHASE_SHAPE_STRAIN, "same_phase")


def _strict_matches(lines: list[dict], field: str, limit: float, name: str) -> dict:
    """Found and top-1 over the lines whose candidate records hold ``field``, a match counting where its ``field``
    is at most ``limit``; keys named by ``name``."""
    measured = [line for line in lines if line.get("candidate_details") and field in line["candidate_details"][0]]
    if not measured:
        return {}

    def strict(record: dict) -> bool:
        return record[field] is not None and record[field] <= limit

    found = sum(any(strict(c) for c in line["candidate_details"]) for line in measured)
    top1 = sum(any(strict(c) and c["label"] == line["winner"] for c in line["candidate_details"]) for line in measured)
    return {f"with_{field}": len(measured),
            f"relaxed_match_{name}": round(100 * found / len(measured), 1),
            f"top1_{name}": round(100 * top1 / len(measured), 1),
            f"top1_over_any_{name}": round(100 * top1 / found, 1) if found else None}


def sign_test_p(first_only: int, second_only: int) -> float:
    """Two-sided exact sign test: the chance, were two rankings equally good, of a split of the compositions only one
    of them ranks first at least as uneven as ``first_only`` against ``second_only`` (4 places)."""
    tail = sum(math.comb(first_only + second_only, k) for k in range(min(first_only, second_only) + 1))
    return round(min(1.0, 2 * tail / 2 ** (first_only + second_only)), 4)


def compare(paths: list[Path], against: list[Path]) -> dict:
    """Two runs paired on the rows both hold (e.g. one potential against another, the same samples): the counts of
    each on those rows, the compositions whose known structure only one of them ranks first, and the two-sided exact
    sign test of those (the chance of a split at least as uneven were both rankings equally good). ``same_samples``:
    rows whose candidates match the known structure before relaxation alike, candidate by candidate (the same seed
    and model sample the same cells on one machine; a run elsewhere may differ in the last bits)."""
    first = {line["row"]: line for line in read_lines(paths)}
    second = {line["row"]: line for line in read_lines(against)}
    rows = sorted(first.keys() & second.keys())
    if not rows:
        raise SystemExit("the two runs share no row")

    def pattern(line: dict) -> list[bool] | None:
        return [c["sampled_match"] for c in line["candidate_details"]] if "candidate_details" in line else None

    gains = [first[row]["formula"] for row in rows if first[row]["top1"] and not second[row]["top1"]]
    losses = [second[row]["formula"] for row in rows if second[row]["top1"] and not first[row]["top1"]]
    return {
        "rows": len(rows),
        "same_samples": sum(pattern(first[row]) is not None and pattern(first[row]) == pattern(second[row])
                            for row in rows),
        **{key: [sum(run[row][key] for row in rows) for run in (first, second)]
           for key in ("sampled", "relaxed_match", "top1")},
        "top1_only_first": gains, "top1_only_second": losses,
        "sign_test_p": sign_test_p(len(gains), len(losses)),
        "mean_seconds": [round(sum(run[row]["seconds"] for row in rows) / len(rows), 1) for run in (first, second)],
    }


def missed_ranks(lines: list[dict]) -> dict:
    """Over the lines with ``candidate_details``: how many; ``top3``, the % whose known structure is among the ML
    ranking's first three (what DFT on the top 3 could pick from); and for those found but not ranked first:
    ``{best ML rank of a match: compositions}``, how far (meV/atom, sorted) the best-ranked match lies above the winner
    in ML energy, and in how many of them the winner has no symmetry (P1) after relaxation."""
    detailed = [line for line in lines if "candidate_details" in line]
    missed = [line for line in detailed if line["relaxed_match"] and not line["top1"]]
    ranks, gaps, unsymmetric = Counter(), [], 0
    for line in missed:
        representatives = [c for c in line["candidate_details"] if c["rank"] is not None and c["duplicate_of"] is None]
        by_rank = {c["rank"]: c for c in representatives}
        best = min(c["rank"] for c in line["candidate_details"] if c["match"] and c["rank"] is not None)
        ranks[best] += 1
        winner = by_rank[1]
        gaps.append(round(1000 * (by_rank[best]["ml_energy_per_atom"] - winner["ml_energy_per_atom"]), 1))
        unsymmetric += winner["space_group"].startswith("P1 ")
    in_top3 = sum(any(c["match"] and c["rank"] is not None and c["rank"] <= 3 for c in line["candidate_details"])
                  for line in detailed)
    return {"with_candidate_details": len(detailed),
            "top3": round(100 * in_top3 / len(detailed), 1) if detailed else None,
            "found_not_top1_by_best_match_rank": {str(rank): ranks[rank] for rank in sorted(ranks)},
            "found_not_top1_energy_above_winner_meV": sorted(gaps),
            "found_not_top1_winner_p1": unsymmetric}


#: The settings that define a run, all alike in the lines of one ``--out`` (resuming with another would mix two runs),
#: with the value meant by a line written before the setting was recorded (absent here: not checked on such lines).
#: ``model_sha256`` is the checkpoint's weights (a shipped name such as ``mp_20`` stands for other weights once a new
#: model is shipped under it), taken from the checkpoint, not from the command line.
RUN_SETTINGS = {"checkpoint": None, "model_sha256": None, "split": "reserved", "potential": "chgnet",
                "num_samples": None, "steps": None, "seed": None, "fmax": None, "relax_steps": None, "resample_from": 0,
                "resample_top": None, "resample_copies": None, "resample_steps": None, "rerank_potential": None,
                "rerank_top": None}


def mixed_setting(lines: list[dict], settings: dict) -> str | None:
    """What makes ``lines`` another run than ``settings`` (``"with split reserved, not selection"``), or None."""
    for key, value in settings.items():
        recorded = {line.get(key, RUN_SETTINGS[key] if RUN_SETTINGS[key] is not None else value) for line in lines}
        if recorded - {value}:
            return f"with {key} {', '.join(sorted(map(str, recorded)))}, not {value}"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default="mp_20")
    parser.add_argument("--rows", type=int, default=100, help="first N rows of --split")
    parser.add_argument("--split", choices=("reserved", "selection"), default="reserved",
                        help="reserved: the figures' rows; selection: the rows to choose a ranking rule or any other "
                             "setting on (the val rows held out from training), never the reserved ones")
    parser.add_argument("--num-samples", type=int, default=10,
                        help="candidates per composition, shared among Z by the training prior")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--potential", default="chgnet", help="the ML potential that relaxes and ranks (a name of "
                        "equicsp_core.settings.POTENTIALS): one per --out")
    parser.add_argument("--fmax", type=float, default=0.05)
    parser.add_argument("--relax-steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--denoising-loss", action="store_true", help="record each relaxed candidate's denoising "
                        "loss under the CSP model (benchmarks/denoising_loss.py; an experimental ranking signal)")
    parser.add_argument("--symmetry-polish", action="store_true", help="record each relaxed candidate made "
                        "symmetric at 0.1, 0.25 and 0.5 Å and relaxed again (an experimental step)")
    parser.add_argument("--resample-from", type=int, default=0, metavar="T0", help="a second round (an experimental "
                        "step, second_round): the best relaxed structures noised to time T0 (1..1000) and denoised "
                        "again, and its control, as many fresh samples; 0: neither")
    parser.add_argument("--resample-top", type=int, default=2, help="with --resample-from: how many of the "
                        "best-ranked structures")
    parser.add_argument("--resample-copies", type=int, default=4, help="with --resample-from: copies of each")
    parser.add_argument("--resample-steps", type=int, default=50, help="with --resample-from: denoising steps")
    parser.add_argument("--rerank-potential", help="relax the best --rerank-top groups again with this second "
                        "potential and rank them by its energies (an experimental step, rerank); default: none")
    parser.add_argument("--rerank-top", type=int, default=3, help="with --rerank-potential: how many groups")
    parser.add_argument("--part", default="0/1", help="i/n: every n-th of the rows from the i-th (0 <= i < n)")
    parser.add_argument("--out", required=True, nargs="+", help="one file; with --summary, the parts of one run")
    parser.add_argument("--summary", action="store_true", help="print the fractions of --out and stop")
    parser.add_argument("--against", nargs="+", help="with --summary: a second run (its parts), compared with --out "
                        "row by row")
    args = parser.parse_args()
    if args.against and not args.summary:
        parser.error("--against compares two finished runs: give it with --summary")
    if args.summary:
        paths = [Path(path) for path in args.out]
        result = compare(paths, [Path(path) for path in args.against]) if args.against else summary(paths)
        print(json.dumps(result, indent=1))
        return
    if len(args.out) > 1:
        parser.error("--out takes one file, except with --summary")
    out = Path(args.out[0])
    try:
        part, parts = (int(value) for value in args.part.split("/"))
    except ValueError:
        parser.error(f"--part {args.part!r}: expected i/n, two integers")
    if not 0 <= part < parts:
        parser.error(f"--part {args.part}: needs 0 <= i < n")

    import torch

    from equicsp_core.checkpoint import model_of, read_checkpoint, resolve_checkpoint
    from equicsp_core.relax import load_calculator
    from equicsp_core.splits import load_cifs, split_rows

    torch.set_num_threads(args.threads)
    lines = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    settings = {key: getattr(args, key) for key in RUN_SETTINGS if key != "model_sha256"}
    payload = read_checkpoint(args.checkpoint)
    settings["model_sha256"] = payload["model_sha256"]
    mixed = mixed_setting(lines, settings)
    if mixed:
        parser.error(f"{out} holds rows {mixed}: use another --out")
    done = {line["row"] for line in lines}
    rows = split_rows("mp_20", args.split)[:args.rows][part::parts]
    cifs = load_cifs("mp_20", rows)
    model, card = model_of(payload, resolve_checkpoint(args.checkpoint)).eval(), payload.get("card", {})
    calculator = load_calculator(args.potential, "cpu")
    rerank_calculator = load_calculator(args.rerank_potential, "cpu") if args.rerank_potential else None
    for row, cif in zip(rows, cifs):
        if row.index in done:
            continue
        line = {**settings, **run_row(row.index, cif, model, card, calculator, rerank_calculator, args)}
        with out.open("a") as handle:
            handle.write(json.dumps(line) + "\n")
        print(f"{line['formula']}: {line.get('refused') or ''} sampled {line['sampled']}, relaxed "
              f"{line['relaxed_match']}, top1 {line['top1']} ({line['seconds']} s)", flush=True)


if __name__ == "__main__":
    main()
