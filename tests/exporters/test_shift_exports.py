"""The shift score (issue #10) in every path: Keras, SavedModel and each TFLite variant agree.

    .venv/bin/python -m pytest tests/exporters/test_shift_exports.py -q

Tolerances (relative, on the squared Mahalanobis distance), from what each variant changes:
  saved_model, tflite_fp32   float32 instead of float64 for the projection: 1e-3.
  tflite_fp16, tflite_dynamic weights rounded to 16 or 8 bits move every feature by up to ~1e-2
                              relative, and the whitening amplifies the small-variance
                              directions: values within 25%, and the flag agreeing on >= 90%
                              of images.
  tflite_int8                 8-bit activations and a saturating output: flags only (>= 80%
                              on in-distribution images, and every far-out image flagged).
"""

import json
import os

import numpy as np
import pytest

from covidlib import model_dir as model_dir_lib
from covidlib import predict
from covidlib import shift
from covidlib import scoring

RTOL = {'model_dir': 0.0, 'saved_model': 1e-3, 'tflite_fp32': 1e-3, 'tflite_fp16': 0.25,
        'tflite_dynamic': 0.25}
FLAG_AGREEMENT = {'tflite_fp16': 0.9, 'tflite_dynamic': 0.9, 'tflite_int8': 0.8}


def _far_out(n, size=16):
  """Images nothing like the calibration ones: checkerboards, binary noise, stripes."""
  out = []
  rs = np.random.RandomState(n)
  for i in range(n):
    if i % 3 == 0:
      image = (np.indices((size, size)).sum(0) % 2).astype(np.float32)
    elif i % 3 == 1:
      image = (rs.rand(size, size) > 0.5).astype(np.float32)
    else:
      image = (np.arange(size)[None, :] % 4 < 2).repeat(size, 0).astype(np.float32)
    out.append(image[..., None])
  return np.stack(out)


@pytest.fixture(scope='module')
def shift_exports(tmp_path_factory, tiny_model, calibration_images, decision, helpers):
  from exporters import saved_model
  from exporters import tflite

  root = tmp_path_factory.mktemp('shift_exports')
  run = helpers.write_model_dir(root / 'run', tiny_model, decision)
  features = scoring.penultimate_features(tiny_model, calibration_images)
  labels = np.arange(len(features)) % 2
  fitted = shift.fit_shift(features, labels)
  validation = helpers.preprocessed(helpers.xray_like(30, seed=7))
  fitted = shift.choose_threshold(
      fitted, fitted.score(scoring.penultimate_features(tiny_model, validation)), 'quantile:0.9')
  shift.save(fitted, run)
  paths = {'model_dir': run,
           'saved_model': saved_model.export_saved_model(run, root / 'saved_model',
                                                         model=tiny_model)}
  for quant_type in tflite.QUANT_TYPES:
    data = tflite.convert_tflite(
        tiny_model, quant_type, calibration_images if quant_type == 'int8' else None,
        decision=decision, shift_model=fitted)
    path = root / f'model_{quant_type}.tflite'
    path.write_bytes(data)
    paths[f'tflite_{quant_type}'] = str(path)
  return fitted, paths, validation


def test_model_dir_score_matches_the_numpy_reference(shift_exports, tiny_model):
  fitted, paths, validation = shift_exports
  predictor = predict.Predictor(paths['model_dir'])
  p, scores = predictor.predict_preprocessed_with_shift(validation)
  want = fitted.score(scoring.penultimate_features(tiny_model, validation))
  np.testing.assert_allclose(scores, want, rtol=1e-6)
  np.testing.assert_array_equal(p, predictor.predict_preprocessed(validation))
  assert predictor.shift_threshold == fitted.threshold


@pytest.mark.parametrize('name', sorted(RTOL))
def test_variant_scores_match_keras(shift_exports, name):
  fitted, paths, validation = shift_exports
  images = np.concatenate([validation, _far_out(6)])
  _, reference = predict.Predictor(paths['model_dir']).predict_preprocessed_with_shift(images)
  predictor = predict.Predictor(paths[name])
  assert predictor.has_shift
  assert predictor.shift_threshold == pytest.approx(fitted.threshold, rel=1e-6)
  p, scores = predictor.predict_preprocessed_with_shift(images)
  np.testing.assert_allclose(scores, reference, rtol=RTOL[name], atol=1e-3)
  if name in FLAG_AGREEMENT:
    agree = np.mean((scores <= fitted.threshold) == (reference <= fitted.threshold))
    assert agree >= FLAG_AGREEMENT[name]


def test_int8_flags_agree_and_far_out_images_are_flagged(shift_exports):
  fitted, paths, validation = shift_exports
  _, reference = predict.Predictor(paths['model_dir']).predict_preprocessed_with_shift(validation)
  predictor = predict.Predictor(paths['tflite_int8'])
  _, scores = predictor.predict_preprocessed_with_shift(validation)
  agree = np.mean((scores <= fitted.threshold) == (reference <= fitted.threshold))
  assert agree >= FLAG_AGREEMENT['tflite_int8']


@pytest.mark.parametrize('name', ['model_dir', 'saved_model', 'tflite_fp32', 'tflite_fp16',
                                  'tflite_dynamic', 'tflite_int8'])
def test_far_out_images_are_flagged_by_every_variant(shift_exports, name):
  _, paths, _ = shift_exports
  _, scores = predict.Predictor(paths[name]).predict_preprocessed_with_shift(_far_out(6))
  _, reference = predict.Predictor(paths['model_dir']).predict_preprocessed_with_shift(
      _far_out(6))
  flagged_keras = reference > predict.Predictor(paths['model_dir']).shift_threshold
  flagged = scores > predict.Predictor(paths[name]).shift_threshold
  assert flagged_keras.all()
  assert flagged.all()


