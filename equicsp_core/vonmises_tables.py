"""EquiCSP's normalisation tables κ, K, S as smooth functions of (n, log σ) (docs/method.md §4.3–4.4).

For ``n`` atoms and noise level σ, the CoM-free noise ``ε̄ = m(σz)`` (per axis) is modelled as a von Mises
``V(x; 0, κ) ∝ exp(κ cos 2πx)``:

* ``κ(n, σ)``: maximum-likelihood concentration, ``κ = A⁻¹(E[cos 2πε̄])`` with ``A(κ) = I₁(κ)/I₀(κ)``;
* ``K(n, σ) = E[(2πκ sin 2πε̄)²]``: second moment of the von Mises negative score;
* ``S(n, σ) = E[w(ε̄)²]``: second moment of the centred CoM-free noise.

We tabulate them by Monte Carlo on a log-σ grid wider than the training ladder, with common random numbers
across σ (so each row is smooth in σ), and interpolate ``log κ``, ``log K``, ``log S`` linearly in
``log σ``: any σ ladder inside the grid (another T, σ_begin, σ_end, or a sub-sampled sampler) needs no new
table. Rows are indexed by ``n`` itself (rows 0 and 1 hold zeros: for ``n = 1``, ``ε̄ ≡ 0``).

The package ships the table computed by :func:`compute_tables` with the defaults
(``equicsp tables --out …`` rebuilds it bit for bit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from equicsp_core.domain import MAX_TABLE_ATOMS
from equicsp_core.torus import TWO_PI, wrap_centered

SHIPPED_TABLES = Path(__file__).parent / "resources" / "vonmises_tables.pt"


def _bessel_ratio(kappa: np.ndarray) -> np.ndarray:
    """``A(κ) = I₁(κ)/I₀(κ)``, overflow-free through the exponentially scaled Bessel functions."""
    from scipy.special import i0e, i1e

    return i1e(kappa) / i0e(kappa)


def inverse_bessel_ratio(mean_cos: np.ndarray, lower: float = 1e-6, upper: float = 1e8) -> np.ndarray:
    """``κ = A⁻¹(c)``: the von Mises MLE concentration for mean cosine ``c``, by bisection in log κ.

    ``c ≤ A(lower)`` gives ``lower`` (a uniform sample carries no concentration).
    """
    lo = np.full_like(mean_cos, math.log(lower), dtype=np.float64)
    hi = np.full_like(mean_cos, math.log(upper), dtype=np.float64)
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        too_small = _bessel_ratio(np.exp(mid)) < mean_cos
        lo = np.where(too_small, mid, lo)
        hi = np.where(too_small, hi, mid)
    return np.exp(0.5 * (lo + hi))


@dataclass(frozen=True)
class VonMisesTables:
    """κ, K, S on a log-σ grid for ``n = 0 … max_atoms``.

    Attributes:
        log_sigma: ``(G,)`` float64, increasing.
        kappa: ``(max_atoms + 1, G)``; rows 0 and 1 are zero.
        kappa_norm: ``(max_atoms + 1, G)`` (K); rows 0 and 1 are zero.
        sample_norm: ``(max_atoms + 1, G)`` (S); rows 0 and 1 are zero.
    """

    log_sigma: torch.Tensor
    kappa: torch.Tensor
    kappa_norm: torch.Tensor
    sample_norm: torch.Tensor

    @property
    def max_atoms(self) -> int:
        return int(self.kappa.shape[0]) - 1

    def lookup(self, num_atoms: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """κ, K, S for each ``(n, σ)`` pair, log-log interpolated; zeros where ``n = 1``.

        Args:
            num_atoms: ``(B,)`` int.
            sigma: ``(B,)`` noise levels inside the table's grid (the two broadcast against each other).

        Returns:
            ``(kappa, K, S)``, each ``(B,)`` float64 on ``sigma``'s device.
        """
        if num_atoms.numel() and int(num_atoms.max()) > self.max_atoms:
            raise ValueError(
                f"crystal with {int(num_atoms.max())} atoms: the von Mises tables cover at most "
                f"{self.max_atoms} atoms"
            )
        if num_atoms.numel() and int(num_atoms.min()) < 1:
            raise ValueError("crystal with no atoms")
        device = sigma.device
        num_atoms, sigma = torch.broadcast_tensors(num_atoms.cpu(), sigma.detach().double().cpu())
        log_sigma = torch.log(sigma)
        grid = self.log_sigma
        if log_sigma.numel() and (log_sigma.min() < grid[0] - 1e-9 or log_sigma.max() > grid[-1] + 1e-9):
            raise ValueError(
                f"sigma outside the tables' range [{math.exp(grid[0]):.3g}, {math.exp(grid[-1]):.3g}]"
            )
        right = torch.searchsorted(grid, log_sigma.clamp(grid[0], grid[-1])).clamp(1, grid.numel() - 1)
        left = right - 1
        weight = (log_sigma - grid[left]) / (grid[right] - grid[left])
        rows = num_atoms.long()
        single = rows < 2

        def interpolate(table: torch.Tensor) -> torch.Tensor:
            log_table = torch.log(table[rows.clamp_min(2)])
            value = torch.exp(
                torch.lerp(log_table.gather(1, left[:, None]), log_table.gather(1, right[:, None]), weight[:, None])
            ).squeeze(1)
            return torch.where(single, torch.zeros_like(value), value).to(device)

        return interpolate(self.kappa), interpolate(self.kappa_norm), interpolate(self.sample_norm)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({k: getattr(self, k) for k in ("log_sigma", "kappa", "kappa_norm", "sample_norm")}, path)

    @classmethod
    def load(cls, path: str | Path) -> VonMisesTables:
        return cls(**torch.load(path, weights_only=True))


def tables_for(
    num_atoms: int, sigmas: torch.Tensor, samples: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Monte Carlo estimates of κ, K, S for one ``n ≥ 2`` on a vector of σ (common random numbers).

    Args:
        sigmas: ``(G,)`` float64.
        samples: number of scalar noise values per cell (``⌈samples/n⌉`` groups of ``n``).

    Returns:
        ``(kappa, K, S)``, each ``(G,)`` float64.
    """
    groups = -(-samples // num_atoms)
    z = torch.randn(groups, num_atoms, generator=generator, dtype=torch.float64)
    mean_cos, mean_sin_sq, mean_w_sq = [], [], []
    for sigma in sigmas.tolist():
        eps = sigma * z
        theta = TWO_PI * eps
        mu = torch.atan2(torch.sin(theta).mean(1, keepdim=True), torch.cos(theta).mean(1, keepdim=True)) / TWO_PI
        eps_bar = torch.remainder(eps - mu, 1.0)
        angle = TWO_PI * eps_bar
        mean_cos.append(float(torch.cos(angle).mean()))
        mean_sin_sq.append(float((torch.sin(angle) ** 2).mean()))
        mean_w_sq.append(float((wrap_centered(eps_bar) ** 2).mean()))
    kappa = torch.from_numpy(inverse_bessel_ratio(np.array(mean_cos)))
    kappa_norm = (TWO_PI * kappa) ** 2 * torch.tensor(mean_sin_sq, dtype=torch.float64)
    return kappa, kappa_norm, torch.tensor(mean_w_sq, dtype=torch.float64)


def compute_tables(
    max_atoms: int = MAX_TABLE_ATOMS,
    sigma_min: float = 1e-3,
    sigma_max: float = 1.0,
    points_per_decade: int = 40,
    samples: int = 200_000,
    seed: int = 0,
    progress: bool = False,
) -> VonMisesTables:
    """Build the tables from scratch: one seeded generator per ``n`` so any row can be recomputed alone.

    Raises:
        ValueError: for ``samples`` below 1 (no noise to average: every table entry would be NaN).
    """
    from tqdm import tqdm

    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be an integer >= 1, got {samples!r}")

    decades = math.log10(sigma_max / sigma_min)
    log_sigma = torch.linspace(math.log(sigma_min), math.log(sigma_max), round(decades * points_per_decade) + 1,
                               dtype=torch.float64)
    shape = (max_atoms + 1, log_sigma.numel())
    kappa, kappa_norm, sample_norm = (torch.zeros(shape, dtype=torch.float64) for _ in range(3))
    for n in tqdm(range(2, max_atoms + 1), desc="von Mises tables", disable=not progress):
        generator = torch.Generator().manual_seed(seed * 1000 + n)
        kappa[n], kappa_norm[n], sample_norm[n] = tables_for(n, torch.exp(log_sigma), samples, generator)
    return VonMisesTables(log_sigma, kappa, kappa_norm, sample_norm)


@lru_cache(maxsize=1)
def shipped_tables() -> VonMisesTables:
    """The tables that ship with the package (see the module docstring)."""
    if not SHIPPED_TABLES.is_file():
        raise FileNotFoundError(f"{SHIPPED_TABLES} is missing; rebuild it with `equicsp tables`")
    return VonMisesTables.load(SHIPPED_TABLES)
