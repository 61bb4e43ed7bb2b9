"""Distribution shift: a score saying how unlike the training images an image is.

    from covidlib import scoring, shift
    train = scoring.score_dataset(model, train_data, taps=True)        # one pass per split
    val = scoring.score_dataset(model, validation_data, taps=True)
    shift_model = shift.fit_shift(train.taps, train.labels, validation=val.taps)
    shift_model = shift.choose_threshold(shift_model, shift_model.score(val.taps),
                                         'quantile:0.99', split='validation')
    shift.save(shift_model, 'runs/compact_resnet')                       # shift.npz + shift.json
    score = shift.load('runs/compact_resnet').score(scored.taps)        # (n,) float64

or, for a model_dir trained before this existed (or before the multi-depth score):

    covidlib-fit-shift --model_dir=runs/compact_resnet [--policy=quantile:0.99]

Fitting it on a model_dir's splits (covidlib-train's end-of-training hook and
covidlib-fit-shift) is `covidlib.shift_fit`; this module is numpy only: it fits, scores, stores
and reports on arrays of features.

The score (issue #10, at several depths since issue #17) is a feature ensemble of Mahalanobis
scores (Lee et al., NeurIPS 2018). The features are the pooled outputs of the network at several
depths (`covidlib.models.feature_taps`: one tap per resolution stage, each pooled to the mean
and standard deviation of every channel, and the penultimate features, the input of the final
Dense 'logit'). Early taps see acquisition style (scanner, digitisation, processing), the deep
ones what the network learned about the finding; a new site can differ at any of them.

  1. Per tap t, on the training images: class means mu_c and one covariance S shared by the
     classes, of the class-centred features, shrunk toward a scaled identity,
     S' = (1 - a) S + a (tr S / d) I, with `a` chosen by Ledoit-Wolf (or fixed). Its distance
     is the squared Mahalanobis distance to the nearest class mean:
         d_t(f) = min_c (f - mu_c)^T S'^-1 (f - mu_c) = min_c || f W - m_c ||^2
     with W = V diag(lambda)^-1/2 (S' = V diag(lambda) V^T, so W is d x d) and m_c = mu_c W.
  2. Per tap, standardised on the validation images (films the weights were not fitted on):
     z_t = (d_t - mean_t) / sd_t. The raw distances of different depths are not comparable
     (their dimensions and spreads differ by orders of magnitude), and the training images'
     distances are too small to standardise with (the network fits them: deep taps hold
     training films closer to their class means than any new film).
  3. score = max_t z_t: an image is as unusual as its most unusual depth.

Why max over standardised depths. Lee et al. weight the depths by a logistic regression fitted
on out-of-distribution samples, which do not exist when a model is trained. The combination
chosen instead needs none, and was measured (benchmarks/shift.py, BENCHMARKS.md "Out-of-
distribution flag": two models trained at one hospital each, scored on their own test split and
on every film of the other hospital). Which depth carries a site's shift differs from model to
model (the NIH-trained model sees Guangzhou films best at its last stage, the Guangzhou-trained
one sees NIH films best at its first), so no fixed choice of depth serves both. Among the
combinations that need no out-of-distribution data, the maximum of standardised depths gave the
best share flagged on the harder of the two models (60% of unseen-site films at quantile:0.99,
2.7% of own test films; the mean of standardised depths 57%, standardised log-distances 57%, a
(median, 90th percentile) standardisation 53%, raw distances 49%, distances over their
validation median 39%), and the mean of standardised depths was within 3 points of it on both:
the maximum is kept because it does not dilute a shift seen at one depth by the number of
depths.

Steps 1-3 are matrix products, subtractions, sums of squares, a minimum, a scale and offset
and a maximum: the SavedModel and TFLite exports compute the score in-graph from the same
forward pass (`exporters.serving.shift_score_tf`). An image is `in_distribution` when
score <= threshold; the threshold is chosen on the validation split by a named policy:

  quantile:Q   the Q-quantile (0 < Q < 1) of the validation images' scores, e.g. quantile:0.99:
               about 1% of images like the validation ones are flagged.

What it means: at some depth of the network the image's features lie farther from the training
images' than almost all validation images' do. What it does not: a low score is no promise that
the answer is right (an in-distribution image can still be misclassified), and the score only
knows the feature distributions of the training images, so a shift the network's features do
not see (one that leaves them unchanged) goes unnoticed.

Stored in the model_dir beside decision.json, with no pickle (format 2):
  shift.npz    per tap i: projection_i W (d_i, d_i), centers_i m_c (C, d_i) and
               class_means_i mu_c (C, d_i), float64 (np.savez, read with allow_pickle=False).
  shift.json   {"format": 2, "taps": [{"name", "feature_dim", "shrinkage", "offset",
                "scale", "threshold"}, ...], "combine": "max", "normalised_on", "threshold",
                "policy", "split", "feature_dim", "n_per_class", "fit_split", "score",
                "description"}; offset and scale are each tap's validation mean and standard
               deviation, a tap's threshold that of its depth alone (same policy, same
               images): the int8 TFLite variant carries the penultimate depth alone (8-bit
               activations do not carry the whitened features of the earlier depths:
               exporters/tflite.py).
Format 1 (issue #10, before the depths: shift.json without "format", shift.npz with one
projection, centers and class_means of the penultimate features) still loads, as a one-tap
ensemble with offset 0 and scale 1, i.e. the very same score; `covidlib-fit-shift` refits it in
format 2.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from typing import Mapping, Sequence

import numpy as np
from scipy import stats

from covidlib import errors
from covidlib import metrics
from covidlib import model_dir as md

SHIFT_NPZ = 'shift.npz'
SHIFT_JSON = 'shift.json'
FORMAT = 2
COMBINE = 'max'
PENULTIMATE = 'penultimate'  # = covidlib.models.PENULTIMATE_TAP (this module imports no model).
DEFAULT_POLICY = 'quantile:0.99'
VALID_FORMS = ('quantile:Q (0 < Q < 1, e.g. quantile:0.99)',)
SCORE_NAME = ('largest over the depths of the network of the squared Mahalanobis distance to '
              'the nearest class mean (shared shrunk covariance), each depth standardised on '
              'the validation images')
SCORE_NAME_PENULTIMATE = ('squared Mahalanobis distance to the nearest class mean (shared shrunk '
                          'covariance)')
DESCRIPTION = (
    'shift_score: how unlike the training images an image is. At several depths of the network '
    '(early layers see how a film was taken and processed, late ones what the model learned '
    'about the finding), the squared Mahalanobis distance of the image\'s features to the '
    'nearest class mean of the training images, standardised by its mean and spread on the '
    'validation images; the score is the largest of them. in_distribution: shift_score <= '
    'threshold. Flagged (out of distribution) means the image is unlike what the model learned '
    'from, so its answer should not be trusted. Not flagged does not mean the answer is right.')
DESCRIPTION_PENULTIMATE = (
    'shift_score: how unlike the training images an image is, as the squared Mahalanobis '
    'distance of its penultimate-layer features to the nearest class mean of the training '
    'images. in_distribution: shift_score <= threshold. Flagged (out of distribution) means '
    'the image is unlike what the model learned from, so its answer should not be trusted. '
    'Not flagged does not mean the answer is right.')


@dataclasses.dataclass(frozen=True)
class TapScore:
  """One depth: d(f) = min_c ||f W - m_c||^2, standardised to (d(f) - offset) / scale."""
  name: str                    # The tap (covidlib.models.feature_taps), e.g. 'stage1_out'.
  projection: np.ndarray       # W, (d, d) float64: the whitening of the shrunk covariance.
  centers: np.ndarray          # m_c = mu_c W, (C, d) float64.
  class_means: np.ndarray      # mu_c, (C, d) float64 (for reference; not needed to score).
  shrinkage: float
  offset: float = 0.0          # The distance's mean on the validation images.
  scale: float = 1.0           # Its standard deviation there.
  # The threshold of this depth alone, by the same policy on the same images: what a variant
  # that can carry only this depth (the int8 TFLite file: the penultimate one) flags with.
  threshold: float | None = None

  @property
  def feature_dim(self) -> int:
    return int(self.projection.shape[0])

  def distance(self, features) -> np.ndarray:
    """(n, d) features -> (n,) float64 squared Mahalanobis distance to the nearest class."""
    f = _check_features(features, self.feature_dim, self.name)
    z = f @ self.projection
    return ((z[:, None, :] - self.centers[None, :, :]) ** 2).sum(-1).min(axis=1)

  def score(self, features) -> np.ndarray:
    """(n, d) features -> (n,) the standardised distance."""
    return (self.distance(features) - self.offset) / self.scale

  def info(self) -> dict:
    return {'name': self.name, 'feature_dim': self.feature_dim, 'shrinkage': self.shrinkage,
            'offset': self.offset, 'scale': self.scale, 'threshold': self.threshold}


@dataclasses.dataclass(frozen=True)
class ShiftModel:
  """A fitted shift score: score = max over taps of the standardised distance; flagged when
  > threshold."""
  taps: tuple[TapScore, ...]
  n_per_class: tuple[int, ...]
  fit_split: str = 'train'
  threshold: float | None = None
  policy: str = ''
  split: str = ''
  normalised_on: str = ''
  format: int = FORMAT  # 1: loaded from an issue-10 shift.json (penultimate only, raw).

  @property
  def tap_names(self) -> tuple[str, ...]:
    return tuple(t.name for t in self.taps)

  @property
  def feature_dims(self) -> tuple[int, ...]:
    return tuple(t.feature_dim for t in self.taps)

  @property
  def feature_dim(self) -> int:
    """All features the score reads, over every tap."""
    return int(sum(self.feature_dims))

  @property
  def score_name(self) -> str:
    return SCORE_NAME_PENULTIMATE if self.format == 1 else SCORE_NAME

  @property
  def description(self) -> str:
    return DESCRIPTION_PENULTIMATE if self.format == 1 else DESCRIPTION

  def tap_features(self, features) -> list[np.ndarray]:
    """The features of each tap, in the order of `taps`, from {tap: (n, d)} (e.g. Scored.taps,
    which may hold more taps), a sequence in that order, or one (n, d) array for a one-tap
    score.

    Raises:
      UsageError: a tap missing, the wrong number of arrays.
    """
    if isinstance(features, Mapping):
      missing = [n for n in self.tap_names if n not in features]
      if missing:
        raise errors.UsageError(f'shift features lack the taps {missing}; the score reads '
                                f'{list(self.tap_names)}')
      return [features[n] for n in self.tap_names]
    if isinstance(features, (list, tuple)):
      if len(features) != len(self.taps):
        raise errors.UsageError(f'shift features: {len(features)} arrays for the '
                                f'{len(self.taps)} taps {list(self.tap_names)}')
      return list(features)
    if len(self.taps) != 1:
      raise errors.UsageError(f'shift features: one array for the {len(self.taps)} taps '
                              f'{list(self.tap_names)}; pass {{tap: features}}')
    return [features]

  def tap_scores(self, features) -> np.ndarray:
    """(n, k) float64: each tap's standardised distance (what the maximum is taken over)."""
    return np.stack([t.score(f) for t, f in zip(self.taps, self.tap_features(features))],
                    axis=1)

  def score(self, features) -> np.ndarray:
    """Features (see tap_features) -> (n,) float64 shift scores."""
    return self.tap_scores(features).max(axis=1)

  def single_tap(self, name: str) -> 'ShiftModel':
    """The score of one depth alone, with that depth's own threshold (TapScore.threshold).

    Raises:
      UsageError: no such tap, or no threshold chosen for it.
    """
    if name not in self.tap_names:
      raise errors.UsageError(f'the shift score has no tap {name!r}; its taps are '
                              f'{list(self.tap_names)}')
    if len(self.taps) == 1:
      return self
    tap = self.taps[self.tap_names.index(name)]
    if tap.threshold is None:
      raise errors.UsageError(f'the shift score has no threshold for tap {name!r} alone: refit '
                              'it with covidlib-fit-shift')
    return dataclasses.replace(self, taps=(tap,), threshold=tap.threshold)

  def in_distribution(self, scores) -> np.ndarray:
    """scores <= threshold; UsageError when no threshold was chosen."""
    if self.threshold is None:
      raise errors.UsageError('the shift model has no threshold: choose one with '
                              'covidlib.shift.choose_threshold (or covidlib-fit-shift)')
    return np.asarray(scores) <= self.threshold

  def info(self) -> dict:
    """shift.json's content."""
    if self.format == 1:  # What issue #10 wrote, kept when such a file is saved again.
      tap = self.taps[0]
      return {'threshold': self.threshold, 'policy': self.policy, 'split': self.split,
              'feature_dim': tap.feature_dim, 'n_per_class': list(self.n_per_class),
              'shrinkage': tap.shrinkage, 'fit_split': self.fit_split,
              'score': self.score_name, 'description': self.description}
    return {'format': FORMAT, 'threshold': self.threshold, 'policy': self.policy,
            'split': self.split, 'taps': [t.info() for t in self.taps], 'combine': COMBINE,
            'normalised_on': self.normalised_on, 'feature_dim': self.feature_dim,
            'n_per_class': list(self.n_per_class), 'fit_split': self.fit_split,
            'score': self.score_name, 'description': self.description}


