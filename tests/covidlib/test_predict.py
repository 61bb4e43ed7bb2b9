"""covidlib.predict.Predictor: one API over .keras, model_dir, SavedModel and each TFLite variant;
per-file errors; DICOM like PNG; model paths that are not models."""

import os

import keras
import numpy as np
import pytest

from covidlib import errors
from covidlib import model_dir as model_dir_lib
from covidlib import models
from covidlib import predict
from covidlib import preprocess

SIZE, CHANNELS = 32, 3  # 3 channels: the gray image repeated, as covidlib models may want.
DECISION = model_dir_lib.Decision(threshold=0.45, policy='youden', temperature=1.3,
                                  split='validation')
# Max |P - P_keras| per backend on these images (int8: 8-bit activations, random weights).
TOLERANCE = {'keras': 0.0, 'model_dir': 0.0, 'saved_model': 1e-5, 'tflite_fp32': 1e-5,
             'tflite_fp16': 5e-3, 'tflite_dynamic': 5e-2, 'tflite_int8': 1e-1}


def _images(n, seed):
  rs = np.random.RandomState(seed)
  out = []
  for _ in range(n):
    h, w = rs.randint(24, 64, size=2)
    base = np.linspace(rs.uniform(0, 120), rs.uniform(120, 255), w)[None, :]
    blob = 120 * np.exp(-((np.arange(h)[:, None] - rs.uniform(0, h)) ** 2) / (2 * (h / 4) ** 2))
    out.append(np.clip(base + blob + rs.normal(0, 10, (h, w)), 0, 255).astype(np.uint8))
  return out


def _preprocessed(images):
  return np.stack([preprocess.preprocess(i[..., None], SIZE, CHANNELS).numpy() for i in images])


@pytest.fixture(scope='module')
def exports(tmp_path_factory):
  """A compact_resnet model_dir (logits spread to std 2) and every export of it, as files."""
  from exporters import saved_model
  from exporters import tflite

  root = tmp_path_factory.mktemp('predict')
  model = models.build_model('compact_resnet', image_size=SIZE, channels=CHANNELS, seed=0)
  calibration = _preprocessed(_images(30, seed=5))
  logit = model.get_layer('logit')
  z = np.asarray(keras.Model(model.input, logit.output)(calibration)).reshape(-1)
  kernel, bias = logit.get_weights()
  scale = 2.0 / max(z.std(), 1e-6)
  logit.set_weights([kernel * scale, (bias - z.mean()) * scale])
  run = root / 'run'
  run.mkdir()
  model.save(run / 'model.keras')
  model_dir_lib.write_json(run / 'config.json', {'model': 'compact_resnet', 'image_size': SIZE,
                                                 'channels': CHANNELS})
  model_dir_lib.save_decision(run, DECISION)
  paths = {'keras': str(run / 'model.keras'), 'model_dir': str(run),
           'saved_model': saved_model.export_saved_model(run, root / 'saved_model', model=model)}
  tflite_dir = root / 'tflite'
  tflite_dir.mkdir()
  for quant_type in tflite.QUANT_TYPES:
    data = tflite.convert_tflite(model, quant_type, calibration if quant_type == 'int8' else None,
                                 decision=DECISION)
    path = tflite_dir / f'model_{quant_type}.tflite'
    path.write_bytes(data)
    paths[f'tflite_{quant_type}'] = str(path)
  return paths


@pytest.fixture(scope='module')
def image_files(tmp_path_factory):
  from PIL import Image
  root = tmp_path_factory.mktemp('images')
  paths = []
  for i, image in enumerate(_images(12, seed=9)):
    path = root / f'x{i:02d}.{"png" if i % 2 else "jpg"}'
    Image.fromarray(image).save(path)
    paths.append(str(path))
  return paths


@pytest.fixture(scope='module')
def keras_reference(exports, image_files):
  return predict.Predictor(exports['keras']).predict_files(image_files)


