"""A new site: does it differ from the training site, and how good is a model there (arrays only).

    from covidlib import sites
    test = sites.two_sample_test(reference.features, site_features, reference.taps, seed=0)
    test['p_value'], test['domain_roc_auc'], test['differs']        # batch-level, per tap too
    figures = sites.site_figures(labels, scores, patients, threshold=0.42, seed=0)
    figures['sensitivity']        # {'value', 'ci95', 'method', 'n', 'films_needed', ...}
    judged = sites.judge(figures, sites.parse_targets('sensitivity:0.9,specificity:0.8'))
    adapt, hold_out = sites.split_by_patient(labels, groups, holdout_fraction=0.3, seed=0)

What `covidlib-site` computes (covidlib/site.py loads the films and runs the model; this module
only sees arrays: no TensorFlow, no files).

Does the site differ (`check`)? The films of the site against the model_dir's reference (pooled
features of up to 500 training-site films at every tap, shallow to deep: covidlib.reference).
Each tap's features are standardised by the reference's mean and sd, then:
  - kernel MMD (Gretton et al., JMLR 2012): the unbiased MMD^2 with a Gaussian kernel whose
    bandwidth is the median distance between the pooled films; its p-value from
    `n_permutations` random relabellings of the pooled films (p = (1 + #{perm >= observed}) /
    (1 + n_permutations), so the smallest p is 1 / (n_permutations + 1)). One combined p-value
    over the taps: the smallest per-tap p-value, referred to the smallest per-tap p-values of
    the SAME permutations (a min-p test, Westfall & Young 1993): exact, with no Bonferroni loss
    from correlated taps.
  - a classifier two-sample test (Lopez-Paz & Oquab, ICLR 2017): a logistic regression telling
    the site's films from the reference's, its out-of-fold ROC-AUC over stratified folds, with
    DeLong's interval on the logit scale. 0.5 = indistinguishable; 1.0 = every film tells its
    site. Per tap, and on all taps together ('combined').
  The site differs when the combined p-value is below `alpha` (0.01). Early taps carry
  acquisition style (scanner, digitisation, processing); deep ones what the model reads. A batch
  whose case mix is far from the reference's (e.g. normals only) can differ in the deep taps for
  that reason alone: the per-tap rows show where a difference lies.

How good is the model there (`validate`)? ROC-AUC, sensitivity and specificity at the model's
own threshold, each with a 95% interval that resamples PATIENTS, not films (films of one patient
are not independent):
  - sensitivity, specificity: the Wilson interval at the effective number of films, n / deff,
    where the design effect deff = (patient-bootstrap variance) / (binomial variance), at least
    1. With one film per patient it is the Wilson interval; it stays inside [0, 1] and keeps its
    coverage at 0/n and n/n and with few films, where a percentile bootstrap falls short.
  - ROC-AUC: the patient-bootstrap standard error on the logit scale, logit(A) +- 1.96 SE,
    mapped back (keeps the interval inside [0, 1] and its coverage near 1: measured in
    tests/covidlib/test_sites.py).
  The bootstrap resamples patients within each class of patient (stratified), `n_bootstrap`
  times. A figure needs at least MIN_FILMS_PER_CLASS films of each class it uses.
  `films_needed`: about how many films (at the same case mix and films per patient) bring the
  interval's half-width under 0.05: n * (half-width / 0.05)^2, since intervals narrow as 1/sqrt(n).
  A target `sensitivity:0.9` PASSES only when the interval's LOWER bound is at least 0.9: the
  data must show the model is that good, not merely fail to show it is worse.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
from scipy import special
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold

from covidlib import errors
from covidlib import metrics

DEFAULT_ALPHA = 0.01
DEFAULT_PERMUTATIONS = 1000
MIN_FILMS_PER_CLASS = 10
HALF_WIDTH = 0.05
TARGET_FIGURES = ('sensitivity', 'specificity', 'roc_auc')
DEFAULT_TARGETS = 'sensitivity:0.9,specificity:0.8'
AGE_BANDS = ((0, 18, '0-17'), (18, 40, '18-39'), (40, 65, '40-64'), (65, 200, '65+'))
_SD_FLOOR = 1e-6


# --------------------------------------------------------------------------------------------
# check: a batch of films against the reference.
# --------------------------------------------------------------------------------------------


def _standardise(reference: np.ndarray, site: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Both standardised by the reference's per-feature mean and sd (sd floored)."""
  reference = np.asarray(reference, np.float64)
  site = np.asarray(site, np.float64)
  mean = reference.mean(axis=0)
  sd = np.maximum(reference.std(axis=0), _SD_FLOOR)
  return (reference - mean) / sd, (site - mean) / sd


