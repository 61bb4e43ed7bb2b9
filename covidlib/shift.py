"""Distribution shift: a score saying how unlike the training images an image is.

    from covidlib import scoring, shift
    features = scoring.penultimate_features(model, train_images)        # (n, d)
    shift_model = shift.fit_shift(features, train_labels)                # Mahalanobis, shrunk
    shift_model = shift.choose_threshold(shift_model, shift_model.score(val_features),
                                         'quantile:0.99', split='validation')
    shift.save(shift_model, 'runs/compact_resnet')                       # shift.npz + shift.json
    score = shift.load('runs/compact_resnet').score(features)            # (n,) float64

or, for a model_dir trained before this existed:

    covidlib-fit-shift --model_dir=runs/compact_resnet [--policy=quantile:0.99]

Fitting it on a model_dir's splits (covidlib-train's end-of-training hook and
covidlib-fit-shift) is `covidlib.shift_fit`; this module is numpy only: it fits, scores, stores
and reports on arrays of features.

The score (issue #10). The features are the input of the model's final Dense 'logit' layer
(`covidlib.scoring.penultimate_features`). On the training images each class c gets its mean
mu_c; all classes share one covariance S of the class-centred features, shrunk toward a scaled
identity, S' = (1 - a) S + a (tr S / d) I, with `a` chosen by Ledoit-Wolf (or fixed). The score
of an image is its squared Mahalanobis distance to the nearest class mean:

    score(f) = min_c (f - mu_c)^T S'^-1 (f - mu_c) = min_c || f W - m_c ||^2

with W = V diag(lambda)^-1/2 (S' = V diag(lambda) V^T, so W is d x d) and m_c = mu_c W. That
second form, a matrix product, a subtraction, a sum of squares and a minimum, is what the
SavedModel and TFLite exports compute in-graph (`exporters.serving.shift_score_tf`). An image is `in_distribution`
when score <= threshold; the threshold is chosen on the validation split by a named policy:

  quantile:Q   the Q-quantile (0 < Q < 1) of the validation images' scores, e.g. quantile:0.99:
               about 1% of images like the validation ones are flagged.

What it means: the image's features lie farther from the training images' than almost all
validation images' do. What it does not: a low score is no promise that the answer is right
(an in-distribution image can still be misclassified), and the score only knows the feature
distribution of the training images, so a shift the network's features do not see (one that
leaves them unchanged) goes unnoticed.

Stored in the model_dir beside decision.json, with no pickle:
  shift.npz    arrays: projection W (d, d) float64, centers m_c (C, d) float64,
               class_means mu_c (C, d) float64 (np.savez, read with allow_pickle=False).
  shift.json   {"threshold", "policy", "split", "feature_dim", "n_per_class", "shrinkage",
                "fit_split", "score", "description"}.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os

import numpy as np

from covidlib import errors
from covidlib import metrics
from covidlib import model_dir as md

SHIFT_NPZ = 'shift.npz'
SHIFT_JSON = 'shift.json'
DEFAULT_POLICY = 'quantile:0.99'
VALID_FORMS = ('quantile:Q (0 < Q < 1, e.g. quantile:0.99)',)
SCORE_NAME = 'squared Mahalanobis distance to the nearest class mean (shared shrunk covariance)'
DESCRIPTION = (
    'shift_score: how unlike the training images an image is, as the squared Mahalanobis '
    'distance of its penultimate-layer features to the nearest class mean of the training '
    'images. in_distribution: shift_score <= threshold. Flagged (out of distribution) means '
    'the image is unlike what the model learned from, so its answer should not be trusted. '
    'Not flagged does not mean the answer is right.')


@dataclasses.dataclass(frozen=True)
class ShiftModel:
  """A fitted shift score: score(f) = min_c ||f W - m_c||^2; flagged when > threshold."""
  projection: np.ndarray       # W, (d, d) float64: the whitening of the shrunk covariance.
  centers: np.ndarray          # m_c = mu_c W, (C, d) float64.
  class_means: np.ndarray      # mu_c, (C, d) float64 (for reference; not needed to score).
  n_per_class: tuple[int, ...]
  shrinkage: float
  fit_split: str = 'train'
  threshold: float | None = None
  policy: str = ''
  split: str = ''

  @property
  def feature_dim(self) -> int:
    return int(self.projection.shape[0])

  def score(self, features) -> np.ndarray:
    """(n, d) features -> (n,) float64 squared Mahalanobis distance to the nearest class."""
    f = _check_features(features, self.feature_dim)
    z = f @ self.projection
    distances = ((z[:, None, :] - self.centers[None, :, :]) ** 2).sum(-1)
    return distances.min(axis=1)

  def in_distribution(self, scores) -> np.ndarray:
    """scores <= threshold; UsageError when no threshold was chosen."""
    if self.threshold is None:
      raise errors.UsageError('the shift model has no threshold: choose one with '
                              'covidlib.shift.choose_threshold (or covidlib-fit-shift)')
    return np.asarray(scores) <= self.threshold

  def info(self) -> dict:
    """shift.json's content."""
    return {'threshold': self.threshold, 'policy': self.policy, 'split': self.split,
            'feature_dim': self.feature_dim, 'n_per_class': list(self.n_per_class),
            'shrinkage': self.shrinkage, 'fit_split': self.fit_split, 'score': SCORE_NAME,
            'description': DESCRIPTION}


