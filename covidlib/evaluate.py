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
gives the share flagged per source, metrics on answered vs abstained images, which depths of the
network flag, the histogram of scores and the score's ROC-AUC for normals of unseen sources
against the evaluated split.

How it is composed: each dataset is scored once (`covidlib.scoring`: scores, labels, penultimate
features and metadata per image, and with a shift score the pooled features at every depth),
then the analyses run on those arrays (`covidlib.metrics`, `covidlib.threshold`,
`covidlib.calibration`, `covidlib.shortcuts`, `covidlib.shift`), then `covidlib.report` writes
them. The datasets scored: the threshold split (when an operating
point is chosen), the evaluated split, the other findings and each unseen source's dataset (for
the shortcut and shift sections), each split of them once.

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

from covidlib import CLASS_NAMES
from covidlib import calibration
from covidlib import confounds as confounds_lib
from covidlib import data
from covidlib import errors
from covidlib import explain
from covidlib import hold_out
from covidlib import metrics
from covidlib import model_dir as md
from covidlib import scoring
from covidlib import shift as shift_lib
from covidlib import shortcuts
from covidlib import threshold as threshold_lib
from covidlib.scored import Scored

CAVEAT = ('Research software, not a diagnostic device. These figures describe one model on one '
          'dataset; they do not show that it works on patients, scanners or hospitals it has '
          'not seen.')
METADATA_KEYS = data.METADATA_KEYS
MAX_GRADCAM = 2000  # Grad-CAM costs one forward and backward pass per image.
GRID_SIZE = 8
# Where normals of each source live, in order of preference, for the `auto` unseen sources.
UNSEEN_CANDIDATES = {
    'nih': ('covid_xray/adult', 'covid_xray/adult_pediatric'),
    'kaggle_pediatric': ('covid_xray/adult_pediatric', 'covid_xray/patient_split',
                         'covid_xray/seed'),
}
OTHER_FINDINGS = 'covid_xray/other_findings'


@dataclasses.dataclass
class Evaluation:
  report: dict                            # JSON-ready; see evaluate_predictions.
  predictions: Scored                     # On the evaluation split (scores uncalibrated).
  calibrated_scores: np.ndarray
  decision: md.Decision
  heatmaps: np.ndarray | None             # Grad-CAM of the first MAX_GRADCAM images.
  grid_indices: list[int]                 # Which images the Grad-CAM grid shows.
  shift_scores: np.ndarray | None = None  # Per image of `predictions`, when the model has one.
  shift_threshold: float | None = None


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


def default_groups(predictions: Scored) -> list[str]:
  """['source'] when the data says where images come from (a TFDS split), else []."""
  sources = predictions.metadata.get('source')
  return ['source'] if sources is not None and any(sources) else []


