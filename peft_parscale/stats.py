"""How sure is a benchmark difference? Bootstrap intervals over problems and paired tests of two models.

A benchmark score is a mean over problems (HumanEval: 164), so its uncertainty comes from which problems happen to be
in the benchmark. The intervals and tests here resample problems, with a fixed seed so that a report is reproducible:

- `bootstrap_interval`: the 95% percentile bootstrap interval of a mean over problems (or of a ratio of sums, such as
  a loss in nats per token, with ``weights``), by ``scipy.stats.bootstrap``.
- `paired_bootstrap_pvalue`: two models scored on the same problems; the two-sided p-value of "no difference in
  mean" from the bootstrap distribution of the mean per-problem difference, shifted to the null hypothesis: the
  fraction of resampled mean differences d* with ``|d* − d| >= |d|``, where d is the observed mean difference.
- `seed_and_problem_bootstrap`: two models each trained with several seeds, all scored on the same problems; the
  bootstrap distribution of the difference of their seed-averaged mean scores, resampling the seeds of each model and
  the problems. A problem-only interval says how sure the difference is for these trained models; this one also
  covers how far training again with another seed moves it.
- `mcnemar_exact`: for pass/fail outcomes (greedy pass@1), the exact McNemar test: of the b + c problems where the
  two models disagree, b are passed by the first only; under the null hypothesis b ~ Binomial(b + c, 1/2), and the
  two-sided p-value is ``min(1, 2 · P(X <= min(b, c)))``.

Example::

    from peft_parscale.stats import bootstrap_interval, mcnemar_exact, paired_bootstrap_pvalue

    low, high = bootstrap_interval(per_problem_pass)                # 95% interval of the mean
    paired_bootstrap_pvalue(p8_pass_at_10, p1_pass_at_10)           # p-value of the mean difference
    mcnemar_exact(p8_greedy_passed, p1_greedy_passed)               # {"b": ..., "c": ..., "pvalue": ...}
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import binomtest, bootstrap

CONFIDENCE = 0.95
NUM_RESAMPLES = 10_000
SEED = 0


def _vector(values: Sequence[float], name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or len(array) < 2:  # one problem has no sampling distribution to speak of
        raise ValueError(f"{name} must be a sequence of at least two numbers, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} holds non-finite values")
    return array


def bootstrap_means(
    values: Sequence[float],
    weights: Sequence[float] | None = None,
    num_resamples: int = NUM_RESAMPLES,
    seed: int = SEED,
) -> np.ndarray:
    """The statistic of ``num_resamples`` resamples of the problems, drawn with replacement: the mean of ``values``,
    or with ``weights`` the weighted mean ``sum(w·v) / sum(w)`` (a ratio of sums, resampled in pairs)."""
    values = _vector(values, "values")
    data, statistic = (values,), _mean
    if weights is not None:
        weights = _weights(weights, values)
        data, statistic = (values * weights, weights), _ratio_of_sums
    result = bootstrap(
        data,
        statistic,
        n_resamples=num_resamples,
        paired=True,
        vectorized=True,
        method="percentile",
        random_state=np.random.default_rng(seed),
    )
    return result.bootstrap_distribution


def _weights(weights: Sequence[float], values: np.ndarray) -> np.ndarray:
    weights = _vector(weights, "weights")
    if weights.shape != values.shape or (weights < 0).any() or weights.sum() <= 0:
        raise ValueError("weights must be as many as the values, non-negative and not all zero")
    return weights


def _mean(values: np.ndarray, axis: int = -1) -> np.ndarray:
    return values.mean(axis=axis)


def _ratio_of_sums(numerators: np.ndarray, denominators: np.ndarray, axis: int = -1) -> np.ndarray:
    return numerators.sum(axis=axis) / denominators.sum(axis=axis)


def bootstrap_interval(
    values: Sequence[float],
    weights: Sequence[float] | None = None,
    confidence: float = CONFIDENCE,
    num_resamples: int = NUM_RESAMPLES,
    seed: int = SEED,
) -> tuple[float, float]:
    """The percentile bootstrap interval (default 95%) of the mean of ``values`` over problems (with ``weights``: of
    ``sum(w·v) / sum(w)``), from `bootstrap_means`.

    Example::

        bootstrap_interval([1, 0, 1, 1])                        # interval of a pass rate
        bootstrap_interval(nll_per_token, weights=tokens)       # interval of a loss in nats per token
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence}")
    means = bootstrap_means(values, weights, num_resamples, seed)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def paired_bootstrap_pvalue(
    first: Sequence[float],
    second: Sequence[float],
    weights: Sequence[float] | None = None,
    num_resamples: int = NUM_RESAMPLES,
    seed: int = SEED,
) -> float:
    """Two-sided p-value that two models, scored per problem on the same problems, have the same mean score (see the
    module docstring); with ``weights``, the same weighted mean (such as a loss per token: values per-pair losses,
    weights their token counts, the same for both models). 1.0 when the observed difference is 0.

    Example::

        paired_bootstrap_pvalue(p8_pass_at_1_per_problem, base_pass_at_1_per_problem)
    """
    first, second = _vector(first, "first"), _vector(second, "second")
    if first.shape != second.shape:
        raise ValueError(f"paired scores need one per problem for both models, got {len(first)} and {len(second)}")
    differences = first - second
    observed = np.average(differences, weights=None if weights is None else _weights(weights, differences))
    if observed == 0:
        return 1.0
    resampled = bootstrap_means(differences, weights, num_resamples, seed)
    return float(np.mean(np.abs(resampled - observed) >= abs(observed)))


