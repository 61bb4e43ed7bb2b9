"""covidlib.metrics against scikit-learn and published interval tables."""

import math

import numpy as np
import pytest
from sklearn import metrics as sk

from covidlib import errors
from covidlib import metrics


def _fixed_arrays(seed=0, n=120, decimals=2):
  """Labels and scores with ties (rounded scores), both classes, overlapping."""
  rs = np.random.RandomState(seed)
  y = rs.randint(0, 2, n)
  p = np.clip(0.35 * y + 0.65 * rs.rand(n), 0, 1)
  return y, np.round(p, decimals)


def _ece_reference(y, p, n_bins):
  """A loop over bins, written independently of the vectorised version."""
  total = 0.0
  for i in range(n_bins):
    low, high = i / n_bins, (i + 1) / n_bins
    inside = (p >= low) & ((p < high) if i < n_bins - 1 else (p <= high))
    if inside.any():
      total += inside.mean() * abs(y[inside].mean() - p[inside].mean())
  return total


@pytest.mark.parametrize('seed,decimals', [(0, 2), (1, 1), (2, 6)])
def test_point_values_match_sklearn(seed, decimals):
  y, p = _fixed_arrays(seed, decimals=decimals)
  result = metrics.compute_metrics(y, p, threshold=0.5, n_bootstrap=0)
  f = {k: v.value for k, v in result.figures.items()}
  q = (p >= 0.5).astype(int)
  tn, fp, fn, tp = sk.confusion_matrix(y, q, labels=[0, 1]).ravel()
  assert result.confusion.matrix() == [[tn, fp], [fn, tp]]
  assert f['accuracy'] == pytest.approx(sk.accuracy_score(y, q))
  assert f['sensitivity'] == pytest.approx(sk.recall_score(y, q))
  assert f['specificity'] == pytest.approx(sk.recall_score(y, q, pos_label=0))
  assert f['ppv'] == pytest.approx(sk.precision_score(y, q))
  assert f['npv'] == pytest.approx(sk.precision_score(y, q, pos_label=0))
  assert f['f1'] == pytest.approx(sk.f1_score(y, q))
  assert f['roc_auc'] == pytest.approx(sk.roc_auc_score(y, p), abs=1e-12)
  assert f['pr_auc'] == pytest.approx(sk.average_precision_score(y, p), abs=1e-12)
  assert f['brier'] == pytest.approx(sk.brier_score_loss(y, p))
  assert f['nll'] == pytest.approx(sk.log_loss(y, np.clip(p, 1e-7, 1 - 1e-7)))
  assert f['ece'] == pytest.approx(_ece_reference(y, p, 10))
  assert result.n == len(y) and result.n_covid == y.sum() and result.n_normal == len(y) - y.sum()


def test_batched_statistics_match_sklearn_row_by_row():
  y, p = _fixed_arrays(3, n=40, decimals=1)
  rs = np.random.RandomState(1)
  rows = np.stack([np.round(rs.rand(40), 1) for _ in range(5)])
  np.testing.assert_allclose(metrics.roc_auc(y, rows), [sk.roc_auc_score(y, r) for r in rows])
  np.testing.assert_allclose(metrics.average_precision(y, rows),
                             [sk.average_precision_score(y, r) for r in rows])
  np.testing.assert_allclose(metrics.ece(y, rows, 5), [_ece_reference(y, r, 5) for r in rows])


@pytest.mark.parametrize('k,n,low,high', [
    # Newcombe (1998), Statistics in Medicine 17:857, Table I, method 3 (Wilson score).
    (81, 263, 0.2553, 0.3662),
    (15, 148, 0.0624, 0.1605),
    (0, 20, 0.0, 0.1611),
    (1, 29, 0.0061, 0.1718),
    # The article's 58/60 (the quadratic's roots, solved independently below).
    (58, 60, 0.8864, 0.9908),
])
def test_wilson_interval_published_values(k, n, low, high):
  got = metrics.wilson_interval(k, n)
  assert got == pytest.approx((low, high), abs=5e-5)
  # Wilson bounds are the roots of (phat - p)^2 = z^2 p (1 - p) / n.
  z2 = metrics.Z95 ** 2
  phat = k / n
  a, b, c = 1 + z2 / n, -(2 * phat + z2 / n), phat ** 2
  roots = sorted(np.roots([a, b, c]).real)
  assert got == pytest.approx((max(0.0, roots[0]), roots[1]), abs=1e-9)


def test_proportions_carry_wilson_intervals():
  y = np.array([1] * 60 + [0] * 40)
  p = np.array([0.9] * 58 + [0.1] * 2 + [0.1] * 40)
  result = metrics.compute_metrics(y, p, n_bootstrap=0)
  sens = result.figures['sensitivity']
  assert sens.value == pytest.approx(58 / 60)
  assert (sens.low, sens.high) == pytest.approx(metrics.wilson_interval(58, 60))
  assert sens.method == 'wilson'


