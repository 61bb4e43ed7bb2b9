"""The keras.applications backbones (covidlib.models.BACKBONES) in every path, and their weights.

Each backbone is built as few times as possible: a build takes seconds, a traced training step
or an export tens of seconds to minutes.
Tiny inputs: 32 px (keras.applications' minimum), float32 (the oneDNN bfloat16 bug of
covidlib.distribute hits maps of 1 x 1, which every backbone reaches at 32 px).
"""

import dataclasses
import os

import h5py
import keras
import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver
from PIL import Image

from covidlib import errors
from covidlib import explain
from covidlib import model_dir as md
from covidlib import models
from covidlib import predict
from covidlib import preprocess
from covidlib import train
from covidlib.cli import common
from covidlib.cli import train as train_cli
from exporters import export

SIZE = 32
BACKBONES = sorted(models.BACKBONES)


def _xray_like(rs, n):
  """n uint8 gray images (40-56 px): smooth blobs and noise, brightness varying per image."""
  images = []
  for _ in range(n):
    h, w = rs.randint(40, 57, size=2)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    image = np.zeros((h, w))
    for _ in range(3):
      cy, cx, s = rs.rand(), rs.rand(), 0.1 + 0.3 * rs.rand()
      image += rs.rand() * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
    image = image / image.max() * rs.uniform(100, 215) + rs.normal(0, 8, (h, w))
    images.append(np.clip(image, 0, 255).astype(np.uint8))
  return images


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  """ROOT/{train,validation}/{covid,normal}/*.png: 8 + 8 train, 12 + 12 validation images."""
  root = tmp_path_factory.mktemp('backbone_data')
  rs = np.random.RandomState(0)
  for split, count in (('train', 8), ('validation', 12)):
    for label, name in enumerate(('normal', 'covid')):
      (root / split / name).mkdir(parents=True)
      for i, image in enumerate(_xray_like(rs, count)):
        image = np.clip(image.astype(int) + 40 * label, 0, 255).astype(np.uint8)
        Image.fromarray(image).save(root / split / name / f'{name}_{i:02d}.png')
  return str(root)


def _images(folder, split='validation'):
  """(float32 (n, SIZE, SIZE, 1) preprocessed images, their paths) of a split."""
  paths = sorted(os.path.join(dirpath, f) for dirpath, _, files in
                 os.walk(os.path.join(folder, split)) for f in files)
  images = np.stack([preprocess.preprocess(predict.read_image(p), SIZE, 1).numpy()
                     for p in paths])
  return images, paths


def _set_batch_statistics(model, images):
  """Sets every batch norm's moving statistics to those of `images` (one training-mode pass).

  A deep network fresh from random init (or after a step or two) gives every image the same
  features in inference, to 1e-10: its moving statistics are still ~ their initial 0 and 1. With
  the statistics of real images it computes image-dependent features, as a trained one does.
  """
  norms = [l for l in model.layers if isinstance(l, keras.layers.BatchNormalization)]
  for layer in norms:
    layer.momentum = 0.0
  model(images, training=True)
  for layer in norms:
    layer.momentum = models.BN_MOMENTUM


def _spread_logits(model, images):
  """Rescales the head so the logits over `images` have mean 0 and standard deviation 2: with
  every score at one value, decision-agreement checks would trivially pass or fail
  (tests/exporters/conftest.py does the same for its tiny model)."""
  logits = keras.Model(model.input, model.get_layer('logit').output)(images).numpy()
  kernel, bias = model.get_layer('logit').get_weights()
  scale = 2.0 / max(float(logits.std()), 1e-6)
  model.get_layer('logit').set_weights([kernel * scale, (bias - logits.mean()) * scale])


def _last_feature_map(model):
  """The layer whose output the global pooling 'pool' reads: the backbone's last activation."""
  source = model.get_layer('pool').input
  return next(l for l in model.layers if l.output is source)


