"""Fit a scaling law L(N, D) = E + A / N^alpha + B / D^beta to final losses, and read off the compute-optimal size.

This is the third approach of Hoffmann et al. 2022 ("Chinchilla", section 3.3 and appendix D.2): minimise
the Huber loss (delta 1e-3) between the predicted and the observed log-losses with L-BFGS, from a grid of
initialisations (the objective has many local minima), keeping the best. The prediction is written in log
space as log L = LSE(a - alpha log N, b - beta log D, e) with A = exp(a), B = exp(b), E = exp(e), which keeps
the three terms positive without constraints.

With C = 6 N D FLOPs, minimising L over N at fixed C gives (the paper's equation 4)
    N_opt(C) = G (C/6)^(beta / (alpha + beta)),  D_opt(C) = (C/6) / N_opt,  G = (alpha A / (beta B))^(1 / (alpha + beta)).
Its uncertainty comes from a bootstrap over runs: refit on runs drawn with replacement, take percentiles of N_opt.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass

import numpy as np

HUBER_DELTA = 1e-3  # Chinchilla's
# Initialisations, a coarser version of the paper's grid (it used 5 x 5 x 5 x 6 x 6 = 4,500 starts).
INIT_ALPHA = INIT_BETA = (0.2, 0.6, 1.0)
INIT_E = (-1.0, 0.0, 1.0)
INIT_A = INIT_B = (0.0, 5.0, 10.0, 15.0, 20.0)
STARTS = 48  # of those, how many L-BFGS runs start from (the ones with the lowest objective)
BOUNDS = [(-10.0, 60.0), (-10.0, 60.0), (-5.0, 5.0), (0.0, 4.0), (0.0, 4.0)]  # a, b, e, alpha, beta


@dataclass
class LossFit:
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float  # the Huber loss at the optimum (summed over runs)
    n_runs: int

    def predict(self, N, D):
        """The fitted loss at N parameters and D tokens (arrays broadcast)."""
        return self.E + self.A / np.power(N, self.alpha) + self.B / np.power(D, self.beta)

    def compute_optimal(self, flops: float) -> tuple[float, float]:
        """(N_opt, D_opt) for a budget of `flops` = 6 N D; see the module docstring."""
        a, b = self.alpha, self.beta
        if a <= 0 or b <= 0:  # a flat direction: no finite optimum
            return math.nan, math.nan
        G = (a * self.A / (b * self.B)) ** (1.0 / (a + b))
        n = G * (flops / 6.0) ** (b / (a + b))
        return n, flops / 6.0 / n

    def as_dict(self) -> dict:
        return asdict(self)


def _objective(theta: np.ndarray, logN: np.ndarray, logD: np.ndarray, logL: np.ndarray, delta: float):
    """Summed Huber loss of the log-loss residuals and its gradient (analytic, so L-BFGS needs no finite differences)."""
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * logN, b - beta * logD, np.full_like(logN, e)])
    top = terms.max(axis=0)
    w = np.exp(terms - top)
    s = w.sum(axis=0)
    pred = top + np.log(s)
    w /= s  # softmax weights: d pred / d (each term)
    r = pred - logL
    small = np.abs(r) <= delta
    loss = np.where(small, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta)).sum()
    g = np.where(small, r, delta * np.sign(r))
    grad = np.array([(g * w[0]).sum(), (g * w[1]).sum(), (g * w[2]).sum(),
                     -(g * w[0] * logN).sum(), -(g * w[1] * logD).sum()])
    return loss, grad


def init_grid() -> list[tuple[float, ...]]:
    return [(a, b, e, al, be) for a, b, e, al, be in
            itertools.product(INIT_A, INIT_B, INIT_E, INIT_ALPHA, INIT_BETA)]


def fit_scaling_law(N, D, L, *, delta: float = HUBER_DELTA, inits=None) -> LossFit:
    """Fit E + A/N^alpha + B/D^beta to losses `L` of runs with `N` parameters and `D` tokens (Chinchilla's approach 3)."""
    from scipy.optimize import minimize  # scipy: only the fit needs it

    N, D, L = (np.asarray(x, dtype=np.float64) for x in (N, D, L))
    if not (len(N) == len(D) == len(L)) or len(L) == 0:
        raise ValueError("N, D and L must be non-empty and of one length")
    if np.any(N <= 0) or np.any(D <= 0) or np.any(L <= 0) or not np.all(np.isfinite(L)):
        raise ValueError("N, D and L must be positive and finite")
    logN, logD, logL = np.log(N), np.log(D), np.log(L)
    if inits is None:  # L-BFGS from the grid points that start lowest: most of the grid's basins, a tenth of the cost
        grid = init_grid()
        start = [_objective(np.asarray(t), logN, logD, logL, delta)[0] for t in grid]
        inits = [grid[i] for i in np.argsort(start)[:STARTS]]
    best = None
    for theta0 in inits:
        res = minimize(_objective, np.asarray(theta0, dtype=np.float64), args=(logN, logD, logL, delta), jac=True,
                       method="L-BFGS-B", bounds=BOUNDS, options={"maxiter": 500})
        if np.isfinite(res.fun) and (best is None or res.fun < best.fun):
            best = res
    a, b, e, alpha, beta = best.x
    return LossFit(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=float(alpha), beta=float(beta),
                   objective=float(best.fun), n_runs=len(L))


def bootstrap_fits(N, D, L, best: LossFit, *, samples: int = 200, seed: int = 0) -> list[LossFit]:
    """Refits on `samples` resamples of the runs (drawn with replacement). Each starts from the full fit and two
    spread-out points, so that a resample's own minimum is found without the whole grid's cost."""
    N, D, L = (np.asarray(x, dtype=np.float64) for x in (N, D, L))
    rng = np.random.default_rng(seed)
    start = (math.log(best.A), math.log(best.B), math.log(best.E), best.alpha, best.beta)
    inits = [start, (5.0, 5.0, 0.0, 0.3, 0.3), (10.0, 10.0, 0.0, 0.6, 0.6)]
    fits = []
    for _ in range(samples):
        idx = rng.integers(0, len(L), len(L))
        fits.append(fit_scaling_law(N[idx], D[idx], L[idx], inits=inits))
    return fits


def predict_with_uncertainty(best: LossFit, fits: list[LossFit], flops: float, *, level: float = 0.9) -> dict:
    """The compute-optimal N and D at `flops` from the full fit, with the central `level` interval over `fits`."""
    n, d = best.compute_optimal(flops)
    out = {"flops": flops, "n_opt": n, "d_opt": d, "loss": float(best.predict(n, d)) if math.isfinite(n) else math.nan,
           "level": level, "bootstrap_samples": len(fits)}
    ns = np.array([f.compute_optimal(flops)[0] for f in fits])
    ns = ns[np.isfinite(ns) & (ns > 0)]
    out["bootstrap_usable"] = len(ns)
    if len(ns):
        lo, hi = np.quantile(ns, [(1 - level) / 2, (1 + level) / 2])
        out.update(n_lo=float(lo), n_hi=float(hi), d_lo=flops / 6.0 / float(hi), d_hi=flops / 6.0 / float(lo))
    else:
        out.update(n_lo=math.nan, n_hi=math.nan, d_lo=math.nan, d_hi=math.nan)
    return out
