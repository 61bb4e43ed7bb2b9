"""covidlib-predict-beam: covidlib-predict's CSV rows, sharded, on Apache Beam.

    .venv/bin/python -m pytest tests/covidlib/test_beam_scoring.py -q

The pipeline runs on the DirectRunner in this process (in_memory: fast; the workers of
multi_processing run the same code). Checked against covidlib-predict's own --format=csv output
for the same files: the same rows; every input has one row (rows + error rows = inputs); a file
that raises becomes an error row; a re-run skips the complete shards. Skipped, with the reason in
pytest's summary, where apache-beam is not installed (`.[test]` installs it).
"""

import csv
import glob
import io
import os
import sys

from absl import flags
from absl.testing import flagsaver
import keras
import numpy as np
from PIL import Image
import pytest

pytest.importorskip('apache_beam', reason="apache-beam is not installed: pip install "
                    "'covidlib[beam]' (CI installs it through .[test])")

import covidlib  # noqa: E402
from covidlib import beam_options  # noqa: E402
from covidlib import beam_scoring  # noqa: E402
from covidlib import errors  # noqa: E402
from covidlib import model_dir as model_dir_lib  # noqa: E402
from covidlib import predict  # noqa: E402
from covidlib.cli import common  # noqa: E402
from covidlib.cli import predict as predict_cli  # noqa: E402
from covidlib.cli import predict_beam as cli  # noqa: E402

IN_PROCESS = beam_options.parse('runner=DirectRunner,direct_running_mode=in_memory,'
                                'direct_num_workers=1')
BAD = ('empty.png', 'notes.png', 'truncated.jpg')


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  """A 16 px model_dir, its fp32 .tflite, and a folder of 8 good and 3 bad files."""
  from exporters import tflite
  root = tmp_path_factory.mktemp('beam_scoring')
  keras.utils.set_random_seed(0)
  inputs = keras.Input((16, 16, 1))
  x = keras.layers.Conv2D(4, 3, activation='relu', name='conv')(inputs)
  x = keras.layers.GlobalAveragePooling2D()(x)
  logit = keras.layers.Dense(1, name='logit', kernel_initializer='ones',
                             bias_initializer=keras.initializers.Constant(-0.3))(x)
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
  for k in range(8):
    name = f'sub/i{k}.jpg' if k % 3 == 0 else f'i{k}.png'
    Image.fromarray(np.clip(rs.normal(30 * k, 20, (24, 30)), 0, 255).astype(np.uint8)).save(
        images / name)
  (images / 'empty.png').write_bytes(b'')
  (images / 'notes.png').write_text('a text file named .png\n')
  (images / 'truncated.jpg').write_bytes((images / 'sub' / 'i0.jpg').read_bytes()[:80])
  return {'model_dir': str(run), 'tflite': str(root / 'model.tflite'), 'images': str(images)}


