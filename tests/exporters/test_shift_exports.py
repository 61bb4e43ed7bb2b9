"""The shift score (issue #10) in every path: Keras, SavedModel and each TFLite variant agree.

    .venv/bin/python -m pytest tests/exporters/test_shift_exports.py -q

The score is the largest over the model's depths of a squared Mahalanobis distance standardised
on validation images (covidlib.shift), so in-distribution images score about -1 to 3 and
far-out ones tens to thousands. Tolerances, from what each variant changes:
  saved_model, tflite_fp32   float32 instead of float64 for the projection: 1e-3 relative
                              (1e-3 absolute near zero).
  tflite_fp16, tflite_dynamic weights rounded to 16 or 8 bits move every feature by up to ~1e-2
                              relative, and the whitening amplifies the small-variance
                              directions: values within 25%, or within 0.25 near zero (a
                              quarter of the validation images' standard deviation at a
                              depth), and the flag agreeing on >= 90% of images.
  tflite_int8                 carries the penultimate depth alone, with its own threshold
                              (8-bit activations do not carry the earlier depths); 8-bit
                              activations and a saturating output: flags only (>= 80% agreeing
                              with the Keras score of that depth on in-distribution images, and
                              every far-out image flagged).
The uint8_image variants (fp32, dynamic) take the decoded image and score it after their
in-graph resize; they are held to the fp32 and dynamic tolerances against the Keras model on
the same images through covidlib.preprocess, and run through the TensorFlow-free edge route.
"""

import json
import os

import numpy as np
import pytest
from PIL import Image

from covidlib import edge
from covidlib import model_dir as model_dir_lib
from covidlib import predict
from covidlib import shift
from covidlib import scoring

RTOL = {'model_dir': 0.0, 'saved_model': 1e-3, 'tflite_fp32': 1e-3, 'tflite_fp16': 0.25,
        'tflite_dynamic': 0.25}
ATOL = {'model_dir': 0.0, 'saved_model': 1e-3, 'tflite_fp32': 1e-3, 'tflite_fp16': 0.25,
        'tflite_dynamic': 0.25}
FLAG_AGREEMENT = {'tflite_fp16': 0.9, 'tflite_dynamic': 0.9, 'tflite_int8': 0.8}
UINT8_IMAGE = {'tflite_uint8_image': 'fp32', 'tflite_uint8_image_dynamic': 'dynamic'}
UINT8_RTOL = {'tflite_uint8_image': RTOL['tflite_fp32'],
              'tflite_uint8_image_dynamic': RTOL['tflite_dynamic']}
UINT8_ATOL = {'tflite_uint8_image': ATOL['tflite_fp32'],
              'tflite_uint8_image_dynamic': ATOL['tflite_dynamic']}


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


def _validation_raw(helpers):
  """The decoded images behind the fixture's `validation` (same seed), at their own sizes."""
  return helpers.xray_like(30, seed=7)


def _far_out_gray(n):
  """_far_out as decoded uint8 images: at the model's size, so the resize is the identity."""
  return [np.round(x[..., 0] * 255).astype(np.uint8) for x in _far_out(n)]


@pytest.fixture(scope='module')
def uint8_exports(shift_exports, tiny_model, decision, tmp_path_factory):
  """The uint8_image variants with the fixture's shift score: name -> path."""
  from exporters import tflite

  fitted = shift_exports[0]
  root = tmp_path_factory.mktemp('uint8_shift')
  paths = {}
  for name, quant_type in UINT8_IMAGE.items():
    path = root / f'model_{name}.tflite'
    path.write_bytes(tflite.convert_tflite_uint8_image(tiny_model, quant_type, decision,
                                                       shift_model=fitted))
    paths[name] = str(path)
  return paths


def _taps(model, images):
  """{tap: pooled features} of preprocessed images, by the one scoring pass."""
  import tensorflow as tf

  batches = tf.data.Dataset.from_tensor_slices((images, np.zeros(len(images)))).batch(16)
  return scoring.score_dataset(model, batches, taps=True).taps


