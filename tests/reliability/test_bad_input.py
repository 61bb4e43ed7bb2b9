"""Issue 6's bad-input matrix: one table of generated files, driven through every path.

    .venv/bin/python -m pytest tests/reliability/test_bad_input.py -q

Paths: covidlib's decode path (`covidlib.preprocess.load_image`), the `covidlib-predict` binary
(one subprocess over a folder of every case), a SavedModel server process (the bytes signature,
tests/reliability/serve_worker.py), dataset building from a folder (`covidlib.data.check_images`
and `load_folder`), and the `covidlib-train` binary on a folder dataset. Valid-but-odd images give
the same pixels as PIL (the reference decoder) and the same probability on every path; invalid
ones give a typed error naming the file, and batch tools go on with the rest, list every failure
and exit non-zero.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import re
import struct
import subprocess
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from covidlib import data
from covidlib import errors
from covidlib import predict
from covidlib import preprocess

LUMA = np.array([0.2989, 0.5870, 0.1140])
LIMIT = preprocess.DEFAULT_MAX_PIXELS


# ---------------------------------------------------------------------------------------------
# The table.

def _save(image: Image.Image, fmt: str, **kwargs) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, fmt, **kwargs)
  return buffer.getvalue()


def _chunk(kind: bytes, payload: bytes) -> bytes:
  return (struct.pack('>I', len(payload)) + kind + payload
          + struct.pack('>I', zlib.crc32(kind + payload)))


def png_declaring(side: int, rows: int = 0, bit_depth: int = 8) -> bytes:
  """A well-formed PNG (valid chunk CRCs and zlib stream) declaring side x side gray pixels.

  rows=0: the IDAT holds 4 KB of noise only (not even one row), so the file is a few KB and its
  pixel data is invalid (too short) for a decoder: a header-only bomb. rows=side: a complete,
  valid image of zeros (a real decompression bomb: ~side*side/8000 bytes at bit_depth 1).
  """
  ihdr = struct.pack('>IIBBBBB', side, side, bit_depth, 0, 0, 0, 0)
  row_bytes = 1 + (side * bit_depth + 7) // 8
  compressor = zlib.compressobj(9)
  if rows:
    row = b'\0' * row_bytes
    idat = b''.join(compressor.compress(row) for _ in range(rows))
  else:
    rs = np.random.RandomState(0)
    idat = compressor.compress(rs.randint(0, 256, 64 * 64, np.uint8).tobytes())
  idat += compressor.flush()
  return (b'\x89PNG\r\n\x1a\n' + _chunk(b'IHDR', ihdr) + _chunk(b'IDAT', idat)
          + _chunk(b'IEND', b''))


def dicom_without_pixels() -> bytes:
  from pydicom.dataset import Dataset, FileMetaDataset
  from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

  ds = Dataset()
  ds.file_meta = FileMetaDataset()
  ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
  ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
  ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
  ds.Modality, ds.PatientID = 'CR', 'anon'
  buffer = io.BytesIO()
  ds.save_as(buffer, enforce_file_format=True)
  return buffer.getvalue()


@dataclasses.dataclass(frozen=True)
class Case:
  filename: str
  contents: bytes
  error: str | None  # None: a valid image. Else how the error reason starts.
  dicom_error: str | None = None  # The reason on DICOM-aware paths (covidlib.predict), if other.
  reference: np.ndarray | None = None  # Valid images: the gray pixels PIL gives.
  atol: float = 0.0  # |covidlib - PIL| allowed (JPEG decoders may round differently).

  @property
  def predict_error(self) -> str | None:
    return self.dicom_error or self.error


def _pil_gray(contents: bytes) -> np.ndarray:
  """The reference: PIL decodes, 16 bits scale by 1/257, colour goes through BT.601 luma."""
  image = Image.open(io.BytesIO(contents))
  if image.mode in ('I;16', 'I;16B', 'I'):
    return np.round(np.asarray(image, np.float64) / 257.0)
  return np.round(np.asarray(image.convert('RGB'), np.float64) @ LUMA)


def _cases() -> dict[str, Case]:
  rs = np.random.RandomState(0)
  gray = np.clip(np.linspace(0, 200, 30)[None, :] + np.linspace(0, 50, 20)[:, None]
                 + rs.randint(0, 5, (20, 30)), 0, 255).astype(np.uint8)
  png = _save(Image.fromarray(gray), 'PNG')
  jpeg = _save(Image.fromarray(gray), 'JPEG', quality=95)
  cmyk = np.stack([gray, 255 - gray, gray // 2, np.full_like(gray, 30)], axis=-1)
  rgba = np.dstack([gray, gray, gray, np.full_like(gray, 128)])

  def valid(filename, contents, atol=0.0):
    return Case(filename, contents, None, reference=_pil_gray(contents), atol=atol)

  not_decodable = 'not a decodable image'
  return {
      'zero_byte': Case('zero.png', b'', 'empty file (0 bytes)'),
      'truncated_jpeg': Case('truncated.jpg', jpeg[:len(jpeg) // 2],
                             f'{not_decodable} (Invalid JPEG data'),
      'truncated_png': Case('truncated.png', png[:len(png) // 2],
                            f'{not_decodable} (Invalid PNG data'),
      'text_named_png': Case('notes.png', b'Patient list, do not share\n' * 8,
                             f'{not_decodable} (Unknown image file format'),
      'html_named_jpg': Case('download.jpg',
                             b'<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head>'
                             b'<body><h1>Not Found</h1></body></html>\n',
                             f'{not_decodable} (Unknown image file format'),
      'decompression_bomb': Case('bomb.png', png_declaring(30000),
                                 f'image declares more pixels than the limit of {LIMIT}'),
      'dicom_without_pixels': Case('no_pixels.dcm', dicom_without_pixels(),
                                   f'{not_decodable} (Unknown image file format',
                                   dicom_error='DICOM file has no pixel data'),
      'cmyk_jpeg': valid('cmyk.jpg', _save(Image.fromarray(cmyk, 'CMYK'), 'JPEG', quality=95),
                         atol=3),
      'palette_png': valid('palette.png', _save(Image.fromarray(gray).convert('P'), 'PNG')),
      'png_16_bit': valid('deep.png', _save(Image.fromarray(gray.astype(np.uint16) * 257 + 100),
                                            'PNG')),
      'rgba_png': valid('rgba.png', _save(Image.fromarray(rgba, 'RGBA'), 'PNG')),
      'one_by_one': valid('one.png', _save(Image.fromarray(gray[5:6, 7:8]), 'PNG')),
      'ten_by_ten': valid('ten.jpg', _save(Image.fromarray(gray[:10, 10:20]), 'JPEG'), atol=2),
  }


CASES = _cases()
NAMES = list(CASES)
INVALID = [name for name in NAMES if CASES[name].error]


@pytest.fixture(scope='module')
def case_folder(tmp_path_factory):
  """ROOT/<file of each case> plus ROOT/good.png."""
  root = tmp_path_factory.mktemp('cases')
  for case in CASES.values():
    (root / case.filename).write_bytes(case.contents)
  (root / 'good.png').write_bytes(_save(Image.fromarray(np.full((24, 24), 90, np.uint8)), 'PNG'))
  return root


@pytest.fixture(scope='module')
def reference_probability(tiny_model_dir):
  """P(COVID-19) of a valid case computed here, from PIL's pixels, by the Keras model itself."""
  from covidlib import model_dir as md

  model = md.load_model(tiny_model_dir)

  def probability(case: Case) -> float:
    gray = case.reference.astype(np.uint8)[..., None]
    return float(np.asarray(model(preprocess.preprocess(gray, 16)[None]))[0, 0])

  return probability


