"""covidlib.threshold and covidlib.calibration on constructed scores with known answers."""

import numpy as np
import pytest

from covidlib import calibration
from covidlib import errors
from covidlib import metrics
from covidlib import threshold

# 10 COVID-19 and 10 normal scores. Sorted, the COVID-19 scores interleave with the normal ones
# near the top, so each policy lands on a different, hand-checkable cut.
COVID = [0.30, 0.45, 0.55, 0.62, 0.70, 0.80, 0.85, 0.90, 0.95, 0.99]
NORMAL = [0.05, 0.10, 0.15, 0.20, 0.25, 0.35, 0.40, 0.50, 0.60, 0.75]
Y = np.array([1] * 10 + [0] * 10)
P = np.array(COVID + NORMAL)


def test_fixed_policy_reports_what_it_achieves():
  choice = threshold.choose_threshold(Y, P, 'fixed:0.5')
  assert choice.threshold == 0.5 and choice.policy == 'fixed:0.5'
  # >= 0.5: COVID-19 from 0.55 up = 8/10; normal below 0.5 = 7/10.
  assert choice.sensitivity == pytest.approx(0.8)
  assert choice.specificity == pytest.approx(0.7)


def test_youden_policy():
  choice = threshold.choose_threshold(Y, P, 'youden')
  # By hand, J = sens + spec - 1 per cut "p >= s": 0.30 -> 1.0 + 0.5 - 1 = 0.5;
  # 0.45 -> 0.9 + 0.7 - 1 = 0.6; 0.55 -> 0.8 + 0.8 - 1 = 0.6; 0.62 -> 0.7 + 0.9 - 1 = 0.6;
  # 0.80 -> 0.5 + 1.0 - 1 = 0.5; every other cut is lower. Three cuts tie at 0.6; ties go to the
  # higher sensitivity: the cut at 0.45, reported as the midpoint (0.40 + 0.45) / 2.
  assert choice.threshold == pytest.approx(0.425)
  assert (choice.sensitivity, choice.specificity) == pytest.approx((0.9, 0.7))
  j = np.array([s + t - 1 for _, s, t in zip(*threshold.operating_points(Y, P))])
  assert j.max() == pytest.approx(0.6)


def test_sensitivity_policy():
  choice = threshold.choose_threshold(Y, P, 'sensitivity:0.95')
  # Sensitivity >= 0.95 means every COVID-19 image, the lowest at 0.30: cut "p >= 0.30",
  # threshold midway from 0.25, specificity 5/10.
  assert choice.threshold == pytest.approx(0.275)
  assert (choice.sensitivity, choice.specificity) == pytest.approx((1.0, 0.5))
  choice = threshold.choose_threshold(Y, P, 'sensitivity:0.7')
  # 7 of 10: cut "p >= 0.62" (spec 9/10); "p >= 0.70" would give only 6/10.
  assert choice.threshold == pytest.approx(0.61)
  assert (choice.sensitivity, choice.specificity) == pytest.approx((0.7, 0.9))


def test_specificity_policy():
  choice = threshold.choose_threshold(Y, P, 'specificity:1.0')
  # Every normal below: cut above 0.75 -> "p >= 0.80", sensitivity 5/10.
  assert choice.threshold == pytest.approx(0.775)
  assert (choice.sensitivity, choice.specificity) == pytest.approx((0.5, 1.0))


def test_threshold_applies_as_label_rule():
  for policy in ('youden', 'sensitivity:0.95', 'sensitivity:0.7', 'specificity:0.8'):
    choice = threshold.choose_threshold(Y, P, policy)
    c = metrics.confusion(Y, P >= choice.threshold)
    assert c.tp / 10 == pytest.approx(choice.sensitivity), policy
    assert c.tn / 10 == pytest.approx(choice.specificity), policy