def evaluate_predictions(predictions: Scored, decision: md.Decision, *,
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


# --------------------------------------------------------------------------------------------
# The extra datasets the shortcut and shift sections score: other findings, unseen sources.
# --------------------------------------------------------------------------------------------


def resolve_unseen(spec: Sequence[str] | str, config: dict,
                   data_dir: str | None) -> tuple[dict[str, str], list[str]]:
  """{source: dataset} of normal sources to test as never seen in training; and notes.

  spec: 'auto' (UNSEEN_CANDIDATES that are built and absent from the training split, for a
  model trained on covid_xray; nothing for other data, whose unseen sites only the user can
  name), or entries 'DATASET:SOURCE'. A source that the training split holds is refused: it is
  not unseen.
  """
  notes = []
  if (spec == 'auto' or spec == ['auto']) and not md.trained_on_public_data(config):
    return {}, []
  trained = data.training_sources(config)
  if spec == 'auto' or spec == ['auto']:
    if trained is None:
      return {}, ['unseen sources: the training data is not a built TFDS dataset with sources']
    chosen = {}
    for source, candidates in UNSEEN_CANDIDATES.items():
      if source in trained:
        continue
      built = [c for c in candidates if data.is_built(c, data_dir)]
      if built:
        chosen[source] = built[0]
      else:
        notes.append(f'unseen source {source}: none of {", ".join(candidates)} is built')
    return chosen, notes
  chosen = {}
  for entry in spec:
    dataset, sep, source = entry.rpartition(':')
    if not sep or not dataset or not source:
      raise errors.UsageError(f'unseen source {entry!r} must be DATASET:SOURCE, e.g. '
                              'covid_xray/adult:nih')
    if trained is not None and source in trained:
      raise errors.UsageError(f'unseen source {entry!r}: source {source!r} is in the training '
                              f'split of {config.get("dataset")}, so it is not unseen')
    chosen[source] = dataset
  return chosen, notes


def score_unseen_normals(model, config: dict, unseen: Sequence[str] | str,
                         data_dir: str | None, *, batch_size: int = 32, strict: bool = True,
                         taps: bool = False
                         ) -> tuple[dict[str, tuple[Scored, str]], list[str]]:
  """({source: (its normal images, scored, dataset)}, notes) for `unseen` (resolve_unseen).

  Every split of the dataset holding a source is scored once; its normals of that source are
  kept. strict: a source that cannot be scored raises (the shortcut figures); otherwise it
  becomes a note (the shift section alone). taps: also the pooled features at every depth (what
  the shift score reads), from the same pass.

  Raises:
    DataError (strict): a chosen dataset holds no normal image of its source.
  """
  if strict:
    chosen, notes = resolve_unseen(unseen, config, data_dir)
  else:
    try:
      chosen, notes = resolve_unseen(unseen, config, data_dir)
    except errors.CovidlibError as e:
      return {}, [f'unseen sources: {e}']
  normals = {}
  for source, dataset in chosen.items():
    try:
      scored = scoring.score_every_split(model, config, dataset, data_dir,
                                         batch_size=batch_size, keep_images=False, taps=taps)
    except errors.CovidlibError as e:
      if strict:
        raise
      notes.append(f'unseen source {source}: {e}')
      continue
    scored = scored.select((scored.column('source') == source) & (scored.labels == 0))
    if not len(scored):
      if strict:
        raise errors.DataError(f'{dataset}: no normal image of source {source!r}')
      notes.append(f'unseen source {source}: no normal image in {dataset}')
      continue
    normals[source] = (scored, dataset)
  return normals, notes


def shortcut_section(model, config: dict, decision: md.Decision, evaluated: Scored, *,
                     data_dir: str | None, unseen_normals: tuple[dict, list[str]],
                     other_dataset: str | None = 'auto', held_out_reports: Sequence[str] = (),
                     probe: bool = True, n_bootstrap: int = metrics.DEFAULT_BOOTSTRAP,
                     seed: int = 0, batch_size: int = 32) -> dict:
  """report['shortcuts'] (covidlib.shortcuts.shortcut_report) with its data found from the
  model_dir's config.

  unseen_normals: what score_unseen_normals returned (the shift section uses the same).
  """
  if probe:
    try:
      model.get_layer('logit')
    except ValueError:
      raise errors.UsageError('source probe: the model has no layer named "logit" '
                              '(covidlib.models networks end in Dense "logit")') from None
  notes = []
  if other_dataset == 'auto' and not md.trained_on_public_data(config):
    other_dataset = None  # covid_xray's other findings say nothing about a user's own finding.
  elif other_dataset == 'auto':
    other_dataset = OTHER_FINDINGS if data.is_built(OTHER_FINDINGS, data_dir) else None
    if other_dataset is None:
      notes.append(f'other findings: {OTHER_FINDINGS} is not built in the data_dir')
  other = None
  if other_dataset:
    other = scoring.score_every_split(model, config, other_dataset, data_dir,
                                      batch_size=batch_size, keep_images=False)
    if other.labels.any():
      raise errors.DataError(f'{other_dataset}: other-findings data must hold label 0 (not '
                             f'COVID-19) only; {int(other.labels.sum())} images have label 1')
  normals_by_source, more_notes = unseen_normals
  notes += more_notes
  unseen_data = {source: (scored, f'{dataset}, every split, normals of source {source}')
                 for source, (scored, dataset) in normals_by_source.items()}
  held_out = []
  for path in held_out_reports:
    held_out += hold_out.read(path)['held_out']
  section = shortcuts.shortcut_report(
      decision, evaluated, other=other,
      other_description=f'{other_dataset} ({shortcuts.OTHER_FINDINGS_NOTE})',
      unseen=unseen_data, held_out=held_out, probe=probe, n_bootstrap=n_bootstrap, seed=seed)
  section['notes'] = notes
  return section


# --------------------------------------------------------------------------------------------
# The whole evaluation.
# --------------------------------------------------------------------------------------------


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
                       shortcut_options: dict | None = None,
                       confounds: Sequence[str] = ()) -> Evaluation:
  """Evaluates a model_dir on a split (or a folder, or datasets passed in).

  Args:
    model_dir: a finished covidlib-train run (config.json + model.keras).
    split, dataset, data_dir, folder: what to evaluate (see covidlib.scoring.load_split).
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
    shortcut_options: add the `shortcuts` section (shortcut_section keyword arguments plus
      'unseen', e.g. {'other_dataset': 'auto', 'unseen': 'auto', 'held_out_reports': []});
      None leaves it out.
    confounds: metadata features (e.g. ['view']) for the `confounds` section: the ROC-AUC of
      each feature alone and the model's within each value (covidlib.confounds).

  Raises:
    UsageError: a bad model_dir, policy, split or grouping feature.
    DataError: empty data, or a split that cannot support the policy.
  """
  model_dir = md.check_model_dir(model_dir)
  config = md.load_config(model_dir)
  model = md.load_model(model_dir)
  if threshold_policy is not None:
    threshold_lib.parse_policy(threshold_policy)
  unknown = [g for g in (*(group_by or ()), *confounds) if g not in METADATA_KEYS]
  if unknown:
    raise errors.UsageError(f'cannot group by {unknown}: valid features are '
                            f'{", ".join(METADATA_KEYS)}')
  data_dir_used = data_dir or config.get('data_dir')
  source_note = {}

  # ------------------------------------------------------------ The operating point.
  choose = threshold_policy is not None or calibrate
  if choose:
    if threshold_data is None:
      threshold_data, source_note['threshold_data'] = scoring.load_split(
          config, threshold_split, dataset=dataset, data_dir=data_dir, batch_size=batch_size)
    on_threshold = scoring.score_dataset(model, threshold_data, features=False)
    decision, chosen = threshold_lib.choose_decision(on_threshold.labels, on_threshold.scores,
                                                     threshold_policy, calibrate,
                                                     threshold_split)
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
    eval_data, source_note['eval_data'] = scoring.load_split(
        config, split, dataset=dataset, data_dir=data_dir, folder=folder, batch_size=batch_size)
  shift_model = shift_lib.load(model_dir)
  if shift_model is not None and shift_model.threshold is None:
    shift_model = None
  # With a shift score, the pooled features at every depth come from the same pass.
  predictions = scoring.score_dataset(model, eval_data, keep_images=gradcam,
                                      taps=shift_model is not None)
  report = {
      'caveat': CAVEAT,
      'model_dir': os.path.abspath(model_dir),
      'model': config.get('model'),
      'image_size': config.get('image_size'),
      'channels': config.get('channels', 1),
      **({} if md.class_names(config) == CLASS_NAMES else
         {'class_names': list(md.class_names(config))}),  # A user's own two classes.
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
  if confounds:
    report['confounds'] = confounds_lib.confound_section(
        predictions.labels, scores, {c: predictions.column(c) for c in confounds},
        n_bootstrap=n_bootstrap, seed=seed)

  # ------------------------------------------------------------ Grad-CAM.
  heatmaps, grid = None, []
  if gradcam:
    heatmaps, grid, report['gradcam'] = gradcam_section(
        model, predictions, scores, decision.threshold,
        {g: predictions.metadata[g] for g in group_by if g in predictions.metadata},
        layer=gradcam_layer, batch_size=batch_size, class_names=md.class_names(config))

  # ------------------------------------------------------------ Shortcuts.
  unseen_normals = None  # Normals of unseen sources: scored once, for both sections.
  if shortcut_options is not None:
    options = dict(shortcut_options)
    unseen_normals = score_unseen_normals(model, config, options.pop('unseen', 'auto'),
                                          data_dir_used, batch_size=batch_size,
                                          taps=shift_model is not None)
    report['shortcuts'] = shortcut_section(
        model, config, decision, predictions, data_dir=data_dir_used,
        unseen_normals=unseen_normals, n_bootstrap=n_bootstrap, seed=seed,
        batch_size=batch_size, **options)

  # ------------------------------------------------------------ Distribution shift.
  shift_scores = None
  if shift_model is not None:
    if unseen_normals is None:
      unseen_normals = score_unseen_normals(
          model, config, 'auto', data_dir_used, batch_size=batch_size, strict=False, taps=True)
    shift_scores = shift_model.score(predictions.taps)
    normals_by_source, notes = unseen_normals
    report['shift'] = shift_lib.report_section(
        shift_model, shift_scores, predictions.labels, scores,
        predictions.metadata.get('source'), decision.threshold,
        unseen={source: (shift_model.score(normals.taps), dataset)
                for source, (normals, dataset) in normals_by_source.items()},
        tap_scores={'evaluated': shift_model.tap_scores(predictions.taps),
                    **{f'unseen {source}': shift_model.tap_scores(normals.taps)
                       for source, (normals, _) in normals_by_source.items()}},
        notes=notes, n_bootstrap=n_bootstrap, seed=seed)
  return Evaluation(report=report, predictions=predictions, calibrated_scores=scores,
                    decision=decision, heatmaps=heatmaps, grid_indices=grid,
                    shift_scores=shift_scores,
                    shift_threshold=None if shift_model is None else shift_model.threshold)


def gradcam_section(model, predictions: Scored, scores: np.ndarray, threshold: float,
                    groups: dict[str, np.ndarray], *, layer: str | None = None,
                    batch_size: int = 32, class_names: Sequence[str] = CLASS_NAMES
                    ) -> tuple[np.ndarray, list[int], dict]:
  """(heatmaps of the first MAX_GRADCAM images, the grid's indices, report['gradcam'])."""
  grid, selection = select_for_grid(predictions.labels, scores, threshold)
  count = min(len(predictions), MAX_GRADCAM)
  predicted = (scores >= threshold).astype(np.int64)
  layer = layer or explain.find_target_layer(model)
  heatmaps = np.concatenate([
      explain.grad_cam_batch(model, predictions.images[i:i + batch_size], layer,
                             target=predicted[i:i + batch_size])
      for i in range(0, count, batch_size)])
  grid = [i for i in grid if i < count]
  filenames = predictions.metadata.get('filename')
  section = {
      'layer': layer, 'target': 'the predicted class of each image', 'images': count,
      'selection': selection,
      'grid_items': [{
          'filename': None if filenames is None else str(filenames[i]),
          'label': class_names[int(predictions.labels[i])],
          'p_covid': float(scores[i]),
          'lung_focus': explain.lung_focus_score(heatmaps[i]),
      } for i in grid],
      'lung_focus': _lung_focus_summary(heatmaps, predictions.labels, groups),
  }
  return heatmaps, grid, section