def _check_grad_cam_and_taps(model, images):
  # Grad-CAM: the automatic target is the backbone's last feature map.
  assert explain.find_target_layer(model) == _last_feature_map(model).name
  heat = explain.grad_cam(model, images[0])
  assert heat.shape == (SIZE, SIZE) and np.all(np.isfinite(heat))
  assert heat.min() >= 0 and heat.max() <= 1
  # Feature taps: one per resolution stage (16, 8, 4, 2, 1 px at 32 px), then the penultimate.
  taps = models.feature_taps(model)
  assert taps[-1] == models.PENULTIMATE_TAP
  assert [model.get_layer(t).output.shape[1] for t in taps[:-1]] == [16, 8, 4, 2, 1]
  assert taps[-2] == _last_feature_map(model).name
  outputs = models.tap_model(model)(images[:2])
  np.testing.assert_allclose(outputs[0], model(images[:2]), atol=1e-5)
  assert [o.shape[-1] for o in outputs[1:-1]] == [
      2 * model.get_layer(t).output.shape[-1] for t in taps[:-1]]
  assert outputs[-1].shape == (2, model.get_layer('logit').input.shape[-1])


# The whole route per backbone costs minutes of CPU (a traced training step, a SavedModel and
# five TFLite conversions of a 150-430 layer graph: mobilenetv3small ~2 min, densenet121 ~5), so
# by default only mobilenetv3small, the device backbone, takes it; every backbone's model-level
# paths (weights, preprocessing, Grad-CAM, taps, init_from) are checked below in seconds.
# COVIDLIB_TEST_ALL_BACKBONES=1 runs the whole route for the others too.
_ALL_ROUTES = os.environ.get('COVIDLIB_TEST_ALL_BACKBONES') == '1'


@pytest.mark.slow
@pytest.mark.parametrize('name', [
    n if n == 'mobilenetv3small' or _ALL_ROUTES else pytest.param(n, marks=pytest.mark.skip(
        reason='minutes of CPU: COVIDLIB_TEST_ALL_BACKBONES=1 runs it')) for n in BACKBONES])