def _check_features(features, dim: int | None = None, tap: str = '') -> np.ndarray:
  f = np.asarray(features, np.float64)
  where = f' at tap {tap!r}' if tap else ''
  if f.ndim != 2 or (dim is not None and f.shape[1] != dim):
    want = f'(n, {dim})' if dim is not None else '(n, d)'
    raise errors.UsageError(f'shift features{where} must have shape {want}, got {f.shape}')
  if not np.all(np.isfinite(f)):
    raise errors.DataError(f'shift features{where} hold NaN or infinite values')
  return f


def ledoit_wolf_shrinkage(centred: np.ndarray) -> float:
  """Ledoit-Wolf's shrinkage toward (tr S / d) I for already centred rows (n, d), in [0, 1]."""
  n, d = centred.shape
  s = centred.T @ centred / n
  mu = np.trace(s) / d
  delta = ((s - mu * np.eye(d)) ** 2).sum()
  x2 = centred ** 2
  beta = ((x2.T @ x2).sum() / n - (s ** 2).sum()) / n
  if delta <= 0:
    return 1.0
  return float(np.clip(beta / delta, 0.0, 1.0))


def fit_tap(features, labels, shrinkage: float | str = 'ledoit_wolf',
            name: str = PENULTIMATE) -> TapScore:
  """Class means and one shared, shrunk covariance of one tap's training features (step 1).

  Raises:
    UsageError: bad shapes or shrinkage. DataError: too few images (fewer than 2 beyond the
      number of classes), or non-finite features.
  """
  f = _check_features(features, tap=name)
  y = np.asarray(labels).reshape(-1).astype(np.int64)
  if y.shape[0] != f.shape[0]:
    raise errors.UsageError(f'shift: {f.shape[0]} feature rows but {y.shape[0]} labels')
  classes = np.unique(y)
  if f.shape[0] < classes.size + 2:
    raise errors.DataError(f'shift: {f.shape[0]} images are too few to fit a covariance')
  means = np.stack([f[y == c].mean(axis=0) for c in classes])
  centred = f - means[np.searchsorted(classes, y)]
  if shrinkage == 'ledoit_wolf':
    a = ledoit_wolf_shrinkage(centred)
  else:
    try:
      a = float(shrinkage)
    except (TypeError, ValueError):
      a = -1.0
    if not 0.0 <= a <= 1.0:
      raise errors.UsageError(
          f"shift shrinkage must be 'ledoit_wolf' or a number in [0, 1], got {shrinkage!r}")
  d = f.shape[1]
  s = centred.T @ centred / max(f.shape[0] - classes.size, 1)
  scale = np.trace(s) / d
  if scale <= 0:  # Every image has the same features as its class mean: a dead network.
    scale = 1.0
  s = (1.0 - a) * s + a * scale * np.eye(d)
  eigenvalues, vectors = np.linalg.eigh(s)
  # A floor keeps W finite when a = 0 and the covariance is singular (d > n).
  eigenvalues = np.maximum(eigenvalues, 1e-6 * scale)
  projection = vectors / np.sqrt(eigenvalues)[None, :]
  return TapScore(name=name, projection=projection, centers=means @ projection,
                  class_means=means, shrinkage=float(a))


