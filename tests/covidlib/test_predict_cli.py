"""covidlib-predict: table/json/csv rows, bad files listed with exit 1, one-line usage errors,
Grad-CAM overlays; main() in-process under flagsaver, plus one real console run."""

import csv
import io
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver
from PIL import Image

from covidlib import model_dir as model_dir_lib
from covidlib import predict
from covidlib.cli import common
from covidlib.cli import predict as cli

PROG = 'covidlib-predict'


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  """A 16 px model_dir (threshold 0.5), its fp32 .tflite, and a folder of 3 good + 3 bad files."""
  from exporters import tflite
  root = tmp_path_factory.mktemp('predict_cli')
  keras.utils.set_random_seed(0)
  inputs = keras.Input((16, 16, 1))
  x = keras.layers.Conv2D(4, 3, activation='relu', name='conv')(inputs)
  x = keras.layers.GlobalAveragePooling2D()(x)
  logit = keras.layers.Dense(1, name='logit', kernel_initializer='ones',
                             bias_initializer=keras.initializers.Constant(-0.1))(x)
  model = keras.Model(inputs, keras.layers.Activation('sigmoid', name='probability')(logit))
  run = root / 'run'
  run.mkdir()
  model.save(run / 'model.keras')
  model_dir_lib.write_json(run / 'config.json', {'model': 'tiny', 'image_size': 16,
                                                 'channels': 1})
  (root / 'model.tflite').write_bytes(tflite.convert_tflite(model, 'fp32'))
  images = root / 'images'
  (images / 'sub').mkdir(parents=True)
  rs = np.random.RandomState(0)
  for name, level in (('a.png', 30), ('sub/b.jpg', 200), ('c.bmp', 120)):
    Image.fromarray(np.clip(rs.normal(level, 20, (24, 30)), 0, 255).astype(np.uint8)).save(
        images / name)
  (images / 'empty.png').write_bytes(b'')
  (images / 'notes.png').write_text('a text file named .png\n')
  (images / 'truncated.jpg').write_bytes((images / 'sub' / 'b.jpg').read_bytes()[:80])
  (images / '.DS_Store').write_bytes(b'\0\1')
  return {'model_dir': str(run), 'tflite': str(root / 'model.tflite'), 'images': str(images)}


def _main(argv, **values) -> int:
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  defaults = {'model': None, 'format': 'table', 'grad_cam_dir': None, 'num_threads': None}
  with flagsaver.flagsaver(**{**defaults, **values}):
    return common.call_main(cli.main, [PROG] + list(argv), PROG)


def _expected(setup):
  names = ['a.png', 'c.bmp', 'empty.png', 'notes.png', 'sub/b.jpg', 'truncated.jpg']
  paths = [os.path.join(setup['images'], n) for n in names]
  return paths, predict.Predictor(setup['model_dir']).predict_files(paths)


@pytest.mark.parametrize('model', ['model_dir', 'tflite'])
def test_csv_rows_for_a_folder_with_bad_files(model, setup, capsys):
  assert _main([setup['images']], model=setup[model], format='csv') == 1
  out, err = capsys.readouterr()
  rows = list(csv.DictReader(io.StringIO(out)))
  paths, expected = _expected(setup)
  assert [r['path'] for r in rows] == paths  # Sorted, recursive, .DS_Store skipped.
  for row, want in zip(rows, expected):
    if want.ok:
      assert float(row['probability']) == pytest.approx(want.probability, abs=1e-5)
      assert row['class_name'] == want.class_name and row['error'] == ''
    else:
      assert row['probability'] == '' and row['label'] == '' and row['error'] == want.error
  labels = [r['class_name'] for r in rows if r['class_name']]
  assert sorted(set(labels)) == ['covid', 'normal']  # Dark and bright images differ.
  assert err.count('\n') == 1 and err.startswith(f'{PROG}: error: 3 of 6 files could not be read')
  assert 'empty.png: empty file (0 bytes)' in err


def test_json_and_table(setup, capsys):
  good = [os.path.join(setup['images'], n) for n in ('a.png', 'c.bmp')]
  assert _main(good, model=setup['model_dir'], format='json') == 0
  document = json.loads(capsys.readouterr().out)
  _, expected = _expected(setup)
  assert document['n'] == 2 and document['n_failed'] == 0
  assert document['results'][1] == expected[1].to_dict()
  assert _main(good + [os.path.join(setup['images'], 'empty.png')], model=setup['tflite']) == 1
  lines = capsys.readouterr().out.splitlines()
  assert lines[0].split() == ['file', 'P(COVID-19)', 'decision', 'threshold', 'error']
  assert lines[1].split()[0] == good[0] and lines[1].split()[2] == expected[0].class_name
  assert lines[3].split()[1:] == ['-', '0.5', 'empty', 'file', '(0', 'bytes)']


def test_usage_and_model_errors_are_one_line(setup, tmp_path, capsys):
  image = os.path.join(setup['images'], 'a.png')
  (tmp_path / 'readme.txt').write_text('hi')
  cases = [
      (dict(), [image], 2, 'flag --model is required'),
      (dict(model=setup['tflite']), [], 2,
       'no input: give image files or folders after the flags'),
      (dict(model=setup['tflite']), [str(tmp_path / 'gone.png')], 2,
       f"input '{tmp_path / 'gone.png'}' does not exist"),
      (dict(model=str(tmp_path / 'none.tflite')), [image], 2,
       f"model '{tmp_path / 'none.tflite'}' does not exist"),
      (dict(model=str(tmp_path / 'readme.txt')), [image], 1,
       f'{tmp_path / "readme.txt"}: not a model: expected a .keras file, a model_dir, a '
       'SavedModel folder or a .tflite file'),
      (dict(model=setup['tflite'], grad_cam_dir=str(tmp_path / 'cams')), [image], 2,
       '--grad_cam_dir needs a .keras model or model_dir (Grad-CAM differentiates the Keras '
       'model), not a tflite model'),
  ]
  for values, argv, status, message in cases:
    assert _main(argv, **values) == status, message
    out, err = capsys.readouterr()
    assert err == f'{PROG}: error: {message}\n' and out == ''


def test_grad_cam_overlays_for_readable_files(setup, tmp_path, capsys):
  cams = tmp_path / 'cams'
  assert _main([setup['images']], model=setup['model_dir'], grad_cam_dir=str(cams),
               format='json') == 1
  capsys.readouterr()
  assert sorted(os.listdir(cams)) == ['0000_a.png.png', '0001_c.bmp.png', '0004_b.jpg.png']
  overlay = np.asarray(Image.open(cams / '0000_a.png.png'))
  assert overlay.shape == (16, 16, 3) and overlay.dtype == np.uint8


@pytest.mark.slow
def test_console_script_lists_bad_files_and_exits_1(setup):
  done = subprocess.run(
      [sys.executable, '-m', 'covidlib.cli.predict', f'--model={setup["tflite"]}',
       '--format=csv', setup['images']], capture_output=True, text=True, timeout=120,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3'))
  assert done.returncode == 1, done.stderr[-1000:]
  rows = list(csv.DictReader(io.StringIO(done.stdout)))
  assert [bool(r['error']) for r in rows] == [False, False, True, True, False, True]
  assert 'Traceback' not in done.stderr