def test_backbone_in_every_path(name, folder, tmp_path):
  """Train one step -> model_dir -> SavedModel and every TFLite variant with parity -> predict
  -> Grad-CAM -> feature taps -> init_from."""
  model_dir = str(tmp_path / 'run')
  config = train.make_config(model=name, image_size=SIZE, dataset=f'folder:{folder}', epochs=1,
                             batch_size=16, seed=0, mixed_precision='off')
  history = train.train(config, model_dir)
  assert len(history['loss']) == 1 and np.isfinite(history['loss'][0])
  model = md.load_model(model_dir)  # Keras safe_mode on: no Lambda, every layer serializable.
  images, paths = _images(folder)
  _set_batch_statistics(model, _images(folder, 'train')[0])
  _spread_logits(model, images)
  model.save(os.path.join(model_dir, md.MODEL))

  # The covidlib contract: gray float32 'image' in, float32 'probability' = sigmoid('logit') out;
  # the gray channel repeated and preprocessed inside; the backbone flat in the model.
  assert model.name == name and model.input.name == 'image'
  assert model.input_shape == (None, SIZE, SIZE, 1) and model.output_shape == (None, 1)
  assert [l.name for l in model.layers[:3]] == ['image', 'gray_to_rgb', 'preprocess']
  assert not any(isinstance(l, keras.Model) for l in model.layers) and len(model.layers) > 100
  p = model(images).numpy()
  logits = keras.Model(model.input, model.get_layer('logit').output)(images).numpy()
  assert p.dtype == np.float32
  np.testing.assert_allclose(p, 1 / (1 + np.exp(-logits)), rtol=1e-5)

  # Export: the SavedModel and every TFLite variant, each against the Keras model on the split.
  # A network one step from random weights is no test of quantization (its int8 variant
  # disagrees with Keras on a third of the images: the int8 agreement target is measured on a
  # trained model, BENCHMARKS.md "Networks"); the float variants must match it.
  out = str(tmp_path / 'export')
  report = export.export_model_dir(model_dir, out, dataset=f'folder:{folder}',
                                   calibration_images=16, latency_runs=1, allow_parity_miss=True)
  variants = report['models']
  assert sorted(variants) == sorted(['keras', *export.FORMATS])
  for fmt in ('saved_model', 'tflite_fp32'):
    assert all(t['pass'] for t in variants[fmt]['targets'].values()), variants[fmt]
    assert variants[fmt]['max_abs_dp'] < 1e-4
  assert variants['tflite_fp16']['max_abs_dp'] < 0.05
  for fmt in ('tflite_dynamic', 'tflite_uint8_image', 'tflite_int8'):
    assert variants[fmt]['max_abs_dp'] < 1.0 and variants[fmt]['agreement'] >= 0.5
    assert os.path.isfile(os.path.join(out, export.tflite_filename(fmt)))

  # predict, from the model_dir and from the fp32 file, on the same files.
  keras_p = [r.probability for r in predict.Predictor(model_dir).predict_files(paths)]
  # Predictor batches the files its own way: oneDNN rounds by batch composition (1e-5 seen).
  np.testing.assert_allclose(keras_p, p[:, 0], atol=1e-4)
  fp32 = predict.Predictor(os.path.join(out, export.tflite_filename('tflite_fp32')))
  np.testing.assert_allclose([r.probability for r in fp32.predict_files(paths)], p[:, 0],
                             atol=1e-4)

  _check_grad_cam_and_taps(model, images)

  # init_from: a fresh build of the same backbone takes the trained weights, layer by name.
  fresh = models.build_model(name, SIZE, 1, seed=5)
  train.init_weights_from(fresh, model_dir)
  for a, b in zip(fresh.get_weights(), model.get_weights()):
    np.testing.assert_array_equal(a, b)


def _write_legacy_h5(path, layers):
  """A weights file in the layout of the ImageNet files keras.applications downloads (tf.keras
  `save_weights('x.h5')`): attrs layer_names; one group per layer, attrs weight_names."""
  with h5py.File(path, 'w') as f:
    f.attrs['layer_names'] = [l.name.encode() for l in layers]
    f.attrs['backend'] = b'tensorflow'
    f.attrs['keras_version'] = b'2.9.0'
    for layer in layers:
      group = f.create_group(layer.name)
      names = [f'{layer.name}/{w.name}:0'.encode() for w in layer.weights]
      group.attrs['weight_names'] = names
      for n, w in zip(names, layer.weights):
        group.create_dataset(n.decode(), data=np.asarray(w))


def _backbone_layers(model):
  return [l for l in model.layers if l.weights and l.name != 'logit']


def _keras_preprocess(name, images255):
  """keras.applications' own preprocessing of [0, 255] RGB images, for the reference model."""
  module = {'densenet121': keras.applications.densenet,
            'resnet50v2': keras.applications.resnet_v2}.get(name)
  # EfficientNetV2 and MobileNetV3 preprocess inside (include_preprocessing=True, the default).
  return images255 if module is None else module.preprocess_input(images255)