def _standardised(tap: TapScore, validation) -> TapScore:
  """`tap` with offset and scale = the mean and standard deviation of its validation distances
  (step 2); a spread of zero (one validation image) leaves the scale at 1."""
  distances = tap.distance(validation)
  if not distances.size:
    raise errors.DataError(f'shift: no validation features at tap {tap.name!r}')
  sd = float(distances.std())
  offset = float(distances.mean())
  scale = sd if sd > 1e-12 * max(1.0, abs(offset)) else 1.0
  return dataclasses.replace(tap, offset=offset, scale=scale)


def fit_shift(features, labels, shrinkage: float | str = 'ledoit_wolf',
              fit_split: str = 'train', *, validation=None,
              normalised_on: str = 'validation') -> ShiftModel:
  """The shift score of training features, standardised per tap on validation features.

  Args:
    features: the training images' features: {tap: (n, d_i)} (e.g. Scored.taps, shallow to
      deep; every tap is used, in that order), or one (n, d) array, taken as the penultimate
      features.
    labels: (n,) class labels (0 normal, 1 the positive class); every class present is used.
    shrinkage: 'ledoit_wolf', or a fixed weight a in [0, 1] of the scaled identity.
    fit_split: which split the features came from (recorded in shift.json).
    validation: the validation images' features, in the same form: each tap's distance is
      standardised by its mean and standard deviation there. Without it (one tap only) the
      score is the raw distance.
    normalised_on: the name of the validation split (recorded in shift.json).

  Raises:
    UsageError: bad shapes or shrinkage, several taps without validation features, validation
      features that lack a tap. DataError: too few images, or non-finite features.
  """
  if not isinstance(features, Mapping):
    features = {PENULTIMATE: features}
    if validation is not None and not isinstance(validation, Mapping):
      validation = {PENULTIMATE: validation}
  if not features:
    raise errors.UsageError('shift: no features to fit on')
  if validation is None and len(features) > 1:
    raise errors.UsageError(f'shift: {len(features)} taps need validation features to '
                            'standardise each depth on')
  taps = tuple(fit_tap(f, labels, shrinkage, name=str(name)) for name, f in features.items())
  y = np.asarray(labels).reshape(-1).astype(np.int64)
  model = ShiftModel(taps=taps, n_per_class=tuple(int((y == c).sum()) for c in np.unique(y)),
                     fit_split=fit_split)
  if validation is None:
    return model
  taps = tuple(_standardised(t, f) for t, f in zip(taps, model.tap_features(validation)))
  return dataclasses.replace(model, taps=taps, normalised_on=normalised_on)