def _gaussian_kernel(x: np.ndarray) -> np.ndarray:
  """exp(-||a - b||^2 / (2 h^2)) over the rows of x, h = the median pairwise distance."""
  sq = (x * x).sum(axis=1)
  d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * x @ x.T, 0.0)
  off = d2[np.triu_indices(len(x), 1)]
  h2 = float(np.median(off[off > 0])) if np.any(off > 0) else 1.0  # Median of squared = squared median.
  return np.exp(-d2 / (2.0 * h2))


def _mmd2(kernel: np.ndarray, z: np.ndarray) -> np.ndarray:
  """Unbiased MMD^2 for each row of z (B, N) in {0, 1}: 1 = the site's films, 0 = reference."""
  z = np.atleast_2d(z).astype(kernel.dtype)
  m = z[0].sum()
  n = z.shape[1] - m
  kz = z @ kernel                       # (B, N)
  xx = (kz * z).sum(axis=1) - m         # sum over i != j of site pairs (k(a, a) = 1).
  x_all = kz.sum(axis=1)                # z' K 1
  yy = kernel.sum() - 2 * x_all + xx + m - n  # (1-z)' K (1-z) - n
  xy = x_all - (xx + m)                 # z' K (1 - z)
  return xx / (m * (m - 1)) + yy / (n * (n - 1)) - 2 * xy / (m * n)


def mmd_test(reference: Sequence[np.ndarray], site: Sequence[np.ndarray], *,
             n_permutations: int = DEFAULT_PERMUTATIONS, seed: int | None = 0) -> dict:
  """Per-tap MMD^2 and permutation p-values, and the combined min-p p-value (module docstring).

  Args:
    reference, site: one (n_ref, d_i) and one (n_site, d_i) array per tap.
  """
  n_ref, n_site = len(reference[0]), len(site[0])
  rng = np.random.default_rng(seed)
  observed = np.r_[np.zeros(n_ref), np.ones(n_site)]
  # Row 0 is the observed labelling; the others are the same permutations for every tap.
  z = np.vstack([observed] + [rng.permutation(observed) for _ in range(n_permutations)])
  stats = []
  for ref, new in zip(reference, site):
    ref, new = _standardise(ref, new)
    stats.append(_mmd2(_gaussian_kernel(np.vstack([ref, new])), z))
  stats = np.stack(stats, axis=1)  # (1 + B, taps)
  # p-value of every row (observed and permuted) within its tap's permutation distribution.
  null = stats[1:]
  exceed = (null[None, :, :] >= stats[:, None, :]).sum(axis=1)  # (1 + B, taps)
  p_rows = (1 + exceed) / (1 + n_permutations)
  min_p = p_rows.min(axis=1)
  combined = (1 + np.sum(min_p[1:] <= min_p[0])) / (1 + n_permutations)
  return {'mmd2': stats[0].tolist(), 'p_values': p_rows[0].tolist(), 'p_value': float(combined),
          'n_permutations': int(n_permutations)}


def delong_auc(labels, scores) -> metrics.Estimate:
  """ROC-AUC with DeLong's standard error (DeLong et al. 1988), the interval on the logit scale.

  Instant where a bootstrap of the domain classifier's scores would take a second per tap.
  """
  y = np.asarray(labels).astype(bool)
  p = np.asarray(scores, np.float64)
  pos, neg = np.sort(p[y]), np.sort(p[~y])
  # Per positive: share of negatives below it (ties half); per negative: positives above it.
  v10 = (np.searchsorted(neg, p[y], 'left') + np.searchsorted(neg, p[y], 'right')) / (
      2 * neg.size)
  v01 = 1 - (np.searchsorted(pos, p[~y], 'left') + np.searchsorted(pos, p[~y], 'right')) / (
      2 * pos.size)
  auc = float(v10.mean())
  se = math.sqrt(v10.var(ddof=1) / pos.size + v01.var(ddof=1) / neg.size)
  eps = 0.5 / (pos.size * neg.size)
  centre = special.logit(min(max(auc, eps), 1 - eps))
  se_logit = se / max(auc * (1 - auc), eps)  # Delta method.
  return metrics.Estimate(auc, float(special.expit(centre - metrics.Z95 * se_logit)),
                          float(special.expit(centre + metrics.Z95 * se_logit)),
                          method='delong, logit')


