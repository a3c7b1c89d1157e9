"""Results aggregation: A_t, A_avg, forgetting, mean ± std, summary and plots, against hand-computed values."""

import math

import pytest

from inflora_avalanche.results import (
    aggregate,
    average_forgetting,
    average_incremental_accuracy,
    format_summary,
    format_value,
    forgetting_per_experience,
    incremental_accuracies,
    mean_std,
    plot_accuracy_curve,
    plot_accuracy_matrix,
    seed_result,
)

# accuracy (%) on test experience j (columns) after training experience t (rows)
MATRIX = [
    [90.0, None, None],
    [80.0, 70.0, None],
    [60.0, 65.0, 50.0],
]
SIZES = [100, 100, 200]


def test_a_t_is_sample_weighted_accuracy_on_all_seen_classes():
    curve = incremental_accuracies(MATRIX, SIZES)
    # A_2 = (60*100 + 65*100 + 50*200) / 400; the unweighted row mean would be 58.33
    assert curve == pytest.approx([90.0, 75.0, 56.25])
    assert average_incremental_accuracy(curve) == pytest.approx(73.75)


def test_equal_sizes_make_a_t_the_row_mean():
    curve = incremental_accuracies(MATRIX, [50, 50, 50])
    assert curve[2] == pytest.approx((60 + 65 + 50) / 3)


def test_forgetting_uses_best_earlier_accuracy():
    # exp 0: max(90, 80) - 60 = 30; exp 1: 70 - 65 = 5
    assert forgetting_per_experience(MATRIX) == pytest.approx([30.0, 5.0])
    assert average_forgetting(MATRIX) == pytest.approx(17.5)
    assert average_forgetting([[88.0]]) is None


def test_mean_std_is_sample_std():
    stat = mean_std([1.0, 2.0, 3.0, 4.0])
    assert stat["mean"] == pytest.approx(2.5)
    assert stat["std"] == pytest.approx(math.sqrt(5.0 / 3.0))
    assert stat["n"] == 4
    assert mean_std([7.0]) == {"mean": 7.0, "std": None, "n": 1}
    assert mean_std([None, 3.0, None])["mean"] == 3.0
    assert format_value({"mean": 86.514, "std": 0.7349, "n": 5}) == "86.51 ± 0.73"
    assert format_value({"mean": 86.514, "std": None, "n": 1}) == "86.51"


def test_bad_matrices_are_rejected():
    with pytest.raises(ValueError, match="row 1"):
        incremental_accuracies([[90.0], [80.0, None]], [10, 10])
    with pytest.raises(ValueError, match="test-set size"):
        incremental_accuracies(MATRIX, [100, 0, 200])


def _two_seeds():
    other = [[94.0, None, None], [84.0, 74.0, None], [64.0, 69.0, 54.0]]  # every entry +4
    task_aware = [[95.0, None, None], [90.0, 85.0, None], [88.0, 86.0, 80.0]]
    return [
        seed_result(MATRIX, SIZES, task_aware, seed=0),
        seed_result(other, SIZES, task_aware, seed=1),
    ]


def test_aggregate_over_seeds():
    runs = _two_seeds()
    assert runs[0]["A_last"] == pytest.approx(56.25)
    assert runs[1]["A_last"] == pytest.approx(60.25)
    assert runs[0]["task_aware_last"] == pytest.approx((88 * 100 + 86 * 100 + 80 * 200) / 400)
    agg = aggregate(runs)
    assert agg["seeds"] == [0, 1]
    assert agg["A_last"]["mean"] == pytest.approx(58.25)
    assert agg["A_last"]["std"] == pytest.approx(4.0 / math.sqrt(2.0))
    assert agg["A_avg"]["mean"] == pytest.approx(73.75 + 2.0)  # seeds: 73.75 and 77.75
    assert agg["forgetting"]["mean"] == pytest.approx(17.5)  # a constant shift does not change forgetting
    assert agg["forgetting"]["std"] == pytest.approx(0.0)
    assert [s["mean"] for s in agg["A_t"]] == pytest.approx([92.0, 77.0, 58.25])
    assert agg["accuracy_matrix_mean"][2] == pytest.approx([62.0, 67.0, 52.0])
    assert agg["accuracy_matrix_mean"][0][1] is None


def test_summary_and_plots(tmp_path):
    runs = _two_seeds()
    results = {"preset": "p", "demo": True, "benchmark": {"name": "b", "num_classes": 6, "n_experiences": 3},
               "config": {"backbone": "vit"}, "published": {"A_last": "86.51 ± 0.73"}, "seeds": runs,
               "aggregate": aggregate(runs), "runtime_s": 12.5}
    text = format_summary(results)
    assert "DEMO" in text and "NOT the benchmark" in text
    assert "58.25 ± 2.83" in text  # A_last
    assert "75.75 ± 2.83" in text  # A_avg
    assert "(published: 86.51 ± 0.73)" in text
    for plot in (plot_accuracy_curve, plot_accuracy_matrix):
        path = plot(results, tmp_path / f"{plot.__name__}.png")
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