def parse_policy(policy: str) -> float:
  """'quantile:0.99' -> 0.99.

  Raises:
    UsageError: naming the string and listing the valid forms.
  """
  def bad(why):
    return errors.UsageError(f'bad shift policy {policy!r}: {why}; valid forms: '
                             + ', '.join(VALID_FORMS))
  if not isinstance(policy, str):
    raise bad('not a string')
  kind, sep, number = policy.strip().lower().partition(':')
  if kind != 'quantile':
    raise bad(f'unknown policy {kind!r}')
  if not sep or not number:
    raise bad('quantile needs a number after the colon')
  try:
    q = float(number)
  except ValueError:
    raise bad(f'{number!r} is not a number') from None
  if not 0.0 < q < 1.0:
    raise bad(f'quantile {q:g} is outside (0, 1)')
  return q


def choose_threshold(shift_model: ShiftModel, scores, policy: str = DEFAULT_POLICY,
                     split: str = 'validation', tap_scores=None) -> ShiftModel:
  """The shift model with its threshold chosen on `scores` (in-distribution images) by policy;
  with `tap_scores` ((n, k), shift_model.tap_scores of the same images), each depth's own
  threshold too (TapScore.threshold, for ShiftModel.single_tap)."""
  q = parse_policy(policy)
  scores = np.asarray(scores, np.float64).reshape(-1)
  if not scores.size:
    raise errors.DataError(f'shift policy {policy!r}: no scores on split {split!r}')
  threshold = float(np.quantile(scores, q))
  taps = shift_model.taps
  if tap_scores is not None:
    tap_scores = np.asarray(tap_scores, np.float64)
    if tap_scores.shape != (scores.size, len(taps)):
      raise errors.UsageError(f'shift tap_scores must have shape ({scores.size}, {len(taps)}), '
                              f'got {tap_scores.shape}')
    taps = tuple(dataclasses.replace(t, threshold=float(np.quantile(tap_scores[:, k], q)))
                 for k, t in enumerate(taps))
  return dataclasses.replace(shift_model, taps=taps, threshold=threshold,
                             policy=f'quantile:{q:g}', split=split)


