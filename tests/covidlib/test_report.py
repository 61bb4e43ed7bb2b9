"""covidlib.report and the array-level parts of covidlib.evaluate, without a trained model."""

import csv
import json
import os
import sys

import numpy as np
import pytest
import tensorflow as tf

from covidlib import errors
from covidlib import evaluate
from covidlib import model_dir as md
from covidlib import models
from covidlib import report
from covidlib import scored
from covidlib import scoring


def _predictions(n=40, seed=0, images=True):
  rs = np.random.RandomState(seed)
  labels = np.array([1, 0] * (n // 2))
  scores = np.clip(0.3 * labels + 0.35 + 0.25 * rs.randn(n), 0.001, 0.999)
  source = np.array(['ieee8023' if l else ('kaggle_pediatric' if i % 4 else 'ieee8023')
                     for i, l in enumerate(labels)], dtype=object)
  meta = {'filename': np.array([f'f{i}.png' for i in range(n)], dtype=object),
          'source': source, 'view': np.array(['PA', 'AP'] * (n // 2), dtype=object)}
  x = rs.rand(n, 16, 16, 1).astype(np.float32) if images else None
  return scored.Scored(labels=labels, scores=scores, metadata=meta, images=x)


def _evaluation(predictions, decision, heatmaps=True):
  rep = {'caveat': evaluate.CAVEAT, 'model_dir': '/runs/x', 'model': 'tiny', 'image_size': 16,
         'channels': 1,
         'data': {'description': 'made up', 'split': 'test', 'n': len(predictions),
                  'n_covid': int(predictions.labels.sum()),
                  'n_normal': int(len(predictions) - predictions.labels.sum())},
         'decision': {**vars(decision), 'chosen_now': False, 'loaded_from': 'default'}}
  rep.update(evaluate.evaluate_predictions(predictions, decision, group_by=['source', 'view'],
                                           n_bootstrap=100))
  q = predictions.scores
  grid, selection = evaluate.select_for_grid(predictions.labels, q, decision.threshold, 4)
  maps = None
  if heatmaps:
    maps = np.random.RandomState(1).rand(len(predictions), 16, 16).astype(np.float32)
    rep['gradcam'] = {'layer': 'conv', 'target': 'the predicted class', 'images': len(q),
                      'selection': selection,
                      'grid_items': [{'filename': f'f{i}.png', 'label': 'covid', 'p_covid': q[i],
                                      'lung_focus': 0.4} for i in grid],
                      'lung_focus': evaluate._lung_focus_summary(
                          maps, predictions.labels, {'source': predictions.metadata['source']})}
  return evaluate.Evaluation(report=rep, predictions=predictions, calibrated_scores=q,
                             decision=decision, heatmaps=maps, grid_indices=grid)


def test_select_for_grid_orders_confident_errors_first():
  labels = np.array([1, 1, 0, 0, 1, 0])
  scores = np.array([0.1, 0.45, 0.95, 0.55, 0.9, 0.2])
  # Errors at t=0.5: FN 0 (P 0.1 -> 0.9 sure of 'normal'), FN 1 (0.55 sure), FP 2 (0.95),
  # FP 3 (0.55).
  order, why = evaluate.select_for_grid(labels, scores, 0.5, size=3)
  assert order == [2, 0, 1] and why == 'the 3 most confident errors'
  # Four errors, then the correct ones by confidence: 4 (P 0.9), 5 (0.8 sure of normal).
  order, why = evaluate.select_for_grid(labels, scores, 0.5, size=6)
  assert order == [2, 0, 1, 3, 4, 5]
  assert why == 'the 4 most confident errors, then the 2 most confident correct predictions'
  order, why = evaluate.select_for_grid(np.array([1, 0, 1]), np.array([0.7, 0.05, 0.99]), 0.5)
  assert order == [2, 1, 0] and why == 'the 3 most confident correct predictions'


def test_predict_dataset_collects_labels_scores_and_metadata():
  x = np.random.RandomState(0).rand(5, 8, 8, 1).astype(np.float32)
  y = np.array([1, 0, 1, 1, 0], np.float32)
  meta = {'filename': tf.constant([b'a', b'b', b'c', b'd', b'e']),
          'age': tf.constant([30, -1, 40, 50, 2], tf.int32)}
  ds = tf.data.Dataset.from_tensor_slices((x, y, meta)).batch(2)

  def model(images, training=False):
    return tf.reduce_mean(images, axis=(1, 2))

  out = scoring.score_dataset(model, ds, keep_images=True)
  np.testing.assert_array_equal(out.labels, [1, 0, 1, 1, 0])
  np.testing.assert_allclose(out.scores, x.mean(axis=(1, 2, 3)), rtol=1e-6)
  assert list(out.metadata['filename']) == ['a', 'b', 'c', 'd', 'e']
  np.testing.assert_array_equal(out.metadata['age'], [30, -1, 40, 50, 2])
  assert out.images.shape == (5, 8, 8, 1)
  with pytest.raises(errors.UsageError, match='must be batched'):
    scoring.score_dataset(model, tf.data.Dataset.from_tensor_slices((x, y)))
  with pytest.raises(errors.DataError, match='holds no examples'):
    scoring.score_dataset(model, tf.data.Dataset.from_tensor_slices((x, y)).batch(2).take(0))


def test_write_report_files_json_and_markdown(tmp_path):
  pred = _predictions()
  evaluation = _evaluation(pred, md.Decision(threshold=0.5))
  # history.json of covidlib.train: the lists, the kept epoch's record, one extension.
  history = {'loss': [0.9, 0.5], 'val_loss': [1.0, 0.7], 'val_auc': [0.8, 0.6],
             'kept_epoch': 1, 'kept_by': 'val_auc', 'kept_reason': 'highest val_auc',
             'kept_metrics': {'loss': 0.9, 'val_loss': 1.0, 'val_auc': 0.8},
             'extended_from_epochs': 1}
  paths = report.write_report(str(tmp_path), evaluation, history=history)
  assert sorted(os.listdir(tmp_path)) == sorted([
      'confusion_matrix.png', 'roc.png', 'pr.png', 'reliability.png', 'training_curves.png',
      'gradcam_grid.png', 'report.json', 'report.md', 'predictions.csv'])
  data = json.loads((tmp_path / 'report.json').read_text())
  assert data['files']['roc'] == 'roc.png'
  kept_text = 'epoch 1 of 2 (highest val_auc): val_auc 0.8000, val_loss 1.0000'
  assert data['history'] == {
      'epochs': 2, 'last': {'loss': 0.5, 'val_auc': 0.6, 'val_loss': 0.7},
      'kept': {'epoch': 1, 'by': 'val_auc', 'reason': 'highest val_auc', 'text': kept_text,
               'metrics': {'loss': 0.9, 'val_auc': 0.8, 'val_loss': 1.0}},
      'extended_from_epochs': 1}
  kaggle = data['groups']['source']['kaggle_pediatric']
  assert kaggle['n_covid'] == 0 and kaggle['figures']['roc_auc']['value'] is None
  assert 'only one class present' in kaggle['figures']['roc_auc']['reason']
  text = (tmp_path / 'report.md').read_text()
  assert text.startswith('# Evaluation: tiny on made up\n\n> **Research software')
  for heading in ('## Metrics with 95% intervals', '## Confusion matrix', '## By source',
                  '## By view', '## Operating threshold', '## Calibration', '## Grad-CAM',
                  '## Plots', '## Training'):
    assert heading in text
  # Per-source row: kaggle holds normals only; sensitivity and AUC show as undefined.
  row = next(line for line in text.splitlines() if line.startswith('| kaggle_pediatric |'))
  cells = [c.strip() for c in row.strip('|').split('|')]
  assert cells[1] == str(kaggle['n']) and cells[4] == '—' and cells[6] == '—'
  assert cells[5].startswith(f'{kaggle["figures"]["specificity"]["value"]:.3f} [')
  assert 'Not chosen now: threshold 0.5000' in text
  assert (f'## Training\n\n2 epochs (extended from 1). The model holds {kept_text}. Last epoch: '
          'loss 0.5000, val_auc 0.6000, val_loss 0.7000.\n') in text
  assert data['gradcam']['lung_focus']['empty_maps'] == 0
  assert 'all-zero map' not in text
  assert paths['report_md'] == str(tmp_path / 'report.md')


def test_a_history_without_the_kept_record():
  # history.json of a covidlib before keep: no kept epoch to name; without validation the
  # kept epoch's figures are the training ones.
  old = {'loss': [0.9, 0.5], 'auc': [0.6, 0.8]}
  assert report._history_summary(old) == {'epochs': 2, 'last': {'auc': 0.8, 'loss': 0.5}}
  assert report.kept_epoch_text(old) is None and report.kept_epoch_text(None) is None
  no_validation = {**old, 'kept_epoch': 2, 'kept_by': 'last',
                   'kept_reason': 'the last epoch: keep=best found no validation data',
                   'kept_metrics': {'loss': 0.5, 'auc': 0.8}}
  assert report.kept_epoch_text(no_validation) == (
      'epoch 2 of 2 (the last epoch: keep=best found no validation data): auc 0.8000, '
      'loss 0.5000')


def test_without_matplotlib_plots_are_skipped_and_said(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, 'matplotlib', None)  # `import matplotlib` now fails.
  evaluation = _evaluation(_predictions(), md.Decision())
  report.write_report(str(tmp_path), evaluation)
  assert sorted(os.listdir(tmp_path)) == ['gradcam_grid.png', 'predictions.csv', 'report.json',
                                         'report.md']
  text = (tmp_path / 'report.md').read_text()
  assert 'Plots skipped: matplotlib is not installed' in text
  assert 'matplotlib is not installed' in json.loads(
      (tmp_path / 'report.json').read_text())['plots_skipped']


def test_calibration_and_chosen_threshold_sections():
  evaluation = _evaluation(_predictions(), md.Decision(threshold=0.42, policy='youden',
                                                       temperature=1.5, split='validation'),
                           heatmaps=False)
  rep = evaluation.report
  rep['decision'].update(chosen_now=True, threshold_data='folder v', written_to='/m/decision.json',
                         threshold_choice={'threshold': 0.42, 'policy': 'youden',
                                           'sensitivity': 0.9, 'specificity': 0.8, 'n': 50},
                         temperature_fit={'temperature': 1.5, 'nll_before': 0.6,
                                          'nll_after': 0.5, 'ece_before': 0.2,
                                          'ece_after': 0.05, 'at_bound': False,
                                          'separable': False, 'n': 50})
  text = report.render_markdown(rep, {'skipped': 'x'})
  assert ('by policy `youden`: threshold 0.4200, where sensitivity = 0.900 and specificity = '
          '0.800') in text
  assert 'Written to `/m/decision.json`' in text
  assert 'T = 1.500 (NLL 0.600 -> 0.500, ECE 0.200 -> 0.050 there)' in text
  assert rep['calibration']['ece_after'] != rep['calibration']['ece_before']
  assert '## Grad-CAM\n\nNot computed.' in text
  rep['decision']['temperature_fit']['separable'] = True
  assert 'perfectly separated' in report.render_markdown(rep, {})


def test_report_write_leaves_no_temporary_files(tmp_path):
  evaluation = _evaluation(_predictions(images=True), md.Decision(), heatmaps=True)
  report.write_report(str(tmp_path), evaluation, plots=False)
  assert not [name for name in os.listdir(tmp_path) if name.startswith('.')]
  assert report.read_report(str(tmp_path))['metrics']['n'] == 40


def test_all_zero_heatmaps_are_counted_not_scored():
  predictions = _predictions(n=8)
  evaluation = _evaluation(predictions, md.Decision())
  maps = evaluation.heatmaps.copy()
  maps[:3] = 0.0  # No positive evidence for the predicted class.
  lung = evaluate._lung_focus_summary(maps, predictions.labels, {})
  assert lung['empty_maps'] == 3 and lung['all']['n'] == 5
  evaluation.report['gradcam']['lung_focus'] = lung
  text = report.render_markdown(evaluation.report, {})
  assert 'over 5 images (3 more had an all-zero map' in text


def test_a_users_own_class_names_name_everything(tmp_path):
  """report.json's class_names (a labelled_xrays dataset's, e.g. normal / pneumonia) replace
  COVID-19 in report.md and predictions.csv; without them the names are covidlib's."""
  pred = _predictions()
  evaluation = _evaluation(pred, md.Decision(threshold=0.5))
  evaluation.report['class_names'] = ['normal', 'pneumonia']
  report.write_report(str(tmp_path), evaluation, plots=False)
  text = (tmp_path / 'report.md').read_text()
  assert 'COVID-19' not in text.split('## Shortcuts')[0].split('## Grad-CAM')[0]
  assert 'Sensitivity (pneumonia recall)' in text and 'predicted pneumonia' in text
  with open(tmp_path / report.PREDICTIONS_CSV) as f:
    rows = list(csv.DictReader(f))
  assert {r['decision'] for r in rows} == {'normal', 'pneumonia'}
  assert all(r['decision'] == ('pneumonia' if float(r['probability']) >= 0.5 else 'normal')
             for r in rows)
  assert md.class_names({}) == ('normal', 'covid')
  assert md.display_name('covid') == 'COVID-19' and md.display_name('pneumonia') == 'pneumonia'
  with pytest.raises(errors.DataError, match='class_names must be two names'):
    md.class_names({'class_names': ['a', 'b', 'c']})


def test_score_files_matches_the_array_pass(tmp_path, encode):
  """scoring.score_files (a file list) gives the scores score_images gives on the same tensors."""
  from covidlib import data
  from covidlib import models

  model = models.build_model('compact_resnet', image_size=16, channels=1, seed=0)
  rs = np.random.RandomState(0)
  paths = []
  for i in range(3):
    path = tmp_path / f'{i}.png'
    path.write_bytes(encode(rs.randint(0, 256, (20, 24)).astype(np.uint8)))
    paths.append(str(path))
  scored_files = scoring.score_files(model, paths, [1, 0, 1], {'image_size': 16}, batch_size=2)
  images = np.concatenate([x for x, _ in data.load_files(paths, [1, 0, 1], image_size=16)])
  np.testing.assert_allclose(scored_files.scores, scoring.score_images(model, images, 2),
                             rtol=1e-6)
  assert list(scored_files.labels) == [1, 0, 1]
  assert list(scored_files.column('filename')) == paths
  assert scored_files.features.shape == (3, int(models.feature_layer(model).input.shape[-1]))


def test_score_dataset_taps_come_from_the_same_pass():
  """taps=True: every tap's pooled features, penultimate == features, select/concat keep them."""
  model = models.build_model('compact_resnet', 32, 1, seed=0)
  x = np.random.RandomState(1).rand(5, 32, 32, 1).astype(np.float32)
  ds = tf.data.Dataset.from_tensor_slices((x, np.array([1, 0, 1, 0, 0]))).batch(2)
  out = scoring.score_dataset(model, ds, taps=True)
  assert list(out.taps) == models.feature_taps(model)
  reference = models.tap_model(model)(x)
  np.testing.assert_allclose(out.scores, np.asarray(reference[0]).reshape(-1), atol=1e-6)
  for k, name in enumerate(out.taps):
    np.testing.assert_allclose(out.taps[name], reference[k + 1], rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(out.features, out.taps['penultimate'])
  both = scored.concat([out.select(out.labels == 1), out.select(out.labels == 0)])
  np.testing.assert_array_equal(both.taps['stem_relu'][:2], out.taps['stem_relu'][[0, 2]])
  assert scoring.score_dataset(model, ds).taps is None