@pytest.mark.parametrize('backend', list(TOLERANCE))
def test_every_backend_agrees_with_keras(backend, exports, image_files, keras_reference):
  predictor = predict.Predictor(exports[backend])
  assert predictor.format == {'keras': 'keras', 'model_dir': 'keras',
                              'saved_model': 'saved_model'}.get(backend, 'tflite')
  assert (predictor.image_size, predictor.channels) == (SIZE, CHANNELS)
  assert predictor.decision == DECISION
  results = predictor.predict_files(image_files)
  assert [r.path for r in results] == image_files and all(r.ok for r in results)
  p = np.array([r.probability for r in results])
  reference = np.array([r.probability for r in keras_reference])
  assert np.abs(p - reference).max() <= TOLERANCE[backend]
  assert [r.label for r in results] == [int(x >= 0.45) for x in p]
  assert all(r.threshold == pytest.approx(0.45) for r in results)


def test_reference_applies_the_temperature(exports, image_files, keras_reference):
  model = keras.saving.load_model(exports['keras'])
  z = np.asarray(keras.Model(model.input, model.get_layer('logit').output)(
      _preprocessed([preprocess.load_image(p)[..., 0] for p in image_files]))).reshape(-1)
  np.testing.assert_allclose([r.probability for r in keras_reference],
                             1 / (1 + np.exp(-z / 1.3)), atol=1e-5)
  labels = [r.label for r in keras_reference]
  assert 0 < sum(labels) < len(labels)  # The threshold splits the images: labels are tested.


def test_bad_files_are_reported_and_the_rest_predicted(exports, image_files, tmp_path, encode):
  empty = tmp_path / 'empty.png'
  empty.write_bytes(b'')
  truncated = tmp_path / 'truncated.png'
  truncated.write_bytes(open(image_files[1], 'rb').read()[:100])
  text = tmp_path / 'notes.png'
  text.write_text('not an image at all\n')
  missing = tmp_path / 'missing.jpg'
  paths = [image_files[0], str(empty), str(truncated), image_files[1], str(text), str(missing)]
  predictor = predict.Predictor(exports['tflite_fp32'])
  results = predictor.predict_files(paths, batch_size=2)
  assert [r.ok for r in results] == [True, False, False, True, False, False]
  assert results[1].error == 'empty file (0 bytes)'
  assert results[2].error.startswith('not a decodable image')
  assert results[4].error.startswith('not a decodable image')
  assert results[5].error == 'no such file'
  assert all(r.probability is None and r.label is None for r in results if not r.ok)
  alone = predictor.predict_files([image_files[0], image_files[1]])
  assert [results[0].probability, results[3].probability] == [a.probability for a in alone]


def test_predict_array_equals_predict_files(exports, image_files):
  predictor = predict.Predictor(exports['saved_model'])
  gray = preprocess.load_image(image_files[1])
  from_array = predictor.predict_array(gray[..., 0], name='array')
  assert from_array.path == 'array'
  assert from_array.probability == pytest.approx(
      predictor.predict_files([image_files[1]])[0].probability, abs=1e-7)
  assert predictor.predict_array(gray).probability == from_array.probability
  with pytest.raises(errors.UsageError, match='uint8 gray image'):
    predictor.predict_array(gray.astype(np.float32))


def test_dicom_predicts_like_the_same_pixels_as_png(exports, tmp_path):
  from PIL import Image
  from pydicom.dataset import Dataset, FileMetaDataset
  from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
  gray = _images(1, seed=3)[0]
  gray = np.round((gray - gray.min()) / (gray.max() - gray.min()) * 255).astype(np.uint8)
  Image.fromarray(gray).save(tmp_path / 'x.png')
  ds = Dataset()
  ds.file_meta = FileMetaDataset()
  ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
  ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
  ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
  ds.set_pixel_data(65535 - gray.astype(np.uint16) * 257, 'MONOCHROME1', 16)  # Inverted.
  ds.save_as(tmp_path / 'IM0001', enforce_file_format=True)  # No extension: found by magic.
  for backend in ('keras', 'tflite_int8'):
    # One image per batch: oneDNN may round a row differently by its place in a batch.
    png, dcm = predict.Predictor(exports[backend]).predict_files(
        [tmp_path / 'x.png', tmp_path / 'IM0001'], batch_size=1)
    assert dcm.ok and dcm.probability == png.probability and dcm.label == png.label