def test_the_table_covers_issue_6(helpers):
  """The cases the issue names, the two kinds, and files that really are what they claim."""
  assert len(INVALID) == 7 and len(NAMES) - len(INVALID) == 6
  assert all(len(CASES[n].contents) < 8192 for n in NAMES)  # A bomb of a few KB.
  assert Image.open(io.BytesIO(CASES['cmyk_jpeg'].contents)).mode == 'CMYK'
  assert Image.open(io.BytesIO(CASES['palette_png'].contents)).mode == 'P'
  assert Image.open(io.BytesIO(CASES['png_16_bit'].contents)).mode.startswith('I')
  assert Image.open(io.BytesIO(CASES['rgba_png'].contents)).mode == 'RGBA'
  with pytest.raises(Image.DecompressionBombError, match='900000000 pixels'):  # PIL agrees.
    Image.open(io.BytesIO(CASES['decompression_bomb'].contents))


# ---------------------------------------------------------------------------------------------
# Path 1: covidlib's decode path.

@pytest.mark.parametrize('name', NAMES)
def test_decode_path(name, tmp_path):
  case = CASES[name]
  path = tmp_path / case.filename
  path.write_bytes(case.contents)
  if case.error is None:
    image = preprocess.load_image(path)
    assert image.dtype == np.uint8 and image.shape == case.reference.shape + (1,)
    np.testing.assert_allclose(image[..., 0], case.reference, atol=case.atol)
    return
  with pytest.raises(errors.InvalidImageError) as raised:
    preprocess.load_image(path)
  assert raised.value.path == str(path)
  assert str(raised.value).startswith(f'{path}: {case.error}'), str(raised.value)


