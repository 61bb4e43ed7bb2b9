"""Clinical metrics of a binary classifier, each with a 95% interval, from (labels, scores).

    from covidlib import metrics
    result = metrics.compute_metrics(y_true, p_covid, threshold=0.5, seed=0)
    result.figures['sensitivity']   # Estimate(value=0.93, low=0.81, high=0.98, method='wilson')
    result.confusion.as_dict()      # rows = true normal/covid, columns = predicted normal/covid

Label 1 = COVID-19 (positive), 0 = normal; a score is P(COVID-19); predicted label = p >= threshold.

Intervals:
  - proportions (accuracy, sensitivity, specificity, PPV, NPV): Wilson score interval, which
    stays inside [0, 1] and behaves at 0/n and n/n, unlike the normal approximation.
  - F1, ROC-AUC, PR-AUC (average precision), Brier score, ECE and NLL: percentile interval of a
    seeded, stratified bootstrap (positives and negatives resampled separately, so every resample
    keeps the class counts and AUC stays defined). Same seed -> same interval.

ECE (expected calibration error): scores cut into `n_bins` equal-width bins over [0, 1] (10 by
default; bin i holds i/n_bins <= p < (i+1)/n_bins, the last bin also holds p = 1), then
ECE = sum over bins of (bin count / n) * |fraction of COVID-19 in bin - mean score in bin|.

Degenerate cases give None with a reason instead of a number or a crash: a zero denominator
(e.g. sensitivity with no COVID-19 image), AUCs with one class only.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import numpy as np
from scipy import stats

from covidlib import errors

Z95 = 1.959963984540054  # Two-sided 95% normal quantile.
DEFAULT_BOOTSTRAP = 1000
DEFAULT_BINS = 10
_EPS = 1e-7  # Clip for log loss: float32 sigmoid outputs reach exactly 0 and 1.

PROPORTIONS = ('accuracy', 'sensitivity', 'specificity', 'ppv', 'npv')
BOOTSTRAPPED = ('f1', 'roc_auc', 'pr_auc', 'brier', 'ece', 'nll')
FIGURES = PROPORTIONS + BOOTSTRAPPED
DESCRIPTIONS = {
    'accuracy': 'share of images labelled correctly',
    'sensitivity': 'COVID-19 images called COVID-19 (recall of COVID-19)',
    'specificity': 'normal images called normal (recall of normal)',
    'ppv': 'images called COVID-19 that are COVID-19 (precision)',
    'npv': 'images called normal that are normal',
    'f1': 'harmonic mean of PPV and sensitivity',
    'roc_auc': 'area under the ROC curve (threshold-free ranking quality)',
    'pr_auc': 'average precision (area under the precision-recall curve)',
    'brier': 'mean squared error of P(COVID-19); lower is better',
    'ece': 'expected calibration error, equal-width bins; lower is better',
    'nll': 'mean negative log-likelihood (log loss); lower is better',
}


@dataclasses.dataclass(frozen=True)
class Estimate:
  """A figure with its 95% interval; value None means undefined here, and `reason` says why."""
  value: float | None
  low: float | None = None
  high: float | None = None
  method: str = ''
  reason: str = ''

  def as_dict(self) -> dict:
    out = {'value': self.value, 'ci95': [self.low, self.high], 'method': self.method}
    if self.reason:
      out['reason'] = self.reason
    return out


@dataclasses.dataclass(frozen=True)
class Confusion:
  """Counts of a binary confusion matrix, label 1 = COVID-19."""
  tn: int
  fp: int
  fn: int
  tp: int

  @property
  def n(self) -> int:
    return self.tn + self.fp + self.fn + self.tp

  def matrix(self) -> list[list[int]]:
    """[[TN, FP], [FN, TP]]: rows = true normal/covid, columns = predicted normal/covid."""
    return [[self.tn, self.fp], [self.fn, self.tp]]

  def as_dict(self) -> dict:
    return {'rows': ['true normal', 'true covid'],
            'columns': ['predicted normal', 'predicted covid'],
            'matrix': self.matrix(), 'tn': self.tn, 'fp': self.fp, 'fn': self.fn, 'tp': self.tp}


@dataclasses.dataclass(frozen=True)
class Metrics:
  """Every figure of one set of (labels, scores) at one threshold."""
  n: int
  n_covid: int
  n_normal: int
  threshold: float
  confusion: Confusion
  figures: dict[str, Estimate]

  def as_dict(self) -> dict:
    return {'n': self.n, 'n_covid': self.n_covid, 'n_normal': self.n_normal,
            'threshold': self.threshold, 'confusion': self.confusion.as_dict(),
            'figures': {k: v.as_dict() for k, v in self.figures.items()}}


def format_figure(figure: dict | None, undefined: str = '—', reason: bool = False) -> str:
  """An Estimate.as_dict() as 'value [low, high]' (3 decimals; no interval when it has none).

  An undefined figure (None, or value None) gives `undefined`, followed by ' (its reason)' when
  `reason` is set and the figure says why.
  """
  if not figure or figure.get('value') is None:
    why = figure.get('reason') if reason and figure else None
    return undefined + (f' ({why})' if why else '')
  low, high = (figure.get('ci95') or [None, None])[:2]
  return f'{figure["value"]:.3f}' + ('' if low is None else f' [{low:.3f}, {high:.3f}]')


def check_arrays(y_true, scores) -> tuple[np.ndarray, np.ndarray]:
  """Validates labels in {0, 1} and finite scores in [0, 1] of the same length."""
  y = np.asarray(y_true).reshape(-1)
  p = np.asarray(scores, dtype=np.float64).reshape(-1)
  if y.shape != p.shape:
    raise errors.UsageError(f'labels and scores differ in length: {y.size} vs {p.size}')
  if y.size == 0:
    raise errors.DataError('no examples to evaluate (0 labels)')
  bad = ~np.isin(y, (0, 1))
  if bad.any():
    raise errors.UsageError(f'labels must be 0 (normal) or 1 (covid); got {y[bad][0]!r}')
  if not np.all(np.isfinite(p)) or p.min() < 0 or p.max() > 1:
    raise errors.UsageError(
        f'scores must be probabilities in [0, 1]; got min {np.nanmin(p)}, max {np.nanmax(p)}'
        + (' and non-finite values' if not np.all(np.isfinite(p)) else ''))
  return y.astype(np.int64), p


def confusion(y_true, y_pred) -> Confusion:
  y = np.asarray(y_true).astype(bool).reshape(-1)
  q = np.asarray(y_pred).astype(bool).reshape(-1)
  return Confusion(tn=int(np.sum(~y & ~q)), fp=int(np.sum(~y & q)), fn=int(np.sum(y & ~q)),
                   tp=int(np.sum(y & q)))


def wilson_interval(successes: int, total: int, z: float = Z95) -> tuple[float, float]:
  """Wilson score interval of successes/total (Wilson 1927; Newcombe 1998, method 3)."""
  if total <= 0:
    raise ValueError(f'total must be positive, got {total}')
  if not 0 <= successes <= total:
    raise ValueError(f'successes must be in [0, {total}], got {successes}')
  phat = successes / total
  denom = 1 + z * z / total
  center = (phat + z * z / (2 * total)) / denom
  half = z * math.sqrt(phat * (1 - phat) / total + z * z / (4 * total * total)) / denom
  return max(0.0, center - half), min(1.0, center + half)


def proportion(successes: int, total: int, what: str) -> Estimate:
  """successes/total with its Wilson interval; None (with the reason) when total is 0."""
  if total == 0:
    return Estimate(None, method='wilson', reason=f'undefined: no {what}')
  low, high = wilson_interval(successes, total)
  return Estimate(successes / total, low, high, method='wilson')


# Batched statistics. Each takes labels y (n,) and scores (B, n) or (n,) and returns (B,) or
# a scalar; the bootstrap calls them once on a (B, n) matrix of resampled scores.


def roc_auc(y: np.ndarray, p: np.ndarray) -> np.ndarray:
  """Mann-Whitney ROC-AUC (ties count one half), equal to sklearn's roc_auc_score."""
  y = np.asarray(y).astype(bool)
  p = np.atleast_2d(p)
  n_pos = int(y.sum())
  n_neg = y.size - n_pos
  ranks = stats.rankdata(p, axis=1)  # Average ranks for ties.
  u = ranks[:, y].sum(axis=1) - n_pos * (n_pos + 1) / 2
  return u / (n_pos * n_neg)


