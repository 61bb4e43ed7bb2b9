"""The operating threshold: chosen on a validation split by a named policy.

    from covidlib import threshold
    choice = threshold.choose_threshold(y_val, p_val, 'sensitivity:0.95')
    choice.threshold, choice.sensitivity, choice.specificity

Policies (label = P(COVID-19) >= threshold):
  fixed:T            T itself, 0 <= T <= 1 (fixed:0.5 is the default when nothing was chosen).
  youden             maximises Youden's J = sensitivity + specificity - 1.
  sensitivity:X      the highest specificity whose sensitivity is at least X (0 < X <= 1): the
                     policy for "miss at most 5% of COVID-19" (sensitivity:0.95).
  specificity:X      the highest sensitivity whose specificity is at least X.

Candidates: every distinct way of splitting the validation scores. The threshold reported for
"positive iff p >= s" (s a validation score) is the midpoint between s and the next lower
distinct score (half of s for the lowest score; midway to 1 above the highest), so a new score
a hair under s is not flipped by rounding.
Ties of the objective go to the higher sensitivity: a missed COVID-19 is the costlier error.

With temperature scaling first (`choose_decision`): fit T on the split (covidlib.calibration),
then choose the threshold there on the calibrated scores:

    decision, account = threshold.choose_decision(y_val, p_val, 'youden', calibrate=True,
                                                  split='validation')

The result is stored with the model as `decision.json` (`covidlib.model_dir.save_decision`) and
applied by `covidlib.predict` and the exports' decision outputs.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from covidlib import calibration
from covidlib import errors
from covidlib import metrics
from covidlib import model_dir as md

VALID_FORMS = ('fixed:T (0 <= T <= 1, e.g. fixed:0.5)', 'youden',
               'sensitivity:X (0 < X <= 1, e.g. sensitivity:0.95)',
               'specificity:X (0 < X <= 1, e.g. specificity:0.9)')


@dataclasses.dataclass(frozen=True)
class Policy:
  kind: str  # 'fixed', 'youden', 'sensitivity' or 'specificity'.
  value: float | None = None

  def __str__(self) -> str:
    return self.kind if self.value is None else f'{self.kind}:{self.value:g}'


@dataclasses.dataclass(frozen=True)
class ThresholdChoice:
  """The chosen threshold and what it achieves on the split it was chosen on."""
  threshold: float
  policy: str
  sensitivity: float | None
  specificity: float | None
  n: int

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def _bad(policy: str, why: str) -> errors.UsageError:
  return errors.UsageError(
      f'bad threshold policy {policy!r}: {why}; valid forms: ' + ', '.join(VALID_FORMS))


def parse_policy(policy: str) -> Policy:
  """'youden' / 'fixed:0.5' / 'sensitivity:0.95' / 'specificity:0.9' -> Policy.

  Raises:
    UsageError: naming the string and listing the valid forms.
  """
  if not isinstance(policy, str):
    raise _bad(str(policy), 'not a string')
  text = policy.strip().lower()
  if text == 'youden':
    return Policy('youden')
  kind, sep, number = text.partition(':')
  if kind not in ('fixed', 'sensitivity', 'specificity'):
    raise _bad(policy, f'unknown policy {kind!r}')
  if not sep or not number:
    raise _bad(policy, f'{kind} needs a number after the colon')
  try:
    value = float(number)
  except ValueError:
    raise _bad(policy, f'{number!r} is not a number') from None
  if kind == 'fixed' and not 0.0 <= value <= 1.0:
    raise _bad(policy, f'threshold {value:g} is outside [0, 1]')
  if kind != 'fixed' and not 0.0 < value <= 1.0:
    raise _bad(policy, f'target {value:g} is outside (0, 1]')
  return Policy(kind, value)


def operating_points(y_true, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(thresholds, sensitivity, specificity) for every distinct split, thresholds ascending.

  The first candidate (half the lowest score) calls everything COVID-19; the last, midway
  between the highest score and 1, calls everything normal.
  """
  y, p = metrics.check_arrays(y_true, scores)
  n_pos = int(y.sum())
  n_neg = y.size - n_pos
  distinct = np.unique(p)  # Ascending.
  below = np.concatenate([[0.0], distinct[:-1]])
  thresholds = np.concatenate([(distinct + below) / 2, [(distinct[-1] + 1.0) / 2]])
  if distinct[-1] >= 1.0:  # Nothing can sit above a score of exactly 1.
    thresholds = thresholds[:-1]
  # For each candidate count the positives and negatives at or above it.
  sorted_pos = np.sort(p[y == 1])
  sorted_neg = np.sort(p[y == 0])
  tp = n_pos - np.searchsorted(sorted_pos, thresholds, side='left')
  tn = np.searchsorted(sorted_neg, thresholds, side='left')
  with np.errstate(invalid='ignore', divide='ignore'):
    sensitivity = tp / n_pos if n_pos else np.full(thresholds.shape, np.nan)
    specificity = tn / n_neg if n_neg else np.full(thresholds.shape, np.nan)
  return thresholds, sensitivity, specificity