@pytest.fixture(scope='module')
def shift_exports(tmp_path_factory, tiny_model, calibration_images, decision, helpers):
  """The multi-depth score fitted on the tiny model (the stage of its second convolution and
  its penultimate features), and every export of it."""
  from exporters import saved_model
  from exporters import tflite

  root = tmp_path_factory.mktemp('shift_exports')
  run = helpers.write_model_dir(root / 'run', tiny_model, decision)
  train = _taps(tiny_model, calibration_images)
  labels = np.arange(len(calibration_images)) % 2
  validation = helpers.preprocessed(helpers.xray_like(30, seed=7))
  val_taps = _taps(tiny_model, validation)
  fitted = shift.fit_shift(train, labels, validation=val_taps)
  assert len(fitted.taps) == 2
  fitted = shift.choose_threshold(fitted, fitted.score(val_taps), 'quantile:0.9',
                                  tap_scores=fitted.tap_scores(val_taps))
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
  want = fitted.score(_taps(tiny_model, validation))
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
  np.testing.assert_allclose(scores, reference, rtol=RTOL[name], atol=ATOL[name])
  if name in FLAG_AGREEMENT:
    agree = np.mean((scores <= fitted.threshold) == (reference <= fitted.threshold))
    assert agree >= FLAG_AGREEMENT[name]


def test_int8_carries_the_penultimate_depth_and_its_flags_agree(shift_exports):
  """8-bit activations cannot carry the earlier depths (exporters.tflite.int8_shift_model): the
  int8 file's score is the penultimate depth alone, with that depth's own threshold, and its
  flags agree with the Keras model's score of that depth."""
  from covidlib import tflite_metadata

  fitted, paths, validation = shift_exports
  keras_route = predict.Predictor(paths['model_dir'])
  reference, threshold = keras_route.shift_scores_at(validation, 'penultimate')
  assert threshold == fitted.taps[-1].threshold != fitted.threshold
  predictor = predict.Predictor(paths['tflite_int8'])
  assert predictor.shift_taps == ('penultimate',) and keras_route.shift_taps == fitted.tap_names
  assert predictor.shift_threshold == pytest.approx(threshold, rel=1e-6)
  entry = tflite_metadata.read_model_info(open(paths['tflite_int8'], 'rb').read()).extra['shift']
  assert [t['name'] for t in entry['taps']] == ['penultimate'] and 'int8' in entry['variant']
  _, scores = predictor.predict_preprocessed_with_shift(validation)
  agree = np.mean((scores <= threshold) == (reference <= threshold))
  assert agree >= FLAG_AGREEMENT['tflite_int8']


def test_int8_from_a_saved_model_with_several_depths_is_refused(shift_exports, calibration_images):
  from covidlib import errors
  from exporters import tflite

  with pytest.raises(errors.UsageError, match='reads several depths, which int8 cannot carry'):
    tflite.convert_tflite(shift_exports[1]['saved_model'], 'int8', calibration_images)


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


def test_parity_report_has_the_shift_table(shift_exports, uint8_exports, helpers):
  from exporters import parity

  fitted, paths, validation = shift_exports
  variants = {k: v for k, v in paths.items() if k != 'model_dir'}
  variants.update(uint8_exports)
  labels = np.arange(len(validation)) % 2
  raw = ([x[..., None] for x in _validation_raw(helpers)], labels)
  report = parity.parity_report(paths['model_dir'], variants, validation, labels,
                                latency_runs=0, n_bootstrap=0, raw=raw)
  assert report['shift']['threshold'] == pytest.approx(fitted.threshold)
  for name in variants:
    want = FLAG_AGREEMENT.get(name, FLAG_AGREEMENT['tflite_dynamic'] if 'dynamic' in name else 1)
    assert report['models'][name]['shift']['flag_agreement'] >= want
  assert report['models']['saved_model']['shift']['max_rel_diff'] < 1e-3
  assert report['models']['tflite_uint8_image']['shift']['max_rel_diff'] < UINT8_RTOL[
      'tflite_uint8_image'] + 1e-3
  text = parity.render_markdown(report)
  table = text.split('## Shift score')[1]
  assert '| tflite_int8 (*) |' in table and '| tflite_uint8_image |' in table
  assert report['models']['tflite_int8']['shift']['taps'] == ['penultimate']
  assert 'taps' not in report['models']['tflite_fp32']['shift']
  assert 'no shift_score output' not in table


# ------------------------------------------------------------------ The uint8_image variant.

@pytest.mark.parametrize('name', sorted(UINT8_IMAGE))
def test_uint8_image_scores_match_keras_on_the_preprocessed_images(
    shift_exports, uint8_exports, tiny_model, helpers, name):
  fitted, _, _ = shift_exports
  raw = _validation_raw(helpers)[:12] + _far_out_gray(3)
  assert len({x.shape for x in raw}) > 5  # Resized in the graph from assorted sizes.
  reference = fitted.score(_taps(tiny_model, helpers.preprocessed(raw)))
  ours = edge.EdgePredictor(uint8_exports[name])
  assert ours.kind == edge.UINT8_IMAGE and ours.has_shift
  assert ours.shift_threshold == pytest.approx(fitted.threshold, rel=1e-6)
  got = [ours.predict_array(x) for x in raw]
  scores = np.array([r.shift_score for r in got])
  np.testing.assert_allclose(scores, reference, rtol=UINT8_RTOL[name], atol=UINT8_ATOL[name])
  assert [r.in_distribution for r in got] == [bool(s <= ours.shift_threshold) for s in scores]
  agree = np.mean((scores <= fitted.threshold) == (reference <= fitted.threshold))
  assert agree >= FLAG_AGREEMENT.get(name.replace('uint8_image_', ''), 1.0)
  # The full route runs the same file through covidlib.edge: the same scores.
  full = predict.Predictor(uint8_exports[name])
  assert full.has_shift and full.shift_threshold == ours.shift_threshold
  np.testing.assert_allclose([full.predict_array(x).shift_score for x in raw], scores, rtol=1e-6)


