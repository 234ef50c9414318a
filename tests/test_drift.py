"""The drift statistics without SciPy in the runtime: KS against SciPy's, PSI by hand, the monitor's alarm.

Torch-free (numpy and SciPy, which scikit-learn brings). The alarm on a real lighting shift of
real images, through the service, is in ``tests/test_serve.py``.
"""
from __future__ import annotations

import math
import threading

import numpy as np
import pytest
from scipy import stats

from anomaly.deploy.drift import DriftMonitor, drift_status, kolmogorov_sf, ks_2samp, psi


@pytest.mark.parametrize("n,m", [(40, 40), (100, 50), (200, 200), (1000, 500)])
def test_ks_statistic_is_scipys_and_p_value_close_to_its_exact_one(n, m):
    rng = np.random.default_rng(n * 1000 + m)
    in_band = 0
    for shift in np.linspace(0.0, 0.8, 17):
        a, b = rng.normal(0, 1, n), rng.normal(shift, 1, m)
        d, p = ks_2samp(a, b)
        exact = stats.ks_2samp(a, b, method="exact")
        assert d == pytest.approx(exact.statistic, abs=1e-12)
        if 0.01 <= exact.pvalue <= 0.1:  # where the alarm decides (module docstring's bound)
            in_band += 1
            assert abs(p - exact.pvalue) < 0.02, (shift, p, exact.pvalue)
        assert abs(p - exact.pvalue) < 0.06
    assert in_band >= 1  # the sweep did cross the decision region


def test_ks_on_ties_and_identical_samples():
    a = np.repeat([0.1, 0.2, 0.3], 30)
    d, p = ks_2samp(a, a.copy())
    assert d == 0.0 and p == 1.0
    b = np.repeat([0.2, 0.3, 0.4], 30)
    assert ks_2samp(a, b)[0] == pytest.approx(stats.ks_2samp(a, b).statistic)


def test_kolmogorov_sf_matches_scipy_limit():
    for x in (0.3, 0.5, 0.8, 1.0, 1.36, 1.63, 2.5):
        assert kolmogorov_sf(x) == pytest.approx(stats.kstwobign.sf(x), rel=1e-9, abs=1e-15)
    assert kolmogorov_sf(0.0) == 1.0


def test_psi_by_hand():
    ref = np.arange(1000) / 1000.0  # deciles at 0.1, 0.2, ...: ten equally full bins
    cur = np.full(200, 0.05)  # every score in the first bin
    p_ref = np.full(10, 0.1)
    p_cur = np.array([1.0] + [1e-4] * 9)  # empty bins floored
    assert psi(ref, cur) == pytest.approx(float(np.sum((p_cur - p_ref) * np.log(p_cur / p_ref))), rel=1e-12)
    assert psi(ref, ref) == pytest.approx(0.0, abs=1e-12)
    rng = np.random.default_rng(0)
    big = rng.normal(0, 1, 5000)
    assert psi(big, rng.normal(0, 1, 500)) < 0.1
    assert psi(big, rng.normal(0.5, 1, 500)) > 0.2  # half a standard deviation: a significant shift


def test_bad_samples_are_refused():
    with pytest.raises(ValueError, match="at least one score"):
        ks_2samp([], [1.0])
    with pytest.raises(ValueError, match="finite"):
        psi([1.0, math.nan], [1.0])


def test_drift_status_needs_a_reference_and_enough_scores():
    rng = np.random.default_rng(1)
    assert drift_status(None, rng.normal(size=300)).reason.startswith("no reference")
    small = drift_status(rng.normal(size=20), rng.normal(size=300))
    assert not small.alarm and small.ks_pvalue is None and "reference too small" in small.reason
    warm = drift_status(rng.normal(size=500), rng.normal(size=40), min_scores=100)
    assert not warm.alarm and warm.psi is None and warm.reason.startswith("warming up")
    shifted = drift_status(rng.normal(size=500), rng.normal(1.0, 1, 200))
    assert shifted.alarm and "KS p-value" in shifted.reason and "PSI" in shifted.reason


def test_monitor_keeps_the_last_window_and_alarms_on_a_shift():
    rng = np.random.default_rng(2)
    mon = DriftMonitor(rng.normal(0, 1, 2000), window=200, min_scores=100)
    for v in rng.normal(0, 1, 200):
        mon.add(float(v))
    calm = mon.status()
    assert calm.scores == 200 and not calm.alarm, calm
    mon.add(*rng.normal(0.8, 1, 200))  # pushes every unshifted score out
    mon.add(math.nan)  # an error is not a measurement
    alarm = mon.status()
    assert alarm.scores == 200 and alarm.alarm and alarm.ks_pvalue < 0.05
    mon.clear()
    assert mon.status().scores == 0


def test_monitor_is_thread_safe():
    mon = DriftMonitor(np.linspace(0, 1, 100), window=1000, min_scores=10)
    threads = [threading.Thread(target=lambda: [mon.add(0.5) or mon.status() for _ in range(300)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert mon.status().scores == 1000
