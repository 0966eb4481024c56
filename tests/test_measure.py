"""Tests for ryzen_core.measure: paired rounds, the interval, the verdict, adaptive rounds, busy machines.

Every series here is synthetic, so the right verdict is known and nothing depends on this machine's speed.
"""
import itertools
import json

import numpy as np
import pytest

from ryzen_core.measure import (
    BUSY_CV,
    busy_warning,
    compare_pairs,
    conditions,
    format_ratio,
    measure_until_narrow,
    median_interval,
    paired_ratios,
    summarize,
)


class CallRecorder:
    """Fake measurement: logs its name on every call and returns the next value of a cycle."""

    def __init__(self, name, log, values):
        self.name, self.log, self.values = name, log, itertools.cycle(values)

    def __call__(self):
        self.log.append(self.name)
        return next(self.values)


def ratios_of(series):
    """A comparison whose per-round ratios (higher is better) are exactly `series`."""
    return compare_pairs([1.0] * len(series), series, higher_is_better=True)


def old_rule_says_no_difference(c):
    return abs(c.median_ratio - 1.0) <= c.p75 - c.p25


def test_summarize_known_list():
    s = summarize(range(1, 101))  # 1..100
    assert s["n"] == 100 and s["min"] == 1 and s["max"] == 100 and s["mean"] == 50.5
    assert s["p50"] == pytest.approx(50.5)
    assert s["p90"] == pytest.approx(90.1)  # linear interpolation: 1 + 0.9 * 99
    assert s["p99"] == pytest.approx(99.01)
    assert s["std"] == pytest.approx(np.std(np.arange(1, 101), ddof=1))
    assert summarize([3.0])["std"] == 0.0
    with pytest.raises(ValueError):
        summarize([])


def test_paired_ratios_interleaves_and_discards_warmup():
    log = []
    result = paired_ratios(CallRecorder("A", log, [1.0]), CallRecorder("B", log, [1.0]), warmup=2, repeats=3,
                           higher_is_better=True)
    assert log == ["A", "B"] * 5
    assert result.n == 3 and len(result.ratios) == 3


def test_median_of_pairwise_ratios_and_orientation():
    log = []
    # Tokens/s: B twice as fast in every pair, while the machine drifts between pairs.
    drift = [100.0, 80.0, 120.0, 90.0, 110.0]
    faster = paired_ratios(CallRecorder("A", log, drift), CallRecorder("B", log, [2 * d for d in drift]),
                           warmup=0, repeats=5, higher_is_better=True)
    assert faster.median_ratio == pytest.approx(2.0) and faster.ci_low == pytest.approx(2.0)
    assert faster.verdict == "faster"
    assert faster.values_a == drift and faster.values_b == [2 * d for d in drift]
    # Seconds: lower is better, so B taking twice as long is a ratio of 0.5.
    slower = paired_ratios(CallRecorder("A", log, [1.0]), CallRecorder("B", log, [2.0]), warmup=1, repeats=4,
                           higher_is_better=False)
    assert slower.median_ratio == pytest.approx(0.5) and slower.verdict == "slower"
    # The median is of per-pair ratios, not a ratio of medians: pairs (1,3) (10,10) (100,50) -> 3, 1, 0.5.
    mixed = compare_pairs([1.0, 10.0, 100.0], [3.0, 10.0, 50.0], higher_is_better=True)
    assert mixed.median_ratio == pytest.approx(1.0) and mixed.min == pytest.approx(0.5) and mixed.max == 3.0
    assert mixed.p25 == pytest.approx(0.75) and mixed.p75 == pytest.approx(2.0)
    assert mixed.verdict == "no measurable difference"


def test_the_interval_is_a_fixed_seed_bootstrap_of_the_median():
    series = [0.9, 1.1, 1.2, 1.25, 1.3, 1.6, 2.0]
    low, high = median_interval(series)
    assert min(series) <= low <= np.median(series) <= high <= max(series)
    assert (low, high) == median_interval(series)  # same rounds, same interval
    c = ratios_of(series)
    assert (c.ci_low, c.ci_high, c.ci_level) == (low, high, 0.95)
    assert json.loads(json.dumps(c.to_dict()))["ci_high"] == high


def test_wide_interval_wholly_above_one_is_faster():
    # The issue's `27.511 [20.725, 141.189]`: the spread is wider than the gain, every round won by far.
    wide = ratios_of([20.725, 22.1, 25.3, 27.511, 31.0, 80.2, 141.189])
    assert old_rule_says_no_difference(wide)
    assert wide.ci_low > 1 and wide.verdict == "faster"
    # And `1.493 [1.226, 1.725]`.
    moderate = ratios_of([1.05, 1.2, 1.252, 1.493, 1.7, 1.75, 1.9])
    assert (moderate.median_ratio, moderate.p25, moderate.p75) == pytest.approx((1.493, 1.226, 1.725))
    assert old_rule_says_no_difference(moderate)
    assert moderate.ci_low > 1 and moderate.verdict == "faster"