# --------------------------------------------------------------------------------------------
# Storage: shift.npz (arrays) + shift.json (the rest). No pickle.
# --------------------------------------------------------------------------------------------


def save(shift_model: ShiftModel, folder: str | os.PathLike) -> None:
  """Writes shift.npz and shift.json into `folder` (atomically, each)."""
  folder = os.fspath(folder)
  buffer = io.BytesIO()
  if shift_model.format == 1:
    tap = shift_model.taps[0]
    np.savez(buffer, projection=tap.projection, centers=tap.centers,
             class_means=tap.class_means)
  else:
    arrays = {}
    for i, tap in enumerate(shift_model.taps):
      arrays.update({f'projection_{i}': tap.projection, f'centers_{i}': tap.centers,
                     f'class_means_{i}': tap.class_means})
    np.savez(buffer, **arrays)
  md.write_bytes_atomic(os.path.join(folder, SHIFT_NPZ), buffer.getvalue())
  md.write_json(os.path.join(folder, SHIFT_JSON), shift_model.info())


def exists(folder: str | os.PathLike) -> bool:
  folder = os.fspath(folder)
  return (os.path.isfile(os.path.join(folder, SHIFT_NPZ))
          and os.path.isfile(os.path.join(folder, SHIFT_JSON)))


def _tap_arrays(arrays, suffix: str, npz_path: str, name: str) -> tuple[np.ndarray, ...]:
  projection, centers, class_means = (np.asarray(arrays[k + suffix], np.float64)
                                      for k in ('projection', 'centers', 'class_means'))
  if projection.ndim != 2 or projection.shape[0] != projection.shape[1] or \
      centers.ndim != 2 or centers.shape[1] != projection.shape[1]:
    raise errors.DataError(f'{npz_path}: inconsistent shapes at tap {name!r}: projection '
                           f'{projection.shape}, centers {centers.shape}')
  return projection, centers, class_means