def test_operating_points_cover_both_extremes():
  thresholds, sens, spec = threshold.operating_points(Y, P)
  assert thresholds[0] == pytest.approx(0.05 / 2) and (sens[0], spec[0]) == (1.0, 0.0)
  assert thresholds[-1] == pytest.approx((0.99 + 1) / 2) and (sens[-1], spec[-1]) == (0.0, 1.0)
  assert np.all(np.diff(thresholds) > 0)
  assert np.all(np.diff(sens) <= 0) and np.all(np.diff(spec) >= 0)


@pytest.mark.parametrize('policy,why', [
    ('youdn', "unknown policy 'youdn'"),
    ('fixed', 'fixed needs a number'),
    ('fixed:1.5', 'threshold 1.5 is outside'),
    ('sensitivity:abc', "'abc' is not a number"),
    ('sensitivity:0', 'target 0 is outside'),
    ('specificity:', 'specificity needs a number'),
])
def test_bad_policy_names_it_and_lists_forms(policy, why):
  with pytest.raises(errors.UsageError) as e:
    threshold.parse_policy(policy)
  message = str(e.value)
  assert f'bad threshold policy {policy!r}' in message
  assert why in message
  assert 'valid forms: fixed:T' in message and 'youden' in message and 'sensitivity:X' in message


def test_data_policy_needs_both_classes():
  with pytest.raises(errors.DataError, match='needs both classes, it has 0 COVID-19 and 3'):
    threshold.choose_threshold([0, 0, 0], [0.1, 0.2, 0.3], 'youden')


def test_temperature_softens_overconfident_scores():
  rs = np.random.RandomState(0)
  n = 400
  y = rs.randint(0, 2, n)
  # Well calibrated logits z ~ N(+-1.5, 1.5); the model then reports 4 z: far too sure.
  z = np.where(y == 1, 1.5, -1.5) + 1.5 * rs.randn(n)
  true_p = 1 / (1 + np.exp(-z))
  y = (rs.rand(n) < true_p).astype(int)  # Labels drawn from the calibrated probability.
  overconfident = 1 / (1 + np.exp(-4 * z))
  fit = calibration.fit_temperature(y, overconfident)
  assert 3.0 < fit.temperature < 5.5  # Close to the 4 we planted.
  assert fit.nll_after < fit.nll_before - 0.2
  assert fit.ece_after < fit.ece_before / 2
  assert not fit.at_bound and not fit.separable
  calibrated = calibration.apply_temperature(overconfident, fit.temperature)
  # Ranking (so ROC-AUC) is unchanged.
  assert metrics.roc_auc(y, calibrated)[0] == pytest.approx(metrics.roc_auc(y, overconfident)[0])
  assert metrics.nll(y, calibrated)[0] == pytest.approx(fit.nll_after)


def test_temperature_sharpens_underconfident_scores_and_flags_separable():
  rs = np.random.RandomState(1)
  y = rs.randint(0, 2, 300)
  z = np.where(y == 1, 2.0, -2.0) + rs.randn(300)
  y = (rs.rand(300) < 1 / (1 + np.exp(-z))).astype(int)
  timid = 1 / (1 + np.exp(-z / 3))
  assert calibration.fit_temperature(y, timid).temperature < 0.5
  separable = calibration.fit_temperature([0, 0, 1, 1], [0.2, 0.3, 0.7, 0.8])
  assert separable.separable and not separable.at_bound
  assert separable.temperature == 1.0 and separable.nll_after == separable.nll_before


def test_temperature_errors():
  with pytest.raises(errors.DataError, match='needs both classes'):
    calibration.fit_temperature([1, 1], [0.3, 0.9])
  with pytest.raises(errors.UsageError, match='temperature must be a positive number'):
    calibration.apply_temperature([0.5], 0.0)
  np.testing.assert_allclose(calibration.apply_temperature([0.0, 0.5, 1.0], 1.0),
                             [1e-7, 0.5, 1 - 1e-7])