def domain_classifier(reference: np.ndarray, site: np.ndarray, *, n_folds: int = 5,
                      seed: int | None = 0) -> metrics.Estimate:
  """Out-of-fold ROC-AUC of a logistic regression telling the site's films from the reference's.

  Standardised features, L2 penalty (C = 0.1: few films, many features), balanced class
  weights, stratified folds (at most the site's film count); the interval is DeLong's.
  """
  ref, new = _standardise(reference, site)
  x = np.vstack([ref, new])
  y = np.r_[np.zeros(len(ref), np.int64), np.ones(len(new), np.int64)]
  folds = StratifiedKFold(min(n_folds, len(new), len(ref)), shuffle=True,
                          random_state=None if seed is None else int(seed))
  p = np.zeros(len(y))
  for train, held in folds.split(x, y):
    clf = LogisticRegression(C=0.1, class_weight='balanced', solver='liblinear')
    clf.fit(x[train], y[train])
    p[held] = clf.decision_function(x[held])
  return delong_auc(y, p)


def two_sample_test(reference: Sequence[np.ndarray], site: Sequence[np.ndarray],
                    taps: Sequence[str], *, alpha: float = DEFAULT_ALPHA,
                    n_permutations: int = DEFAULT_PERMUTATIONS, seed: int | None = 0,
                    per_tap_classifier: bool = True) -> dict:
  """check's batch-level test: MMD per tap and combined, the domain classifier, the decision.

  Returns:
    {'differs', 'alpha', 'p_value', 'domain_roc_auc' (Estimate dict, all taps together),
     'n_reference', 'n_site', 'taps': [{'tap', 'dim', 'mmd2', 'p_value', 'domain_roc_auc'}]}.

  Raises:
    UsageError: mismatched taps or dimensions, or too few films.
  """
  if not 0 < alpha < 1:
    raise errors.UsageError(f'alpha must be in (0, 1), got {alpha!r}')
  if not len(reference) == len(site) == len(taps) or not taps:
    raise errors.UsageError(f'{len(taps)} taps, {len(reference)} reference and {len(site)} '
                            'site feature arrays: one of each per tap')
  for name, ref, new in zip(taps, reference, site):
    if np.ndim(ref) != 2 or np.ndim(new) != 2 or np.shape(ref)[1] != np.shape(new)[1]:
      raise errors.UsageError(f'tap {name!r}: reference features {np.shape(ref)} and site '
                              f'features {np.shape(new)} differ in dimension')
  n_ref, n_site = len(reference[0]), len(site[0])
  if n_site < 2 or n_ref < 2:
    raise errors.UsageError(f'a two-sample test needs at least 2 films on each side; got '
                            f'{n_site} site films and {n_ref} reference films')
  mmd = mmd_test(reference, site, n_permutations=n_permutations, seed=seed)
  combined = domain_classifier(np.hstack(reference), np.hstack(site), seed=seed)
  rows = []
  for k, name in enumerate(taps):
    auc = domain_classifier(reference[k], site[k], seed=seed) if per_tap_classifier else None
    rows.append({'tap': name, 'dim': int(np.shape(reference[k])[1]), 'mmd2': mmd['mmd2'][k],
                 'p_value': mmd['p_values'][k],
                 'domain_roc_auc': None if auc is None else auc.as_dict()})
  return {'differs': bool(mmd['p_value'] < alpha), 'alpha': alpha, 'p_value': mmd['p_value'],
          'n_permutations': mmd['n_permutations'], 'domain_roc_auc': combined.as_dict(),
          'n_reference': int(n_ref), 'n_site': int(n_site), 'taps': rows}


def format_p(p: float, n_permutations: int) -> str:
  """'p < 0.001' at the permutation test's floor (the next of 0.001, 0.01, 0.05 above it),
  else 'p = 0.034'."""
  floor = 1.0 / (n_permutations + 1)
  if p <= floor + 1e-12:
    bound = next((b for b in (0.001, 0.01, 0.05) if b > floor), None)
    return f'p < {bound:g}' if bound else f'p <= {floor:.3g}'
  return f'p = {p:.3f}' if p >= 0.001 else f'p = {p:.1e}'