@pytest.mark.slow
@pytest.mark.filterwarnings('ignore:`input_shape` is undefined or non-square')  # MobileNetV3's.
@pytest.mark.parametrize('name', BACKBONES)
def test_weights_file_keras_reference_grad_cam_taps_and_init_from(name, folder, tmp_path,
                                                                   monkeypatch):
  """A model's backbone weights written to a Keras weights file and loaded back give identical
  features; keras.applications itself loads that file as its ImageNet file (same name as ours)
  and, on its own preprocessing of the same images x 255, computes the same features."""
  model = models.build_model(name, SIZE, 1, seed=0)
  images, _ = _images(folder)
  _set_batch_statistics(model, _images(folder, 'train')[0])
  _spread_logits(model, images)
  features = models.feature_model(model)(images)[1].numpy()
  assert features.std(0).mean() > 1e-3  # Features that differ between images.
  # Every weighted layer is a convolution, Dense or batch norm: count_flops counts them all.
  counted = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense,
             keras.layers.BatchNormalization)
  assert all(isinstance(l, counted) for l in model.layers if l.weights)
  path = str(tmp_path / f'{name}.h5')
  _write_legacy_h5(path, _backbone_layers(model))

  loaded = models.build_model(name, SIZE, 1, seed=1, weights=path)
  np.testing.assert_array_equal(models.feature_model(loaded)(images)[1].numpy(), features)
  # The head is not in the file: it keeps its seeded initial weights.
  fresh_head = models.build_model(name, SIZE, 1, seed=1).get_layer('logit').get_weights()
  np.testing.assert_array_equal(loaded.get_layer('logit').get_weights()[0], fresh_head[0])

  # keras.applications with weights='imagenet' asks its cache for exactly our file name and
  # hash, and loads our file (its loader matches layers by order: the layout is right).
  spec = models.BACKBONES[name]
  asked = []

  def fake_get_file(fname, origin, cache_subdir, file_hash, **kwargs):
    asked.append((fname, cache_subdir, file_hash))
    return path

  # Every builder calls keras.src.utils.file_utils.get_file (ResNet50V2 through resnet.py).
  monkeypatch.setattr('keras.src.utils.file_utils.get_file', fake_get_file)
  reference = getattr(keras.applications, spec.builder)(
      include_top=False, weights='imagenet', input_shape=(SIZE, SIZE, 3), pooling='avg')
  assert asked == [(spec.weights_file, 'models', spec.weights_md5)]
  rgb255 = np.repeat(images, 3, axis=-1) * 255.0
  # Compared at the first convolution: our preprocessing and keras' own on x 255 are equal up to
  # float32 rounding ((x * 255) / 127.5 - 1 is not bit for bit x * 2 - 1), and deeper in a
  # random network whose activations grow to hundreds (EfficientNetV2: batch norm statistics
  # still 0 and 1) that rounding grows to whole percents. The layout of the whole file is
  # checked exactly above (loaded back, identical features).
  stem = next(l.name for l in reference.layers if isinstance(l, keras.layers.Conv2D))
  theirs = keras.Model(reference.input, reference.get_layer(stem).output)(
      _keras_preprocess(name, rgb255)).numpy()
  ours = keras.Model(model.input, model.get_layer(stem).output)(images).numpy()
  np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())
  assert np.abs(theirs).max() > 0.1  # Not a trivially zero map.

  # Keras 3's own weights format (.weights.h5) loads too.
  keras3 = str(tmp_path / f'{name}.weights.h5')
  reference.save_weights(keras3)
  loaded.get_layer(_backbone_layers(loaded)[0].name).set_weights(
      [np.zeros_like(w) for w in _backbone_layers(loaded)[0].get_weights()])
  models.load_backbone_weights(loaded, name, keras3)
  np.testing.assert_array_equal(models.feature_model(loaded)(images)[1].numpy(), features)

  _check_grad_cam_and_taps(model, images)

  # init_from a saved model of the same backbone: every weight, the head's too.
  saved = str(tmp_path / 'model.keras')
  model.save(saved)
  train.init_weights_from(loaded, saved)
  for a, b in zip(loaded.get_weights(), model.get_weights()):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_imagenet_from_the_cache_and_bad_files_name_what_does_not_fit(folder, tmp_path,
                                                                      monkeypatch):
  name = 'mobilenetv3small'  # The quickest to build; the code path is the same for all.
  spec = models.BACKBONES[name]
  model = models.build_model(name, SIZE, 1, seed=0)
  _set_batch_statistics(model, _images(folder, 'train')[0])
  layers = _backbone_layers(model)
  monkeypatch.setenv('KERAS_HOME', str(tmp_path / 'keras_home'))
  cached = os.path.join(models.keras_cache_dir(), spec.weights_file)
  os.makedirs(os.path.dirname(cached))
  _write_legacy_h5(cached, layers)

  # Not the file Keras downloads (another md5): refused, as Keras would refuse it.
  with pytest.raises(errors.UsageError, match=rf'weights=imagenet: {cached} is not the file '
                     rf'Keras downloads \(md5 [0-9a-f]{{32}}, expected {spec.weights_md5}\)'):
    models.build_model(name, SIZE, 1, weights='imagenet')
  # With the md5 of our file standing in for the real one: loaded from the cache.
  monkeypatch.setitem(models.BACKBONES, name,
                      dataclasses.replace(spec, weights_md5=models._md5(cached)))
  from_cache = models.build_model(name, SIZE, 1, seed=2, weights='imagenet')
  x = np.random.RandomState(0).rand(2, SIZE, SIZE, 1).astype(np.float32)
  np.testing.assert_array_equal(models.feature_model(from_cache)(x)[1],
                                models.feature_model(model)(x)[1])

  # A file missing a layer, one with a wrong shape, a whole model file, and a non-HDF5 file.
  fresh = models.build_model(name, SIZE, 1, seed=3)
  before = fresh.get_weights()
  short = str(tmp_path / 'short.h5')
  _write_legacy_h5(short, layers[:-1])
  with pytest.raises(errors.UsageError) as e:
    models.load_backbone_weights(fresh, name, short)
  assert str(e.value) == (
      f"weights file {short!r} has no layer {layers[-1].name!r} of {name} (its layers include "
      f"{', '.join(sorted(l.name for l in layers[:-1])[:3])}): it is not a weights file of "
      f'{name} (ImageNet: {spec.weights_file})')
  wrong = str(tmp_path / 'wrong.h5')
  _write_legacy_h5(wrong, layers)
  with h5py.File(wrong, 'r+') as f:
    n = f'{layers[0].name}/{layers[0].weights[0].name}:0'
    del f[layers[0].name][n]
    f[layers[0].name].create_dataset(n, data=np.zeros((3, 3, 1, 16), np.float32))
  with pytest.raises(errors.UsageError,
                     match=rf"weights file '{wrong}': layer '{layers[0].name}' has weights of "
                     r'shapes \[\(3, 3, 1, 16\)\] there and \[\(3, 3, 3, 16\)\] in '
                     rf'{name}: it is not a weights file of {name}'):
    models.load_backbone_weights(fresh, name, wrong)
  text = tmp_path / 'notes.h5'
  text.write_text('not weights')
  with pytest.raises(errors.UsageError, match=rf"weights file '{text}' is not a Keras HDF5 "
                     'weights file'):
    models.load_backbone_weights(fresh, name, str(text))
  for a, b in zip(before, fresh.get_weights()):  # Nothing half-loaded.
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('name', BACKBONES)
def test_imagenet_without_the_cache_fails_at_once_naming_the_file(name, tmp_path, monkeypatch):
  monkeypatch.setenv('KERAS_HOME', str(tmp_path / 'empty'))
  folder = os.path.join(str(tmp_path / 'empty'), 'models')
  with pytest.raises(errors.UsageError) as e:
    models.weights_path(name, 'imagenet')
  message = str(e.value)
  assert '\n' not in message
  assert message.startswith(f'weights=imagenet: {models.BACKBONES[name].weights_file} (the '
                            f"ImageNet weights of {name}) is not in Keras' cache {folder}:")
  # Through the config (train() calls make_config first: before any data is read).
  with pytest.raises(errors.UsageError, match="is not in Keras' cache"):
    train.make_config(model=name, weights='imagenet')