def load(folder: str | os.PathLike) -> ShiftModel | None:
  """The shift model stored in `folder` (format 2, or format 1 as a one-tap ensemble), or None
  when it holds none.

  Raises:
    DataError: naming the file, for a malformed shift.npz or shift.json, or a format newer than
      this covidlib reads.
  """
  folder = os.fspath(folder)
  if not exists(folder):
    return None
  npz_path = os.path.join(folder, SHIFT_NPZ)
  json_path = os.path.join(folder, SHIFT_JSON)
  info = md.read_json(json_path)
  try:
    version = int(info.get('format', 1))
    if version > FORMAT:
      raise errors.DataError(f'{json_path}: shift score format {version}, newer than this '
                             f'covidlib reads ({FORMAT}): upgrade covidlib or refit it with '
                             f'covidlib-fit-shift --model_dir={folder}')
    if info.get('combine', COMBINE) != COMBINE:
      raise ValueError(f'combine {info["combine"]!r} is not {COMBINE!r}')
    described = (info['taps'] if version > 1 else
                 [{'name': PENULTIMATE, 'shrinkage': info.get('shrinkage', 0.0)}])
    with np.load(npz_path, allow_pickle=False) as arrays:
      taps = []
      for i, tap in enumerate(described):
        name = str(tap['name'])
        projection, centers, class_means = _tap_arrays(arrays, f'_{i}' if version > 1 else '',
                                                       npz_path, name)
        taps.append(TapScore(name=name, projection=projection, centers=centers,
                             class_means=class_means, shrinkage=float(tap.get('shrinkage', 0)),
                             offset=float(tap.get('offset', 0.0)),
                             scale=float(tap.get('scale', 1.0)),
                             threshold=None if tap.get('threshold') is None
                             else float(tap['threshold'])))
  except errors.CovidlibError:
    raise
  except Exception as e:  # KeyError, ValueError (pickled content refused), BadZipFile, OSError.
    raise errors.DataError(f'{npz_path}: malformed shift arrays ({type(e).__name__}: '
                           f'{str(e)[:200]})') from None
  if not taps or any(t.scale <= 0 or not np.isfinite(t.scale) for t in taps):
    raise errors.DataError(f'{json_path}: malformed (no taps, or a scale that is not positive)')
  try:
    threshold = info.get('threshold')
    return ShiftModel(taps=tuple(taps),
                      n_per_class=tuple(int(n) for n in info.get('n_per_class', ())),
                      fit_split=str(info.get('fit_split', '')),
                      threshold=None if threshold is None else float(threshold),
                      policy=str(info.get('policy', '')), split=str(info.get('split', '')),
                      normalised_on=str(info.get('normalised_on', '')), format=version)
  except (AttributeError, TypeError, ValueError) as e:
    raise errors.DataError(f'{json_path}: malformed ({e})') from None


def info_json(shift_model: ShiftModel) -> str:
  """shift.json as text (what the TFLite metadata entry holds)."""
  return json.dumps(shift_model.info(), indent=2, sort_keys=True) + '\n'


def remove(folder: str | os.PathLike) -> None:
  """Deletes shift.npz and shift.json from `folder` (a score of another model must not stay)."""
  for name in (SHIFT_NPZ, SHIFT_JSON):
    path = os.path.join(os.fspath(folder), name)
    if os.path.exists(path):
      os.remove(path)


# --------------------------------------------------------------------------------------------
# The `shift` section of covidlib-evaluate's report.
# --------------------------------------------------------------------------------------------

N_HISTOGRAM_BINS = 30


def _as_unit(scores: np.ndarray) -> np.ndarray:
  """The ranks of `scores` scaled into (0, 1): a monotone map (ties kept) of any real scores.

  ROC-AUC depends on the order of scores only, so covidlib.metrics (which wants scores in
  [0, 1]) gives the score's ROC-AUC and its bootstrap interval unchanged.
  """
  scores = np.asarray(scores, np.float64)
  return stats.rankdata(scores) / (scores.size + 1)