@pytest.mark.parametrize('name', sorted(UINT8_IMAGE) + ['tflite_fp32', 'tflite_int8'])
def test_edge_route_flags_far_out_images(shift_exports, uint8_exports, helpers, name):
  fitted, paths, _ = shift_exports
  gray = _far_out_gray(6) + [255 - _far_out_gray(1)[0]]  # Checkerboards, noise, stripes.
  keras_route = predict.Predictor(paths['model_dir'])
  assert all(keras_route.predict_array(x).in_distribution is False for x in gray)
  ours = edge.EdgePredictor({**paths, **uint8_exports}[name])
  got = [ours.predict_array(x) for x in gray]
  assert all(r.in_distribution is False and r.shift_score > ours.shift_threshold for r in got)
  assert all(r.label in (0, 1) for r in got)  # Flagged, still labelled (no abstention here).
  inside = [ours.predict_array(x) for x in _validation_raw(helpers)]
  if name == 'tflite_int8':  # The penultimate depth alone, with its own threshold.
    scores, threshold = keras_route.shift_scores_at(
        helpers.preprocessed(_validation_raw(helpers)), 'penultimate')
    assert ours.shift_threshold == pytest.approx(threshold, rel=1e-6)
    reference = list(scores <= threshold)
  else:
    assert ours.shift_threshold == pytest.approx(fitted.threshold, rel=1e-6)
    reference = [keras_route.predict_array(x).in_distribution for x in _validation_raw(helpers)]
  agree = np.mean([r.in_distribution == want for r, want in zip(inside, reference)])
  assert agree >= FLAG_AGREEMENT.get(name.replace('uint8_image_', ''), 0.9)


def test_uint8_image_metadata_and_second_output(shift_exports, uint8_exports):
  from ai_edge_litert.interpreter import Interpreter

  from covidlib import tflite_metadata

  fitted, _, _ = shift_exports
  content = open(uint8_exports['tflite_uint8_image'], 'rb').read()
  assert tflite_metadata.read_shift_threshold(content) == fitted.threshold
  info = tflite_metadata.read_model_info(content)
  assert info.input['shift_output']['name'] == 'shift_score'
  assert info.extra['shift'] == json.loads(shift.info_json(fitted))
  runner = Interpreter(model_content=content).get_signature_runner()
  assert sorted(runner.get_output_details()) == ['probability', 'shift_score']
  assert list(runner.get_input_details()) == ['image']


@pytest.mark.parametrize('name', sorted(UINT8_IMAGE) + [f'tflite_{q}' for q in (
    'fp32', 'dynamic', 'fp16', 'int8')])
def test_probability_is_output_0_for_apps_that_read_by_position(shift_exports, uint8_exports,
                                                                name):
  from ai_edge_litert.interpreter import Interpreter

  content = open({**shift_exports[1], **uint8_exports}[name], 'rb').read()
  interpreter = Interpreter(model_content=content)
  named = interpreter.get_signature_runner().get_output_details()
  positions = [o['index'] for o in interpreter.get_output_details()]
  assert positions == [named['probability']['index'], named['shift_score']['index']]


