"""The edge install, for real: a fresh venv with only ai-edge-litert, numpy, pillow and pydicom,
and covidlib installed without its dependencies, predicts a PNG and a DICOM with no TensorFlow.

    .venv/bin/python -m pytest tests/covidlib/test_edge_venv.py -q     # ~1 min, needs PyPI

The models are made here, in the test environment (a tiny Keras model through the project's
exporter): the fixed-size int8 variant (numpy preprocessing in the venv) and the any-size
uint8_image variant (resize inside the graph). Their answers in the venv must equal the full
route's (`covidlib.predict.Predictor`, TensorFlow) on the same files. `import tensorflow` must
fail in the venv, and `tensorflow` must not be in sys.modules after predicting. Marked slow (it
installs packages); it still runs in CI, which reaches PyPI. Without a package index it fails
with a message saying so.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest
from PIL import Image

from covidlib import model_dir as model_dir_lib
from covidlib import predict

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EDGE_PACKAGES = ('ai-edge-litert>=2.3,<3', 'numpy>=1.26,<3', 'pillow>=10', 'pydicom>=2.4')
SIZE = 20
DECISION = model_dir_lib.Decision(threshold=0.4, policy='youden', temperature=1.2)

# Runs in the venv: predicts, then reports what was imported. Prints one JSON line.
DRIVER = r'''
import json, sys
from covidlib.cli import predict_edge
status = predict_edge.call_main(['covidlib-predict-edge', '--format=json', *sys.argv[1:]])
heavy = sorted({m.split('.')[0] for m in sys.modules} & {'tensorflow', 'keras', 'absl',
                                                         'exporters', 'tensorflow_datasets'})
print(json.dumps({'status': status, 'heavy': heavy}))
'''


def _run(command, what, timeout=300, **kwargs):
  done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)
  if done.returncode != 0:
    pytest.fail(f'{what} failed (exit {done.returncode}): {" ".join(map(str, command))}\n'
                f'{done.stderr[-3000:]}', pytrace=False)
  return done


@pytest.fixture(scope='module')
def edge_venv(tmp_path_factory):
  """A venv with the edge packages only, and covidlib installed with --no-deps."""
  root = tmp_path_factory.mktemp('edge_venv')
  venv = root / 'venv'
  _run([sys.executable, '-m', 'venv', str(venv)], 'creating a venv', timeout=120)
  python = str(venv / 'bin' / 'python')
  env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'VIRTUAL_ENV')}
  done = subprocess.run([python, '-m', 'pip', 'install', '--quiet', *EDGE_PACKAGES],
                        capture_output=True, text=True, timeout=600, env=env)
  if done.returncode != 0:
    pytest.fail('could not install the edge packages from the package index (is PyPI '
                f'reachable?): pip install {" ".join(EDGE_PACKAGES)}\n{done.stderr[-2000:]}',
                pytrace=False)
  # A copy of the sources, so that building the wheel writes nothing into the checkout.
  source = root / 'covidlib_src'
  ignore = shutil.ignore_patterns('__pycache__', '*.pyc', '*.egg-info', 'build', 'dist')
  for name in ('covidlib', 'covidlib_tfds', 'exporters'):
    shutil.copytree(os.path.join(REPO, name), source / name, ignore=ignore)
  for name in ('pyproject.toml', 'setup.cfg', 'README.md'):
    if os.path.exists(os.path.join(REPO, name)):
      shutil.copy(os.path.join(REPO, name), source / name)
  done = subprocess.run([python, '-m', 'pip', 'install', '--quiet', '--no-deps', str(source)],
                        capture_output=True, text=True, timeout=600, env=env)
  if done.returncode != 0:
    pytest.fail('pip install --no-deps of covidlib failed (building needs setuptools and wheel '
                f'from the package index):\n{done.stderr[-2000:]}', pytrace=False)
  return {'python': python, 'bin': str(venv / 'bin'), 'env': env}


@pytest.fixture(scope='module')
def models_and_inputs(tmp_path_factory):
  """Two .tflite variants of a tiny model, a PNG, a DICOM of other pixels, and their
  probabilities by the full route."""
  from pydicom.dataset import Dataset, FileMetaDataset
  from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

  from covidlib import preprocess
  from exporters import tflite

  root = tmp_path_factory.mktemp('edge_models')
  rs = np.random.RandomState(0)
  images = [np.clip(rs.normal(rs.uniform(40, 200), 30, rs.randint(15, 70, 2)), 0, 255)
            .astype(np.uint8) for _ in range(12)]
  keras.utils.set_random_seed(0)
  inputs = keras.Input((SIZE, SIZE, 1))
  x = keras.layers.Conv2D(4, 3, activation='relu')(inputs)
  x = keras.layers.GlobalAveragePooling2D()(x)
  outputs = keras.layers.Dense(1, activation='sigmoid', name='probability')(x)
  model = keras.Model(inputs, outputs)
  calibration = np.stack([preprocess.preprocess(i[..., None], SIZE).numpy() for i in images])
  paths = {
      'int8': root / 'model_int8.tflite', 'uint8_image': root / 'model_uint8_image.tflite'}
  paths['int8'].write_bytes(tflite.convert_tflite(model, 'int8', calibration, decision=DECISION))
  paths['uint8_image'].write_bytes(tflite.convert_tflite_uint8_image(model, 'fp32', DECISION))
  Image.fromarray(images[0]).save(root / 'chest.png')
  gray = images[1]
  ds = Dataset()
  ds.file_meta = FileMetaDataset()
  ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
  ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
  ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
  ds.set_pixel_data(gray.astype(np.uint16) * 16, 'MONOCHROME2', 12)
  ds.save_as(root / 'chest.dcm', enforce_file_format=True)
  files = [str(root / 'chest.png'), str(root / 'chest.dcm')]
  full = {name: [r.probability for r in predict.Predictor(path).predict_files(files)]
          for name, path in paths.items()}
  return {'models': {k: str(v) for k, v in paths.items()}, 'files': files, 'full': full}


@pytest.mark.slow
def test_edge_install_has_no_tensorflow_and_predicts_png_and_dicom(edge_venv,
                                                                   models_and_inputs):
  python, env = edge_venv['python'], edge_venv['env']
  done = subprocess.run([python, '-c', 'import tensorflow'], capture_output=True, text=True,
                        timeout=60, env=env)
  assert done.returncode != 0 and "No module named 'tensorflow'" in done.stderr
  files = models_and_inputs['files']
  for name, model in models_and_inputs['models'].items():
    done = _run([python, '-c', DRIVER, f'--model={model}', *files], f'edge prediction ({name})',
                timeout=120, env=env, cwd=os.path.dirname(model))
    lines = done.stdout.strip().splitlines()
    document, report = json.loads('\n'.join(lines[:-1])), json.loads(lines[-1])
    assert report == {'status': 0, 'heavy': []}, (report, done.stderr[-2000:])
    assert [r['path'] for r in document['results']] == files
    assert all(r['error'] is None and r['threshold'] == pytest.approx(0.4)
               for r in document['results'])
    got = [r['probability'] for r in document['results']]
    # int8: the routes' float inputs differ by float rounding (~1e-7), which can now and then
    # move a value across an int8 quantization boundary; uint8_image takes the same pixels.
    np.testing.assert_allclose(got, models_and_inputs['full'][name],
                               atol=0.05 if name == 'int8' else 1e-5)
    assert [r['label'] for r in document['results']] == [int(p >= 0.4) for p in got]


@pytest.mark.slow
def test_edge_console_script_in_the_venv(edge_venv, models_and_inputs):
  script = os.path.join(edge_venv['bin'], 'covidlib-predict-edge')
  done = _run([script, f'--model={models_and_inputs["models"]["uint8_image"]}', '--format=csv',
               *models_and_inputs['files']], 'covidlib-predict-edge', timeout=120,
              env=edge_venv['env'])
  rows = done.stdout.splitlines()
  assert rows[0] == ('path,probability,label,class_name,threshold,error,shift_score,in_distribution,decision'
                     ) and len(rows) == 3
  assert 'Traceback' not in done.stderr