def _symlog10(x) -> np.ndarray:
  """sign(x) log10(1 + |x|): the histogram's axis, for standardised scores of either sign that
  run from about -1 to thousands (about log10 for the large ones)."""
  x = np.asarray(x, np.float64)
  return np.sign(x) * np.log10(1.0 + np.abs(x))


def _part_metrics(labels, p, threshold, n_bootstrap, seed) -> dict:
  if not len(labels):
    return {'n': 0}
  result = metrics.compute_metrics(labels, p, threshold, n_bootstrap=n_bootstrap, seed=seed)
  return {'n': int(len(labels)), 'n_covid': int(np.sum(labels)),
          'figures': {k: result.figures[k].as_dict()
                      for k in ('accuracy', 'sensitivity', 'specificity', 'roc_auc')}}


def report_section(shift_model: ShiftModel, scores: np.ndarray, labels: np.ndarray,
                   calibrated_scores: np.ndarray, sources: np.ndarray | None,
                   decision_threshold: float, *,
                   unseen: dict[str, tuple[np.ndarray, str]] | None = None,
                   tap_scores: dict[str, np.ndarray] | None = None,
                   notes: Sequence[str] = (), n_bootstrap: int = 1000, seed: int = 0) -> dict:
  """report['shift']: flagged share per source, answered vs abstained metrics, unseen sources,
  and which depths flag.

  Args:
    shift_model: the fitted score, with a threshold.
    scores: (n,) shift scores of the evaluated split's images (shift_model.score of features).
    labels: (n,) their labels; calibrated_scores: (n,) P(positive) after the decision's
      temperature; sources: (n,) their sources, or None.
    decision_threshold: the operating threshold of P(positive).
    unseen: {source: (shift scores of its normals, dataset)} for sources absent from training:
      how well the score tells them from the evaluated split.
    tap_scores: {'evaluated' or an unseen source: (m, k) shift_model.tap_scores}: the share of
      images above the threshold at each depth (a score over it is flagged by that depth).
    notes: what could not be measured, shown as is.
  """
  threshold = float(shift_model.threshold)
  scores = np.asarray(scores, np.float64)
  flagged = scores > threshold
  section = {
      'score': shift_model.score_name, 'threshold': threshold, 'policy': shift_model.policy,
      'chosen_on': shift_model.split, 'taps': list(shift_model.tap_names),
      'feature_dim': shift_model.feature_dim,
      'n': int(scores.size), 'n_flagged': int(flagged.sum()),
      'share_flagged': float(flagged.mean()),
      'explanation': shift_model.description,
  }
  notes = list(notes)
  if shift_model.format == 1:
    notes.append('this shift score reads the penultimate features only (written by an older '
                 'covidlib); covidlib-fit-shift refits it at several depths of the network')
  if sources is not None and any(sources):
    section['by_source'] = {
        (str(s) or '(unknown)'): {'n': int((sources == s).sum()),
                                  'n_flagged': int(flagged[sources == s].sum()),
                                  'share_flagged': float(flagged[sources == s].mean())}
        for s in sorted(set(sources))}
  section['answered'] = _part_metrics(labels[~flagged], calibrated_scores[~flagged],
                                      decision_threshold, n_bootstrap, seed)
  section['abstained'] = _part_metrics(labels[flagged], calibrated_scores[flagged],
                                       decision_threshold, n_bootstrap, seed)
  section['answered']['description'] = 'images in distribution (shift_score <= threshold)'
  section['abstained']['description'] = ('images flagged out of distribution: what '
                                         '--on_shift=abstain would not answer')

  # Normals of sources never seen in training: does the score tell them from this split?
  groups = {'evaluated': scores}
  unseen_entries = []
  for source, (other, dataset) in (unseen or {}).items():
    other = np.asarray(other, np.float64)
    groups[f'unseen {source}'] = other
    y = np.r_[np.zeros(scores.size, np.int64), np.ones(other.size, np.int64)]
    auc = _part_metrics(y, _as_unit(np.r_[scores, other]), 0.5, n_bootstrap,
                        seed)['figures']['roc_auc']
    unseen_entries.append({
        'source': source, 'dataset': dataset, 'n': int(other.size),
        'n_flagged': int((other > threshold).sum()),
        'share_flagged': float((other > threshold).mean()), 'roc_auc': auc,
        'roc_auc_means': f'shift score: normals of {source} (positive) against the evaluated '
                         'split (negative)'})
  section['unseen_sources'] = unseen_entries
  if tap_scores and len(shift_model.taps) > 1:
    section['depths'] = {
        'taps': list(shift_model.tap_names),
        'means': 'share of the images whose standardised distance at that depth is above the '
                 'threshold (an image is flagged when any depth is)',
        'share_above': {name: np.mean(np.asarray(v) > threshold, axis=0).tolist()
                        for name, v in tap_scores.items()}}
  section['notes'] = notes
  everything = np.concatenate(list(groups.values()))
  edges = np.histogram_bin_edges(_symlog10(everything), N_HISTOGRAM_BINS)
  section['histogram'] = {
      'axis': 'sign(s) log10(1 + |s|) of the shift score s',
      'edges': edges.tolist(), 'threshold': float(_symlog10(threshold)),
      'counts': {name: np.histogram(_symlog10(v), edges)[0].tolist()
                 for name, v in groups.items()}}
  return section