def _check_features(features, dim: int | None = None) -> np.ndarray:
  f = np.asarray(features, np.float64)
  if f.ndim != 2 or (dim is not None and f.shape[1] != dim):
    want = f'(n, {dim})' if dim is not None else '(n, d)'
    raise errors.UsageError(f'shift features must have shape {want}, got {f.shape}')
  if not np.all(np.isfinite(f)):
    raise errors.DataError('shift features hold NaN or infinite values')
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


def fit_shift(features, labels, shrinkage: float | str = 'ledoit_wolf',
              fit_split: str = 'train') -> ShiftModel:
  """Class means and one shared, shrunk covariance of the training features.

  Args:
    features: (n, d) penultimate features of the training images.
    labels: (n,) class labels (0 normal, 1 COVID-19); every class present is used.
    shrinkage: 'ledoit_wolf', or a fixed weight a in [0, 1] of the scaled identity.
    fit_split: which split the features came from (recorded in shift.json).

  Raises:
    UsageError: bad shapes or shrinkage. DataError: too few images (fewer than 2 beyond the
      number of classes), or non-finite features.
  """
  f = _check_features(features)
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
  return ShiftModel(projection=projection, centers=means @ projection, class_means=means,
                    n_per_class=tuple(int((y == c).sum()) for c in classes),
                    shrinkage=float(a), fit_split=fit_split)


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
                     split: str = 'validation') -> ShiftModel:
  """The shift model with its threshold chosen on `scores` (in-distribution images) by policy."""
  q = parse_policy(policy)
  scores = np.asarray(scores, np.float64).reshape(-1)
  if not scores.size:
    raise errors.DataError(f'shift policy {policy!r}: no scores on split {split!r}')
  threshold = float(np.quantile(scores, q))
  return dataclasses.replace(shift_model, threshold=threshold, policy=f'quantile:{q:g}',
                             split=split)


# --------------------------------------------------------------------------------------------
# Storage: shift.npz (arrays) + shift.json (the rest). No pickle.
# --------------------------------------------------------------------------------------------


def save(shift_model: ShiftModel, folder: str | os.PathLike) -> None:
  """Writes shift.npz and shift.json into `folder` (atomically, each)."""
  folder = os.fspath(folder)
  buffer = io.BytesIO()
  np.savez(buffer, projection=shift_model.projection, centers=shift_model.centers,
           class_means=shift_model.class_means)
  md.write_bytes_atomic(os.path.join(folder, SHIFT_NPZ), buffer.getvalue())
  md.write_json(os.path.join(folder, SHIFT_JSON), shift_model.info())


def exists(folder: str | os.PathLike) -> bool:
  folder = os.fspath(folder)
  return (os.path.isfile(os.path.join(folder, SHIFT_NPZ))
          and os.path.isfile(os.path.join(folder, SHIFT_JSON)))


def load(folder: str | os.PathLike) -> ShiftModel | None:
  """The shift model stored in `folder`, or None when it holds none.

  Raises:
    DataError: naming the file, for a malformed shift.npz or shift.json.
  """
  folder = os.fspath(folder)
  if not exists(folder):
    return None
  npz_path = os.path.join(folder, SHIFT_NPZ)
  info = md.read_json(os.path.join(folder, SHIFT_JSON))
  try:
    with np.load(npz_path, allow_pickle=False) as arrays:
      projection = np.asarray(arrays['projection'], np.float64)
      centers = np.asarray(arrays['centers'], np.float64)
      class_means = np.asarray(arrays['class_means'], np.float64)
  except Exception as e:  # KeyError, ValueError (pickled content refused), BadZipFile, OSError.
    raise errors.DataError(f'{npz_path}: malformed shift arrays ({type(e).__name__}: '
                           f'{str(e)[:200]})') from None
  if projection.ndim != 2 or projection.shape[0] != projection.shape[1] or \
      centers.ndim != 2 or centers.shape[1] != projection.shape[1]:
    raise errors.DataError(f'{npz_path}: inconsistent shapes: projection {projection.shape}, '
                           f'centers {centers.shape}')
  try:
    threshold = info.get('threshold')
    return ShiftModel(projection=projection, centers=centers, class_means=class_means,
                      n_per_class=tuple(int(n) for n in info.get('n_per_class', ())),
                      shrinkage=float(info.get('shrinkage', 0.0)),
                      fit_split=str(info.get('fit_split', '')),
                      threshold=None if threshold is None else float(threshold),
                      policy=str(info.get('policy', '')), split=str(info.get('split', '')))
  except (AttributeError, TypeError, ValueError) as e:
    raise errors.DataError(f'{os.path.join(folder, SHIFT_JSON)}: malformed ({e})') from None


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