def test_narrow_series_whose_interval_straddles_one_is_not_faster():
    # Seven rounds within 0.4% of 1.022 and two below 1: the quartiles say "faster", the median's interval does not.
    c = ratios_of([0.95, 0.96, 1.02, 1.021, 1.022, 1.023, 1.024, 1.025, 1.03])
    assert not old_rule_says_no_difference(c)
    assert c.ci_low < 1 < c.ci_high and c.verdict == "no measurable difference"
    # The mirror image for slower, with the metric's own words.
    mirrored = compare_pairs([1.0] * 9, [1 / r for r in c.ratios], higher_is_better=True, better="smaller",
                             worse="larger")
    assert mirrored.verdict == "no measurable difference"
    assert compare_pairs([1.0] * 5, [0.8, 0.82, 0.79, 0.81, 0.8], True, "smaller", "larger").verdict == "larger"


def test_identical_noisy_measurements_are_no_measurable_difference():
    noise = [10.0, 12.5, 9.0, 11.0, 10.2, 13.0, 8.8, 10.9]
    shuffled = compare_pairs(noise, noise[3:] + noise[:3], higher_is_better=True)
    assert shuffled.verdict == "no measurable difference"
    # A small but consistent gain is measurable even though the raw values are noisy.
    consistent = compare_pairs(noise, [v * 1.05 for v in noise], higher_is_better=True)
    assert consistent.verdict == "faster" and consistent.median_ratio == pytest.approx(1.05)


def test_one_round_gets_no_verdict():
    c = compare_pairs([1.0], [3.0], higher_is_better=True)
    assert c.median_ratio == 3.0 and c.verdict == "no measurable difference"


def test_format_ratio_from_a_comparison_or_its_dict():
    c = ratios_of([1.31, 1.38, 1.44])
    text = format_ratio(c)
    assert text == f"1.38x [{c.ci_low:.2f}, {c.ci_high:.2f}]" and text == format_ratio(c.to_dict()) == str(c)
    assert format_ratio(c, digits=3).startswith("1.380x [")


def test_rounds_are_added_until_the_interval_is_narrow_and_stop_at_the_cap():
    log = []
    steady = paired_ratios(CallRecorder("A", log, [1.0]), CallRecorder("B", log, [1.5]), warmup=0, repeats=3,
                           higher_is_better=True, max_repeats=20)
    assert steady.n == 3  # already narrow: no extra rounds
    noisy_b = [0.5, 2.0, 1.0, 3.0, 0.7]
    noisy = paired_ratios(CallRecorder("A", log, [1.0]), CallRecorder("B", log, noisy_b), warmup=0, repeats=3,
                          higher_is_better=True, max_repeats=12)
    assert noisy.n == 12  # never narrow: runs to the cap

    # Narrowing after a few noisy rounds: stops as soon as the interval is within the target.
    values = iter([0.5, 2.0, 1.0] + [1.2] * 40)
    widths = []
    record = measure_until_narrow(lambda: widths.append(next(values)), lambda: [ratios_of(widths)],
                                  min_rounds=3, max_rounds=40, target=0.05)
    assert record["narrow_enough"] and 3 < record["rounds"] < 40 and record["rounds"] == len(widths)
    half = (ratios_of(widths[:-1]).ci_high - ratios_of(widths[:-1]).ci_low) / 2 / ratios_of(widths[:-1]).median_ratio
    assert half > 0.05  # one round fewer was not narrow enough


def test_busy_machine_is_flagged_by_load_or_variation():
    quiet_rounds = compare_pairs([100.0, 101.0, 99.0], [150.0, 151.0, 149.0], True)
    quiet = conditions([{"load_1m": 0.5, "usable_cores": 2}, {"load_1m": 1.0, "usable_cores": 2}], [quiet_rounds])
    assert not quiet["busy"] and quiet["reasons"] == [] and busy_warning(quiet) is None

    loaded = conditions([{"load_1m": 0.5, "usable_cores": 2}, {"load_1m": 3.5, "usable_cores": 2}], [quiet_rounds])
    assert loaded["busy"] and "load average 3.50 above the 2 usable cores" in loaded["reasons"][0]
    assert "rerun" in busy_warning(loaded).lower()

    jumpy_rounds = compare_pairs([100.0, 60.0, 140.0], [150.0, 90.0, 210.0], True).to_dict()
    assert jumpy_rounds["cv_a"] > BUSY_CV
    jumpy = conditions([{"load_1m": 0.1, "usable_cores": 2}], [jumpy_rounds])
    assert jumpy["busy"] and "coefficient of variation" in jumpy["reasons"][0]
    assert jumpy["max_cv"] == pytest.approx(0.4)


def test_the_public_names_resolve_from_ryzen_core_and_the_validator():
    import ryzen_core
    from ryzen_core import measure, validator

    for name in ("paired_ratios", "compare_pairs", "PairedComparison", "summarize", "format_ratio",
                 "measure_until_narrow", "median_interval"):
        assert getattr(ryzen_core, name) is getattr(measure, name)
    assert validator.compare_pairs is measure.compare_pairs and validator.paired_ratios is measure.paired_ratios
    assert callable(ryzen_core.read_bandwidth_gbs) and callable(ryzen_core.gemm_rates)