def render_markdown(section: dict, plot: str | None = None) -> list[str]:
  """The "Distribution shift" part of report.md."""
  taps = section.get('taps') or [PENULTIMATE]
  where = (f'{section["feature_dim"]} penultimate features' if taps == [PENULTIMATE] else
           f'{section["feature_dim"]} features at {len(taps)} depths ({", ".join(taps)})')
  out = ['## Distribution shift (out of distribution)', '',
         f'{section["explanation"]}', '',
         f'Score: {section["score"]}, on {where}. '
         f'Threshold {section["threshold"]:.4g} (policy `{section["policy"]}` on split '
         f'`{section["chosen_on"]}`). Flagged here: {section["n_flagged"]} of {section["n"]} '
         f'({section["share_flagged"]:.1%}).', '']
  if section.get('by_source'):
    out += ['| source | n | flagged | share flagged |', '|---|---|---|---|']
    for name, s in section['by_source'].items():
      out.append(f'| {name} | {s["n"]} | {s["n_flagged"]} | {s["share_flagged"]:.1%} |')
    out.append('')
  out += ['| part | n | accuracy | sensitivity | specificity | ROC-AUC |',
          '|---|---|---|---|---|---|']
  for part in ('answered', 'abstained'):
    p = section[part]
    f = p.get('figures', {})
    out.append(f'| {part} ({p.get("description", "")}) | {p["n"]} | '
               + ' | '.join(metrics.format_figure(f.get(k)) for k in
                            ('accuracy', 'sensitivity', 'specificity', 'roc_auc')) + ' |')
  out.append('')
  if section.get('unseen_sources'):
    out += ['| unseen source (normals) | n | flagged | shift-score ROC-AUC vs this split |',
            '|---|---|---|---|']
    for e in section['unseen_sources']:
      out.append(f'| {e["source"]} ({e["dataset"]}) | {e["n"]} | {e["share_flagged"]:.1%} | '
                 f'{metrics.format_figure(e["roc_auc"])} |')
    out.append('')
  if section.get('depths'):
    depths = section['depths']
    groups = list(depths['share_above'])
    out += [f'Which depths flag: {depths["means"]}.', '',
            '| depth | ' + ' | '.join(groups) + ' |', '|---|' + '---|' * len(groups)]
    for k, tap in enumerate(depths['taps']):
      out.append(f'| {tap} | ' + ' | '.join(f'{depths["share_above"][g][k]:.1%}'
                                            for g in groups) + ' |')
    out.append('')
  for note in section.get('notes', []):
    out.append(f'- {note}')
  if section.get('notes'):
    out.append('')
  if plot:
    out += [f'![shift score histogram]({plot})', '']
  out += ['Not flagged does not mean correct: an image like the training images can still be '
          'misclassified, and the score knows only the feature distributions of the training '
          'images.', '']
  return out


def plot_histogram(section: dict, path: str, plt) -> None:
  """The histogram of the shift score per group (symmetric log axis), with the threshold, as a
  PNG."""
  hist = section['histogram']
  edges = np.asarray(hist['edges'])
  fig, ax = plt.subplots(figsize=(5, 3.4))
  for name, counts in hist['counts'].items():
    counts = np.asarray(counts, np.float64)
    ax.stairs(counts / max(counts.sum(), 1), edges, label=f'{name} (n={int(counts.sum())})')
  ax.axvline(hist['threshold'], color='red', linestyle='--', label='threshold')
  ax.set_xlabel('shift score, sign(s) log10(1 + |s|)')
  ax.set_ylabel('share of images')
  ax.set_title('Distribution shift score')
  ax.legend(fontsize=7)
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=100, bbox_inches='tight')
  md.write_bytes_atomic(path, buffer.getvalue())
  plt.close(fig)