def check_verdict(test: dict, share_flagged: float | None = None) -> str:
  """The one line of `covidlib-site check`."""
  auc = test['domain_roc_auc']
  evidence = (f'{format_p(test["p_value"], test["n_permutations"])}; domain ROC-AUC '
              f'{metrics.format_figure(auc)}')
  flagged = ('' if share_flagged is None else
             f'; {share_flagged:.0%} of films flagged out of distribution one by one')
  if test['differs']:
    return (f'site differs from training ({evidence}{flagged}) on {test["n_site"]} films: '
            'validate before use')
  return (f'no difference from training detected ({evidence}{flagged}) on {test["n_site"]} '
          'films: this does not show that the model works here; validate before use')


# --------------------------------------------------------------------------------------------
# validate: figures with patient-level intervals.
# --------------------------------------------------------------------------------------------


def patient_index(patients: Sequence[str]) -> np.ndarray:
  """One integer per film: films of one patient share it; a film without an id is its own."""
  keys = [p if p else f'\0film{i}' for i, p in enumerate(np.asarray(patients, object).tolist())]
  _, index = np.unique(np.asarray(keys, dtype=object).astype(str), return_inverse=True)
  return index.reshape(-1)


def bootstrap_weights(labels: np.ndarray, clusters: np.ndarray, n_bootstrap: int,
                      seed: int | None) -> np.ndarray:
  """(B, n) film weights: how often each film's patient is drawn in each resample.

  Patients are resampled with replacement within their class (a patient with any positive film
  counts as positive), so each resample keeps the number of patients of each class.
  """
  n_clusters = int(clusters.max()) + 1
  positive = np.zeros(n_clusters, bool)
  positive[clusters[labels == 1]] = True
  rng = np.random.default_rng(seed)
  counts = np.zeros((n_bootstrap, n_clusters))
  for group in (np.flatnonzero(positive), np.flatnonzero(~positive)):
    if group.size:
      drawn = group[rng.integers(0, group.size, size=(n_bootstrap, group.size))]
      rows = np.repeat(np.arange(n_bootstrap), group.size)
      np.add.at(counts, (rows, drawn.reshape(-1)), 1.0)
  return counts[:, clusters]