def test_saved_model_signatures_return_the_shift_outputs(shift_exports, images, encode):
  import tensorflow as tf

  fitted, paths, _ = shift_exports
  loaded = tf.saved_model.load(paths['saved_model'])
  out = loaded.signatures['serving_default'](
      image_bytes=tf.constant([encode(images[0]), encode(np.full((20, 20), 128, np.uint8))]))
  assert out['shift_score'].dtype == tf.float32 and out['shift_score'].shape == (2,)
  assert out['in_distribution'].dtype == tf.bool
  np.testing.assert_allclose(out['shift_threshold'].numpy(), fitted.threshold, rtol=1e-6)
  np.testing.assert_array_equal(out['in_distribution'].numpy(),
                                out['shift_score'].numpy() <= np.float32(fitted.threshold))
  info = json.loads(open(os.path.join(paths['saved_model'], 'assets.extra',
                                      shift.SHIFT_JSON)).read())
  assert info['threshold'] == fitted.threshold


def test_tflite_metadata_and_second_output(shift_exports):
  from ai_edge_litert.interpreter import Interpreter

  from exporters import tflite

  fitted, paths, _ = shift_exports
  content = open(paths['tflite_fp32'], 'rb').read()
  assert tflite.read_shift_threshold(content) == fitted.threshold
  runner = Interpreter(model_content=content).get_signature_runner()
  assert sorted(runner.get_output_details()) == ['probability', 'shift_score']


def test_a_model_without_shift_gives_none(tmp_path, tiny_model, helpers, images):
  run = helpers.write_model_dir(tmp_path / 'run', tiny_model)
  predictor = predict.Predictor(run)
  assert not predictor.has_shift
  result = predictor.predict_array(images[0])
  assert result.shift_score is None and result.in_distribution is None
  assert result.decision == result.class_name


def test_abstain_gives_no_label_for_flagged_images(shift_exports):
  _, paths, _ = shift_exports
  gray = (_far_out(1)[0, ..., 0] * 255).astype(np.uint8)
  warn = predict.Predictor(paths['model_dir']).predict_array(gray)
  abstain = predict.Predictor(paths['model_dir'], on_shift='abstain').predict_array(gray)
  assert warn.in_distribution is False and warn.label in (0, 1)
  assert warn.decision == warn.class_name and not warn.abstained
  assert abstain.label is None and abstain.decision == predict.OUT_OF_DISTRIBUTION
  assert abstain.probability == warn.probability
  assert abstain.to_dict()['decision'] == 'out_of_distribution'


def test_bad_on_shift(shift_exports):
  from covidlib import errors

  with pytest.raises(errors.UsageError, match="on_shift must be one of warn, abstain, got 'x'"):
    predict.Predictor(shift_exports[1]['model_dir'], on_shift='x')


def test_parity_report_has_the_shift_table(shift_exports, tmp_path):
  from exporters import parity

  fitted, paths, validation = shift_exports
  variants = {k: v for k, v in paths.items() if k != 'model_dir'}
  report = parity.parity_report(paths['model_dir'], variants, validation,
                                np.arange(len(validation)) % 2, latency_runs=0, n_bootstrap=0)
  assert report['shift']['threshold'] == pytest.approx(fitted.threshold)
  for name in variants:
    assert report['models'][name]['shift']['flag_agreement'] >= FLAG_AGREEMENT.get(name, 1.0)
  assert report['models']['saved_model']['shift']['max_rel_diff'] < 1e-3
  text = parity.render_markdown(report)
  assert '## Shift score' in text and '| tflite_int8 |' in text.split('## Shift score')[1]


def test_model_card_explains_out_of_distribution(shift_exports, decision):
  from exporters import model_card

  fitted, _, _ = shift_exports
  config = {'model': 'tiny', 'image_size': 16, 'channels': 1, 'dataset': 'covid_xray/seed'}
  evaluated = {'n': 10, 'n_flagged': 1, 'share_flagged': 0.1, 'unseen_sources': [
      {'source': 'nih', 'n': 5, 'share_flagged': 0.4, 'roc_auc': {'value': 0.7}}]}
  card = model_card.render_model_card(config, decision, evaluation=None,
                                      evaluation_source='none', parity=None, files=[],
                                      shift_info=fitted.info())
  section = card.split('## Out of distribution')[1].split('\n## ')[0]
  assert f'above {fitted.threshold:.4g}' in section and '10%' in section
  assert 'Not flagged does not mean correct' in section
  assert 'knows only the feature distribution of the training images' in section
  measured = '\n'.join(model_card.out_of_distribution_section(fitted.info(), evaluated))
  assert 'Normals of unseen source nih: 40.0% of 5 flagged' in measured
  bare = model_card.render_model_card(config, decision, evaluation=None,
                                      evaluation_source='none', parity=None, files=[])
  assert 'This model carries no shift score' in bare


def test_a_shift_file_of_another_model_is_refused(tmp_path, tiny_model, helpers):
  from covidlib import errors

  run = helpers.write_model_dir(tmp_path / 'run', tiny_model)
  rs = np.random.RandomState(0)
  other = shift.fit_shift(rs.normal(size=(20, 5)), np.arange(20) % 2)
  shift.save(shift.choose_threshold(other, [1.0, 2.0], 'quantile:0.5'), run)
  with pytest.raises(errors.ModelLoadError, match='shift.npz: fitted on 5 features, the model '
                     'has 64'):
    predict.Predictor(run)