def _predict_csv(model: str, folder: str, capsys) -> list[dict]:
  """covidlib-predict --format=csv FOLDER, in-process: its rows."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  with flagsaver.flagsaver(model=model, format='csv', grad_cam_dir=None, num_threads=None,
                           workers=None, on_shift='warn'):
    assert common.call_main(predict_cli.main, ['covidlib-predict', folder],
                            'covidlib-predict') == 1  # Its bad files: exit 1.
  return list(csv.DictReader(io.StringIO(capsys.readouterr().out)))


def _shard_rows(output: str, shards: int) -> list[dict]:
  rows = []
  for k in range(shards):
    with open(beam_scoring.shard_path(output, k, shards), encoding='utf-8') as f:
      rows += list(csv.DictReader(f))
  return rows


@pytest.mark.slow
@pytest.mark.parametrize('model', ['model_dir', 'tflite'])
def test_the_shards_hold_covidlib_predicts_rows(setup, tmp_path, capsys, model):
  expected = _predict_csv(setup[model], setup['images'], capsys)
  paths = beam_scoring.expand([setup['images']])
  output = str(tmp_path / 'out' / 'run')
  summary = beam_scoring.score_files(setup[model], paths, output, shard_size=4,
                                     options=IN_PROCESS)
  rows = _shard_rows(output, 3)
  assert [r['path'] for r in rows] == [r['path'] for r in expected] == paths  # Input order.
  assert list(rows[0]) == list(expected[0])  # The same columns.
  for row, want in zip(rows, expected):
    p, q = row.pop('probability'), want.pop('probability')
    assert (p == '') == (q == '') and (not p or abs(float(p) - float(q)) <= 2e-6), row['path']
    assert row == want
  # No file lost: every input has one row, a probability or an error.
  assert (summary.files, summary.rows, summary.errors) == (11, 8, 3)
  assert summary.rows + summary.errors == len(paths)
  assert sorted(os.path.basename(f.split(': ')[0]) for f in summary.failed) == sorted(BAD)
  assert summary.shard_pattern == f'{output}-*-of-00003.csv'


@pytest.mark.slow
def test_a_rerun_scores_only_the_missing_shards(setup, tmp_path):
  paths = beam_scoring.expand([setup['images']])
  output = str(tmp_path / 'run')
  first = beam_scoring.score_files(setup['tflite'], paths, output, shard_size=3,
                                   options=IN_PROCESS)
  assert (first.shards, first.skipped_shards) == (4, 0)
  shards = [beam_scoring.shard_path(output, k, 4) for k in range(4)]
  before = {s: (open(s).read(), os.stat(s).st_mtime_ns) for s in shards}
  os.remove(shards[2])  # As after a crash: that shard was never renamed into place.
  again = beam_scoring.score_files(setup['tflite'], paths, output, shard_size=3,
                                   options=IN_PROCESS)
  assert (again.skipped_shards, again.rows, again.errors) == (3, first.rows, first.errors)
  after = {s: (open(s).read(), os.stat(s).st_mtime_ns) for s in shards}
  assert after[shards[2]][0] == before[shards[2]][0]  # Rewritten, the same rows.
  assert all(after[s] == before[s] for s in shards if s != shards[2])  # Not touched.
  assert sorted(os.listdir(tmp_path)) == sorted(
      [os.path.basename(s) for s in shards] + ['run-manifest.json'])  # No partial files left.
  # Other inputs into the same output: refused, not mixed.
  with pytest.raises(errors.UsageError, match=r'holds the shards of another run \(changed: '
                                              r'files, inputs_sha256;'):
    beam_scoring.score_files(setup['tflite'], paths[:-1], output, shard_size=3,
                             options=IN_PROCESS)
  with pytest.raises(errors.UsageError, match=r'changed: model, model_fingerprint'):
    beam_scoring.score_files(setup['model_dir'], paths, output, shard_size=3,
                             options=IN_PROCESS)


def test_a_file_that_raises_becomes_an_error_row(setup, tmp_path, monkeypatch):
  """Not an unreadable file (those are covidlib-predict's error rows) but any failure: the row
  names it, the other files of its batch are scored, the pipeline does not fail."""
  predict_files = predict.Predictor.predict_files
  broken = os.path.join(setup['images'], 'i1.png')

  def failing(self, paths, *args, **kwargs):
    if broken in paths:
      raise RuntimeError('the model server went away')
    return predict_files(self, paths, *args, **kwargs)
  monkeypatch.setattr(predict.Predictor, 'predict_files', failing)
  paths = beam_scoring.expand([setup['images']])
  output = str(tmp_path / 'run')
  summary = beam_scoring.score_files(setup['tflite'], paths, output, shard_size=100,
                                     options=IN_PROCESS)
  assert (summary.rows, summary.errors) == (7, 4)
  [row] = [r for r in _shard_rows(output, 1) if r['path'] == broken]
  assert row['error'] == 'RuntimeError: the model server went away'
  assert row['probability'] == row['label'] == row['class_name'] == ''


def _main(argv, **values) -> int:
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  defaults = {'model': None, 'output': None, 'file_list': None, 'shard_size': 1000,
              'batch_size': None, 'on_shift': 'warn',
              'beam_pipeline_options': 'runner=DirectRunner,direct_running_mode=in_memory'}
  with flagsaver.flagsaver(**{**defaults, **values}):
    return common.call_main(cli.main, [cli.PROG] + list(argv), cli.PROG)


def test_the_binary_prints_a_summary_and_names_the_failed_files(setup, tmp_path, capsys):
  listing = tmp_path / 'films.txt'
  good = [os.path.join(setup['images'], n) for n in ('i1.png', 'i2.png')]
  listing.write_text('\n'.join(good + [os.path.join(setup['images'], 'notes.png')]) + '\n')
  pattern = os.path.join(setup['images'], 'sub', '*.jpg')
  status = _main([pattern], model=setup['tflite'], output=str(tmp_path / 'o' / 'run'),
                 file_list=str(listing), shard_size=2)
  out, err = capsys.readouterr()
  assert status == 1
  assert out.splitlines()[-1] == (
      f'6 files scored into {tmp_path}/o/run-*-of-00003.csv (3 shards, 0 already complete): '
      '5 rows, 1 error rows, 0 out of distribution')
  [line] = [x for x in err.splitlines() if 'error:' in x]
  assert line.startswith('covidlib-predict-beam: error: 1 of 6 files could not be read')
  assert 'notes.png: ' in line
  rows = _shard_rows(str(tmp_path / 'o' / 'run'), 3)
  listed = good + [os.path.join(setup['images'], 'notes.png')]
  assert [r['path'] for r in rows] == listed + sorted(glob.glob(pattern))  # The list first.


def test_usage_errors_are_one_line(setup, tmp_path, capsys, monkeypatch):
  def error_line():
    return [x for x in capsys.readouterr().err.splitlines() if 'error:' in x]

  assert _main([setup['images']], model=setup['tflite']) == 2
  assert error_line() == ['covidlib-predict-beam: error: flag --output is required (an output '
                          'prefix, e.g. scores/run1)']
  assert _main(['nowhere/*.png'], model=setup['tflite'], output=str(tmp_path / 'r')) == 2
  assert error_line() == ["covidlib-predict-beam: error: input pattern 'nowhere/*.png' matches "
                          'no file']
  assert _main([setup['images']], model=setup['tflite'], output=str(tmp_path / 'r'),
               beam_pipeline_options='runner DirectRunner') == 2
  assert error_line()[0].startswith("covidlib-predict-beam: error: --beam_pipeline_options: "
                                    "'runner DirectRunner' is not name=value")
  for name in [m for m in sys.modules if m.split('.')[0] == 'apache_beam']:
    monkeypatch.setitem(sys.modules, name, None)  # As if not installed.
  for name in ('beam_scoring', 'beam_options'):  # Both import apache_beam.
    monkeypatch.delitem(sys.modules, f'covidlib.{name}')
    monkeypatch.delattr(covidlib, name)
  assert _main([setup['images']], model=setup['tflite'], output=str(tmp_path / 'r')) == 2
  assert error_line() == ["covidlib-predict-beam: error: covidlib-predict-beam needs Apache "
                          "Beam, which is not installed: pip install 'covidlib[beam]'"]


def test_the_direct_runner_is_run_without_its_prism_download():
  """Beam 2.77's DirectRunner first downloads its Prism runner from GitHub; covidlib runs the
  DirectRunner's own engine (the FnApiRunner, with the options for its workers) instead."""
  from apache_beam.runners.portability.fn_api_runner import fn_runner
  for text in (None, 'runner=DirectRunner,direct_num_workers=2', 'direct_num_workers=1'):
    assert isinstance(beam_options.runner(beam_options.parse(text)), fn_runner.FnApiRunner)
  assert beam_options.runner(beam_options.parse('runner=FlinkRunner')) is None