def test_bootstrap_is_reproducible_and_brackets_the_value():
  y, p = _fixed_arrays(4)
  a = metrics.compute_metrics(y, p, n_bootstrap=300, seed=7)
  b = metrics.compute_metrics(y, p, n_bootstrap=300, seed=7)
  c = metrics.compute_metrics(y, p, n_bootstrap=300, seed=8)
  for name in metrics.BOOTSTRAPPED:
    assert a.figures[name] == b.figures[name]
    est = a.figures[name]
    assert est.method == 'bootstrap'
    assert est.low <= est.value <= est.high, name
    assert est.high - est.low > 0, name
  assert a.figures['roc_auc'] != c.figures['roc_auc']


def test_stratified_bootstrap_keeps_class_counts():
  y = np.array([1] * 7 + [0] * 13)
  idx = metrics.stratified_bootstrap_indices(y, 50, seed=0)
  assert idx.shape == (50, 20)
  assert np.all(y[idx].sum(axis=1) == 7)


def test_bootstrap_interval_shrinks_with_more_data():
  small_y, small_p = _fixed_arrays(5, n=40)
  big_y, big_p = _fixed_arrays(5, n=1000)
  small = metrics.compute_metrics(small_y, small_p, n_bootstrap=300).figures['roc_auc']
  big = metrics.compute_metrics(big_y, big_p, n_bootstrap=300).figures['roc_auc']
  assert big.high - big.low < (small.high - small.low) / 2


def test_one_class_gives_none_with_reason():
  y = np.zeros(10, int)
  p = np.linspace(0, 0.9, 10)
  result = metrics.compute_metrics(y, p, n_bootstrap=50)
  for name in ('roc_auc', 'pr_auc'):
    assert result.figures[name].value is None
    assert 'only one class present (0 COVID-19, 10 normal)' in result.figures[name].reason
  assert result.figures['sensitivity'].value is None
  assert 'no COVID-19 images' in result.figures['sensitivity'].reason
  assert result.figures['specificity'].value == pytest.approx(0.5)
  # Nothing called COVID-19 and no COVID-19 image: PPV and F1 undefined, brier still defined.
  none_called = metrics.compute_metrics(y, p * 0, n_bootstrap=50)
  assert none_called.figures['ppv'].value is None
  assert none_called.figures['f1'].value is None
  assert none_called.figures['brier'].value == 0.0
  json_ready = result.as_dict()
  assert json_ready['figures']['roc_auc']['ci95'] == [None, None]


def test_bad_inputs_are_usage_errors():
  with pytest.raises(errors.UsageError, match='differ in length: 3 vs 2'):
    metrics.compute_metrics([0, 1, 1], [0.2, 0.3])
  with pytest.raises(errors.UsageError, match='labels must be 0'):
    metrics.compute_metrics([0, 2], [0.2, 0.3])
  with pytest.raises(errors.UsageError, match=r'scores must be probabilities in \[0, 1\]'):
    metrics.compute_metrics([0, 1], [0.2, 1.3])
  with pytest.raises(errors.UsageError, match='threshold must be in'):
    metrics.compute_metrics([0, 1], [0.2, 0.3], threshold=2)
  with pytest.raises(errors.DataError, match='no examples'):
    metrics.compute_metrics([], [])


def test_metrics_by_group_splits_and_names_groups():
  y = np.array([1, 1, 0, 0, 0, 1, 0])
  p = np.array([0.9, 0.8, 0.1, 0.2, 0.7, 0.4, 0.3])
  source = [b'ieee8023', 'ieee8023', 'kaggle_pediatric', 'kaggle_pediatric', 'ieee8023',
            'ieee8023', '']
  out = metrics.metrics_by_group(y, p, {'source': source}, threshold=0.5, n_bootstrap=20)
  assert sorted(out['source']) == ['(unknown)', 'ieee8023', 'kaggle_pediatric']
  ieee = out['source']['ieee8023']
  assert (ieee.n, ieee.n_covid, ieee.n_normal) == (4, 3, 1)
  assert ieee.figures['sensitivity'].value == pytest.approx(2 / 3)
  assert ieee.figures['specificity'].value == 0.0
  kaggle = out['source']['kaggle_pediatric']
  assert kaggle.figures['specificity'].value == 1.0
  assert kaggle.figures['roc_auc'].value is None
  with pytest.raises(errors.UsageError, match="group feature 'view' has 2 values for 7"):
    metrics.metrics_by_group(y, p, {'view': ['PA', 'AP']})


def test_reliability_bins():
  y = np.array([0, 0, 1, 1, 1])
  p = np.array([0.05, 0.15, 0.15, 0.95, 1.0])
  bins = metrics.reliability_bins(y, p, n_bins=10)
  assert len(bins) == 10
  assert bins[0]['count'] == 1 and bins[0]['fraction_covid'] == 0.0
  assert bins[1]['count'] == 2 and bins[1]['fraction_covid'] == 0.5
  assert bins[1]['mean_score'] == pytest.approx(0.15)
  assert bins[9]['count'] == 2 and bins[9]['mean_score'] == pytest.approx(0.975)
  assert bins[5]['count'] == 0 and bins[5]['mean_score'] is None
  assert math.isclose(sum(b['count'] for b in bins), 5)
