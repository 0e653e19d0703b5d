"""The parallel scaling law of ParScale (arXiv 2505.10475, Eq. 5): fitting, prediction and plots.

With N the non-embedding parameter count of the base model and P the number of parallel streams, the final training
loss follows

    L(N, P) = E + (A·1e9 / (N·(k·ln P + 1)))^alpha

so P streams act like multiplying N by the *effective parameter multiplier* 1 + k·ln P. E is the irreducible loss,
A (in billions of parameters) and alpha the Chinchilla-style power law in N, and k the multiplier's
gain per unit of ln P (k·ln 2 per doubling of P).

The fit follows the paper (and Hoffmann et al., 2022): minimise the Huber loss (delta = 1e-3) between log L̂ and log L
with L-BFGS-B from every point of a grid of starting points and keep the best. On the paper's 48 runs (`paper_runs()`,
the final training losses of its Stack-V2 Python and Pile pre-training runs, P in {1, 2, 4, 8}, six model sizes,
42B tokens each, as published; shipped with the package as parscale_paper_losses.csv) it reproduces the published laws, kept here as `PAPER_STACK_V2_PYTHON`
and `PAPER_PILE`: k and R² of both corpora and E, A, alpha of the code corpus to every published digit; on the Pile,
E, A and alpha land within 2.2e-4 of the published values, at a slightly lower Huber objective than the published
point (the minimum lies in a flat E-A-alpha valley).

Example:

    >>> from peft_parscale.scaling_law import fit_parallel_scaling_law, paper_runs
    >>> runs = paper_runs()["stack-v2-python"]
    >>> law = fit_parallel_scaling_law(runs.non_embedding_params, runs.num_streams, runs.losses)
    >>> round(law.k, 4), round(law.r2, 5), round(law.multiplier(8), 2)
    (0.3935, 0.99783, 1.82)
    >>> round(law.predict(1.5e9, 4), 4)  # predicted loss of a 1.5B model with P = 4
    1.0562
"""

from __future__ import annotations

import csv
import itertools
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

ArrayLike = float | Sequence[float] | np.ndarray

PAPER_RUNS_CSV = Path(__file__).with_name("parscale_paper_losses.csv")

HUBER_DELTA = 1e-3
# The default grid of starting points (E as a fraction of the smallest loss, so that the grid follows the data's
# scale; A in billions of parameters; alpha; k): 4·4·3·3 = 144 L-BFGS-B runs, well under a second with the analytic
# gradient. On the paper's runs 142 of the 144 starts reach the same minimum (k within 4e-6), two stall elsewhere.
DEFAULT_GRID = {
    "E_fraction": (0.1, 0.4, 0.7, 0.9),
    "A": (1e-3, 1e-2, 1e-1, 1.0),
    "alpha": (0.1, 0.3, 0.6),
    "k": (0.1, 0.4, 1.0),
}
NUM_LAW_PARAMETERS = 4  # E, A, alpha, k


@dataclass(frozen=True)
class ParallelScalingLaw:
    """A fitted L(N, P) = E + (A·1e9 / (N·(k·ln P + 1)))^alpha.

    r2 is the coefficient of determination on the losses themselves, 1 − Σ(L − L̂)² / Σ(L − mean L)²: this is the
    definition that gives the paper's 0.9978 (code) and 0.9987 (Pile); the same statistic on log L gives 0.99772 and
    0.99865. huber_objective is the minimised Σ Huber_delta(log L̂ − log L); n_runs the number of runs fitted.
    """

    E: float
    A: float
    alpha: float
    k: float
    r2: float = math.nan
    huber_delta: float = HUBER_DELTA
    huber_objective: float = math.nan
    n_runs: int = 0

    def multiplier(self, num_streams: ArrayLike) -> float | np.ndarray:
        """The effective parameter multiplier 1 + k·ln P: P streams are worth a dense model this many times larger."""
        return _scalar_or_array(1 + self.k * np.log(np.asarray(num_streams, dtype=float)))

    def predict(self, non_embedding_params: ArrayLike, num_streams: ArrayLike = 1) -> float | np.ndarray:
        """The predicted loss for N non-embedding parameters and P streams (floats or arrays, broadcast)."""
        effective = np.asarray(non_embedding_params, dtype=float) * self.multiplier(num_streams)
        return _scalar_or_array(self.E + (self.A * 1e9 / effective) ** self.alpha)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# The published fits on the paper's runs (`paper_runs()`), 24 runs each.