def test_imagenet_cli_error_is_one_line(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv('KERAS_HOME', str(tmp_path))
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  with flagsaver.flagsaver(model_dir=str(tmp_path / 'run'), model='densenet121',
                           weights='imagenet', dataset='folder:/nonexistent'):
    status = common.call_main(train_cli.main, ['covidlib-train'], 'covidlib-train')
  err = capsys.readouterr().err
  assert status == 2
  assert err.strip().count('\n') == 0 and 'Traceback' not in err
  assert ('densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5 (the ImageNet weights of '
          f"densenet121) is not in Keras' cache {tmp_path}/models") in err
  assert not os.path.exists(tmp_path / 'run')


@pytest.mark.parametrize('model, weights, message', [
    ('compact_resnet', 'imagenet', "weights='imagenet': model 'compact_resnet' has no pretrained "
     "weights (only weights='none'); 'imagenet' and weights files are for densenet121, "
     'efficientnetv2b0, mobilenetv3small, resnet50v2'),
    ('seed_cnn', '/some/file.h5', "model 'seed_cnn' has no pretrained weights"),
    ('densenet121', '/no/such/file.h5', "weights '/no/such/file.h5' is not a file: give none, "
     'imagenet or the path of a Keras weights file of densenet121'),
    ('densenet121', '', "weights must be 'none', 'imagenet' or the path of a weights file, "
     "got ''"),
])
def test_bad_weights_are_named(model, weights, message):
  with pytest.raises(errors.UsageError) as e:
    train.make_config(model=model, weights=weights)
  assert message in str(e.value)


def test_weights_and_init_from_together_are_refused(tmp_path):
  weights = tmp_path / 'w.h5'
  weights.write_bytes(b'')
  with pytest.raises(errors.UsageError, match='init_from replaces every weight; give one'):
    train.make_config(model='densenet121', weights=str(weights), init_from=str(tmp_path))


def test_build_is_reproducible_names_seed_precision_and_standardization(restore_policy):
  """Same seed: same weights and layer names (also under mixed precision, whose float32 rebuild
  train.py saves); another seed: other weights; crop/equalize add layers, not weights."""
  name = 'mobilenetv3small'
  a = models.build_model(name, SIZE, 1, seed=7)
  b = models.build_model(name, SIZE, 1, seed=7)
  c = models.build_model(name, SIZE, 1, seed=8)
  names = [l.name for l in a.layers]
  assert [l.name for l in b.layers] == names
  assert all(np.array_equal(x, y) for x, y in zip(a.get_weights(), b.get_weights()))
  assert all(not np.array_equal(x, y) for x, y in zip(a.get_weights(), c.get_weights())
             if x.ndim > 1)
  keras.config.set_dtype_policy('mixed_bfloat16')
  mixed = models.build_model(name, SIZE, 1, seed=7, crop=0.1, equalize='histogram')
  assert [l.name for l in mixed.layers[:4]] == ['image', 'crop', 'equalize', 'gray_to_rgb']
  assert [l.name for l in mixed.layers[3:]] == names[1:]
  assert all(np.array_equal(x, y) for x, y in zip(a.get_weights(), mixed.get_weights()))
  assert mixed.get_layer('conv').compute_dtype == 'bfloat16'
  assert mixed.get_layer('logit').compute_dtype == 'float32'
  assert mixed(np.zeros((1, SIZE, SIZE, 1), np.float32)).dtype == 'float32'
  # Batch norm follows covidlib's momentum (keras.applications' 0.999 would lag ~1000 steps).
  assert {l.momentum for l in a.layers if isinstance(l, keras.layers.BatchNormalization)} == {
      models.BN_MOMENTUM}


@pytest.fixture
def restore_policy():
  yield
  keras.config.set_dtype_policy('float32')


@pytest.mark.parametrize('name, minimum', [(n, 32) for n in BACKBONES])
def test_minimum_image_size(name, minimum):
  with pytest.raises(errors.UsageError,
                     match=f"image_size must be an integer >= {minimum} for model '{name}', "
                     f'got {minimum - 1}'):
    models.build_model(name, minimum - 1)
