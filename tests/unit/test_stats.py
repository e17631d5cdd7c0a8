import pytest

from gen_funcs.stats import BREAKDOWN, RunStats


def record(step, wall, samples, **overrides):
    r = {"step": step, "wall_s": wall, "samples": samples, "manager_rss_mb": 100.0 + step, "sim_rss_mb": 50.0}
    r.update({name: 0.01 for name in BREAKDOWN})
    r.update(overrides)
    return r


def test_steady_excludes_warmup():
    stats = RunStats()
    stats.step(record(1, wall=10.0, samples=100, sim_wait_s=9.0))  # start-up
    stats.step(record(2, wall=11.0, samples=200, sim_wait_s=5.0))  # still waiting on a late worker
    stats.step(record(3, wall=12.0, samples=300))
    stats.step(record(4, wall=17.0, samples=400))  # an evaluation ran before this step: it counts
    stats.step(record(5, wall=18.0, samples=500))
    s = stats.summary()
    assert s["steady_samples_per_s"] == pytest.approx(300 / (18.0 - 11.0))
    assert s["steady_step_s"] == pytest.approx(7.0 / 3)
    assert s["breakdown_s"]["sim_wait_s"] == pytest.approx(0.01)
    assert s["peak_manager_rss_mb"] == 105.0


def test_too_short_a_run_has_no_steady_rate():
    stats = RunStats()
    stats.step(record(1, wall=1.0, samples=10))
    assert stats.summary()["steady_samples_per_s"] is None
