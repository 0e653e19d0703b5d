"""Bootstrap intervals and paired tests (`peft_parscale.stats`) against values computed by hand.

The bootstrap is random, so where its result is compared with an exact probability the tolerance is five binomial
standard errors of a proportion estimated from the number of resamples, sqrt(p(1 - p) / B): a correct implementation
fails such a check with probability below 1e-6, whatever the seed."""

import math

import numpy as np
import pytest

from peft_parscale.stats import (
    bootstrap_interval,
    bootstrap_means,
    mcnemar_exact,
    paired_bootstrap_pvalue,
    seed_and_problem_bootstrap,
)


def five_standard_errors(p: float, resamples: int) -> float:
    return 5 * math.sqrt(p * (1 - p) / resamples)


def test_interval_of_a_constant_is_that_constant():
    # every resample of 0.25, 0.25, 0.25 has mean 0.25 exactly (0.25 and its sums are exact in binary)
    assert bootstrap_interval([0.25, 0.25, 0.25]) == (0.25, 0.25)
    assert bootstrap_interval([2.0, 2.0], weights=[1, 7]) == (2.0, 2.0)


def test_bootstrap_distribution_of_a_small_table_matches_its_enumeration():
    # values 0, 0, 0, 1: a resample of 4 holds k ones with k ~ Binomial(4, 1/4), and its mean is k/4, so
    # P(mean = k/4) = C(4, k) 3^(4-k) / 256 = 81, 108, 54, 12, 1 (/256) for k = 0..4
    resamples = 20_000
    means = bootstrap_means([0, 0, 0, 1], num_resamples=resamples, seed=3)
    for k, count in enumerate([81, 108, 54, 12, 1]):
        p = count / 256
        assert np.mean(means == k / 4) == pytest.approx(p, abs=five_standard_errors(p, resamples))
    # 95% percentile interval: P(mean <= 0) = 0.316 > 0.025, so the 2.5% quantile is 0; P(mean <= 1/2) =
    # 243/256 = 0.949 < 0.975 <= P(mean <= 3/4) = 255/256, so the 97.5% quantile is 3/4 (both far from the edges
    # compared with the standard errors above)
    assert bootstrap_interval([0, 0, 0, 1], num_resamples=resamples, seed=3) == (0.0, 0.75)


def test_weighted_bootstrap_is_a_ratio_of_sums_over_paired_resamples():
    # values 1 and 2 with weights 1 and 3, as (value, weight) pairs: a resample of both first pairs gives
    # 1·1·2 / 2 = 1, of both second pairs 2·3·2 / 6 = 2, and of one each (1 + 6) / 4 = 1.75, with probabilities
    # 1/4, 1/4 and 1/2
    resamples = 20_000
    means = bootstrap_means([1.0, 2.0], weights=[1, 3], num_resamples=resamples)
    assert set(np.unique(means)) == {1.0, 1.75, 2.0}
    for value, p in [(1.0, 0.25), (1.75, 0.5), (2.0, 0.25)]:
        assert np.mean(means == value) == pytest.approx(p, abs=five_standard_errors(p, resamples))


def test_paired_bootstrap_pvalue_matches_its_enumeration():
    # per-problem differences 1, 0, 0: observed mean d = 1/3; a resample holds k ones, k ~ Binomial(3, 1/3), with
    # mean k/3. |k/3 - 1/3| >= 1/3 for k = 0, 2, 3: (8 + 6 + 1) / 27 = 15/27
    resamples = 50_000
    pvalue = paired_bootstrap_pvalue([1, 1, 0], [0, 1, 0], num_resamples=resamples)
    assert pvalue == pytest.approx(15 / 27, abs=five_standard_errors(15 / 27, resamples))
    # the test is two-sided: swapping the models gives the same p-value with the same resamples
    assert paired_bootstrap_pvalue([0, 1, 0], [1, 1, 0], num_resamples=resamples) == pvalue
    assert paired_bootstrap_pvalue([0.5, 0.2], [0.5, 0.2]) == 1.0  # no difference at all


def test_paired_bootstrap_pvalue_is_small_for_a_consistent_difference():
    # 20 problems, each 0.1 better: every resample has mean difference 0.1, and |0.1 - 0.1| >= 0.1 never holds
    assert paired_bootstrap_pvalue([0.6] * 20, [0.5] * 20) == 0.0