def seed_and_problem_bootstrap(
    first_runs: Sequence[Sequence[float]],
    second_runs: Sequence[Sequence[float]],
    weights: Sequence[float] | None = None,
    confidence: float = CONFIDENCE,
    num_resamples: int = NUM_RESAMPLES,
    seed: int = SEED,
) -> dict:
    """The difference first − second of two models' scores averaged over their runs (one row of per-problem scores
    per training seed, the same problems in every row), with its percentile bootstrap interval and two-sided p-value
    (as in `paired_bootstrap_pvalue`). Each resample draws, with replacement, each model's runs and, once for both,
    the problems; with ``weights`` (one per problem) each mean is ``sum(w·v) / sum(w)``. A model with one run adds
    no spread between runs (right for an untrained model); with n runs the resampled spread between runs is
    (n − 1)/n of theirs in variance, the plug-in bootstrap's, so few runs give a slightly narrow interval.

    Example::

        seed_and_problem_bootstrap([p8_seed0_loss, p8_seed1_loss], [p1_seed0_loss, p1_seed1_loss], weights=tokens)
    """
    first = np.stack([_vector(run, "first_runs") for run in first_runs])
    second = np.stack([_vector(run, "second_runs") for run in second_runs])
    if first.shape[1] != second.shape[1]:
        raise ValueError(f"paired scores need the same problems for both models, got {first.shape} and {second.shape}")
    w = np.ones(first.shape[1]) if weights is None else _weights(weights, first[0])
    observed = float(np.average(first.mean(0) - second.mean(0), weights=w))
    rng = np.random.default_rng(seed)
    resampled = np.empty(num_resamples)
    for start in range(0, num_resamples, 1000):  # in blocks, to keep the gathered arrays small
        count = min(1000, num_resamples - start)
        runs_a = first[rng.integers(len(first), size=(count, len(first)))].mean(1)  # (count, problems)
        runs_b = second[rng.integers(len(second), size=(count, len(second)))].mean(1)
        problems = rng.integers(first.shape[1], size=(count, first.shape[1]))
        taken = np.take_along_axis(runs_a - runs_b, problems, axis=1)
        resampled[start : start + count] = (taken * w[problems]).sum(1) / w[problems].sum(1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(resampled, [tail, 1 - tail])
    pvalue = 1.0 if observed == 0 else float(np.mean(np.abs(resampled - observed) >= abs(observed)))
    return {"difference": observed, "low": float(low), "high": float(high), "bootstrap_pvalue": pvalue}


def mcnemar_exact(first_passed: Sequence[bool], second_passed: Sequence[bool]) -> dict:
    """The exact McNemar test of two models' pass/fail outcomes on the same problems.

    Returns ``b`` (problems passed by the first model only), ``c`` (by the second only) and the two-sided ``pvalue``
    (1.0 when they never disagree).

    Example::

        mcnemar_exact(p8_greedy_passed, p1_greedy_passed)   # {"b": 9, "c": 3, "pvalue": 0.146}
    """
    first, second = np.asarray(first_passed, dtype=bool), np.asarray(second_passed, dtype=bool)
    if first.shape != second.shape or first.ndim != 1:
        raise ValueError(f"paired outcomes need one per problem for both models, got {first.shape}, {second.shape}")
    b, c = int((first & ~second).sum()), int((~first & second).sum())
    # binomtest's two-sided p-value sums the outcomes no more likely than the observed one: for p = 1/2 that is
    # 2 · P(X <= min(b, c)), capped at 1
    pvalue = 1.0 if b + c == 0 else float(binomtest(b, b + c, 0.5).pvalue)
    return {"b": b, "c": c, "pvalue": pvalue}
