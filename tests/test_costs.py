"""Forward cost calibration: the t(Q) curve, its measurement on a real backend, and its cache."""

import json
from dataclasses import asdict

import pytest

import specdec.costs
from specdec.backends.pytorch import PyTorchBackend
from specdec.config import load_config
from specdec.costs import (
    CostModel, Curve, calibrated_costs, curve_path, interleaved, load_or_measure, measure_curve, monotone, time_forward,
)
from specdec.testing import TableBackend, random_table

# t = query + 10 x context index: rows [1, 2, 4] and [11, 12, 14] ms
CURVE = Curve(queries=[1, 2, 4], contexts=[100, 200], seconds=[[1.0, 2.0, 4.0], [11.0, 12.0, 14.0]])


@pytest.mark.parametrize(
    "query, context, seconds",
    [
        (1, 100, 1.0), (4, 200, 14.0),  # measured points
        (3, 100, 3.0), (1.5, 200, 11.5),  # between queries
        (2, 150, 7.0), (3, 125, 5.5),  # between queries and contexts
        (8, 100, 8.0), (8, 200, 18.0),  # beyond the last query: the last segment's slope
        (2, 300, 22.0),  # beyond the longest context: the last segment's slope
        (2, 0, 2.0), (3, 50, 3.0),  # below the shortest: its t (extrapolating down gave -8)
        (0, 100, 1e-9),  # extrapolated to 0: clamped
    ],
)
def test_curve_interpolates_and_extrapolates_linearly(query, context, seconds):
    assert CURVE.at(query, context) == pytest.approx(seconds, abs=1e-12)


def test_curve_with_one_point_per_axis_is_constant_along_it():
    one_context = Curve([1, 3], [64], [[2.0, 5.0]])
    assert one_context.at(2, 10) == one_context.at(2, 10_000) == pytest.approx(3.5)
    one_query = Curve([4], [8, 16], [[0.5], [1.5]])
    assert one_query.at(1, 12) == one_query.at(100, 12) == pytest.approx(1.0)
    assert CURVE.ratios(1) == pytest.approx([1.0, 12 / 11, 14 / 11])


def test_cost_model_reads_both_curves():
    costs = CostModel(target=CURVE, draft=Curve([1, 2], [0], [[0.5, 0.75]]))
    assert costs.target_seconds(2, 100) == 2.0 and costs.draft_seconds(3, 5) == pytest.approx(1.0)
    assert CostModel(target=CURVE, draft=None).draft_seconds(3, 100) == 0.0


@pytest.mark.parametrize(
    "row, expected",
    [
        ([1.0, 2.0, 2.0, 5.0], [1.0, 2.0, 2.0, 5.0]),  # already non-decreasing: unchanged
        ([1.0, 3.0, 2.0, 4.0], [1.0, 2.5, 2.5, 4.0]),  # one violation: the pair pooled
        ([3.0, 2.0, 1.0], [2.0, 2.0, 2.0]),  # all pooled
        ([1.0, 4.0, 3.0, 2.0, 5.0], [1.0, 3.0, 3.0, 3.0, 5.0]),  # pooling cascades
        ([2.0], [2.0]),
    ],
)
def test_monotone_is_the_closest_non_decreasing_row(row, expected):
    assert monotone(row) == pytest.approx(expected)
    assert sum(monotone(row)) == pytest.approx(sum(row))  # pooling keeps the total


def test_time_forward_leaves_the_cache_filled_and_nothing_pending(models):
    backend = PyTorchBackend(models("llama", 0))
    before = backend.forward_calls
    seconds = time_forward(backend, 3, 10, repeats=4, warmup=2)
    assert seconds > 0.0
    assert backend.forward_calls - before == 6  # warmup + repeats, each rolled back
    assert backend.committed_len == 10 and backend.pending_len == 0


def test_time_forward_refills_a_cache_of_another_length():
    backend = TableBackend(random_table(1, 5), 5)
    time_forward(backend, 2, 7, repeats=1, warmup=0)
    assert backend.committed_len == 7 and backend.pending_len == 0
    time_forward(backend, 4, 3, repeats=2, warmup=0)
    assert backend.committed_len == 3 and backend.pending_len == 0 and backend.forward_calls == 3


def test_measure_curve_times_every_point_and_resets_the_backend(models):
    backend = PyTorchBackend(models("llama", 0))
    messages = []
    curve = measure_curve(backend, queries=(1, 4), contexts=(8, 16), repeats=1, progress=messages.append)
    assert curve.queries == [1, 4] and curve.contexts == [8, 16]
    assert len(curve.seconds) == 2 and all(len(row) == 2 and all(t > 0.0 for t in row) for row in curve.seconds)
    assert all(row == sorted(row) for row in curve.seconds)  # made monotone
    assert backend.committed_len == 0 and backend.pending_len == 0
    assert messages == ["t(Q) over 8 entries, pass 1 of 1", "t(Q) over 16 entries, pass 1 of 1"]