# The "before decoding" part of the bomb, and the limit being a parameter.

def test_bomb_is_refused_before_its_pixels_are_decoded():
  # A header-only bomb: 12000 x 12000 declared, pixel data that no decoder accepts. The limit's
  # message, not the decoder's, proves the check ran first; with the limit raised, the decoder
  # gets the file and rejects its pixel data.
  header_only = png_declaring(12000)
  with pytest.raises(errors.InvalidImageError, match=f'more pixels than the limit of {LIMIT}'):
    preprocess.decode_bytes(header_only, 'header_only.png')
  with pytest.raises(errors.InvalidImageError, match=r'not a decodable image \(Invalid PNG'):
    preprocess.decode_bytes(header_only, 'header_only.png', max_pixels=10**9)
  # A real bomb: 18 KB that do inflate to 144 megapixels. Refused in a small fraction of the
  # time decoding takes (timings are far apart: ~1 ms against ~1 s).
  real = png_declaring(12000, rows=12000, bit_depth=1)
  assert len(real) < 32 * 1024
  start = time.perf_counter()
  with pytest.raises(errors.InvalidImageError, match='more pixels than the limit'):
    preprocess.decode_bytes(real, 'real.png')
  refused = time.perf_counter() - start
  start = time.perf_counter()
  decoded = preprocess.decode_bytes(real, 'real.png', max_pixels=12000 * 12000)
  decoding = time.perf_counter() - start
  assert decoded.shape == (12000, 12000, 1)
  del decoded
  assert refused < decoding / 10, (refused, decoding)


def test_pixel_limit_is_configurable(xray, tmp_path, tiny_model_dir):
  path = tmp_path / 'x.png'
  path.write_bytes(_save(Image.fromarray(xray), 'PNG'))  # 20 x 30 = 600 pixels.
  assert preprocess.load_image(path, max_pixels=600).shape == (20, 30, 1)
  with pytest.raises(errors.InvalidImageError,
                     match=f'{path}: image declares more pixels than the limit of 599'):
    preprocess.load_image(path, max_pixels=599)
  strict = predict.Predictor(tiny_model_dir, max_pixels=599)
  [result] = strict.predict_files([path])
  assert result.error == 'image declares more pixels than the limit of 599'


# ---------------------------------------------------------------------------------------------
# Path 2: the covidlib-predict binary, one process over every case.

@pytest.fixture(scope='module')
def predict_run(case_folder, tiny_model_dir, helpers):
  status, stdout, stderr = helpers.run_binary(
      ['-m', 'covidlib.cli.predict', f'--model={tiny_model_dir}', '--format=json',
       str(case_folder)])
  rows = {os.path.basename(r['path']): r for r in json.loads(stdout)['results']} if stdout else {}
  return status, rows, stderr