def test_predict_edge_csv_has_the_shift_columns(shift_exports, uint8_exports, helpers, tmp_path,
                                                capsys):
  from covidlib.cli import predict_edge as cli

  fitted, paths, _ = shift_exports
  inside, far = _validation_raw(helpers)[0], _far_out_gray(1)[0]
  Image.fromarray(inside).save(tmp_path / 'a.png')
  Image.fromarray(far).save(tmp_path / 'b.png')
  keras_route = predict.Predictor(paths['model_dir'])
  want = {'a.png': keras_route.predict_array(inside), 'b.png': keras_route.predict_array(far)}
  assert want['b.png'].in_distribution is False
  argv = [cli.PROG, f'--model={uint8_exports["tflite_uint8_image"]}', '--format=csv',
          str(tmp_path / 'a.png'), str(tmp_path / 'b.png')]
  assert cli.call_main(argv) == 0
  header, *rows = capsys.readouterr().out.splitlines()
  columns = header.split(',')
  assert columns[-3:] == ['shift_score', 'in_distribution', 'decision']
  assert len(rows) == 2
  for row in rows:
    cells = dict(zip(columns, row.split(',')))
    reference = want[os.path.basename(cells['path'])]
    assert float(cells['shift_score']) == pytest.approx(reference.shift_score, rel=1e-3)
    assert cells['in_distribution'] == str(reference.in_distribution).lower()
    assert cells['decision'] == cells['class_name'] == reference.class_name


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
  assert 'at 2 depths of the network' in section and 'the largest of them' in section
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
  with pytest.raises(errors.ModelLoadError, match=r"shift.npz: fitted on another model \(tap "
                     r"'penultimate' of model 'tiny' has 64 features, not 5\); refit it with "
                     'covidlib-fit-shift'):
    predict.Predictor(run)
  taps = {'stage9_out': rs.normal(size=(20, 4)), 'penultimate': rs.normal(size=(20, 64))}
  other = shift.fit_shift(taps, np.arange(20) % 2, validation=taps)
  shift.save(shift.choose_threshold(other, [1.0, 2.0], 'quantile:0.5'), run)
  with pytest.raises(errors.ModelLoadError, match=r"shift.npz: fitted on another model \(model "
                     r"'tiny' has no taps \['stage9_out'\]; its taps are \['conv2d\w*', "
                     r"'penultimate'\]\)"):
    predict.Predictor(run)


def test_a_format_1_score_works_in_every_path(tmp_path, tiny_model, calibration_images, decision,
                                             helpers):
  """A model_dir with issue #10's penultimate-only shift.npz/json: the same raw score as then,
  from the Keras model, its SavedModel and its TFLite file, with the stored threshold."""
  from exporters import saved_model
  from exporters import tflite

  run = helpers.write_model_dir(tmp_path / 'run', tiny_model, decision)
  features = scoring.penultimate_features(tiny_model, calibration_images)
  tap = shift.fit_tap(features, np.arange(len(features)) % 2)
  np.savez(os.path.join(run, shift.SHIFT_NPZ), projection=tap.projection, centers=tap.centers,
           class_means=tap.class_means)
  model_dir_lib.write_json(os.path.join(run, shift.SHIFT_JSON), {
      'threshold': 80.0, 'policy': 'quantile:0.99', 'split': 'validation', 'feature_dim': 64,
      'n_per_class': [20, 20], 'shrinkage': tap.shrinkage, 'fit_split': 'train',
      'score': 'squared Mahalanobis distance to the nearest class mean (shared shrunk '
               'covariance)', 'description': 'shift_score: ...'})
  images = np.concatenate([helpers.preprocessed(helpers.xray_like(12, seed=7)), _far_out(3)])
  z = scoring.penultimate_features(tiny_model, images).astype(np.float64) @ tap.projection
  want = ((z[:, None] - tap.centers[None]) ** 2).sum(-1).min(1)  # Issue #10's formula.
  keras_route = predict.Predictor(run)
  assert keras_route.shift_threshold == 80.0
  np.testing.assert_allclose(keras_route.predict_preprocessed_with_shift(images)[1], want,
                             rtol=1e-6)
  exported = saved_model.export_saved_model(run, tmp_path / 'saved_model', model=tiny_model)
  path = tmp_path / 'model.tflite'
  path.write_bytes(tflite.convert_tflite(tiny_model, 'fp32', decision=decision,
                                         shift_model=shift.load(run)))
  assert tflite.read_shift_threshold(path.read_bytes()) == 80.0
  for other in (exported, str(path)):
    predictor = predict.Predictor(other)
    assert predictor.shift_threshold == pytest.approx(80.0)
    np.testing.assert_allclose(predictor.predict_preprocessed_with_shift(images)[1], want,
                               rtol=1e-3)
  assert 'format' not in json.loads(open(os.path.join(exported, 'assets.extra',
                                                      shift.SHIFT_JSON)).read())


def test_export_writes_the_uint8_image_variant_with_the_shift_score(shift_exports, tmp_path):
  from covidlib import tflite_metadata
  from exporters import export

  fitted, paths, _ = shift_exports
  export.export_model_dir(paths['model_dir'], str(tmp_path / 'out'),
                          formats=['tflite_uint8_image'], parity_split=None, latency_runs=0)
  path = tmp_path / 'out' / 'model_uint8_image.tflite'
  assert tflite_metadata.read_shift_threshold(path.read_bytes()) == fitted.threshold
  assert edge.EdgePredictor(path).has_shift
