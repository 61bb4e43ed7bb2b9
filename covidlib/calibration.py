"""Temperature scaling: one number T fitted on validation so that P(COVID-19) means what it says.

    from covidlib import calibration
    fit = calibration.fit_temperature(y_val, p_val)       # fit.temperature, fit.nll_before/after
    p_test_calibrated = calibration.apply_temperature(p_test, fit.temperature)

The models output p = sigmoid(z). We recover the logit z = log(p / (1 - p)) (p clipped to
[1e-7, 1 - 1e-7], so a float32 output of exactly 0 or 1 becomes a logit of about -+16) and fit

    T* = argmin_T  mean NLL(y, sigmoid(z / T)),   T in [0.01, 100],

by bounded Brent search on log T (the NLL is convex in 1/T, so the search finds the one minimum).
T > 1 softens an over-confident model, T < 1 sharpens an under-confident one; the ranking, and
so ROC-AUC, never changes. On a split the model separates perfectly (every COVID-19 score above
every normal one) the NLL falls for ever as T -> 0: there is no evidence to calibrate on, so the
fit keeps T = 1 and sets `separable`. `at_bound` flags a fit that stopped at 0.01 or 100.

The temperature is stored as `Decision.temperature` in decision.json, and the threshold is then
chosen on the calibrated scores: label = sigmoid(logit / T) >= threshold.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import optimize

from covidlib import errors
from covidlib import metrics

T_MIN, T_MAX = 0.01, 100.0
_EPS = 1e-7


@dataclasses.dataclass(frozen=True)
class TemperatureFit:
  temperature: float
  nll_before: float
  nll_after: float
  ece_before: float
  ece_after: float
  at_bound: bool
  separable: bool
  n: int

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def to_logits(scores) -> np.ndarray:
  p = np.clip(np.asarray(scores, np.float64), _EPS, 1 - _EPS)
  return np.log(p) - np.log1p(-p)


def apply_temperature(scores, temperature: float) -> np.ndarray:
  """sigmoid(logit(p) / T), in float64."""
  if not temperature > 0 or not math.isfinite(temperature):
    raise errors.UsageError(f'temperature must be a positive number, got {temperature!r}')
  z = to_logits(scores) / temperature
  return 0.5 * (1.0 + np.tanh(0.5 * z))  # A sigmoid that never overflows.


def fit_temperature(y_true, scores, n_bins: int = metrics.DEFAULT_BINS) -> TemperatureFit:
  """Fits T by minimising the NLL of sigmoid(logit(p) / T) on (labels, scores).

  Raises:
    DataError: a split without both classes (there is nothing to calibrate against).
  """
  y, p = metrics.check_arrays(y_true, scores)
  n_pos = int(y.sum())
  if n_pos in (0, y.size):
    raise errors.DataError(
        'cannot fit a temperature: the split needs both classes, it has '
        f'{n_pos} COVID-19 and {y.size - n_pos} normal images')
  separable = bool(p[y == 1].min() > p[y == 0].max())
  if separable:
    temperature = 1.0
  else:
    def loss(log_t: float) -> float:
      return float(metrics.nll(y, apply_temperature(p, math.exp(log_t)))[0])

    result = optimize.minimize_scalar(loss, bounds=(math.log(T_MIN), math.log(T_MAX)),
                                      method='bounded', options={'xatol': 1e-6})
    temperature = float(math.exp(result.x))
  calibrated = apply_temperature(p, temperature)
  at_bound = not separable and (temperature <= T_MIN * 1.01 or temperature >= T_MAX / 1.01)
  return TemperatureFit(
      temperature=temperature,
      nll_before=float(metrics.nll(y, p)[0]), nll_after=float(metrics.nll(y, calibrated)[0]),
      ece_before=float(metrics.ece(y, p, n_bins)[0]),
      ece_after=float(metrics.ece(y, calibrated, n_bins)[0]),
      at_bound=bool(at_bound), separable=separable, n=int(y.size))