@pytest.mark.slow  # One process for the module (TensorFlow import, ~5 s).
def test_predict_binary_goes_on_lists_every_failure_and_exits_1(predict_run, case_folder,
                                                                 helpers):
  status, rows, stderr = predict_run
  assert status == 1, stderr[-3000:]
  assert len(rows) == len(NAMES) + 1 and rows['good.png']['error'] is None
  ours = helpers.our_lines(stderr, helpers.libjpeg_noise)  # libjpeg's line: RELIABILITY.md.
  assert len(ours) == 1 and 'Traceback' not in stderr, stderr[-3000:]
  assert ours[0].startswith(f'covidlib-predict: error: {len(INVALID)} of {len(NAMES) + 1} files '
                            'could not be read: ')
  for name in INVALID:
    case = CASES[name]
    assert f'{case_folder / case.filename}: {case.predict_error}' in ours[0], name


@pytest.mark.slow  # One process for the module (TensorFlow import, ~5 s).
@pytest.mark.parametrize('name', NAMES)
def test_predict_binary(name, predict_run, reference_probability):
  _, rows, _ = predict_run
  case = CASES[name]
  row = rows[case.filename]
  if case.error is None:
    assert row['error'] is None
    expected = reference_probability(case)
    assert row['probability'] == pytest.approx(expected, abs=0.02 if case.atol else 1e-6)
    assert row['label'] == int(row['probability'] >= 0.5)
    return
  assert row['probability'] is None and row['label'] is None
  assert row['error'].startswith(case.predict_error), row['error']


# ---------------------------------------------------------------------------------------------
# Path 2b: covidlib-predict-edge (LiteRT, numpy and Pillow; no TensorFlow), one process over
# every case, with the uint8_image .tflite of the same model. Its decoder is Pillow's, so the
# wording after 'not a decodable image' is Pillow's; the prefix and the other reasons are the
# same as covidlib-predict's.

# What LiteRT prints on stderr when it creates its CPU delegate (not covidlib's line).
LITERT_NOISE = re.compile(r'^INFO: Created TensorFlow Lite XNNPACK delegate for CPU\.$')


@pytest.fixture(scope='module')
def edge_run(case_folder, tiny_model_dir, helpers, tmp_path_factory):
  from covidlib import model_dir as md
  from exporters import tflite

  path = tmp_path_factory.mktemp('edge') / 'model_uint8_image.tflite'
  path.write_bytes(tflite.convert_tflite_uint8_image(
      md.load_model(tiny_model_dir), 'fp32', md.load_decision(tiny_model_dir)))
  status, stdout, stderr = helpers.run_binary(
      ['-m', 'covidlib.cli.predict_edge', f'--model={path}', '--format=json', str(case_folder)])
  rows = {os.path.basename(r['path']): r for r in json.loads(stdout)['results']} if stdout else {}
  return status, rows, stderr


@pytest.mark.slow  # Converts a model (~2 s).
def test_edge_binary_goes_on_lists_every_failure_and_exits_1(edge_run, case_folder, helpers):
  status, rows, stderr = edge_run
  assert status == 1, stderr[-3000:]
  assert len(rows) == len(NAMES) + 1 and rows['good.png']['error'] is None
  ours = helpers.our_lines(stderr, LITERT_NOISE)
  assert len(ours) == 1 and 'Traceback' not in stderr, stderr[-3000:]
  assert ours[0].startswith(f'covidlib-predict-edge: error: {len(INVALID)} of {len(NAMES) + 1} '
                            'files could not be read: ')
  for name in INVALID:
    reason = CASES[name].predict_error.split(' (')[0]
    assert f'{case_folder / CASES[name].filename}: {reason}' in ours[0], name