PAPER_STACK_V2_PYTHON = ParallelScalingLaw(E=0.6912, A=0.0113, alpha=0.1894, k=0.3935, r2=0.99783, n_runs=24)
PAPER_PILE = ParallelScalingLaw(E=1.2888, A=0.1973, alpha=0.1964, k=0.3344, r2=0.99868, n_runs=24)


@dataclass(frozen=True)
class LogLinearFit:
    """Least-squares loss = intercept − slope·ln P, with its R² (how close per-P losses are to log-linear in P)."""

    intercept: float
    slope: float
    r2: float

    def predict(self, num_streams: ArrayLike) -> float | np.ndarray:
        return _scalar_or_array(self.intercept - self.slope * np.log(np.asarray(num_streams, dtype=float)))


class Runs(NamedTuple):
    """A table of runs as arrays: N (non-embedding parameters), P (streams) and the final loss of each run."""

    non_embedding_params: np.ndarray
    num_streams: np.ndarray
    losses: np.ndarray


def read_runs(csv_path: str | os.PathLike) -> dict[str, Runs]:
    """The runs of a CSV with columns dataset, P, non_embedding_params, final_training_loss, by dataset.

    Example: `read_runs("runs.csv")["pile"].losses`.
    """
    columns: dict[str, list[tuple[float, float, float]]] = {}
    with open(csv_path, newline="") as file:
        for row in csv.DictReader(file):
            values = (float(row["non_embedding_params"]), float(row["P"]), float(row["final_training_loss"]))
            columns.setdefault(row["dataset"], []).append(values)
    return {dataset: Runs(*np.array(rows).T) for dataset, rows in columns.items()}


def paper_runs() -> dict[str, Runs]:
    """The paper's 48 runs by corpus, ``"stack-v2-python"`` and ``"pile"`` (see the module docstring)."""
    return read_runs(PAPER_RUNS_CSV)


