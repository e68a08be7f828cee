"""Bootstrap helpers and sampling: deterministic, clustered, hand-checkable cases."""
import math

import pytest

from biaslab.benchmarks.base import stratified_sample
from biaslab.errors import BiaslabError
from biaslab.stats import bootstrap_ci, mean_std, normal_interval, paired_bootstrap


def acc(rs):
    return sum(r["c"] for r in rs) / len(rs)


RECS = [{"id": i, "c": int(i % 4 != 0)} for i in range(40)]  # accuracy 0.75


def test_bootstrap_value_and_interval_contain_point_and_are_seeded():
    a = bootstrap_ci(RECS, acc, n_boot=300, seed=1)
    b = bootstrap_ci(RECS, acc, n_boot=300, seed=1)
    assert a == b
    assert a["value"] == 0.75
    lo, hi = a["ci95"]
    assert lo < 0.75 < hi and 0.5 < lo and hi <= 1.0


def test_constant_metric_has_degenerate_interval():
    recs = [{"id": i, "c": 1} for i in range(10)]
    assert bootstrap_ci(recs, acc, n_boot=100)["ci95"] == [1.0, 1.0]


def test_cluster_bootstrap_keeps_records_of_an_item_together():
    # each item has two records with identical correctness: accuracy over resamples is a multiple of 1/n_items
    recs = [{"id": i, "c": i % 2} for i in range(5) for _ in range(2)]
    out = bootstrap_ci(recs, acc, n_boot=200, seed=0)
    assert out["value"] == 0.4


def test_paired_bootstrap_delta_and_ci():
    before = [{"id": i, "c": 0} for i in range(30)]
    after = [{"id": i, "c": int(i < 15)} for i in range(30)]
    d = paired_bootstrap(before, after, acc, n_boot=300, seed=0)
    assert d["before"] == 0 and d["after"] == 0.5 and d["delta"] == 0.5
    assert 0 < d["delta_ci95"][0] < 0.5 < d["delta_ci95"][1]
    assert d["p"] < 0.01 and d["n_items"] == 30


def test_paired_bootstrap_identical_sides_gives_zero_delta():
    d = paired_bootstrap(RECS, RECS, acc, n_boot=100)
    assert d["delta"] == 0 and d["delta_ci95"] == [0.0, 0.0]


def test_undefined_metric_is_nan_not_crash():
    out = bootstrap_ci([], acc, n_boot=10)
    assert math.isnan(out["value"]) and out["ci95"] is None


def test_mean_std_and_normal_interval_by_hand():
    m, s = mean_std([1.0, 2.0, 3.0])
    assert m == 2.0 and math.isclose(s, 1.0)
    m, lo, hi = normal_interval([1.0, 2.0, 3.0])
    assert math.isclose(hi - m, 1.96 / math.sqrt(3))


def test_stratified_sample_balanced_deterministic_in_order():
    items = [{"id": i, "group": "a" if i < 90 else "b"} for i in range(100)]
    s1 = stratified_sample(items, 20, seed=3, strata=("group",))
    s2 = stratified_sample(items, 20, seed=3, strata=("group",))
    assert s1 == s2 and len(s1) == 20
    assert sum(1 for x in s1 if x["group"] == "b") == 10  # balanced although b is 10 % of the data
    assert [x["id"] for x in s1] == sorted(x["id"] for x in s1)
    assert stratified_sample(items, 20, seed=4, strata=("group",)) != s1
    assert stratified_sample(items, None, seed=0, strata=("group",)) == items
    with pytest.raises(BiaslabError, match="positive"):
        stratified_sample(items, 0, seed=0, strata=("group",))