def test_tflite_without_embedded_decision_reads_the_sidecar(exports, tmp_path):
  from ai_edge_litert.tools import flatbuffer_utils
  model = flatbuffer_utils.read_model_from_bytearray(
      bytearray(open(exports['tflite_fp32'], 'rb').read()))
  model.metadata = [m for m in model.metadata if not m.name.startswith(b'covidlib')]
  (tmp_path / 'bare.tflite').write_bytes(bytes(flatbuffer_utils.convert_object_to_bytearray(model)))
  assert predict.Predictor(tmp_path / 'bare.tflite').decision == model_dir_lib.Decision()
  sidecar = model_dir_lib.Decision(threshold=0.7, policy='fixed:0.7')
  model_dir_lib.save_decision(tmp_path, sidecar)
  assert predict.Predictor(tmp_path / 'bare.tflite').decision == sidecar


def test_model_paths_that_are_not_models(tmp_path, exports):
  with pytest.raises(errors.UsageError, match="model '.*nothing.keras' does not exist"):
    predict.Predictor(tmp_path / 'nothing.keras')
  (tmp_path / 'readme.txt').write_text('hello')
  with pytest.raises(errors.ModelLoadError, match='readme.txt: not a model: expected a .keras '
                     'file, a model_dir, a SavedModel folder or a .tflite file'):
    predict.Predictor(tmp_path / 'readme.txt')
  with pytest.raises(errors.ModelLoadError, match='folder holds neither saved_model.pb nor '
                     'model.keras'):
    predict.Predictor(tmp_path)
  (tmp_path / 'broken.tflite').write_bytes(open(exports['tflite_fp32'], 'rb').read()[:300])
  with pytest.raises(errors.ModelLoadError, match='broken.tflite: not a loadable TFLite model'):
    predict.Predictor(tmp_path / 'broken.tflite')
  (tmp_path / 'fake.keras').write_bytes(b'PK not really a zip')
  with pytest.raises(errors.ModelLoadError, match='fake.keras: not a loadable Keras model'):
    predict.Predictor(tmp_path / 'fake.keras')
  assert not os.path.exists(tmp_path / 'nothing.keras')


def test_keras_model_with_a_lambda_layer_is_refused(tmp_path):
  inputs = keras.Input((16, 16, 1))
  outputs = keras.layers.Lambda(lambda t: t[:, 0, 0, :] * 0 + 0.5)(inputs)
  keras.Model(inputs, outputs).save(tmp_path / 'lambda.keras')
  with pytest.raises(errors.ModelLoadError, match='lambda.keras: refused to load: it holds a '
                     'Lambda layer'):
    predict.Predictor(tmp_path / 'lambda.keras')


def test_saved_model_without_assets_takes_the_threshold_from_its_graph(exports, tmp_path):
  import shutil
  copy = tmp_path / 'sm'
  shutil.copytree(exports['saved_model'], copy)
  shutil.rmtree(copy / 'assets.extra')
  decision = predict.Predictor(copy).decision
  assert decision.threshold == pytest.approx(0.45) and 'SavedModel graph' in decision.policy


def test_a_model_dir_with_its_own_class_names_predicts_them(exports, image_files, tmp_path):
  """config.json's class_names (a user's own dataset) name each Prediction's class."""
  import shutil
  run = tmp_path / 'run'
  shutil.copytree(exports['model_dir'], run)
  config = model_dir_lib.read_json(run / 'config.json')
  model_dir_lib.write_json(run / 'config.json', {**config, 'class_names': ['normal', 'pneumonia']})
  own = predict.Predictor(str(run)).predict_files(image_files[:4])
  stock = predict.Predictor(exports['model_dir']).predict_files(image_files[:4])
  for mine, theirs in zip(own, stock):
    assert mine.probability == theirs.probability and mine.label == theirs.label
    assert mine.class_name == ('normal', 'pneumonia')[mine.label]
    assert theirs.class_name == ('normal', 'covid')[theirs.label]