def fit_parallel_scaling_law(
    non_embedding_params: ArrayLike,
    num_streams: ArrayLike,
    losses: ArrayLike,
    *,
    huber_delta: float = HUBER_DELTA,
    grid: Iterable[tuple[float, float, float, float]] | None = None,
) -> ParallelScalingLaw:
    """Fit L = E + (A·1e9 / (N·(k·ln P + 1)))^alpha to a table of runs, as the paper does.

    Minimises Σ Huber_delta(log L̂ − log L) over (log E, log A, alpha, k) with L-BFGS-B (analytic gradient, tight
    tolerances, alpha in (0, 5], k such that k·ln P + 1 > 0 for every P), once from each starting point
    (E, A, alpha, k) of `grid` (default: `DEFAULT_GRID`), and returns the best fit with its R² on L.

    Example: `law = fit_parallel_scaling_law(*read_runs(csv_path)["pile"])`, then `law.k` (0.3344 on the paper's
    Pile runs), `law.multiplier(4)` and `law.predict(1.5e9, 4)`.
    """
    from scipy.optimize import minimize  # only fitting needs scipy; prediction and the published laws do not

    params, streams, loss = _validated_runs(non_embedding_params, num_streams, losses)
    if huber_delta <= 0:
        raise ValueError(f"huber_delta must be positive, got {huber_delta}")
    log_loss, log_streams = np.log(loss), np.log(streams)
    log_params_in_billions = np.log(params / 1e9)

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        log_e, log_a, alpha, k = theta
        multiplier = 1 + k * log_streams
        term = np.exp(alpha * (log_a - log_params_in_billions - np.log(multiplier)))
        predicted = np.exp(log_e) + term
        residual = np.log(predicted) - log_loss
        huber = np.where(
            np.abs(residual) <= huber_delta, 0.5 * residual**2, huber_delta * (np.abs(residual) - 0.5 * huber_delta)
        )
        # d Huber / d residual, times d residual / d predicted = 1 / predicted
        weight = np.clip(residual, -huber_delta, huber_delta) / predicted
        gradient = [
            np.exp(log_e) * weight.sum(),
            (weight * alpha * term).sum(),
            (weight * term * (log_a - log_params_in_billions - np.log(multiplier))).sum(),
            (weight * term * -alpha * log_streams / multiplier).sum(),
        ]
        return float(huber.sum()), np.array(gradient)

    # k·ln P + 1 must stay positive at the largest P for the law to be defined.
    k_lower = -1 / log_streams.max() + 1e-6
    bounds = [(None, None), (None, None), (1e-6, 5.0), (k_lower, None)]
    starts = grid if grid is not None else _default_grid(loss)
    best = None
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for e_start, a_start, alpha_start, k_start in starts:
            start = np.array([math.log(e_start), math.log(a_start), alpha_start, max(k_start, k_lower)])
            result = minimize(
                objective,
                start,
                jac=True,
                method="L-BFGS-B",
                bounds=bounds,
                # The objective is ~1e-5 on good fits, so scipy's default (relative to max(|f|, 1)) stops far too early.
                options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 10_000},
            )
            if np.isfinite(result.fun) and (best is None or result.fun < best.fun):
                best = result
    if best is None:
        raise RuntimeError("the scaling-law fit diverged from every starting point; pass a grid closer to the data")
    log_e, log_a, alpha, k = best.x
    law = ParallelScalingLaw(
        E=math.exp(log_e),
        A=math.exp(log_a),
        alpha=float(alpha),
        k=float(k),
        huber_delta=huber_delta,
        huber_objective=float(best.fun),
        n_runs=len(loss),
    )
    predicted = law.predict(params, streams)
    r2 = 1 - ((loss - predicted) ** 2).sum() / ((loss - loss.mean()) ** 2).sum()
    return ParallelScalingLaw(**{**law.to_dict(), "r2": float(r2)})


def fit_log_linear(num_streams: ArrayLike, losses: ArrayLike) -> LogLinearFit:
    """Least-squares fit of loss = intercept − slope·ln P, with R² on the losses.

    Example: `fit_log_linear([1, 2, 4, 8], [2.0, 1.9, 1.8, 1.7])` gives intercept 2, slope 0.1/ln 2 and r2 = 1.
    """
    streams, loss = (np.asarray(values, dtype=float).ravel() for values in (num_streams, losses))
    if streams.shape != loss.shape:
        raise ValueError(f"num_streams and losses differ in length: {streams.size} vs {loss.size}")
    if np.any(streams <= 0):
        raise ValueError("every P must be positive")
    if np.unique(streams).size < 2:
        raise ValueError("a log-linear fit in P needs at least two distinct values of P")
    log_streams = np.log(streams)
    design = np.stack([np.ones_like(log_streams), -log_streams], axis=1)
    (intercept, slope), *_ = np.linalg.lstsq(design, loss, rcond=None)
    residual = ((loss - design @ np.array([intercept, slope])) ** 2).sum()
    total = ((loss - loss.mean()) ** 2).sum()
    r2 = 1 - residual / total if total > 0 else (1.0 if residual == 0 else math.nan)
    return LogLinearFit(intercept=float(intercept), slope=float(slope), r2=float(r2))