def _as_unit(scores: np.ndarray, threshold: float) -> np.ndarray:
  """s / (s + threshold): a monotone map of scores >= 0 into [0, 1), threshold -> 0.5.

  ROC-AUC depends on the order of scores only, so covidlib.metrics (which wants scores in
  [0, 1]) gives the score's ROC-AUC and its bootstrap interval unchanged.
  """
  scores = np.maximum(np.asarray(scores, np.float64), 0.0)
  return scores / (scores + max(threshold, 1e-12))


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
                   notes: list[str] = (), n_bootstrap: int = 1000, seed: int = 0) -> dict:
  """report['shift']: flagged share per source, answered vs abstained metrics, unseen sources.

  Args:
    shift_model: the fitted score, with a threshold.
    scores: (n,) shift scores of the evaluated split's images (shift_model.score of features).
    labels: (n,) their labels; calibrated_scores: (n,) P(positive) after the decision's
      temperature; sources: (n,) their sources, or None.
    decision_threshold: the operating threshold of P(positive).
    unseen: {source: (shift scores of its normals, dataset)} for sources absent from training:
      how well the score tells them from the evaluated split.
    notes: what could not be measured, shown as is.
  """
  threshold = float(shift_model.threshold)
  scores = np.asarray(scores, np.float64)
  flagged = scores > threshold
  section = {
      'score': SCORE_NAME, 'threshold': threshold, 'policy': shift_model.policy,
      'chosen_on': shift_model.split, 'feature_dim': shift_model.feature_dim,
      'n': int(scores.size), 'n_flagged': int(flagged.sum()),
      'share_flagged': float(flagged.mean()),
      'explanation': DESCRIPTION,
  }
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
  notes = list(notes)
  for source, (other, dataset) in (unseen or {}).items():
    other = np.asarray(other, np.float64)
    groups[f'unseen {source}'] = other
    y = np.r_[np.zeros(scores.size, np.int64), np.ones(other.size, np.int64)]
    auc = _part_metrics(y, _as_unit(np.r_[scores, other], threshold), 0.5, n_bootstrap,
                        seed)['figures']['roc_auc']
    unseen_entries.append({
        'source': source, 'dataset': dataset, 'n': int(other.size),
        'n_flagged': int((other > threshold).sum()),
        'share_flagged': float((other > threshold).mean()), 'roc_auc': auc,
        'roc_auc_means': f'shift score: normals of {source} (positive) against the evaluated '
                         'split (negative)'})
  section['unseen_sources'] = unseen_entries
  section['notes'] = notes
  everything = np.concatenate(list(groups.values()))
  edges = np.histogram_bin_edges(np.log10(np.maximum(everything, 1e-6)), N_HISTOGRAM_BINS)
  section['histogram'] = {
      'log10_edges': edges.tolist(), 'log10_threshold': float(np.log10(max(threshold, 1e-6))),
      'counts': {name: np.histogram(np.log10(np.maximum(v, 1e-6)), edges)[0].tolist()
                 for name, v in groups.items()}}
  return section


def render_markdown(section: dict, plot: str | None = None) -> list[str]:
  """The "Distribution shift" part of report.md."""
  out = ['## Distribution shift (out of distribution)', '',
         f'{section["explanation"]}', '',
         f'Score: {section["score"]}, on {section["feature_dim"]} penultimate features. '
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
  for note in section.get('notes', []):
    out.append(f'- {note}')
  if section.get('notes'):
    out.append('')
  if plot:
    out += [f'![shift score histogram]({plot})', '']
  out += ['Not flagged does not mean correct: an image like the training images can still be '
          'misclassified, and the score knows only the feature distribution of the training '
          'images.', '']
  return out


def plot_histogram(section: dict, path: str, plt) -> None:
  """The histogram of log10(shift score) per group, with the threshold, as a PNG."""
  hist = section['histogram']
  edges = np.asarray(hist['log10_edges'])
  fig, ax = plt.subplots(figsize=(5, 3.4))
  for name, counts in hist['counts'].items():
    counts = np.asarray(counts, np.float64)
    ax.stairs(counts / max(counts.sum(), 1), edges, label=f'{name} (n={int(counts.sum())})')
  ax.axvline(hist['log10_threshold'], color='red', linestyle='--', label='threshold')
  ax.set_xlabel('log10 shift score')
  ax.set_ylabel('share of images')
  ax.set_title('Distribution shift score')
  ax.legend(fontsize=7)
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=100, bbox_inches='tight')
  md.write_bytes_atomic(path, buffer.getvalue())
  plt.close(fig)
