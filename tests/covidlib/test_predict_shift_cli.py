"""covidlib-predict with a shift score (issue #10): shift_score and in_distribution in every
format, --on_shift=warn|abstain, exit status 0 for flagged images.

    .venv/bin/python -m pytest tests/covidlib/test_predict_shift_cli.py -q
"""

import csv
import io
import json
import os

import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver
from PIL import Image

from covidlib import model_dir as model_dir_lib
from covidlib import models
from covidlib import predict
from covidlib import preprocess
from covidlib import shift
from covidlib.cli import common
from covidlib.cli import predict as cli
from covidlib import scoring

PROG = cli.PROG
SIZE = 16


def _films(n, seed):
  """Smooth, X-ray-like gray films: a bright band and two dark 'lungs', with noise."""
  rs = np.random.RandomState(seed)
  out = []
  for _ in range(n):
    h, w = rs.randint(28, 40, size=2)
    yy, xx = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
    image = 150 + 60 * np.exp(-((xx - 0.5) ** 2) / 0.01)
    for cx in (0.3, 0.7):
      image -= 80 * np.exp(-((xx - cx) ** 2 + (yy - 0.5) ** 2) / 0.03)
    out.append(np.clip(image + rs.normal(0, 6, (h, w)), 0, 255).astype(np.uint8))
  return out


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp('predict_shift')
  model = models.build_model('compact_resnet', image_size=SIZE, channels=1, seed=0)
  run = root / 'run'
  run.mkdir()
  model.save(run / 'model.keras')
  model_dir_lib.write_json(run / 'config.json', {'model': 'compact_resnet', 'image_size': SIZE,
                                                 'channels': 1})

  def prep(images):
    return np.stack([preprocess.preprocess(i[..., None], SIZE, 1).numpy() for i in images])
  train = prep(_films(40, 0))
  fitted = shift.fit_shift(scoring.penultimate_features(model, train), np.arange(40) % 2)
  validation = scoring.penultimate_features(model, prep(_films(30, 1)))
  shift.save(shift.choose_threshold(fitted, fitted.score(validation), 'quantile:0.99'), run)
  images = root / 'images'
  images.mkdir()
  for i, film in enumerate(_films(3, 2)):
    Image.fromarray(film).save(images / f'film_{i}.png')
  checker = ((np.indices((32, 32)).sum(0) // 2) % 2 * 255).astype(np.uint8)
  Image.fromarray(checker).save(images / 'zz_checkerboard.png')
  return {'model_dir': str(run), 'images': str(images)}


def _main(argv, **values) -> int:
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  defaults = {'model': None, 'format': 'table', 'grad_cam_dir': None, 'num_threads': None,
              'on_shift': 'warn'}
  with flagsaver.flagsaver(**{**defaults, **values}):
    return common.call_main(cli.main, [PROG] + list(argv), PROG)


def test_the_checkerboard_is_out_of_distribution_and_films_are_not(setup):
  paths = sorted(os.path.join(setup['images'], n) for n in os.listdir(setup['images']))
  results = predict.Predictor(setup['model_dir']).predict_files(paths)
  assert [r.in_distribution for r in results] == [True, True, True, False]
  assert all(r.shift_score > 0 for r in results)


def test_table_warn(setup, capsys):
  assert _main([setup['images']], model=setup['model_dir']) == 0
  out, err = capsys.readouterr()
  lines = out.splitlines()
  assert lines[0].split() == ['file', 'P(COVID-19)', 'decision', 'threshold', 'shift_score',
                              'in_dist', 'error']
  assert lines[1].split()[-1] == 'yes'
  assert lines[4].split()[-1] == 'NO' and lines[4].split()[2] in ('normal', 'covid')
  assert 'warning: 1 of 4 images are unlike the training data' in err
  assert 'zz_checkerboard.png' in err and 'not reliable' in err


def test_table_abstain(setup, capsys):
  assert _main([setup['images']], model=setup['model_dir'], on_shift='abstain') == 0
  out, err = capsys.readouterr()
  row = out.splitlines()[4].split()
  assert row[2] == 'out_of_distribution' and row[-1] == 'NO'
  assert 'no label given (decision out_of_distribution)' in err


def test_csv_and_json_hold_the_fields(setup, capsys):
  assert _main([setup['images']], model=setup['model_dir'], format='csv',
               on_shift='abstain') == 0
  rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
  assert [r['in_distribution'] for r in rows] == ['true', 'true', 'true', 'false']
  assert rows[3]['decision'] == 'out_of_distribution' and rows[3]['label'] == ''
  assert rows[0]['decision'] == rows[0]['class_name'] and float(rows[0]['shift_score']) > 0
  assert _main([setup['images']], model=setup['model_dir'], format='json') == 0
  document = json.loads(capsys.readouterr().out)
  last = document['results'][3]
  assert last['in_distribution'] is False and last['decision'] in ('normal', 'covid')
  assert isinstance(last['shift_score'], float)


def test_bad_on_shift_is_a_usage_error(setup, capsys):
  assert _main([setup['images']], model=setup['model_dir'], on_shift='ignore') == 2
  assert "error: on_shift must be one of warn, abstain, got 'ignore'" in capsys.readouterr().err