def plot_scaling_law(
    law: ParallelScalingLaw,
    non_embedding_params: ArrayLike,
    num_streams: ArrayLike,
    losses: ArrayLike,
    path: str | os.PathLike,
    *,
    title: str | None = None,
) -> None:
    """Save a PNG of the runs and the fitted law: loss against N for each P, and loss against P for each N.

    Example: `plot_scaling_law(law, *read_runs(csv_path)["pile"], "pile_law.png", title="Pile")`.
    """
    # A bare Figure renders with Agg on savefig, without pyplot's global state or switching the caller's backend.
    from matplotlib import rcParams
    from matplotlib.figure import Figure

    params, streams, loss = _validated_runs(non_embedding_params, num_streams, losses)
    figure = Figure(figsize=(10, 4), layout="constrained")
    by_params, by_streams = figure.subplots(1, 2)
    colors = rcParams["axes.prop_cycle"].by_key()["color"]
    params_line = np.geomspace(params.min(), params.max(), 100)
    for index, p in enumerate(np.unique(streams)):
        runs, color = streams == p, colors[index % len(colors)]
        by_params.scatter(params[runs], loss[runs], color=color, label=f"P = {p:g}")
        by_params.plot(params_line, law.predict(params_line, p), color=color)
    by_params.set(xscale="log", xlabel="non-embedding parameters N", ylabel="final training loss")
    by_params.legend()
    streams_line = np.geomspace(streams.min(), streams.max(), 100)
    # The P streams' own parameters make N grow slightly with P (0.54B to 0.55B): one curve per base size.
    sizes = _base_sizes(params)
    for index, size in enumerate(np.unique(sizes)):
        runs, color = sizes == size, colors[index % len(colors)]
        by_streams.scatter(streams[runs], loss[runs], color=color, label=f"N ≈ {params[runs].mean() / 1e9:.2f}B")
        by_streams.plot(streams_line, law.predict(params[runs].mean(), streams_line), color=color)
    by_streams.set(xscale="log", xlabel="parallel streams P", ylabel="final training loss")
    by_streams.set_xticks(np.unique(streams), [f"{p:g}" for p in np.unique(streams)], minor=False)
    by_streams.set_xticks([], minor=True)
    by_streams.legend(fontsize="small")
    figure.suptitle(
        f"{title + ': ' if title else ''}L = {law.E:.4f} + ({law.A:.4f}e9 / (N·({law.k:.4f}·ln P + 1)))^{law.alpha:.4f}"
        f", R² = {law.r2:.5f}"
    )
    figure.savefig(path, dpi=120)


def _validated_runs(*columns: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    params, streams, loss = (np.asarray(values, dtype=float).ravel() for values in columns)
    if not params.size == streams.size == loss.size:
        raise ValueError(
            f"non_embedding_params, num_streams and losses differ in length: {params.size}, {streams.size}, {loss.size}"
        )
    for name, values in (("non_embedding_params", params), ("num_streams", streams), ("losses", loss)):
        bad = ~(np.isfinite(values) & (values > 0))
        if bad.any():
            raise ValueError(f"{name} must be positive and finite; got {values[bad].tolist()}")
    if np.any(streams < 1):
        raise ValueError("num_streams must be at least 1")
    if loss.size < NUM_LAW_PARAMETERS:
        raise ValueError(f"the law has {NUM_LAW_PARAMETERS} parameters; got only {loss.size} runs to fit it on")
    if np.unique(streams).size < 2:
        raise ValueError("k needs runs at two or more distinct values of P")
    if np.unique(params).size < 2:
        raise ValueError("E, A and alpha need runs at two or more distinct values of N")
    return params, streams, loss


def _base_sizes(params: np.ndarray, tolerance: float = 0.05) -> np.ndarray:
    """An index per run, shared by runs whose N lie within `tolerance` of the smallest N of their group."""
    order, sizes = np.argsort(params), np.empty(params.size, dtype=int)
    group, start = -1, -math.inf
    for position in order:
        if params[position] > start * (1 + tolerance):
            group, start = group + 1, params[position]
        sizes[position] = group
    return sizes


def _default_grid(losses: np.ndarray) -> Iterable[tuple[float, float, float, float]]:
    fractions, *rest = DEFAULT_GRID.values()
    return itertools.product([f * losses.min() for f in fractions], *rest)


def _scalar_or_array(values: np.ndarray) -> float | np.ndarray:
    return float(values) if np.ndim(values) == 0 else values