@pytest.mark.slow  # Converts a model (~2 s).
@pytest.mark.parametrize('name', NAMES)
def test_edge_binary(name, edge_run, predict_run):
  """Every case as covidlib-predict gives it: the same probability (the same decoded pixels;
  CMYK JPEG within the decoders' 3 levels), or an error with the same reason."""
  _, rows, _ = edge_run
  case = CASES[name]
  row, full = rows[case.filename], predict_run[1][case.filename]
  if case.error is None:
    assert row['error'] is None
    assert row['probability'] == pytest.approx(full['probability'],
                                               abs=0.02 if name == 'cmyk_jpeg' else 1e-5)
    assert row['label'] == int(row['probability'] >= 0.5)
    return
  assert row['probability'] is None and row['label'] is None
  assert row['error'].startswith(case.predict_error.split(' (')[0]), row['error']
  if name in ('zero_byte', 'decompression_bomb', 'dicom_without_pixels'):
    assert row['error'] == full['error']
  if name in ('text_named_png', 'html_named_jpg'):
    assert row['error'] == 'not a decodable image (Unknown image file format)'


# ---------------------------------------------------------------------------------------------
# Path 3: the SavedModel bytes signature, in a server process that must outlive bad requests.

@pytest.fixture(scope='module')
def server(tiny_saved_model, helpers):
  worker = os.path.join(os.path.dirname(__file__), 'serve_worker.py')
  proc = helpers.start_binary([worker, tiny_saved_model], stdin=subprocess.PIPE)
  hello = json.loads(proc.stdout.readline() or '{}')
  assert hello.get('ready'), proc.stderr.read()[-3000:] if proc.poll() is not None else hello

  def request(*images: bytes) -> dict:
    proc.stdin.write(json.dumps([base64.b64encode(i).decode() for i in images]) + '\n')
    proc.stdin.flush()
    return json.loads(proc.stdout.readline())

  yield proc, hello['pid'], request
  proc.stdin.close()
  assert proc.wait(timeout=60) == 0  # It ended when its input ended, not before.


@pytest.mark.slow  # One process for the module (TensorFlow import, ~5 s).
@pytest.mark.parametrize('name', NAMES)
def test_saved_model_server(name, server, predict_run, case_folder):
  proc, pid, request = server
  case = CASES[name]
  good = (case_folder / 'good.png').read_bytes()
  _, rows, _ = predict_run
  reply = request(good, case.contents)
  if case.error is None:  # The server and covidlib-predict agree.
    assert reply['probability'] == pytest.approx(
        [rows['good.png']['probability'], rows[case.filename]['probability']], abs=1e-5)
  else:
    assert reply['error'].startswith('InvalidArgumentError: '), reply
    reason = case.error.split(' (')[-1] if '(' in case.error else case.error
    if case.contents:  # An empty string fails in the decoder with its own wording.
      assert reason in reply['error'], reply
  assert proc.poll() is None and proc.pid == pid  # Alive, the same process...
  again = request(good)  # ...and still serving.
  assert again['probability'] == pytest.approx([rows['good.png']['probability']], abs=1e-5)


# ---------------------------------------------------------------------------------------------
# Path 4: dataset building from a folder.

@pytest.mark.parametrize('name', NAMES)
def test_dataset_from_folder(name, tmp_path, case_folder):
  case = CASES[name]
  (tmp_path / 'normal').mkdir()
  (tmp_path / 'covid').mkdir()
  good = tmp_path / 'normal' / 'good.png'
  good.write_bytes((case_folder / 'good.png').read_bytes())
  path = tmp_path / 'covid' / case.filename
  path.write_bytes(case.contents)
  found = data.check_images([good, path])
  if case.error is None:
    assert found == []
    images, labels = next(iter(data.load_folder(tmp_path, image_size=16, batch_size=2)))
    assert images.shape == (2, 16, 16, 1) and labels.numpy().tolist() == [0.0, 1.0]
    expected = preprocess.preprocess(case.reference.astype(np.uint8)[..., None], 16).numpy()
    np.testing.assert_allclose(images[1].numpy(), expected, atol=case.atol / 255 + 1e-6)
    return
  assert [type(e) for e in found] == [errors.InvalidImageError]
  assert found[0].path == str(path) and found[0].reason.startswith(case.error)
  with pytest.raises(errors.DataError) as raised:
    data.load_folder(tmp_path, image_size=16)
  assert str(raised.value).startswith(
      f'1 of 2 files are not readable images: {path}: {case.error}'), str(raised.value)