def choose_threshold(y_true, scores, policy: str | Policy) -> ThresholdChoice:
  """Applies a policy to (labels, scores) of the split the threshold is chosen on.

  Raises:
    UsageError: a bad policy string.
    DataError: a data-driven policy on a split without both classes.
  """
  policy = parse_policy(policy) if isinstance(policy, str) else policy
  y, p = metrics.check_arrays(y_true, scores)
  n_pos = int(y.sum())
  n_neg = y.size - n_pos
  if policy.kind == 'fixed':
    c = metrics.confusion(y, p >= policy.value)
    return ThresholdChoice(float(policy.value), str(policy),
                           c.tp / n_pos if n_pos else None, c.tn / n_neg if n_neg else None,
                           int(y.size))
  if not n_pos or not n_neg:
    raise errors.DataError(
        f'cannot apply threshold policy {str(policy)!r}: the split needs both classes, '
        f'it has {n_pos} COVID-19 and {n_neg} normal images')
  thresholds, sens, spec = operating_points(y, p)
  if policy.kind == 'youden':
    objective = sens + spec - 1
    # Highest J, ties to the higher sensitivity = the lower threshold (arrays are ascending).
    best = int(np.flatnonzero(np.isclose(objective, objective.max(), rtol=0, atol=1e-12))[0])
  elif policy.kind == 'sensitivity':
    ok = np.flatnonzero(sens >= policy.value - 1e-12)  # Never empty: threshold 0 has sens 1.
    top = spec[ok].max()
    best = int(ok[np.isclose(spec[ok], top, rtol=0, atol=1e-12)][0])
  else:  # specificity
    ok = np.flatnonzero(spec >= policy.value - 1e-12)
    if not ok.size:  # Only when normal images score exactly 1.0.
      raise errors.DataError(
          f'threshold policy {str(policy)!r} cannot be met on this split: the best '
          f'specificity any threshold in [0, 1] reaches is {spec.max():.4f}')
    top = sens[ok].max()
    best = int(ok[np.isclose(sens[ok], top, rtol=0, atol=1e-12)][-1])  # Ties: higher spec.
  return ThresholdChoice(float(thresholds[best]), str(policy), float(sens[best]),
                         float(spec[best]), int(y.size))


def choose_decision(labels, scores, policy: str | None, calibrate: bool,
                    split: str) -> tuple[md.Decision, dict]:
  """Temperature (if `calibrate`), then the threshold by `policy` on the calibrated scores.

  Returns the Decision and a JSON-ready account of how it was chosen.
  """
  policy = policy or 'fixed:0.5'
  parse_policy(policy)  # A bad policy fails before any fitting.
  account: dict = {'split': split, 'n': int(np.size(labels))}
  temperature = 1.0
  if calibrate:
    fit = calibration.fit_temperature(labels, scores)
    temperature = fit.temperature
    account['temperature_fit'] = fit.as_dict()
    scores = calibration.apply_temperature(scores, temperature)
  choice = choose_threshold(labels, scores, policy)
  account['threshold_choice'] = choice.as_dict()
  return md.Decision(threshold=choice.threshold, policy=choice.policy,
                     temperature=float(temperature), split=split), account