def average_precision(y: np.ndarray, p: np.ndarray) -> np.ndarray:
  """sum_k (R_k - R_{k-1}) P_k over distinct thresholds, equal to sklearn's average_precision."""
  y = np.asarray(y).astype(np.float64)
  p = np.atleast_2d(p)
  order = np.argsort(-p, axis=1, kind='stable')
  sorted_p = np.take_along_axis(p, order, axis=1)
  sorted_y = y[order]
  tp = np.cumsum(sorted_y, axis=1)
  rank = np.arange(1, p.shape[1] + 1)
  # A threshold sits at the end of each run of tied scores.
  is_end = np.ones_like(sorted_p, dtype=bool)
  is_end[:, :-1] = sorted_p[:, :-1] != sorted_p[:, 1:]
  tp_at_end = np.where(is_end, tp, 0.0)
  previous = np.zeros_like(tp)
  previous[:, 1:] = np.maximum.accumulate(tp_at_end, axis=1)[:, :-1]
  gain = np.where(is_end, tp - previous, 0.0)
  return (gain * (tp / rank)).sum(axis=1) / y.sum()


def f1(y: np.ndarray, p: np.ndarray, threshold: float) -> np.ndarray:
  y = np.asarray(y).astype(bool)
  q = np.atleast_2d(p) >= threshold
  tp = (q & y).sum(axis=1)
  fp = (q & ~y).sum(axis=1)
  fn = (~q & y).sum(axis=1)
  denom = 2 * tp + fp + fn
  with np.errstate(invalid='ignore', divide='ignore'):
    return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), np.nan)


