"""Patient-grouped k-fold cross-validation, for comparing models honestly on small data.

    from covidlib import crossval, train
    pool = crossval.load_pool('covid_xray/patient_split', ('train', 'validation'),
                              data_dir='tfds_data', image_size=224)
    config = train.make_config(model='compact_resnet', epochs=10)
    result = crossval.cross_validate(config, 'runs/cv_compact_resnet', pool, n_folds=5)
    result['summary']['roc_auc']      # {'mean', 'sd', 'ci95': [low, high], 'n_folds'}

or `covidlib-crossval --out=runs/cv_compact_resnet --model=compact_resnet --folds=5`
(covidlib/cli/crossval.py).

Groups. Two images share a group when they belong to one patient (same source and non-empty
patient_id) or are near-duplicates (the perceptual hash and threshold the dataset builder uses,
`covidlib_tfds.splitting.group_images`, computed here on the preprocessed images); an image with
neither is its own group. Folds come from scikit-learn's StratifiedGroupKFold (shuffled with
`fold_seed`): a group never sits in two folds, and class shares stay as even as the groups allow.

Each fold trains a fresh model with `covidlib.train.train` on the other folds (the datasets are
passed in; augmentation, seed and every other setting come from the config) into
`out_dir/fold_<k>/`, a normal model_dir, and predicts its own fold. A finished fold whose
config matches is reused, so an interrupted cross-validation picks up where it stopped.

Figures per fold are point values at a fixed threshold (0.5 by default; ROC-AUC, PR-AUC, Brier
and ECE do not depend on it). The summary gives, per figure, the mean over folds and a 95%
t-interval, mean +- t(0.975, k-1) * sd / sqrt(k), clipped to [0, 1] (NLL: to [0, inf)). Folds
share training images, so they are not independent and the interval is somewhat too narrow
(Bengio & Grandvalet, 2004): use it to rank models run on the same folds, not as a promise
about new hospitals. The out-of-fold predictions
of all folds, pooled, also get the full metric set with Wilson / bootstrap intervals.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Sequence

import numpy as np
import tensorflow as tf
from scipy import stats
from sklearn.model_selection import StratifiedGroupKFold

from covidlib import calibration
from covidlib import data
from covidlib import errors
from covidlib import hold_out
from covidlib import metrics
from covidlib import model_dir as md
from covidlib import scoring
from covidlib import shortcuts
from covidlib import threshold as threshold_lib
from covidlib import train
from covidlib_tfds import perceptual_hash
from covidlib_tfds import splitting

CROSSVAL_JSON = 'crossval.json'
CROSSVAL_MD = 'crossval.md'
HOLD_OUT_JSON = hold_out.HOLD_OUT_JSON  # The hold-out report's format: covidlib.hold_out.
HOLD_OUT_MD = hold_out.HOLD_OUT_MD
SUMMARY_FIGURES = ('accuracy', 'sensitivity', 'specificity', 'f1', 'roc_auc', 'pr_auc',
                   'brier', 'ece')


@dataclasses.dataclass
class Pool:
  """All images to cross-validate over, preprocessed, in memory."""
  images: np.ndarray                  # (n, S, S, C) float32 in [0, 1].
  labels: np.ndarray                  # (n,) int64, 1 = COVID-19.
  metadata: dict[str, np.ndarray]     # 'filename', 'source', 'patient_id', ... (strings).
  description: str = ''

  def __len__(self) -> int:
    return int(self.labels.size)


def load_pool(dataset: str, splits: Sequence[str] = ('train', 'validation'), *,
              data_dir: str | None = None, image_size: int = 224, channels: int = 1,
              batch_size: int = 64) -> Pool:
  """Reads and preprocesses every image of `splits` into memory (200 KB each at 224 px, gray).

  Args:
    dataset: 'name/config' of a TFDS dataset or 'folder:ROOT' (ROOT/<split>/{covid,normal}).
    splits: the splits to pool; keep a test split out to stay untouched.
  """
  if not splits:
    raise errors.UsageError('no splits given to cross-validate over')
  parts = []
  for split in splits:
    _, root = scoring.split_location({}, split, dataset)
    if root is not None:
      ds = data.load_folder(root, image_size=image_size, channels=channels,
                            batch_size=batch_size, with_metadata=True, cache=False)
    else:
      ds = data.load_tfds(dataset, split, data_dir=data_dir, image_size=image_size,
                          channels=channels, batch_size=batch_size, with_metadata=True,
                          cache=False)
    parts.append(scoring.read_dataset(ds))
  metadata = {key: np.concatenate([p[2][key] for p in parts]) for key in parts[0][2]}
  return Pool(images=np.concatenate([p[0] for p in parts]),
              labels=np.concatenate([p[1] for p in parts]), metadata=metadata,
              description=f'{dataset} {"+".join(splits)}')


def patient_groups(pool: Pool, near_duplicates: bool = True) -> np.ndarray:
  """One group id per image: same patient, or near-duplicate images, share an id.

  Images without a patient id are grouped by the series their file name names
  (covidlib_tfds.splitting.series_key: extubation-8.jpg and extubation-13.jpg are one case's
  films), as the dataset builders split them, so no fold holds part of a series.
  """
  n = len(pool)
  patient = pool.metadata.get('patient_id', np.full(n, '', dtype=object))
  source = pool.metadata.get('source', np.full(n, '', dtype=object))
  filename = pool.metadata.get('filename', np.full(n, '', dtype=object))
  keys = [f'{s}:{p}' if p else
          splitting.series_group_key(s, splitting.series_key(f))
          if f and splitting.GROUP_SERIES else '' for s, p, f in zip(source, patient, filename)]
  if not near_duplicates:  # A distance of at most -1 bits: no pair is ever near.
    return np.asarray(splitting.group_images(keys, [0] * n, max_bits=-1))
  hashes = [perceptual_hash.image_hash(np.round(image[..., 0] * 255.0)) for image in pool.images]
  return np.asarray(splitting.group_images(keys, hashes))


def make_folds(labels, groups, n_folds: int = 5,
               seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
  """(train indices, validation indices) per fold: StratifiedGroupKFold, shuffled with `seed`."""
  labels = np.asarray(labels)
  groups = np.asarray(groups)
  if not isinstance(n_folds, int) or n_folds < 2:
    raise errors.UsageError(f'number of folds must be an integer >= 2, got {n_folds!r}')
  for label, name in ((0, 'normal'), (1, 'COVID-19')):
    count = len(set(groups[labels == label]))
    if count < n_folds:
      raise errors.UsageError(
          f'{n_folds} folds need at least {n_folds} {name} patient groups; the data has '
          f'{count}')
  splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
  return [(np.sort(tr), np.sort(va))
          for tr, va in splitter.split(np.zeros(labels.size), labels, groups)]


def t_interval(values: Sequence[float], confidence: float = 0.95,
               bounds: tuple[float, float] | None = None) -> dict:
  """Mean, sample sd and the t-interval of the mean over folds (None where undefined).

  `bounds`: the figure's range, e.g. (0, 1); the interval is clipped to it.
  """
  values = np.asarray([v for v in values if v is not None], np.float64)
  k = values.size
  if k == 0:
    return {'mean': None, 'sd': None, 'ci95': [None, None], 'n_folds': 0}
  mean = float(values.mean())
  if k == 1:
    return {'mean': mean, 'sd': None, 'ci95': [None, None], 'n_folds': 1}
  sd = float(values.std(ddof=1))
  half = float(stats.t.ppf(0.5 + confidence / 2, k - 1)) * sd / math.sqrt(k)
  low, high = mean - half, mean + half
  if bounds is not None:
    low, high = max(bounds[0], low), min(bounds[1], high)
  return {'mean': mean, 'sd': sd, 'ci95': [low, high], 'n_folds': int(k)}


def _fold_config(config: dict, description: str, fold: int, n_folds: int) -> dict:
  return train.make_config(**{**config, 'dataset': f'{description} fold {fold}/{n_folds}'})


def _train_fold(config: dict, fold_dir: str, train_data, validation_data, overwrite: bool,
                verbose: int):
  """A finished fold with the same config is reused; otherwise train (or resume) it."""
  model_path = os.path.join(fold_dir, md.MODEL)
  if not overwrite and os.path.exists(model_path):
    saved = md.read_json(os.path.join(fold_dir, md.CONFIG))
    if saved == config:
      return md.load_model(fold_dir), True
  train.train(config, fold_dir, train_data=train_data, validation_data=validation_data,
              overwrite=overwrite, verbose=verbose)
  return md.load_model(fold_dir), False


def cross_validate(config: dict, out_dir: str, pool: Pool, *, n_folds: int = 5,
                   fold_seed: int = 0, threshold: float = 0.5, near_duplicates: bool = True,
                   n_bootstrap: int = metrics.DEFAULT_BOOTSTRAP, overwrite: bool = False,
                   verbose: int = 0) -> dict:
  """Trains and scores one model per fold; writes crossval.json / .md into out_dir.

  Args:
    config: covidlib.train config (model, epochs, batch_size, seed, augment, ...).
    out_dir: fold_<k>/ model_dirs and the reports go here.
    pool: the images (load_pool).
    n_folds, fold_seed: StratifiedGroupKFold settings.
    threshold: label = P >= threshold for the threshold-dependent figures.
    near_duplicates: also group near-duplicate images (not only patients).
    n_bootstrap: for the pooled out-of-fold metrics.
    overwrite: retrain folds that are already finished.

  Returns:
    The report: folds (sizes, groups, figures), summary (mean and t-interval per figure),
    pooled out-of-fold metrics.
  """
  config = train.make_config(**config)
  groups = patient_groups(pool, near_duplicates)
  folds = make_folds(pool.labels, groups, n_folds, fold_seed)
  os.makedirs(out_dir, exist_ok=True)
  batch = config['batch_size']
  oof = np.full(len(pool), np.nan)
  fold_reports = []
  for k, (train_idx, val_idx) in enumerate(folds, start=1):
    fold_config = _fold_config(config, pool.description, k, n_folds)
    seed = config['seed']
    train_data = (tf.data.Dataset.from_tensor_slices(
        (pool.images[train_idx], pool.labels[train_idx].astype(np.float32)))
        .shuffle(train_idx.size, seed=seed, reshuffle_each_iteration=True)
        .batch(batch).prefetch(tf.data.AUTOTUNE))
    val_data = tf.data.Dataset.from_tensor_slices(
        (pool.images[val_idx], pool.labels[val_idx].astype(np.float32))).batch(batch)
    fold_dir = os.path.join(out_dir, f'fold_{k}')
    model, reused = _train_fold(fold_config, fold_dir, train_data, val_data, overwrite, verbose)
    p = scoring.score_images(model, pool.images[val_idx], batch)
    oof[val_idx] = p
    m = metrics.compute_metrics(pool.labels[val_idx], p, threshold, n_bootstrap=0)
    fold_reports.append({
        'fold': k, 'model_dir': fold_dir, 'reused': reused,
        'n_train': int(train_idx.size), 'n_validation': int(val_idx.size),
        'n_validation_covid': int(pool.labels[val_idx].sum()),
        'groups_validation': int(len(set(groups[val_idx]))),
        'figures': {name: est.value for name, est in m.figures.items()},
    })
  summary = {name: t_interval([f['figures'][name] for f in fold_reports],
                             bounds=(0.0, math.inf) if name == 'nll' else (0.0, 1.0))
             for name in metrics.FIGURES}
  pooled = metrics.compute_metrics(pool.labels, oof, threshold, n_bootstrap=n_bootstrap,
                                   seed=fold_seed)
  report = {
      'caveat': ('Research software, not a diagnostic device. Cross-validation on one dataset '
                 'says nothing about patients, scanners or hospitals it does not hold.'),
      'data': {'description': pool.description, 'n': len(pool),
               'n_covid': int(pool.labels.sum()), 'groups': int(len(set(groups)))},
      'config': config, 'n_folds': n_folds, 'fold_seed': fold_seed, 'threshold': threshold,
      'grouping': 'patient + near-duplicate' if near_duplicates else 'patient',
      'folds': fold_reports, 'summary': summary, 'pooled_out_of_fold': pooled.as_dict(),
  }
  md.write_json(os.path.join(out_dir, CROSSVAL_JSON), report)
  md.write_bytes_atomic(os.path.join(out_dir, CROSSVAL_MD), render_markdown(report).encode())
  return report


# --------------------------------------------------------------------------------------------
# Leaving one source out.
# --------------------------------------------------------------------------------------------


def _source_array(pool: Pool) -> np.ndarray:
  return np.asarray(pool.metadata.get('source', np.full(len(pool), '', object)), dtype=object)


def _subset(pool: Pool, mask: np.ndarray, description: str) -> Pool:
  return Pool(images=pool.images[mask], labels=pool.labels[mask],
              metadata={k: v[mask] for k, v in pool.metadata.items()}, description=description)


def training_dataset(pool: Pool, batch_size: int, seed: int | None,
                     balance: str = 'none') -> tf.data.Dataset:
  """Shuffled batches of a pool; balance='source' draws each (source, label) stratum equally.

  Balanced draws keep an epoch at ceil(len(pool) / batch_size) batches, so epochs stay
  comparable with plain training.
  """
  labels = pool.labels.astype(np.float32)
  if balance in ('none', None, False):
    return (tf.data.Dataset.from_tensor_slices((pool.images, labels))
            .shuffle(len(pool), seed=seed, reshuffle_each_iteration=True)
            .batch(batch_size).prefetch(tf.data.AUTOTUNE))
  if balance != 'source':
    raise errors.UsageError(f"balance must be 'none' or 'source', got {balance!r}")
  sources = _source_array(pool)
  strata = sorted(set(zip(sources, pool.labels.tolist())))
  parts = []
  for k, (source, label) in enumerate(strata):
    mask = (sources == source) & (pool.labels == label)
    parts.append(tf.data.Dataset.from_tensor_slices((pool.images[mask], labels[mask]))
                 .shuffle(int(mask.sum()), seed=None if seed is None else seed + k,
                          reshuffle_each_iteration=True).repeat())
  steps = math.ceil(len(pool) / batch_size)
  mixed = tf.data.Dataset.sample_from_datasets(parts, seed=seed,
                                               rerandomize_each_iteration=True)
  return mixed.batch(batch_size).take(steps).prefetch(tf.data.AUTOTUNE)


def hold_out_sources(config: dict, out_dir: str, pools: dict[str, Pool], *,
                     sources: Sequence[str] | None = None, threshold_policy: str = 'youden',
                     calibrate: bool = False, n_bootstrap: int = metrics.DEFAULT_BOOTSTRAP,
                     overwrite: bool = False, verbose: int = 0) -> dict:
  """Trains once per normal source with every image of that source left out; scores it.

  For each source S holding normal images: train on pools['train'] without S, choose the
  operating point on pools['validation'] without S by `threshold_policy`, then report the
  specificity on ALL of S's normal images (every split; none was trained on) and the
  sensitivity on pools['test'] COVID-19 images of other sources at that threshold, plus the
  ROC-AUC of those COVID-19 images against S's normals. A source whose removal leaves no normal
  image to train on is reported as skipped, with the reason.

  Args:
    config: covidlib.train config (the recipe: model, epochs, augmentation, standardization...).
      A 'balance' key of 'source' samples (source, label) strata equally.
    out_dir: holdout_<source>/ model_dirs and hold_out.json / hold_out.md go here.
    pools: {'train', 'validation', 'test'} -> Pool (load_pool of each split).
    sources: the sources to leave out; default every source with a normal image.
  """
  missing = [s for s in ('train', 'validation', 'test') if s not in pools]
  if missing:
    raise errors.UsageError(f'leaving a source out needs the train, validation and test splits; '
                            f'missing {missing}')
  config = train.make_config(**config)
  every = {name: _source_array(pool) for name, pool in pools.items()}
  normal_sources = sorted({s for name, pool in pools.items()
                           for s in every[name][pool.labels == 0]})
  if sources:
    unknown = sorted(set(sources) - set(normal_sources))
    if unknown:
      raise errors.UsageError(f'cannot leave out {unknown}: the normal sources are '
                              f'{normal_sources}')
  description = pools['train'].description.rsplit(' ', 1)[0]
  os.makedirs(out_dir, exist_ok=True)
  batch = config['batch_size']
  entries = []
  for source in sources or normal_sources:
    keep = {name: every[name] != source for name in pools}
    train_pool = _subset(pools['train'], keep['train'], f'{description} without {source}')
    if not np.any(train_pool.labels == 0):
      entries.append({'source': source, 'skipped': (
          f'{source} is the only normal source of the training split: leaving it out leaves '
          'no normal image to train on')})
      continue
    val_pool = _subset(pools['validation'], keep['validation'], '')
    run_config = train.make_config(**{**config, 'dataset': f'{description} without source '
                                                           f'{source}'})
    train_data = training_dataset(train_pool, batch, config['seed'],
                                  config.get('balance', 'none'))
    val_data = tf.data.Dataset.from_tensor_slices(
        (val_pool.images, val_pool.labels.astype(np.float32))).batch(batch)
    run_dir = os.path.join(out_dir, f'holdout_{source or "unknown"}')
    model, reused = _train_fold(run_config, run_dir, train_data, val_data, overwrite, verbose)
    decision, _ = threshold_lib.choose_decision(
        val_pool.labels, scoring.score_images(model, val_pool.images, batch), threshold_policy,
        calibrate, 'validation')
    md.save_decision(run_dir, decision)
    held = [_subset(pool, ~keep[name], '') for name, pool in pools.items()]
    held_labels = np.concatenate([h.labels for h in held])
    held_p = np.concatenate([scoring.score_images(model, h.images, batch) for h in held])
    test = pools['test']
    covid_mask = keep['test'] & (test.labels == 1)
    covid_p = scoring.score_images(model, test.images[covid_mask], batch)
    t = decision.threshold

    def calibrated(p):
      return calibration.apply_temperature(p, decision.temperature)

    normal_p = calibrated(held_p[held_labels == 0])
    covid_cal = calibrated(covid_p)
    entry = {
        'source': source, 'how': 'left out of training (covidlib-crossval --hold_out=source)',
        'data': f'{description}: every split, images of source {source}',
        'model_dir': run_dir, 'reused': reused, 'n_train': len(train_pool),
        'policy': decision.policy, 'threshold': t, 'temperature': decision.temperature,
        'n_normal': int(normal_p.size),
        'specificity': metrics.proportion(int((normal_p < t).sum()), int(normal_p.size),
                                          'normal images').as_dict(),
        'n_covid': int(covid_p.size),
        'sensitivity': metrics.proportion(int((covid_cal >= t).sum()), int(covid_p.size),
                                          'COVID-19 images').as_dict(),
        'sensitivity_data': f'{description} test split, COVID-19 images of other sources',
        'roc_auc_covid_vs_these_normals': (metrics.compute_metrics(
            np.concatenate([np.ones(covid_p.size), np.zeros(normal_p.size)]),
            np.concatenate([covid_p, held_p[held_labels == 0]]), 0.5, n_bootstrap=n_bootstrap,
        ).figures['roc_auc'].as_dict() if covid_p.size and normal_p.size else None),
    }
    if np.any(held_labels == 1):  # A source holding both classes (e.g. a user's own site).
      entry['n_covid_in_source'] = int((held_labels == 1).sum())
      entry['sensitivity_in_source'] = metrics.proportion(
          int((calibrated(held_p[held_labels == 1]) >= t).sum()), int((held_labels == 1).sum()),
          'COVID-19 images').as_dict()
    entry['meets_target'] = shortcuts.meets_target(entry)
    entries.append(entry)
  report = {
      'caveat': ('Research software, not a diagnostic device. Each figure is one training run '
                 'on one source left out; a few hundred images, so intervals are wide.'),
      'data': description, 'config': config, 'threshold_policy': threshold_policy,
      'calibrate': calibrate, 'held_out': entries,
  }
  hold_out.write(out_dir, report)
  return report


def render_markdown(report: dict) -> str:
  def fmt(v):
    return '—' if v is None else f'{v:.3f}'

  c = report['config']
  out = [f'# Cross-validation: {c["model"]} on {report["data"]["description"]}', '',
         f'> **{report["caveat"]}**', '',
         f'{report["n_folds"]} folds (StratifiedGroupKFold, seed {report["fold_seed"]}, groups: '
         f'{report["grouping"]}) over {report["data"]["n"]} images '
         f'({report["data"]["n_covid"]} COVID-19) in {report["data"]["groups"]} groups. '
         f'{c["epochs"]} epochs, batch {c["batch_size"]}, learning rate {c["learning_rate"]:g}, '
         f'{c["image_size"]} px, seed {c["seed"]}. Threshold {report["threshold"]:g}.', '',
         '## Mean over folds with 95% t-interval', '',
         '| Figure | Mean | SD | 95% interval | ' +
         ' | '.join(f'fold {f["fold"]}' for f in report['folds']) + ' |',
         '|---|---|---|---|' + '---|' * len(report['folds'])]
  for name in SUMMARY_FIGURES:
    s = report['summary'][name]
    low, high = s['ci95']
    interval = '—' if low is None else f'[{low:.3f}, {high:.3f}]'
    out.append(f'| {name} | {fmt(s["mean"])} | {fmt(s["sd"])} | {interval} | ' +
               ' | '.join(fmt(f['figures'][name]) for f in report['folds']) + ' |')
  out += ['', 'Folds share training images, so the t-interval is somewhat too narrow: compare '
          'models on the same folds with it, do not read it as external validity.', '',
          '## Folds', '', '| fold | train | validation (COVID-19) | groups in validation | '
          'model_dir |', '|---|---|---|---|---|']
  for f in report['folds']:
    out.append(f'| {f["fold"]} | {f["n_train"]} | {f["n_validation"]} '
               f'({f["n_validation_covid"]}) | {f["groups_validation"]} | `{f["model_dir"]}`'
               + (' (reused)' if f['reused'] else '') + ' |')
  pooled = report['pooled_out_of_fold']['figures']
  out += ['', '## Pooled out-of-fold predictions', '', '| Figure | Value | 95% interval |',
          '|---|---|---|']
  for name in SUMMARY_FIGURES:
    low, high = pooled[name]['ci95']
    out.append(f'| {name} | {fmt(pooled[name]["value"])} | '
               + ('—' if low is None else f'[{low:.3f}, {high:.3f}]') + ' |')
  return '\n'.join(out) + '\n'
