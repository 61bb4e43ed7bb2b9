"""covidlib.edge, covidlib.tflite_metadata and covidlib-predict-edge: the TensorFlow-free route.

    .venv/bin/python -m pytest tests/covidlib/test_edge.py -q

Pillow decoding against TensorFlow's (`covidlib.preprocess.decode_image`), numpy preprocessing
against `tf.image.resize`, eagerly and inside tf.data; the edge predictor against the full route
(`covidlib.predict.Predictor`) on the same .tflite files; the uint8_image variant (resize inside
the graph) against the Keras model on images of assorted sizes; bad files; the binary; and that
none of it imports TensorFlow.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from PIL import Image

from covidlib import edge
from covidlib import errors
from covidlib import model_dir as model_dir_lib
from covidlib import predict
from covidlib import preprocess
from covidlib import tflite_metadata
from covidlib.cli import predict_edge as cli

SIZE = 24
DECISION = model_dir_lib.Decision(threshold=0.45, policy='youden', temperature=1.3,
                                  split='validation')
HEAVY = ('tensorflow', 'keras', 'absl', 'exporters', 'tensorflow_datasets', 'jax', 'torch')


def _images(n, seed, low=12, high=90):
  """X-ray-like uint8 (H, W) images of assorted sizes, smaller and larger than SIZE."""
  rs = np.random.RandomState(seed)
  out = []
  for _ in range(n):
    h, w = rs.randint(low, high, size=2)
    base = np.linspace(rs.uniform(0, 120), rs.uniform(120, 255), w)[None, :]
    blob = 120 * np.exp(-((np.arange(h)[:, None] - rs.uniform(0, h)) ** 2) / (2 * (h / 4) ** 2))
    out.append(np.clip(base + blob + rs.normal(0, 10, (h, w)), 0, 255).astype(np.uint8))
  return out


def _encode(array, fmt='PNG', mode=None, **kwargs) -> bytes:
  buffer = io.BytesIO()
  image = Image.fromarray(array, mode) if mode else Image.fromarray(array)
  image.save(buffer, fmt, **kwargs)
  return buffer.getvalue()


def _model(channels: int = 1) -> keras.Model:
  """A tiny covidlib-contract model, logits spread to std 2 over generated images."""
  keras.utils.set_random_seed(0)
  inputs = keras.Input((SIZE, SIZE, channels), name='image')
  x = keras.layers.Conv2D(8, 3, strides=2, activation='relu')(inputs)
  x = keras.layers.Conv2D(8, 3, activation='relu')(x)
  x = keras.layers.Flatten()(x)
  x = keras.layers.Dense(64, activation='relu')(x)
  outputs = keras.layers.Dense(1, activation='sigmoid', name='probability')(x)
  model = keras.Model(inputs, outputs)
  calibration = np.stack([preprocess.preprocess(i[..., None], SIZE, channels).numpy()
                          for i in _images(30, seed=5)])
  features = keras.Model(inputs, model.get_layer('probability').input)(calibration)
  kernel, bias = model.get_layer('probability').get_weights()
  logits = np.asarray(features) @ kernel + bias
  scale = 2.0 / max(float(logits.std()), 1e-6)
  model.get_layer('probability').set_weights([kernel * scale,
                                              (bias - float(logits.mean())) * scale])
  model.calibration = calibration
  return model


@pytest.fixture(scope='module')
def exports(tmp_path_factory):
  """A model_dir and .tflite variants of it: fp32, int8 (preprocessed input), uint8_image."""
  from exporters import tflite
  root = tmp_path_factory.mktemp('edge')
  model = _model()
  run = root / 'run'
  run.mkdir()
  model.save(run / 'model.keras')
  model_dir_lib.write_json(run / 'config.json', {'model': 'tiny', 'image_size': SIZE,
                                                 'channels': 1})
  model_dir_lib.save_decision(run, DECISION)
  paths = {'model_dir': str(run)}
  for name, convert in (
      ('fp32', lambda: tflite.convert_tflite(model, 'fp32', decision=DECISION)),
      ('int8', lambda: tflite.convert_tflite(model, 'int8', model.calibration,
                                             decision=DECISION)),
      ('uint8_image', lambda: tflite.convert_tflite_uint8_image(model, 'fp32', DECISION)),
      ('uint8_image_dynamic',
       lambda: tflite.convert_tflite_uint8_image(model, 'dynamic', DECISION))):
    path = root / f'model_{name}.tflite'
    path.write_bytes(convert())
    paths[name] = str(path)
  return paths


@pytest.fixture(scope='module')
def image_files(tmp_path_factory):
  root = tmp_path_factory.mktemp('edge_images')
  paths = []
  for i, image in enumerate(_images(10, seed=9)):
    path = root / f'x{i:02d}.{("png", "jpg", "bmp")[i % 3]}'
    Image.fromarray(image).save(path)
    paths.append(str(path))
  return paths


# ------------------------------------------------------------------ Nothing heavy is imported.

def test_edge_modules_import_no_tensorflow():
  code = ('import sys; import covidlib.edge, covidlib.cli.predict_edge, covidlib.tflite_metadata,'
          ' covidlib.results, covidlib.dicom; '
          f'print(sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r})))')
  done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                        timeout=60, check=True)
  assert done.stdout.strip() == '[]', done.stdout


# ------------------------------------------------------------------ Metadata, one format.

def test_metadata_reader_agrees_with_the_flatbuffer_schema(exports):
  from ai_edge_litert.tools import flatbuffer_utils
  for name in ('fp32', 'int8', 'uint8_image'):
    content = open(exports[name], 'rb').read()
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(content))
    want = {m.name.decode(): bytes(model.buffers[m.buffer].data) for m in model.metadata}
    assert tflite_metadata.read_metadata(content) == want
    info = tflite_metadata.read_model_info(content)
    assert info.labels == ('normal', 'covid') and info.decision == DECISION
    assert (info.input or {}).get('kind') == ('uint8_image' if name == 'uint8_image' else None)


def test_other_covidlib_entries_are_returned_as_extra(exports):
  content = open(exports['fp32'], 'rb').read()
  content = tflite_metadata.embed_metadata(content, {'covidlib_shift': b'{"mean": 1.5}'})
  assert tflite_metadata.read_model_info(content).extra == {'shift': {'mean': 1.5}}
  bad = tflite_metadata.embed_metadata(content, {'covidlib_decision': b'{"threshold": '})
  with pytest.raises(errors.ModelLoadError, match='malformed covidlib metadata'):
    tflite_metadata.read_model_info(bad)
  for garbage in (b'', b'\x00' * 3, b'\x10\x00\x00\x00TFL3' + b'\xff' * 8, content[:100]):
    with pytest.raises(errors.ModelLoadError, match='not a readable TFLite flatbuffer'):
      tflite_metadata.read_metadata(garbage)


# ------------------------------------------------------------------ Decoding and preprocessing.

def _decode_cases():
  rs = np.random.RandomState(0)
  gray = np.clip(np.linspace(0, 200, 40)[None, :] + np.linspace(0, 50, 30)[:, None]
                 + rs.randint(0, 9, (30, 40)), 0, 255).astype(np.uint8)
  rgb = np.stack([gray, 255 - gray, np.roll(gray, 5, axis=1)], axis=-1)
  cmyk = np.stack([gray, 255 - gray, gray // 2, np.full_like(gray, 30)], axis=-1)
  rgba = np.dstack([rgb, np.full_like(gray, 128)])
  # Saturated colour marks on an odd-sized film: chroma clipping, where upsampling shows.
  vivid = np.repeat(np.pad(gray, ((0, 3), (0, 1)), mode='edge')[..., None], 3, axis=-1)
  vivid[5:12, 7:20] = (250, 10, 10)
  vivid[15:30, 30:35] = (0, 230, 40)
  return {  # name: (bytes, largest allowed difference in gray levels)
      'gray_png': (_encode(gray), 0),
      'rgb_png': (_encode(rgb), 0),
      'rgba_png': (_encode(rgba, mode='RGBA'), 0),
      'gray_alpha_png': (_encode(np.dstack([gray, gray]), mode='LA'), 0),
      'palette_png': (_png_palette(rgb), 0),
      'png_16_bit': (_encode(gray.astype(np.uint16) * 257 + 100), 0),
      'one_bit_png': (_png_mode(gray > 100, '1'), 0),
      'gray_jpeg': (_encode(gray, 'JPEG', quality=90), 0),
      'rgb_jpeg_420': (_encode(rgb, 'JPEG', quality=90), 0),
      'rgb_jpeg_422_odd_size': (_encode(vivid, 'JPEG', quality=80, subsampling=1), 0),
      'rgb_jpeg_420_odd_size': (_encode(vivid, 'JPEG', quality=70, subsampling=2), 0),
      'rgb_jpeg_444': (_encode(vivid, 'JPEG', quality=90, subsampling=0), 0),
      'progressive_jpeg': (_encode(vivid, 'JPEG', quality=85, progressive=True), 0),
      'cmyk_jpeg': (_encode(cmyk, 'JPEG', mode='CMYK', quality=95), 3),
      'rgb_bmp': (_encode(rgb, 'BMP'), 0),
      'gif': (_png_palette(rgb, 'GIF'), 0),
      'one_by_one': (_encode(gray[3:4, 3:4]), 0),
  }


def _png_palette(rgb, fmt='PNG'):
  buffer = io.BytesIO()
  Image.fromarray(rgb).convert('P', palette=Image.Palette.ADAPTIVE, colors=64).save(buffer, fmt)
  return buffer.getvalue()


def _png_mode(array, mode):
  buffer = io.BytesIO()
  Image.fromarray(array).convert(mode).save(buffer, 'PNG')
  return buffer.getvalue()


@pytest.mark.parametrize('name', list(_decode_cases()))
def test_pillow_decoding_matches_tensorflow(name):
  contents, atol = _decode_cases()[name]
  ours = edge.decode_bytes(contents, name)
  theirs = preprocess.decode_bytes(contents, name)
  assert ours.dtype == np.uint8 and ours.shape == theirs.shape
  assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= atol


@pytest.mark.parametrize('shape', [(1, 1), (7, 300), (24, 24), (23, 25), (90, 61), (513, 400)])
@pytest.mark.parametrize('channels', [1, 3])
def test_numpy_preprocessing_matches_tensorflow(shape, channels):
  import tensorflow as tf
  gray = np.random.RandomState(shape[0]).randint(0, 256, shape + (1,)).astype(np.uint8)
  ours = edge.preprocess(gray, SIZE, channels)
  eager = preprocess.preprocess(gray, SIZE, channels).numpy()
  mapped = next(iter(tf.data.Dataset.from_tensors(gray).map(
      lambda g: preprocess.preprocess(g, SIZE, channels)))).numpy()
  assert ours.shape == eager.shape == (SIZE, SIZE, channels) and ours.dtype == np.float32
  np.testing.assert_allclose(ours, eager, atol=1e-6, rtol=0)
  np.testing.assert_allclose(ours, mapped, atol=1e-6, rtol=0)
  assert np.abs(ours - eager).max() * 255 < 1e-3  # Far within one gray level.


def test_resize_spans_are_tensorflows_weights():
  """Resizing a one-hot row reads the weights back out of tf.image.resize."""
  import tensorflow as tf
  for in_size, out_size in ((5, 24), (24, 24), (100, 24), (1000, 7)):
    starts, weights = edge.resize_spans(in_size, out_size)
    dense = np.zeros((out_size, in_size), np.float32)
    for i in range(out_size):
      for t in range(weights.shape[1]):
        if starts[i] + t < in_size:
          dense[i, starts[i] + t] += weights[i, t]
    eye = np.eye(in_size, dtype=np.float32)[:, :, None, None]  # in_size images of (in, 1, 1).
    tf_dense = tf.image.resize(eye, [out_size, 1], method='bilinear', antialias=True)
    np.testing.assert_allclose(dense, tf_dense.numpy()[:, :, 0, 0].T, atol=1e-6)


# ------------------------------------------------------------------ Predictions.

# int8: the two routes' float inputs differ by ~1e-7 (float rounding), which can move a value
# across an int8 quantization boundary now and then and flip a few steps of the output.
@pytest.mark.parametrize('variant, tolerance', [('fp32', 1e-5), ('int8', 0.05)])
def test_edge_predicts_like_the_full_route_on_the_same_file(exports, image_files, variant,
                                                            tolerance):
  full = predict.Predictor(exports[variant]).predict_files(image_files)
  ours = edge.EdgePredictor(exports[variant])
  assert ours.kind == 'preprocessed' and ours.decision == DECISION
  got = ours.predict_files(image_files)
  assert [r.path for r in got] == image_files and all(r.ok for r in got)
  p = np.array([r.probability for r in got])
  want = np.array([r.probability for r in full])
  assert np.abs(p - want).max() <= tolerance
  assert np.mean(np.abs(p - want) <= 1e-5) >= 0.8
  assert np.mean([a.label == b.label for a, b in zip(got, full)]) >= 0.9


@pytest.mark.parametrize('variant, tolerance, agreement', [
    ('uint8_image', 1e-5, 1.0), ('uint8_image_dynamic', 0.05, 0.9)])
def test_uint8_image_variant_matches_keras_at_original_sizes(exports, variant, tolerance,
                                                             agreement):
  images = _images(24, seed=11, low=5, high=200)
  assert len({i.shape for i in images}) > 20  # Sizes vary, both sides of SIZE.
  reference = predict.Predictor(exports['model_dir'])
  want = np.array([reference.predict_array(i).probability for i in images])
  ours = edge.EdgePredictor(exports[variant])
  assert (ours.kind, ours.image_size, ours.channels) == ('uint8_image', SIZE, 1)
  got = np.array([ours.predict_array(i).probability for i in images])
  assert np.abs(got - want).max() <= tolerance
  assert np.mean((got >= 0.45) == (want >= 0.45)) >= agreement
  # The same interpreter, sizes revisited in another order: no state leaks between sizes.
  again = np.array([ours.predict_array(i).probability for i in images[::-1]])[::-1]
  np.testing.assert_allclose(again, got, atol=1e-6)


def test_full_route_runs_the_uint8_image_variant(exports, image_files):
  keras_route = predict.Predictor(exports['model_dir']).predict_files(image_files)
  full = predict.Predictor(exports['uint8_image'])
  assert (full.format, full.image_size, full.channels) == ('tflite', SIZE, 1)
  got = full.predict_files(image_files, batch_size=3)
  np.testing.assert_allclose([r.probability for r in got],
                             [r.probability for r in keras_route], atol=1e-5)
  gray = preprocess.load_image(image_files[0])
  assert full.predict_array(gray).probability == got[0].probability
  with pytest.raises(errors.UsageError, match='takes decoded uint8 images of any size'):
    full.predict_preprocessed(np.zeros((1, SIZE, SIZE, 1), np.float32))


def test_uint8_image_variant_rejects_int8_and_describes_its_input(exports):
  from exporters import tflite
  with pytest.raises(errors.UsageError, match="'int8' is not supported for the uint8_image"):
    tflite.convert_tflite_uint8_image(_model(), 'int8')
  info = tflite_metadata.read_model_info(open(exports['uint8_image'], 'rb').read())
  assert info.input['shape'] == [1, -1, -1, 1] and info.input['dtype'] == 'uint8'
  assert info.input['image_size'] == SIZE and info.input['output']['name'] == 'probability'


def _png_declaring(side: int) -> bytes:
  """A header-only PNG declaring side x side gray pixels (valid chunk CRCs, no pixel data)."""
  import struct
  import zlib

  def chunk(kind, payload):
    return (struct.pack('>I', len(payload)) + kind + payload
            + struct.pack('>I', zlib.crc32(kind + payload)))
  return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', side, side, 8, 0, 0, 0, 0))
          + chunk(b'IDAT', zlib.compress(b'\0' * 64)) + chunk(b'IEND', b''))


@pytest.mark.parametrize('side', [9000, 30000])  # Above our limit; also above Pillow's own.
def test_bomb_is_refused_from_its_header(side):
  with pytest.raises(errors.InvalidImageError,
                     match=f'bomb.png: image declares more pixels than the limit of {64 << 20}$'):
    edge.decode_bytes(_png_declaring(side), 'bomb.png')


def test_bad_files_are_reported_and_the_rest_predicted(exports, image_files, tmp_path):
  (tmp_path / 'empty.png').write_bytes(b'')
  (tmp_path / 'truncated.png').write_bytes(open(image_files[0], 'rb').read()[:100])
  (tmp_path / 'notes.png').write_text('not an image at all\n')
  (tmp_path / 'bomb.png').write_bytes(_encode(np.zeros((100, 100), np.uint8)))
  paths = [image_files[0], str(tmp_path / 'empty.png'), str(tmp_path / 'truncated.png'),
           image_files[3], str(tmp_path / 'notes.png'), str(tmp_path / 'missing.jpg'),
           str(tmp_path / 'bomb.png')]
  for variant in ('fp32', 'uint8_image'):
    predictor = edge.EdgePredictor(exports[variant], max_pixels=9000)
    got = predictor.predict_files(paths, workers=3)
    assert [r.ok for r in got] == [True, False, False, True, False, False, False]
    assert got[1].error == 'empty file (0 bytes)'
    assert got[2].error.startswith('not a decodable image')
    assert got[4].error == 'not a decodable image (Unknown image file format)'
    assert got[5].error == 'no such file'
    assert got[6].error == 'image declares more pixels than the limit of 9000'
    assert all(r.probability is None and r.label is None for r in got if not r.ok)
    serial = predictor.predict_files(paths, workers=0)
    assert [r.probability for r in serial] == [r.probability for r in got]


def test_dicom_predicts_like_the_same_pixels_as_png(exports, tmp_path):
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
  np.testing.assert_array_equal(edge.read_image(tmp_path / 'IM0001'),
                                predict.read_image(tmp_path / 'IM0001'))
  for variant in ('int8', 'uint8_image'):
    png, dcm = edge.EdgePredictor(exports[variant]).predict_files(
        [tmp_path / 'x.png', tmp_path / 'IM0001'])
    assert dcm.ok and dcm.probability == png.probability and dcm.label == png.label


def test_sidecar_decision_and_models_that_are_not_tflite(exports, tmp_path):
  from ai_edge_litert.tools import flatbuffer_utils
  model = flatbuffer_utils.read_model_from_bytearray(
      bytearray(open(exports['fp32'], 'rb').read()))
  model.metadata = [m for m in model.metadata if not m.name.startswith(b'covidlib')]
  (tmp_path / 'bare.tflite').write_bytes(bytes(flatbuffer_utils.convert_object_to_bytearray(model)))
  assert edge.EdgePredictor(tmp_path / 'bare.tflite').decision == model_dir_lib.Decision()
  sidecar = model_dir_lib.Decision(threshold=0.7, policy='fixed:0.7')
  model_dir_lib.save_decision(tmp_path, sidecar)
  assert edge.EdgePredictor(tmp_path / 'bare.tflite').decision == sidecar
  with pytest.raises(errors.UsageError, match="model '.*gone.tflite' does not exist"):
    edge.EdgePredictor(tmp_path / 'gone.tflite')
  with pytest.raises(errors.ModelLoadError, match='run: a folder: the edge route runs .tflite'):
    edge.EdgePredictor(exports['model_dir'])
  with pytest.raises(errors.ModelLoadError, match='model.keras: not a .tflite file'):
    edge.EdgePredictor(os.path.join(exports['model_dir'], 'model.keras'))
  (tmp_path / 'broken.tflite').write_bytes(open(exports['fp32'], 'rb').read()[:300])
  with pytest.raises(errors.ModelLoadError, match='broken.tflite: not a loadable TFLite model'):
    edge.EdgePredictor(tmp_path / 'broken.tflite')


# ------------------------------------------------------------------ The binary.

def test_binary_rows_errors_and_exit_statuses(exports, image_files, tmp_path, capsys):
  folder = tmp_path / 'in'
  folder.mkdir()
  for path in image_files[:3]:
    (folder / os.path.basename(path)).write_bytes(open(path, 'rb').read())
  (folder / 'empty.png').write_bytes(b'')
  (folder / '.hidden.png').write_bytes(b'')
  argv = [cli.PROG, f'--model={exports["uint8_image"]}', '--format=csv', str(folder)]
  assert cli.call_main(argv) == 1
  out, err = capsys.readouterr()
  lines = out.splitlines()
  assert lines[0] == 'path,probability,label,class_name,threshold,error,shift_score,in_distribution,decision'
  assert [line.split(',')[0] for line in lines[1:]] == [
      str(folder / n) for n in ('empty.png', 'x00.png', 'x01.jpg', 'x02.bmp')]
  assert lines[1].endswith(',0.45,empty file (0 bytes),,,')  # No shift score here.
  assert err == (f'{cli.PROG}: error: 1 of 4 files could not be read: '
                 f'{folder / "empty.png"}: empty file (0 bytes)\n')
  good = [str(folder / 'x00.png')]
  assert cli.call_main([cli.PROG, '--format', 'json', '--model', exports['fp32'], *good]) == 0
  document = json.loads(capsys.readouterr().out)
  assert document['n'] == 1 and document['results'][0]['class_name'] in ('normal', 'covid')
  cases = [
      ([*good], 2, 'flag --model is required'),
      ([f'--model={exports["fp32"]}'], 2, 'no input: give image files or folders after the flags'),
      ([f'--model={exports["fp32"]}', '--treshold=0.3', *good], 2,
       "Unknown command line flag 'treshold'"),
      ([f'--model={exports["fp32"]}', '--format=xml', *good], 2, 'argument --format: invalid'),
      ([f'--model={tmp_path / "none.tflite"}', *good], 2,
       f"model '{tmp_path / 'none.tflite'}' does not exist"),
      ([f'--model={image_files[0]}', *good], 1, f'{image_files[0]}: not a .tflite file'),
  ]
  for args, status, message in cases:
    assert cli.call_main([cli.PROG, *args]) == status, message
    out, err = capsys.readouterr()
    assert out == '' and err.startswith(f'{cli.PROG}: error: {message}') and err.count('\n') == 1


def test_without_a_shift_score_the_shift_columns_stay_blank(exports, image_files, capsys):
  """A model exported without a shift score: one output, no covidlib_shift, blank cells."""
  from ai_edge_litert.interpreter import Interpreter
  content = open(exports['uint8_image'], 'rb').read()
  assert tflite_metadata.SHIFT not in tflite_metadata.read_metadata(content)
  assert 'shift_output' not in tflite_metadata.read_model_info(content).input
  assert len(Interpreter(model_content=content).get_output_details()) == 1
  for variant in ('fp32', 'uint8_image'):  # The last one's results are checked below.
    ours = edge.EdgePredictor(exports[variant])
    assert not ours.has_shift and ours.shift_threshold is None
    got = ours.predict_files(image_files[:2])
    assert all(r.ok and r.shift_score is None and r.in_distribution is None for r in got)
  argv = [cli.PROG, f'--model={exports["uint8_image"]}', '--format=csv', *image_files[:2]]
  assert cli.call_main(argv) == 0
  header, *rows = capsys.readouterr().out.splitlines()
  assert header.endswith(',shift_score,in_distribution,decision') and len(rows) == 2
  for row, result in zip(rows, got):
    assert row.endswith(f',,,{result.class_name}')  # error, shift_score, in_distribution blank.


@pytest.mark.slow
def test_console_script_runs_without_importing_tensorflow(exports, image_files):
  code = ('import sys; sys.argv = ["covidlib-predict-edge", "--format=csv", '
          f'"--model={exports["uint8_image"]}", {image_files[0]!r}]; '
          'from covidlib.cli import predict_edge; status = predict_edge.call_main(sys.argv); '
          f'print(sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r}))); '
          'sys.exit(status)')
  done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=60)
  assert done.returncode == 0, done.stderr[-2000:]
  assert done.stdout.splitlines()[-1] == '[]' and 'Traceback' not in done.stderr