def test_interleaved_timing_keeps_a_slow_patch_out_of_the_ratios():
    # point p costs p seconds; the machine runs 3x slower for the first 4 timed calls (after the
    # untimed pass). Back to back, 4 of point 1's 5 repeats would be slow and its median 3.
    calls, passes = [], []

    def time_once(point):
        calls.append(point)
        timed = len(calls) - 1 - 2  # after the warmup pass over 2 points
        return point * (3.0 if 0 <= timed < 4 else 1.0)

    assert interleaved([1, 2], time_once, 5, passes.append) == [1.0, 2.0]
    assert calls == [1, 2] * 6 and passes == [1, 2, 3, 4, 5]


def test_measure_curve_keeps_to_the_context_limit(models):
    backend = PyTorchBackend(models("llama", 0))  # max_length 512
    assert measure_curve(backend, queries=(1, 4), contexts=(8, 510), repeats=1).contexts == [8]
    assert measure_curve(backend, queries=(1, 4), contexts=(1000,), repeats=1).contexts == [512 - 4]
    assert backend.committed_len == 0


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("SPECDEC_CACHE_DIR", str(root))
    return root


@pytest.fixture
def spec_and_backend(write_config, models):
    """The target ModelSpec of a config over a saved tiny model, and a backend over that model."""
    return load_config(write_config()).target, PyTorchBackend(models("llama", 0))


SMALL = dict(queries=(1, 2), contexts=(8,), repeats=1)


def fake_measure(calls: list, seconds: float = 7.0):
    def measure(backend, **kwargs):
        calls.append(kwargs)
        return Curve([1, 2], [8], [[seconds, seconds + 1.0]])

    return measure


def refuse(*args, **kwargs):
    raise AssertionError("measured although a cached curve exists")


def test_calibration_is_measured_cached_and_reused(cache_dir, spec_and_backend, monkeypatch):
    spec, backend = spec_and_backend
    curve = load_or_measure(spec, backend, **SMALL)
    path = curve_path(spec, backend)
    assert path.is_file() and path.parent == cache_dir / "calibration" and path.name.startswith("target-pytorch-")
    stored = json.loads(path.read_text())
    assert stored["curve"] == asdict(curve) and stored["model"] == spec.model and stored["backend"] == "pytorch"
    assert curve.queries == [1, 2] and curve.contexts == [8]

    monkeypatch.setattr(specdec.costs, "measure_curve", refuse)
    assert load_or_measure(spec, backend, **SMALL) == curve

    calls = []
    monkeypatch.setattr(specdec.costs, "measure_curve", fake_measure(calls))
    refreshed = load_or_measure(spec, backend, refresh=True, **SMALL)
    assert calls == [SMALL] and refreshed.seconds == [[7.0, 8.0]]
    monkeypatch.setattr(specdec.costs, "measure_curve", refuse)
    assert load_or_measure(spec, backend) == refreshed  # the refreshed curve replaced the old one


@pytest.mark.parametrize("content", ["{not json", "null", "[]", '{"model": "x"}', '{"curve": 5}', '{"curve": {"queries": [1]}}'])
def test_an_unreadable_calibration_is_measured_again(cache_dir, spec_and_backend, monkeypatch, content):
    spec, backend = spec_and_backend
    path = curve_path(spec, backend)
    path.parent.mkdir(parents=True)
    path.write_text(content)
    calls = []
    monkeypatch.setattr(specdec.costs, "measure_curve", fake_measure(calls))
    curve = load_or_measure(spec, backend, **SMALL)
    assert len(calls) == 1 and curve.seconds == [[7.0, 8.0]]
    assert Curve(**json.loads(path.read_text())["curve"]) == curve


def test_cache_files_differ_per_model_and_options(cache_dir, write_config, models):
    config = load_config(write_config(), ["target.dtype=bfloat16"])
    plain = load_config(write_config())
    backend = PyTorchBackend(models("llama", 0))
    paths = {curve_path(c.target, backend) for c in (config, plain)} | {curve_path(plain.draft, backend)}
    assert len(paths) == 3
    assert curve_path(plain.target, backend) == curve_path(load_config(write_config()).target, backend)  # stable


def test_calibrated_costs_caches_target_and_draft(cache_dir, write_config, models, monkeypatch):
    config = load_config(write_config())
    target, draft = PyTorchBackend(models("llama", 0)), PyTorchBackend(models("llama", 1))
    calls = []
    monkeypatch.setattr(specdec.costs, "measure_curve", fake_measure(calls))
    costs = calibrated_costs(config, target, draft)
    assert len(calls) == 2 and costs.target is not None and costs.draft is not None
    assert curve_path(config.target, target).is_file() and curve_path(config.draft, draft).is_file()
    monkeypatch.setattr(specdec.costs, "measure_curve", refuse)
    assert calibrated_costs(config, target, draft) == costs
    only_target = calibrated_costs(config, target, None)
    assert only_target.draft is None and only_target.target == costs.target
    monkeypatch.setattr(specdec.costs, "measure_curve", fake_measure(calls, 3.0))
    assert calibrated_costs(config, target, draft, refresh=True).target.seconds == [[3.0, 4.0]] and len(calls) == 4