def brier(y: np.ndarray, p: np.ndarray) -> np.ndarray:
  return np.mean((np.atleast_2d(p) - np.asarray(y, np.float64)) ** 2, axis=1)


def nll(y: np.ndarray, p: np.ndarray) -> np.ndarray:
  p = np.clip(np.atleast_2d(p), _EPS, 1 - _EPS)
  y = np.asarray(y, np.float64)
  return -np.mean(y * np.log(p) + (1 - y) * np.log1p(-p), axis=1)


def bin_index(p: np.ndarray, n_bins: int = DEFAULT_BINS) -> np.ndarray:
  """Equal-width bin of each score: i/n_bins <= p < (i+1)/n_bins; p = 1 goes in the last bin."""
  return np.minimum((np.asarray(p) * n_bins).astype(np.int64), n_bins - 1)


def ece(y: np.ndarray, p: np.ndarray, n_bins: int = DEFAULT_BINS) -> np.ndarray:
  """Expected calibration error with equal-width bins (see the module docstring)."""
  p = np.atleast_2d(p)
  rows, n = p.shape
  y = np.broadcast_to(np.asarray(y, np.float64), p.shape)
  flat = (np.arange(rows)[:, None] * n_bins + bin_index(p, n_bins)).reshape(-1)
  size = rows * n_bins
  sum_p = np.bincount(flat, weights=p.reshape(-1), minlength=size).reshape(rows, n_bins)
  sum_y = np.bincount(flat, weights=y.reshape(-1), minlength=size).reshape(rows, n_bins)
  # |sum_y - sum_p| / n = (count / n) * |mean_y - mean_p|, and 0 for empty bins.
  return np.abs(sum_y - sum_p).sum(axis=1) / n


def reliability_bins(y_true, scores, n_bins: int = DEFAULT_BINS) -> list[dict]:
  """Per equal-width bin: its edges, count, mean score and observed fraction of COVID-19."""
  y, p = check_arrays(y_true, scores)
  index = bin_index(p, n_bins)
  out = []
  for i in range(n_bins):
    inside = index == i
    count = int(inside.sum())
    out.append({'low': i / n_bins, 'high': (i + 1) / n_bins, 'count': count,
                'mean_score': float(p[inside].mean()) if count else None,
                'fraction_covid': float(y[inside].mean()) if count else None})
  return out


def stratified_bootstrap_indices(y: np.ndarray, n_bootstrap: int,
                                 seed: int | None) -> np.ndarray:
  """(n_bootstrap, n) indices: each row resamples positives and negatives with replacement."""
  rng = np.random.default_rng(seed)
  pos = np.flatnonzero(y == 1)
  neg = np.flatnonzero(y == 0)
  parts = [group[rng.integers(0, group.size, size=(n_bootstrap, group.size))]
           for group in (pos, neg) if group.size]
  return np.concatenate(parts, axis=1)