def test_folder_of_every_case_names_each_bad_file(case_folder, tmp_path):
  (tmp_path / 'covid').symlink_to(case_folder, target_is_directory=True)
  with pytest.raises(errors.DataError) as raised:
    data.load_folder(tmp_path, image_size=16)
  assert str(raised.value).startswith(
      f'{len(INVALID)} of {len(NAMES) + 1} files are not readable images: ')
  bad = sorted(os.path.basename(e.path) for e in raised.value.invalid_images)
  assert bad == sorted(CASES[n].filename for n in INVALID)


def test_evaluation_of_a_folder_names_each_bad_file(case_folder, tmp_path, tiny_model_dir):
  """covidlib-evaluate --folder reads through the same loader: refused, every bad file named."""
  from covidlib import scoring
  from covidlib import model_dir as md

  (tmp_path / 'normal').symlink_to(case_folder, target_is_directory=True)
  with pytest.raises(errors.DataError) as raised:
    scoring.load_split(md.load_config(tiny_model_dir), 'test', folder=str(tmp_path))
  bad = sorted(os.path.basename(e.path) for e in raised.value.invalid_images)
  assert bad == sorted(CASES[n].filename for n in INVALID)


# ---------------------------------------------------------------------------------------------
# Path 5: the covidlib-train binary on a folder dataset.

def _train_folder(root, case_names, good):
  for split in ('train', 'validation'):
    for label in ('normal', 'covid'):
      (root / split / label).mkdir(parents=True)
      for i in range(2):
        (root / split / label / f'good{i}.png').write_bytes(good)
  for name in case_names:
    case = CASES[name]
    (root / 'train' / 'covid' / case.filename).write_bytes(case.contents)
  return root


@pytest.mark.slow
def test_training_binary_lists_every_bad_file_and_exits_1(tmp_path, case_folder, helpers):
  root = _train_folder(tmp_path / 'data', NAMES, (case_folder / 'good.png').read_bytes())
  model_dir = tmp_path / 'run'
  status, _, stderr = helpers.run_binary(
      ['-m', 'covidlib.cli.train', f'--model_dir={model_dir}', f'--dataset=folder:{root}',
       '--model=compact_resnet', '--image_size=16', '--batch_size=2', '--epochs=1',
       '--verbose=0'])
  assert status == 1, stderr[-3000:]
  ours = helpers.our_lines(stderr, helpers.libjpeg_noise)
  assert len(ours) == 1 and 'Traceback' not in stderr, stderr[-3000:]
  assert ours[0].startswith(f'covidlib-train: error: {len(INVALID)} of {len(NAMES) + 4} files '
                            'are not readable images: ')
  for name in INVALID:
    case = CASES[name]
    assert f'{root / "train" / "covid" / case.filename}: {case.error}' in ours[0], name
  assert not (model_dir / 'model.keras').exists()


@pytest.mark.slow
def test_training_on_odd_but_valid_images(tmp_path, case_folder):
  """The valid cases train (through covidlib.train, what the binary runs) and the model loads."""
  from covidlib import model_dir as md
  from covidlib import train

  valid = [n for n in NAMES if n not in INVALID]
  root = _train_folder(tmp_path / 'data', valid, (case_folder / 'good.png').read_bytes())
  # 32 px: at 16 compact_resnet's last stages are 1 x 1 maps, where the default recipe's mixup
  # now and then sends a kernel to NaN (tests/covidlib/test_shortcuts.py says more).
  config = train.make_config(model='compact_resnet', image_size=32, batch_size=2, epochs=1,
                             dataset=f'folder:{root}', seed=0, mixed_precision='off')
  history = train.train(config, str(tmp_path / 'run'), verbose=0)
  assert len(history['loss']) == 1 and np.isfinite(history['loss'][0])
  assert md.load_model(tmp_path / 'run').input_shape == (None, 32, 32, 1)
