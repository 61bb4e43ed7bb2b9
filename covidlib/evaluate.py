"""Evaluating a trained model: predictions on a split, the operating point, metrics, Grad-CAM.

    from covidlib import evaluate
    result = evaluate.evaluate_model_dir('runs/compact_resnet', split='test',
                                         threshold_policy='youden', calibrate=True)
    result.report['metrics']['figures']['sensitivity']    # {'value', 'ci95', 'method'}

or from the shell, with report.json, report.md and plots written to --out:

    covidlib-evaluate --model_dir=runs/compact_resnet --dataset=covid_xray/patient_split \\
        --split=test --threshold_policy=youden --calibrate --out=runs/compact_resnet/eval

Order of operations when an operating point is chosen (`threshold_policy` or `calibrate`):
  1. predict the threshold split (default 'validation');
  2. if `calibrate`: fit the temperature T there (`covidlib.calibration`);
  3. choose the threshold there by the policy, on the calibrated scores;
  4. store Decision(threshold, policy, T, split) as model_dir/decision.json (unless told not to),
     which `covidlib.predict` and the exports then apply.
Otherwise the decision already in model_dir is used (threshold 0.5, T = 1 if there is none).
The evaluation split is then predicted, calibrated with T, and labelled score >= threshold.

Distribution shift: when the model_dir holds a shift score (`covidlib.shift`), report['shift']
gives the share flagged per source, metrics on answered vs abstained images, the histogram of
scores and the score's ROC-AUC for normals of unseen sources against the evaluated split.

Metrics and intervals: `covidlib.metrics`. Grad-CAM: `covidlib.explain`, run on every evaluated
image (up to MAX_GRADCAM images) for the lung-focus score, and shown for the most confident
errors (false positives with the highest P(COVID-19), false negatives with the lowest), then
the most confident correct predictions to fill the grid.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np
import tensorflow as tf

from covidlib import calibration
from covidlib import errors
from covidlib import explain
from covidlib import metrics
from covidlib import model_dir as md
from covidlib import threshold as threshold_lib

CAVEAT = ('Research software, not a diagnostic device. These figures describe one model on one '
          'dataset; they do not show that it works on patients, scanners or hospitals it has '
          'not seen.')
METADATA_KEYS = ('filename', 'source', 'view', 'patient_id', 'age')
MAX_GRADCAM = 2000  # Grad-CAM costs one forward and backward pass per image.
GRID_SIZE = 8


@dataclasses.dataclass
class Predictions:
  """What a model said about one split."""
  labels: np.ndarray                      # (n,) int64, 1 = COVID-19.
  scores: np.ndarray                      # (n,) float64, the model's raw P(COVID-19).
  metadata: dict[str, np.ndarray]         # Per-example features, e.g. 'filename', 'source'.
  images: np.ndarray | None = None        # (n, S, S, C) float32 model inputs, if kept.

  def __len__(self) -> int:
    return int(self.labels.size)


@dataclasses.dataclass
class Evaluation:
  report: dict                            # JSON-ready; see evaluate_predictions.
  predictions: Predictions                # On the evaluation split (scores uncalibrated).
  calibrated_scores: np.ndarray
  decision: md.Decision
  heatmaps: np.ndarray | None             # Grad-CAM of the first MAX_GRADCAM images.
  grid_indices: list[int]                 # Which images the Grad-CAM grid shows.


def _text(values) -> np.ndarray:
  return np.asarray([v.decode('utf-8', 'replace') if isinstance(v, bytes) else str(v)
                     for v in np.asarray(values).reshape(-1)], dtype=object)


def predict_dataset(model, dataset: tf.data.Dataset, keep_images: bool = False) -> Predictions:
  """Runs `model` over a batched dataset of (image, label) or (image, label, metadata dict)."""
  labels, scores, images = [], [], []
  metadata: dict[str, list] = {}
  for element in dataset:
    if not isinstance(element, (tuple, list)) or len(element) not in (2, 3):
      raise errors.UsageError(
          'evaluation data must yield (image, label) or (image, label, metadata) batches')
    image, label = element[0], element[1]
    if image.shape.rank != 4:
      raise errors.UsageError(
          f'evaluation data must be batched (batch, height, width, channels), got {image.shape}')
    p = model(image, training=False)
    scores.append(np.asarray(p, np.float64).reshape(-1))
    labels.append(np.asarray(label).reshape(-1).astype(np.int64))
    if keep_images:
      images.append(np.asarray(image, np.float32))
    if len(element) == 3:
      for key, value in element[2].items():
        metadata.setdefault(key, []).append(np.asarray(value).reshape(-1))
  if not labels:
    raise errors.DataError('the evaluation data holds no examples')
  meta = {}
  for key, parts in metadata.items():
    values = np.concatenate(parts)
    meta[key] = values if values.dtype.kind in 'iuf' else _text(values)
  return Predictions(labels=np.concatenate(labels), scores=np.concatenate(scores),
                     metadata=meta, images=np.concatenate(images) if keep_images else None)


def load_split(config: dict, split: str, *, dataset: str | None = None,
               data_dir: str | None = None, folder: str | None = None,
               batch_size: int = 32) -> tuple[tf.data.Dataset, str]:
  """The dataset to evaluate, preprocessed as the model was trained; and a description.

  Args:
    config: the model_dir's config.json (image_size, channels, dataset, data_dir).
    split: a split name of the dataset.
    dataset: 'name/config' of a TFDS dataset or 'folder:ROOT' (ROOT/<split>/{covid,normal});
      default: the one the model was trained on.
    data_dir: TFDS data_dir; default: the training one.
    folder: ROOT/{covid,normal}/* to evaluate instead of a dataset (split is then ignored).
  """
  from covidlib import data  # Deferred: the metric functions above need no input pipeline.

  common = dict(image_size=int(config['image_size']), channels=int(config.get('channels', 1)),
                batch_size=batch_size)
  if folder:
    if not os.path.isdir(folder):
      raise errors.UsageError(f'folder {folder!r} does not exist or is not a directory')
    return data.load_folder(folder, with_metadata=True, **common), f'folder {folder}'
  dataset = dataset or config.get('dataset')
  if not dataset:
    raise errors.UsageError('no dataset given and the model_dir config names none')
  if dataset.startswith('folder:'):
    root = os.path.join(dataset[len('folder:'):], split)
    if not os.path.isdir(root):
      raise errors.UsageError(f'split folder {root!r} does not exist (dataset {dataset!r})')
    return data.load_folder(root, with_metadata=True, **common), f'folder {root}'
  data_dir = data_dir or config.get('data_dir')
  return (data.load_tfds(dataset, split, data_dir=data_dir, with_metadata=True, **common),
          f'{dataset} split {split}')


def choose_decision(labels, scores, policy: str | None, calibrate: bool,
                    split: str) -> tuple[md.Decision, dict]:
  """Temperature (if `calibrate`), then the threshold by `policy` on the calibrated scores.

  Returns the Decision and a JSON-ready account of how it was chosen.
  """
  policy = policy or 'fixed:0.5'
  threshold_lib.parse_policy(policy)  # A bad policy fails before any fitting.
  account: dict = {'split': split, 'n': int(np.size(labels))}
  temperature = 1.0
  if calibrate:
    fit = calibration.fit_temperature(labels, scores)
    temperature = fit.temperature
    account['temperature_fit'] = fit.as_dict()
    scores = calibration.apply_temperature(scores, temperature)
  choice = threshold_lib.choose_threshold(labels, scores, policy)
  account['threshold_choice'] = choice.as_dict()
  return md.Decision(threshold=choice.threshold, policy=choice.policy,
                     temperature=float(temperature), split=split), account


def select_for_grid(labels: np.ndarray, scores: np.ndarray, threshold: float,
                    size: int = GRID_SIZE) -> tuple[list[int], str]:
  """The most confident errors first, then (to fill `size`) the most confident correct ones.

  Confidence is the certainty of the label given: P for a COVID-19 call, 1 - P for a normal one.
  """
  predicted = scores >= threshold
  correct = predicted == (labels == 1)
  confidence = np.where(predicted, scores, 1.0 - scores)
  wrong = np.flatnonzero(~correct)
  right = np.flatnonzero(correct)
  wrong = wrong[np.argsort(-confidence[wrong], kind='stable')][:size]
  right = right[np.argsort(-confidence[right], kind='stable')][:size - wrong.size]
  parts = []
  if wrong.size:
    parts.append(f'the {wrong.size} most confident errors')
  if right.size:
    parts.append(f'the {right.size} most confident correct predictions')
  return np.concatenate([wrong, right]).tolist(), ', then '.join(parts)


def _lung_focus_summary(heatmaps: np.ndarray, labels: np.ndarray,
                        groups: dict[str, np.ndarray]) -> dict:
  scores = np.array([np.nan if (s := explain.lung_focus_score(h)) is None else s
                     for h in heatmaps])

  def summary(mask):
    values = scores[mask]
    values = values[~np.isnan(values)]
    return {'n': int(values.size), 'mean': float(values.mean()) if values.size else None}

  out = {'region_share': explain.lung_region_share(*heatmaps.shape[1:3]),
         'empty_maps': int(np.isnan(scores).sum()),  # No positive evidence: no score.
         'all': summary(np.ones(scores.shape, bool)),
         'by_label': {name: summary(labels[:scores.size] == i)
                      for i, name in enumerate(('normal', 'covid'))}}
  for feature, values in groups.items():
    values = values[:scores.size]
    out[f'by_{feature}'] = {(v or '(unknown)'): summary(values == v) for v in sorted(set(values))}
  return out


def default_groups(predictions: Predictions) -> list[str]:
  """['source'] when the data says where images come from (a TFDS split), else []."""
  sources = predictions.metadata.get('source')
  return ['source'] if sources is not None and any(sources) else []


def evaluate_predictions(predictions: Predictions, decision: md.Decision, *,
                         group_by: Sequence[str] | None = None,
                         n_bootstrap: int = metrics.DEFAULT_BOOTSTRAP, seed: int = 0,
                         n_bins: int = metrics.DEFAULT_BINS) -> dict:
  """Metrics, per-group metrics and calibration of one split's predictions under a decision."""
  raw = predictions.scores
  scores = (calibration.apply_temperature(raw, decision.temperature)
            if decision.temperature != 1.0 else raw)
  options = dict(n_bootstrap=n_bootstrap, seed=seed, n_bins=n_bins)
  group_by = default_groups(predictions) if group_by is None else [g for g in group_by if g]
  overall = metrics.compute_metrics(predictions.labels, scores, decision.threshold, **options)
  missing = [g for g in group_by if g not in predictions.metadata]
  if missing:
    raise errors.UsageError(
        f'cannot group by {missing}: the evaluation data has '
        f'{sorted(predictions.metadata) or "no metadata"}')
  groups = metrics.metrics_by_group(
      predictions.labels, scores, {g: predictions.metadata[g] for g in group_by},
      decision.threshold, **options)
  report = {
      'metrics': overall.as_dict(),
      'groups': {feature: {value: m.as_dict() for value, m in by_value.items()}
                 for feature, by_value in groups.items()},
      'calibration': {
          'temperature': decision.temperature,
          'n_bins': n_bins,
          'ece_before': float(metrics.ece(predictions.labels, raw, n_bins)[0]),
          'ece_after': float(metrics.ece(predictions.labels, scores, n_bins)[0]),
          'nll_before': float(metrics.nll(predictions.labels, raw)[0]),
          'nll_after': float(metrics.nll(predictions.labels, scores)[0]),
          'reliability_before': metrics.reliability_bins(predictions.labels, raw, n_bins),
          'reliability_after': metrics.reliability_bins(predictions.labels, scores, n_bins),
      },
      'bootstrap': {'n': n_bootstrap, 'seed': seed, 'stratified': True},
  }
  return report


def evaluate_model_dir(model_dir: str, *, split: str = 'test', dataset: str | None = None,
                       data_dir: str | None = None, folder: str | None = None,
                       eval_data: tf.data.Dataset | None = None,
                       threshold_data: tf.data.Dataset | None = None,
                       threshold_policy: str | None = None,
                       threshold_split: str = 'validation', calibrate: bool = False,
                       write_decision: bool = True, group_by: Sequence[str] | None = None,
                       n_bootstrap: int = metrics.DEFAULT_BOOTSTRAP, seed: int = 0,
                       n_bins: int = metrics.DEFAULT_BINS, gradcam: bool = True,
                       gradcam_layer: str | None = None, batch_size: int = 32,
                       shortcut_options: dict | None = None) -> Evaluation:
  """Evaluates a model_dir on a split (or a folder, or datasets passed in).

  Args:
    model_dir: a finished covidlib-train run (config.json + model.keras).
    split, dataset, data_dir, folder: what to evaluate (see load_split).
    eval_data, threshold_data: batched datasets of (image, label[, metadata]) to use instead of
      loading `split` / `threshold_split`.
    threshold_policy: choose the threshold on `threshold_split` by this policy
      (covidlib.threshold); None keeps the model_dir's decision unless `calibrate`.
    calibrate: fit a temperature on `threshold_split` first.
    write_decision: store a newly chosen decision as model_dir/decision.json.
    group_by: metadata features for the per-group tables (e.g. ['source', 'view']); None:
      'source' when the data has it (TFDS splits), nothing for folders.
    n_bootstrap, seed, n_bins: see covidlib.metrics.
    gradcam: compute Grad-CAM maps (lung-focus scores and the grid).
    shortcut_options: add the `shortcuts` section (covidlib.shortcuts.for_model_dir keyword
      arguments, e.g. {'other_dataset': 'auto', 'unseen': 'auto', 'held_out_reports': []});
      None leaves it out.

  Raises:
    UsageError: a bad model_dir, policy, split or grouping feature.
    DataError: empty data, or a split that cannot support the policy.
  """
  model_dir = md.check_model_dir(model_dir)
  config = md.load_config(model_dir)
  model = md.load_model(model_dir)
  if threshold_policy is not None:
    threshold_lib.parse_policy(threshold_policy)
  unknown = [g for g in (group_by or ()) if g not in METADATA_KEYS]
  if unknown:
    raise errors.UsageError(f'cannot group by {unknown}: valid features are '
                            f'{", ".join(METADATA_KEYS)}')
  source_note = {}

  # ------------------------------------------------------------ The operating point.
  choose = threshold_policy is not None or calibrate
  if choose:
    if threshold_data is None:
      threshold_data, source_note['threshold_data'] = load_split(
          config, threshold_split, dataset=dataset, data_dir=data_dir, batch_size=batch_size)
    on_threshold = predict_dataset(model, threshold_data)
    decision, chosen = choose_decision(on_threshold.labels, on_threshold.scores,
                                       threshold_policy, calibrate, threshold_split)
    if write_decision:
      md.save_decision(model_dir, decision)
    chosen['written_to'] = os.path.join(model_dir, md.DECISION) if write_decision else None
    if threshold_split == split and folder is None and eval_data is None:
      chosen['warning'] = (f'the threshold was chosen on the split it is evaluated on '
                           f'({split!r}): the figures below are optimistic')
  else:
    decision = md.load_decision(model_dir)
    chosen = {'split': decision.split, 'loaded_from': (
        os.path.join(model_dir, md.DECISION)
        if os.path.exists(os.path.join(model_dir, md.DECISION)) else 'default (none stored)')}

  # ------------------------------------------------------------ The evaluation split.
  if eval_data is None:
    eval_data, source_note['eval_data'] = load_split(
        config, split, dataset=dataset, data_dir=data_dir, folder=folder, batch_size=batch_size)
  from covidlib import shift as shift_lib

  shift_model = shift_lib.load(model_dir)
  if shift_model is not None and shift_model.threshold is None:
    shift_model = None
  predictions = predict_dataset(model, eval_data,
                                keep_images=gradcam or shortcut_options is not None
                                or shift_model is not None)
  report = {
      'caveat': CAVEAT,
      'model_dir': os.path.abspath(model_dir),
      'model': config.get('model'),
      'image_size': config.get('image_size'),
      'channels': config.get('channels', 1),
      'data': {'description': source_note.get('eval_data', 'data passed in'),
               'split': None if folder else split, 'n': len(predictions),
               'n_covid': int(predictions.labels.sum()),
               'n_normal': int(len(predictions) - predictions.labels.sum())},
      'decision': {**dataclasses.asdict(decision), 'chosen_now': choose, **chosen},
  }
  if choose:
    report['decision']['threshold_data'] = source_note.get('threshold_data', 'data passed in')
  group_by = default_groups(predictions) if group_by is None else [g for g in group_by if g]
  report.update(evaluate_predictions(predictions, decision, group_by=group_by,
                                     n_bootstrap=n_bootstrap, seed=seed, n_bins=n_bins))
  scores = (calibration.apply_temperature(predictions.scores, decision.temperature)
            if decision.temperature != 1.0 else predictions.scores)

  # ------------------------------------------------------------ Grad-CAM.
  heatmaps, grid = None, []
  if gradcam:
    grid, selection = select_for_grid(predictions.labels, scores, decision.threshold)
    count = min(len(predictions), MAX_GRADCAM)
    predicted = (scores >= decision.threshold).astype(np.int64)
    layer = gradcam_layer or explain.find_target_layer(model)
    heatmaps = np.concatenate([
        explain.grad_cam_batch(model, predictions.images[i:i + batch_size], layer,
                               target=predicted[i:i + batch_size])
        for i in range(0, count, batch_size)])
    grid = [i for i in grid if i < count]
    filenames = predictions.metadata.get('filename')
    report['gradcam'] = {
        'layer': layer, 'target': 'the predicted class of each image', 'images': count,
        'selection': selection,
        'grid_items': [{
            'filename': None if filenames is None else str(filenames[i]),
            'label': ('normal', 'covid')[int(predictions.labels[i])],
            'p_covid': float(scores[i]),
            'lung_focus': explain.lung_focus_score(heatmaps[i]),
        } for i in grid],
        'lung_focus': _lung_focus_summary(
            heatmaps, predictions.labels,
            {g: predictions.metadata[g] for g in group_by if g in predictions.metadata}),
    }

  # ------------------------------------------------------------ Shortcuts.
  unseen_normals = None  # Normals of unseen sources: predicted once, for both sections.
  if shortcut_options is not None:
    from covidlib import shortcuts

    unseen_normals = shortcuts.load_unseen(
        model, config, shortcut_options.get('unseen', 'auto'),
        data_dir or config.get('data_dir'), batch_size=batch_size)
    report['shortcuts'] = shortcuts.for_model_dir(
        model, config, decision, shortcuts.as_scored(predictions),
        data_dir=data_dir or config.get('data_dir'), n_bootstrap=n_bootstrap, seed=seed,
        batch_size=batch_size, unseen_normals=unseen_normals, **shortcut_options)

  # ------------------------------------------------------------ Distribution shift.
  if shift_model is not None:
    report['shift'] = shift_lib.evaluate_section(
        model, config, shift_model, predictions, scores, decision.threshold,
        data_dir=data_dir or config.get('data_dir'),
        unseen=(shortcut_options or {}).get('unseen', 'auto'), n_bootstrap=n_bootstrap,
        seed=seed, batch_size=batch_size, unseen_normals=unseen_normals)
  return Evaluation(report=report, predictions=predictions, calibrated_scores=scores,
                    decision=decision, heatmaps=heatmaps, grid_indices=grid)