def weighted_auc(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
  """(B,) ROC-AUC (ties one half) with film weights (B, n): the Mann-Whitney statistic where a
  film drawn w times counts w times. Equal to metrics.roc_auc for weights of one."""
  y = np.asarray(labels).astype(bool)
  weights = np.atleast_2d(weights)
  _, value = np.unique(scores, return_inverse=True)
  m = int(value.max()) + 1
  onehot = np.zeros((len(scores), m))
  onehot[np.arange(len(scores)), value] = 1.0
  neg_at = (weights * ~y) @ onehot                      # (B, m): negative weight per score value.
  neg_below = np.cumsum(neg_at, axis=1) - neg_at
  credit = neg_below + 0.5 * neg_at                     # For a positive at each value.
  pos_w = weights * y
  u = (pos_w * credit[:, value]).sum(axis=1)
  with np.errstate(invalid='ignore', divide='ignore'):
    return u / (pos_w.sum(axis=1) * (weights * ~y).sum(axis=1))


def films_needed(n: int, low: float | None, high: float | None,
                 half_width: float = HALF_WIDTH) -> int | None:
  """About how many films bring the interval's half-width under `half_width`: n (h / target)^2,
  at least n (None without an interval)."""
  if low is None or high is None or n <= 0:
    return None
  h = (high - low) / 2
  return int(n) if h <= half_width else int(math.ceil(n * (h / half_width) ** 2 - 1e-9))


def _small_sample(clusters: np.ndarray) -> float:
  """g / (g - 1) for g patients: a bootstrap's variance is that much too small (it divides by
  g where the unbiased estimate divides by g - 1)."""
  g = len(set(clusters.tolist()))
  return g / (g - 1) if g > 1 else 1.0


def _proportion(hits: np.ndarray, members: np.ndarray, weights: np.ndarray,
                clusters: np.ndarray, what: str, needed_of: str) -> dict:
  """A sensitivity or specificity: Wilson at the effective n (module docstring)."""
  n = int(members.sum())
  k = int((hits & members).sum())
  if n < MIN_FILMS_PER_CLASS:
    return {'value': None, 'ci95': [None, None], 'method': 'wilson, patient design effect',
            'n': n, 'reason': f'too few {what}: {n}, needs at least {MIN_FILMS_PER_CLASS}',
            'films_needed': MIN_FILMS_PER_CLASS, 'films_needed_of': needed_of}
  p = k / n
  w = weights * members
  with np.errstate(invalid='ignore', divide='ignore'):
    boot = (w * hits).sum(axis=1) / w.sum(axis=1)
  binomial = p * (1 - p) / n
  deff = 1.0
  if binomial > 0 and np.isfinite(boot).sum() > 1:
    deff = max(1.0, float(np.nanvar(boot)) * _small_sample(clusters[members]) / binomial)
  n_eff = n / deff
  low, high = metrics.wilson_interval(p * n_eff, n_eff)
  return {'value': p, 'ci95': [low, high], 'method': 'wilson, patient design effect', 'n': n,
          'design_effect': deff, 'films_needed': films_needed(n, low, high),
          'films_needed_of': needed_of}


def _auc(labels, scores, weights, clusters, n_pos: int, n_neg: int,
         what: tuple[str, str]) -> dict:
  method = 'logit, patient bootstrap SE'
  if min(n_pos, n_neg) < MIN_FILMS_PER_CLASS:
    short = [f'{n} {name}' for n, name in ((n_pos, what[1]), (n_neg, what[0]))
             if n < MIN_FILMS_PER_CLASS]
    return {'value': None, 'ci95': [None, None], 'method': method, 'n': n_pos + n_neg,
            'reason': f'too few films: {" and ".join(short)}, needs at least '
                      f'{MIN_FILMS_PER_CLASS} of each class',
            'films_needed': MIN_FILMS_PER_CLASS, 'films_needed_of': 'each class'}
  value = float(metrics.roc_auc(labels, scores)[0])
  boot = weighted_auc(labels, scores, weights)
  boot = boot[np.isfinite(boot)]
  # Logit scale: an AUC of 1 (or 0) in a resample has no finite logit; clip a hair inside.
  eps = 0.5 / (n_pos * n_neg)
  logit = special.logit(np.clip(boot, eps, 1 - eps))
  centre = special.logit(min(max(value, eps), 1 - eps))
  se = float(np.std(logit) * math.sqrt(_small_sample(clusters))) if logit.size > 1 else 0.0
  low = float(special.expit(centre - metrics.Z95 * se))
  high = float(special.expit(centre + metrics.Z95 * se))
  return {'value': value, 'ci95': [low, high], 'method': method, 'n': n_pos + n_neg,
          'films_needed': films_needed(n_pos + n_neg, low, high),
          'films_needed_of': 'films, at this case mix'}


def site_figures(labels, scores, patients: Sequence[str] | None, threshold: float, *,
                 n_bootstrap: int = metrics.DEFAULT_BOOTSTRAP, seed: int | None = 0,
                 class_names: tuple[str, str] = ('normal', 'positive')) -> dict:
  """ROC-AUC, sensitivity and specificity at `threshold`, with patient-level 95% intervals.

  Args:
    labels: 1 = the positive class. scores: P(positive), calibrated as the model applies it.
    patients: one id per film ('' = unknown: the film is its own patient); None: all unknown.
    class_names: (negative, positive), for the messages.

  Returns:
    {'n', 'n_patients', 'n_per_class', 'roc_auc', 'sensitivity', 'specificity'}; a figure with
    too few films has value None, a reason and `films_needed` = MIN_FILMS_PER_CLASS.
  """
  y, p = metrics.check_arrays(labels, scores)
  clusters = patient_index([''] * y.size if patients is None else patients)
  if clusters.size != y.size:
    raise errors.UsageError(f'{clusters.size} patient ids for {y.size} films')
  weights = bootstrap_weights(y, clusters, n_bootstrap, seed)
  called = p >= threshold
  neg, pos = class_names
  n_pos = int(y.sum())
  return {
      'n': int(y.size), 'n_patients': int(len(set(clusters.tolist()))),
      'n_per_class': [int(y.size - n_pos), n_pos], 'threshold': float(threshold),
      'roc_auc': _auc(y, p, weights, clusters, n_pos, y.size - n_pos, class_names),
      'sensitivity': _proportion(called, y == 1, weights, clusters, f'{pos} films',
                                 f'{pos} films'),
      'specificity': _proportion(~called, y == 0, weights, clusters, f'{neg} films',
                                 f'{neg} films'),
  }


def age_band(age: int | float) -> str:
  """'0-17', '18-39', '40-64', '65+', or '' for an unknown age (< 0)."""
  if age is None or age < 0:
    return ''
  for low, high, name in AGE_BANDS:
    if low <= age < high:
      return name
  return ''


def strata_figures(labels, scores, patients, threshold: float, strata: Mapping[str, Sequence],
                   **kwargs) -> dict:
  """site_figures per value of each stratum ({'site': [...], 'view': [...]}); a stratum with
  one value only (or none known) is left out, since it repeats the overall figures."""
  y = np.asarray(labels)
  p = np.asarray(scores)
  patients = np.asarray([''] * y.size if patients is None else patients, dtype=object)
  out = {}
  for name, values in strata.items():
    values = np.asarray([str(v) for v in values], dtype=object)
    known = sorted({v for v in values if v})
    if len(known) < 2 and not (known and np.any(values == '')):
      continue
    out[name] = {(v or '(unknown)'): site_figures(y[values == v], p[values == v],
                                                  patients[values == v], threshold, **kwargs)
                 for v in sorted(set(values))}
  return out


def parse_targets(text: str) -> dict[str, float]:
  """'sensitivity:0.9,specificity:0.8' -> {'sensitivity': 0.9, 'specificity': 0.8}.

  Raises:
    UsageError: naming the part at fault (unknown figure, bad or out-of-range number, a figure
      given twice, an empty part).
  """
  targets: dict[str, float] = {}
  if not isinstance(text, str) or not text.strip():
    raise errors.UsageError(f'--target is empty; give FIGURE:VALUE[,FIGURE:VALUE], e.g. '
                            f'{DEFAULT_TARGETS}')
  for part in text.split(','):
    name, sep, number = part.strip().partition(':')
    name = name.strip().lower()
    where = f'--target part {part.strip()!r}'
    if not part.strip():
      raise errors.UsageError(f'--target {text!r} has an empty part (a stray comma)')
    if name not in TARGET_FIGURES:
      raise errors.UsageError(f'{where}: unknown figure {name!r}; figures: '
                              f'{", ".join(TARGET_FIGURES)}')
    if not sep or not number.strip():
      raise errors.UsageError(f'{where}: needs a value after the colon, e.g. {name}:0.9')
    try:
      value = float(number)
    except ValueError:
      raise errors.UsageError(f'{where}: {number.strip()!r} is not a number') from None
    if not 0 < value <= 1:
      raise errors.UsageError(f'{where}: {value:g} is outside (0, 1]')
    if name in targets:
      raise errors.UsageError(f'{where}: {name} is given twice')
    targets[name] = value
  return targets


def judge(figures: dict, targets: Mapping[str, float]) -> dict:
  """PASS/FAIL per target (lower bound >= target), and the overall verdict.

  Returns:
    {'verdict': 'PASS' | 'FAIL', 'targets': [{'figure', 'target', 'value', 'ci95', 'result',
    'why'}]}. FAIL says why: the interval lies below the target, reaches below it (the data
    cannot show it is met: `films_needed` says how many films would narrow the interval), or
    the figure is undefined here.
  """
  rows = []
  for name, target in targets.items():
    f = figures[name]
    low, high = f['ci95']
    if f['value'] is None:
      result, why = 'FAIL', f'not measured: {f.get("reason", "undefined")}'
    elif low >= target:
      result, why = 'PASS', f'the lower bound {low:.3f} clears {target:g}'
    elif high < target:
      result, why = 'FAIL', f'the whole interval lies below {target:g}'
    else:
      result, why = 'FAIL', (f'not shown: the interval reaches below {target:g} (lower bound '
                             f'{low:.3f}); about {f["films_needed"]} {f["films_needed_of"]} '
                             'would narrow it to +-0.05')
    rows.append({'figure': name, 'target': target, 'value': f['value'], 'ci95': [low, high],
                 'result': result, 'why': why})
  verdict = 'PASS' if rows and all(r['result'] == 'PASS' for r in rows) else 'FAIL'
  return {'verdict': verdict, 'targets': rows}


def validate_verdict(judged: dict, figures: dict) -> str:
  """The one line of `covidlib-site validate`."""
  parts = []
  for r in judged['targets']:
    f = figures[r['figure']]
    shown = metrics.format_figure(f)
    parts.append(f'{r["figure"]} {shown} ' + ('>=' if r['result'] == 'PASS' else 'vs') +
                 f' {r["target"]:g}')
  return (f'{judged["verdict"]}: ' + '; '.join(parts) +
          f' on {figures["n"]} films ({figures["n_patients"]} patients)')


def check_classes(labels, class_names: tuple[str, str], what: str = 'the films') -> None:
  """DataError when a class is missing or has fewer than MIN_FILMS_PER_CLASS films."""
  labels = np.asarray(labels).reshape(-1)
  counts = [int(np.sum(labels == 0)), int(np.sum(labels == 1))]
  missing = [class_names[c] for c in (1, 0) if counts[c] == 0]
  if missing:
    raise errors.DataError(
        f'{what} hold no {missing[0]} film ({counts[1]} {class_names[1]}, {counts[0]} '
        f'{class_names[0]}): both classes are needed (sensitivity needs {class_names[1]} films, '
        f'specificity {class_names[0]} films)')
  short = [f'{counts[c]} {class_names[c]}' for c in (1, 0) if counts[c] < MIN_FILMS_PER_CLASS]
  if short:
    raise errors.DataError(
        f'{what} hold too few films for a figure with an interval: {" and ".join(short)}; each '
        f'class needs at least {MIN_FILMS_PER_CLASS} films (more for a useful interval: the '
        f'report says how many)')


def lineage_line(lineage: dict | None) -> str:
  """'adapted at SITE on n films (method) from PARENT; validated on m other films of that site:
  ...' from an adapted model_dir's lineage.json, for the model card and exports ('' for none)."""
  if not lineage:
    return ''
  held = lineage['hold_out']
  adapted = held['adapted']
  figures = ', '.join(f'{shown} {metrics.format_figure(adapted[name])}' for name, shown in
                      (('roc_auc', 'ROC-AUC'), ('sensitivity', 'sensitivity'),
                       ('specificity', 'specificity')))
  targets = ', '.join(f'{k} {v:g}' for k, v in held['targets'].items())
  return (f'adapted at {lineage["site"]} on {lineage["adapt"]["n_films"]} films '
          f'({lineage["method"]}) from `{lineage["parent"]["model_dir"]}`; validated on '
          f'{held["n_films"]} other films of that site: {figures} ({adapted["result"]} against '
          f'{targets})')


# --------------------------------------------------------------------------------------------
# adapt: the patient split.
# --------------------------------------------------------------------------------------------


def split_by_patient(labels, groups, holdout_fraction: float, seed: int | None
                     ) -> tuple[np.ndarray, np.ndarray]:
  """(adapt indices, hold-out indices), sorted: whole groups (patients) on one side, about
  `holdout_fraction` of each class's groups in the hold-out (at least one of each class).

  Raises:
    UsageError: a fraction outside (0, 1). DataError: a class with fewer than 2 groups.
  """
  if not 0 < holdout_fraction < 1:
    raise errors.UsageError(f'--holdout_fraction must be in (0, 1), got {holdout_fraction!r}')
  labels = np.asarray(labels).reshape(-1)
  groups = np.asarray(groups).reshape(-1)
  positive_groups = set(groups[labels == 1].tolist())
  rng = np.random.default_rng(seed)
  held = []
  for members in (sorted(positive_groups), sorted(set(groups.tolist()) - positive_groups)):
    if len(members) < 2:
      raise errors.DataError(f'cannot split {len(members)} patient(s) of a class into adapt '
                             'and hold-out parts: each class needs at least 2 patients')
    k = min(len(members) - 1, max(1, int(round(holdout_fraction * len(members)))))
    held += list(rng.choice(np.asarray(members), size=k, replace=False))
  mask = np.isin(groups, held)
  return np.flatnonzero(~mask), np.flatnonzero(mask)


def shared_patients(a: Sequence[str], b: Sequence[str]) -> list[str]:
  """Known patient ids ('' excluded) present in both."""
  return sorted((set(a) - {''}) & (set(b) - {''}))