def test_paired_bootstrap_with_weights_compares_per_token_losses():
    # per-pair losses of two models on pairs of 1 and 3 tokens: differences -1 and +1 nats per token; the observed
    # weighted difference is (1·(-1) + 3·1) / 4 = 0.5. Resamples: both first pairs give -1, both second +1, one each
    # 0.5, with probabilities 1/4, 1/4, 1/2; |d* - 0.5| >= 0.5 holds for -1 and +1: p = 1/2
    resamples = 20_000
    pvalue = paired_bootstrap_pvalue([2.0, 3.0], [3.0, 2.0], weights=[1, 3], num_resamples=resamples)
    assert pvalue == pytest.approx(0.5, abs=five_standard_errors(0.5, resamples))


def test_seed_level_resampling_matches_its_enumeration():
    # three runs of the first model scoring 0, 1 and 2 on every problem, one run of the second scoring 0: the problems
    # do not matter, and a resample's difference is the mean of 3 runs drawn with replacement, S/3 with S the sum of 3
    # draws from {0, 1, 2}: P(S = 0..6) = 1, 3, 6, 7, 6, 3, 1 (/27). Observed difference 1; |S/3 − 1| >= 1 for S = 0
    # or 6: p = 2/27. P(S <= 0) = 1/27 > 0.025 and P(S <= 5) = 26/27 < 0.975: the 95% interval is (0, 2).
    resamples = 20_000
    first = [[0.0] * 4, [1.0] * 4, [2.0] * 4]
    result = seed_and_problem_bootstrap(first, [[0.0] * 4], num_resamples=resamples, seed=5)
    assert result["difference"] == 1.0
    assert (result["low"], result["high"]) == (0.0, 2.0)
    assert result["bootstrap_pvalue"] == pytest.approx(2 / 27, abs=five_standard_errors(2 / 27, resamples))


def test_with_one_run_each_only_the_problems_are_resampled():
    # one run each: the paired bootstrap over problems, whose p-value for differences 1, 0, 0 is 15/27 (above)
    resamples = 50_000
    result = seed_and_problem_bootstrap([[1, 1, 0]], [[0, 1, 0]], num_resamples=resamples)
    assert result["bootstrap_pvalue"] == pytest.approx(15 / 27, abs=five_standard_errors(15 / 27, resamples))
    # weights make each mean a ratio of sums: differences 1 and 0 with weights 3 and 1 give 3/4
    assert seed_and_problem_bootstrap([[1.0, 0.0]], [[0.0, 0.0]], weights=[3, 1])["difference"] == 0.75


def test_mcnemar_exact_by_hand():
    # b = 5 problems passed by the first model only, c = 1 by the second only, and 3 + 2 concordant ones. Under the
    # null hypothesis b ~ Binomial(6, 1/2): p = 2 · P(X <= 1) = 2 · (C(6,0) + C(6,1)) / 64 = 2 · 7/64 = 0.21875
    first = [True] * 5 + [False] + [True] * 3 + [False] * 2
    second = [False] * 5 + [True] + [True] * 3 + [False] * 2
    assert mcnemar_exact(first, second) == {"b": 5, "c": 1, "pvalue": pytest.approx(0.21875, rel=1e-12)}
    # symmetric in the two models; b = 6, c = 0: 2 · (1/64) = 0.03125; equal b and c: p capped at 1
    assert mcnemar_exact(second, first)["pvalue"] == pytest.approx(0.21875, rel=1e-12)
    assert mcnemar_exact([True] * 6, [False] * 6)["pvalue"] == pytest.approx(0.03125, rel=1e-12)
    assert mcnemar_exact([True, False], [False, True])["pvalue"] == 1.0
    assert mcnemar_exact([True, False], [True, False]) == {"b": 0, "c": 0, "pvalue": 1.0}


@pytest.mark.parametrize(
    "call",
    [
        lambda: bootstrap_interval([1.0]),  # one problem
        lambda: bootstrap_interval([1.0, float("nan")]),
        lambda: bootstrap_interval([1.0, 2.0], weights=[1.0]),
        lambda: bootstrap_interval([1.0, 2.0], weights=[0.0, 0.0]),
        lambda: bootstrap_interval([1.0, 2.0], confidence=1.0),
        lambda: paired_bootstrap_pvalue([1.0, 2.0], [1.0, 2.0, 3.0]),
        lambda: mcnemar_exact([True], [True, False]),
        lambda: seed_and_problem_bootstrap([[1.0, 2.0]], [[1.0, 2.0, 3.0]]),
        lambda: seed_and_problem_bootstrap([[1.0, 2.0]], [[1.0, 2.0]], weights=[1.0]),
    ],
)
def test_bad_input_is_refused(call):
    with pytest.raises(ValueError):
        call()