def compute_metrics(y_true, scores, threshold: float = 0.5, *,
                    n_bootstrap: int = DEFAULT_BOOTSTRAP, seed: int | None = 0,
                    n_bins: int = DEFAULT_BINS) -> Metrics:
  """Every figure with its 95% interval (see the module docstring for the methods).

  Args:
    y_true: labels, 1 = COVID-19, 0 = normal.
    scores: P(COVID-19) in [0, 1].
    threshold: label = score >= threshold.
    n_bootstrap: bootstrap resamples for the non-proportion figures (0 = no intervals for them).
    seed: bootstrap seed; the same seed gives the same intervals.
    n_bins: ECE bins.

  Raises:
    UsageError: mismatched lengths, labels other than 0/1, scores outside [0, 1].
  """
  y, p = check_arrays(y_true, scores)
  if not 0.0 <= threshold <= 1.0:
    raise errors.UsageError(f'threshold must be in [0, 1], got {threshold}')
  if n_bootstrap < 0:
    raise errors.UsageError(f'n_bootstrap must be >= 0, got {n_bootstrap}')
  c = confusion(y, p >= threshold)
  n_pos, n_neg = c.tp + c.fn, c.tn + c.fp
  figures = {
      'accuracy': proportion(c.tp + c.tn, c.n, 'images'),
      'sensitivity': proportion(c.tp, n_pos, 'COVID-19 images'),
      'specificity': proportion(c.tn, n_neg, 'normal images'),
      'ppv': proportion(c.tp, c.tp + c.fp, 'image called COVID-19'),
      'npv': proportion(c.tn, c.tn + c.fn, 'image called normal'),
  }
  one_class = ('' if n_pos and n_neg else
               f'undefined: only one class present ({n_pos} COVID-19, {n_neg} normal)')
  functions = {
      'f1': lambda labels, q: f1(labels, q, threshold),
      'roc_auc': roc_auc,
      'pr_auc': average_precision,
      'brier': brier,
      'ece': lambda labels, q: ece(labels, q, n_bins),
      'nll': nll,
  }
  indices = stratified_bootstrap_indices(y, n_bootstrap, seed) if n_bootstrap else None
  # Every resample keeps the class counts in the same order, so one label row serves them all.
  y_resampled = y[indices[0]] if indices is not None else None
  for name, function in functions.items():
    if name in ('roc_auc', 'pr_auc') and one_class:
      figures[name] = Estimate(None, method='bootstrap', reason=one_class)
      continue
    value = float(function(y, p)[0])
    if math.isnan(value):  # F1 with no COVID-19 image and none called COVID-19.
      figures[name] = Estimate(None, method='bootstrap',
                               reason='undefined: no COVID-19 image and none called COVID-19')
    elif indices is None:
      figures[name] = Estimate(value, method='none')
    else:
      low, high = np.nanpercentile(function(y_resampled, p[indices]), [2.5, 97.5])
      figures[name] = Estimate(value, float(low), float(high), method='bootstrap')
  return Metrics(n=c.n, n_covid=n_pos, n_normal=n_neg, threshold=float(threshold), confusion=c,
                 figures=figures)


def metrics_by_group(y_true, scores, groups: Mapping[str, Sequence], threshold: float = 0.5,
                     **kwargs) -> dict[str, dict[str, Metrics]]:
  """compute_metrics per value of each grouping feature, e.g. {'source': [...], 'view': [...]}.

  Returns {feature: {value: Metrics}}; values sorted, '' shown as '(unknown)'.
  """
  y, p = check_arrays(y_true, scores)
  out = {}
  for feature, values in groups.items():
    values = np.asarray([_as_text(v) for v in values], dtype=object)
    if values.shape != y.shape:
      raise errors.UsageError(
          f'group feature {feature!r} has {values.size} values for {y.size} examples')
    out[feature] = {
        (value or '(unknown)'): compute_metrics(y[values == value], p[values == value],
                                                threshold, **kwargs)
        for value in sorted(set(values))}
  return out


def _as_text(value) -> str:
  if isinstance(value, bytes):
    return value.decode('utf-8', 'replace')
  return str(value)
