"""The edge route against the full one and the article's: cold start, folder throughput, install
size, and parity at original image sizes, side by side in one run.

    .venv/bin/python benchmarks/edge.py                                  # ~6 min on 2 cores
    .venv/bin/python benchmarks/edge.py --model_dir=runs/default/compact_resnet --images=200

Writes benchmarks/results/edge.md and edge.json (atomically) and prints the table.

Model: --model_dir (a trained run), else an untrained compact_resnet (224 px, seed 0) whose output
logits are spread to standard deviation 2 over real images, so that decisions are not all alike
(latency and size do not depend on the weights' values; the table says which was used). From it:
model_int8.tflite (calibrated on 50 real images) and model_uint8_image.tflite (decoded uint8 image
of any size in, resize inside the graph), with the project's exporter.

Routes:
  edge      covidlib-predict-edge in a fresh venv holding only ai-edge-litert, numpy, pillow and
            pydicom, with covidlib installed --no-deps (no TensorFlow);
  full      covidlib-predict (TensorFlow decoding and preprocessing, LiteRT for .tflite);
  today     covidlib-predict as of --baseline (the code before issue 12), for the throughput
            target;
  article   the 2020 notebook's way: Keras load_model, keras.utils.load_img, model.predict per
            image.
Cold start: wall time from starting the process to its first result line on stdout, one image,
median of --runs. Throughput: --images real files (half NIH adult normals, half ieee8023_more
COVID-19 and others, from ../shared/data) in one folder, one process, images / wall second
including start-up; and the steady state: predict_files over the folder in a process already
started and warmed up (what a long batch converges to). Install: the installed size (RECORD entries, MB = 10^6 bytes) of each route's
dependency closure, and `du` of the fresh edge venv's site-packages as a cross-check. Parity: the
validation images of covid_xray_seed at their original sizes, Keras (covidlib.preprocess)
against each route, the edge int8 route against the full int8 route (same model: what differs is
decoding and preprocessing), and the largest difference, in gray levels, between the numpy and
the TensorFlow preprocessed tensors. int8 calibration: 50 images of the seed training split.
Targets (issue 12): edge cold start <= 1 s; edge install <= 150 MB; folder throughput >= 2x
today's covidlib-predict; parity agreement >= 0.99.
"""

from __future__ import annotations

import glob
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile

from absl import app
from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.abspath(os.path.join(REPO, '..', 'shared', 'data'))
_MODEL_DIR = flags.DEFINE_string('model_dir', None, 'A trained model_dir (default: untrained).')
_IMAGES = flags.DEFINE_integer('images', 200, 'Real images in the throughput folder.')
_RUNS = flags.DEFINE_integer('runs', 3, 'Cold starts per route (median).')
_BASELINE = flags.DEFINE_string('baseline', 'e8141e4',
                                'Commit of "today\'s" covidlib-predict (before issue 12).')
_DATA = flags.DEFINE_string('data', DATA, 'The shared data folder.')
_OUT = flags.DEFINE_string('out', os.path.join(REPO, 'benchmarks', 'results'),
                           'Where edge.md and edge.json go.')
EDGE_PACKAGES = ('ai-edge-litert>=2.3,<3', 'numpy>=1.26,<3', 'pillow>=10', 'pydicom>=2.4')
SEED_ZIP = 'covid_xray_seed/Covid-19-Detection-*.zip'

ARTICLE = r'''
import sys
import numpy as np
import keras
model = keras.models.load_model(sys.argv[1], compile=False)
for path in sys.argv[2:]:
  image = keras.utils.load_img(path, color_mode='grayscale', target_size=(224, 224))
  x = keras.utils.img_to_array(image)[np.newaxis] / 255.0
  print(path, float(model.predict(x, verbose=0).reshape(-1)[0]), flush=True)
'''


# Runs in a route's environment: images/s of predict_files over the folder once started and
# warmed up (the steady state, without the start-up that dominates a 200-image command here).
STEADY = r'''
import glob, os, sys, time
kind, model, folder = sys.argv[1:4]
files = sorted(glob.glob(os.path.join(folder, '*')))
if kind == 'edge':
  from covidlib import edge
  predictor = edge.EdgePredictor(model)
else:
  from covidlib import predict
  predictor = predict.Predictor(model)
predictor.predict_files(files[:2])
start = time.perf_counter()
out = predictor.predict_files(files)
elapsed = time.perf_counter() - start
assert all(r.ok for r in out), [r.error for r in out if not r.ok][:3]
print(len(files) / elapsed)
'''


def _log(message: str) -> None:
  print(f'[{time.strftime("%H:%M:%S")}] {message}', file=sys.stderr, flush=True)


def _env() -> dict:
  env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'VIRTUAL_ENV')}
  env['TF_CPP_MIN_LOG_LEVEL'] = '3'
  return env


# ------------------------------------------------------------------ Setup.

def _real_images(folder: str, n: int) -> list[str]:
  """Copies n real images (half NIH adult normals, half ieee8023_more) into `folder`."""
  nih = sorted(glob.glob(os.path.join(_DATA.value, 'nih_adult_normals', 'images', '*')))
  more = sorted(glob.glob(os.path.join(_DATA.value, 'ieee8023_more', 'images', '*')))
  chosen = nih[:n - n // 2] + more[:n // 2]
  if len(chosen) < n:
    raise SystemExit(f'only {len(chosen)} images under {_DATA.value}, wanted {n}')
  os.makedirs(folder)
  for path in chosen:
    shutil.copy(path, folder)
  return sorted(os.path.join(folder, os.path.basename(p)) for p in chosen)


def _seed_split(split: str = 'Val') -> tuple[list[bytes], list[str], list[int]]:
  """covid_xray_seed's images of one split (Train, Val) as bytes, names and labels."""
  archive = glob.glob(os.path.join(_DATA.value, SEED_ZIP))[0]
  contents, names, labels = [], [], []
  with zipfile.ZipFile(archive) as z:
    for name in sorted(z.namelist()):
      match = re.search(rf'/CovidDataset/{split}/(Covid|Normal)/[^/]+$', name)
      if match:
        contents.append(z.read(name))
        names.append(name)
        labels.append(int(match.group(1) == 'Covid'))
  return contents, names, labels


def _calibration(size: int, channels: int, n: int = 50):
  """int8 calibration: n images of covid_xray_seed's training split, preprocessed (as export)."""
  import numpy as np

  from covidlib import preprocess

  contents, names, _ = _seed_split('Train')
  step = max(1, len(contents) // n)
  return np.stack([preprocess.preprocess(preprocess.decode_bytes(c, name), size, channels).numpy()
                   for c, name in list(zip(contents, names))[::step][:n]])


def _model(work: str) -> tuple[str, str]:
  """A model_dir (given, or an untrained compact_resnet with spread logits) and its name."""
  import keras
  import numpy as np

  from covidlib import model_dir as model_dir_lib
  from covidlib import models
  from covidlib import preprocess

  if _MODEL_DIR.value:
    return _MODEL_DIR.value, f'trained model_dir {_MODEL_DIR.value}'
  model = models.build_model('compact_resnet', image_size=224, channels=1, seed=0)
  x = _calibration(224, 1)
  logit = model.get_layer('logit')
  z = np.asarray(keras.Model(model.input, logit.output)(x)).reshape(-1)
  kernel, bias = logit.get_weights()
  scale = 2.0 / max(float(z.std()), 1e-6)
  logit.set_weights([kernel * scale, (bias - z.mean()) * scale])
  run = os.path.join(work, 'run')
  os.makedirs(run)
  model.save(os.path.join(run, model_dir_lib.MODEL))
  model_dir_lib.write_json(os.path.join(run, model_dir_lib.CONFIG),
                           {'model': 'compact_resnet', 'image_size': 224, 'channels': 1})
  return run, 'untrained compact_resnet (224 px, seed 0), logits spread to std 2 on real images'


def _exports(model_dir: str, work: str) -> dict[str, str]:
  import numpy as np

  from covidlib import model_dir as model_dir_lib
  from covidlib import preprocess
  from exporters import tflite

  config = model_dir_lib.load_config(model_dir)
  size, channels = int(config['image_size']), int(config.get('channels', 1))
  model = model_dir_lib.load_model(model_dir)
  decision = model_dir_lib.load_decision(model_dir)
  x = _calibration(size, channels)
  paths = {'keras': os.path.join(model_dir, model_dir_lib.MODEL),
           'int8': os.path.join(work, 'model_int8.tflite'),
           'uint8_image': os.path.join(work, 'model_uint8_image.tflite')}
  with open(paths['int8'], 'wb') as f:
    f.write(tflite.convert_tflite(model, 'int8', x, decision=decision))
  with open(paths['uint8_image'], 'wb') as f:
    f.write(tflite.convert_tflite_uint8_image(model, 'dynamic', decision))
  return paths


def _edge_venv(work: str) -> str:
  """A fresh venv with the edge packages and covidlib --no-deps; returns its bin folder."""
  venv = os.path.join(work, 'edge_venv')
  subprocess.run([sys.executable, '-m', 'venv', venv], check=True, timeout=300)
  python = os.path.join(venv, 'bin', 'python')
  subprocess.run([python, '-m', 'pip', 'install', '--quiet', *EDGE_PACKAGES], check=True,
                 timeout=900, env=_env(), stderr=subprocess.DEVNULL)
  source = os.path.join(work, 'covidlib_src')
  ignore = shutil.ignore_patterns('__pycache__', '*.pyc', '*.egg-info', 'build', 'dist')
  for name in ('covidlib', 'covidlib_tfds', 'exporters'):
    shutil.copytree(os.path.join(REPO, name), os.path.join(source, name), ignore=ignore)
  for name in ('pyproject.toml', 'setup.cfg', 'README.md'):
    shutil.copy(os.path.join(REPO, name), source)
  subprocess.run([python, '-m', 'pip', 'install', '--quiet', '--no-deps', source], check=True,
                 timeout=900, env=_env(), stderr=subprocess.DEVNULL)
  return os.path.join(venv, 'bin')


def _baseline(work: str) -> str:
  """The covidlib and exporters packages as of --baseline, for `today's` covidlib-predict."""
  folder = os.path.join(work, 'baseline')
  os.makedirs(folder)
  archive = subprocess.run(['git', '-C', REPO, 'archive', _BASELINE.value, 'covidlib',
                            'exporters'], check=True, capture_output=True).stdout
  subprocess.run(['tar', '-x', '-C', folder], input=archive, check=True)
  return folder


# ------------------------------------------------------------------ Measurements.

def _first_line_seconds(command: list[str], env: dict, cwd: str | None = None,
                        marker: str = ',') -> tuple[float, float]:
  """(seconds to the first stdout line holding a result, seconds to exit)."""
  start = time.perf_counter()
  process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env, cwd=cwd)
  first = None
  for line in process.stdout:
    if first is None and marker in line and not line.startswith('path,'):
      first = time.perf_counter() - start
  process.wait(timeout=600)
  total = time.perf_counter() - start
  if process.returncode not in (0, 1):
    raise RuntimeError(f'{command[:3]} exited {process.returncode}: {process.stderr.read()[-2000:]}')
  return (first if first is not None else total), total


def _closure_mb(python: str, requirements: list[str]) -> tuple[float, dict[str, float]]:
  """Installed MB (RECORD sizes) of `requirements` and everything they require, in `python`'s
  environment; extras as 'name[extra]'."""
  code = r'''
import json, re, sys
from importlib import metadata
try:
  from packaging.markers import Marker
except ImportError:
  from pip._vendor.packaging.markers import Marker
seen, queue = {}, []
for r in json.loads(sys.argv[1]):
  name, _, extras = r.partition('[')
  queue.append((name, [e for e in extras.rstrip(']').split(',') if e]))
while queue:
  name, extras = queue.pop()
  key = re.sub(r'[-_.]+', '-', name.strip()).lower()
  try:
    dist = metadata.distribution(key)
  except metadata.PackageNotFoundError:
    continue
  if key in seen and not extras:
    continue
  seen[key] = sum(f.size or 0 for f in (dist.files or []))
  for req in dist.requires or []:
    spec, _, marker = req.partition(';')
    if marker.strip():
      environments = [{'extra': e} for e in extras] or [{'extra': ''}]
      if not any(Marker(marker).evaluate(env) for env in environments):
        continue
    queue.append((re.split(r'[ <>=!~;\[(]', spec.strip())[0], []))
print(json.dumps(seen))
'''
  done = subprocess.run([python, '-c', code, json.dumps(requirements)], capture_output=True,
                        text=True, check=True, env=_env())
  sizes = json.loads(done.stdout)
  return sum(sizes.values()) / 1e6, {k: round(v / 1e6, 1) for k, v in sorted(sizes.items())}


def _du_mb(folder: str) -> float:
  done = subprocess.run(['du', '-s', '--block-size=1', folder], capture_output=True, text=True,
                        check=True)
  return int(done.stdout.split()[0]) / 1e6


def _parity(paths: dict[str, str], model_dir: str) -> dict:
  """Keras (covidlib.preprocess) against the edge and full routes on covid_xray_seed's
  validation images at their original sizes."""
  import numpy as np

  from covidlib import edge
  from covidlib import errors
  from covidlib import predict
  from covidlib import preprocess

  contents, names, labels = _seed_split('Val')
  reference = predict.Predictor(model_dir)
  threshold = reference.decision.threshold
  routes = {'edge uint8_image (resize in graph)': edge.EdgePredictor(paths['uint8_image']),
            'edge int8 (numpy preprocessing)': edge.EdgePredictor(paths['int8']),
            'full int8 (TensorFlow preprocessing)': predict.Predictor(paths['int8'])}
  p_ref, p, worst_gray, sizes = [], {k: [] for k in routes}, 0.0, []
  for data, name in zip(contents, names):
    try:
      gray_tf = preprocess.decode_bytes(data, name)
    except errors.InvalidImageError:
      continue
    gray_edge = edge.decode_bytes(data, name)
    sizes.append(gray_tf.shape[:2])
    x_tf = preprocess.preprocess(gray_tf, reference.image_size, reference.channels).numpy()
    x_np = edge.preprocess(gray_edge, reference.image_size, reference.channels)
    worst_gray = max(worst_gray, float(np.abs(x_tf - x_np).max() * 255))
    p_ref.append(reference.predict_array(gray_tf).probability)
    for route, model in routes.items():
      gray = gray_edge if route.startswith('edge') else gray_tf
      p[route].append(model.predict_array(gray).probability)
  p_ref = np.asarray(p_ref)
  out = {'n': len(p_ref), 'n_covid': int(sum(labels)), 'threshold': threshold,
         'sizes': f'{min(min(s) for s in sizes)} to {max(max(s) for s in sizes)} px per side',
         'max_gray_levels_numpy_vs_tf_preprocessing': worst_gray, 'routes': {}}
  def compare(values, reference):
    values, reference = np.asarray(values), np.asarray(reference)
    return {'agreement': float(np.mean((values >= threshold) == (reference >= threshold))),
            'max_abs_dp': float(np.abs(values - reference).max()),
            'mean_abs_dp': float(np.abs(values - reference).mean())}

  for route, values in p.items():
    out['routes'][f'{route} vs Keras'] = compare(values, p_ref)
  out['routes']['edge int8 vs full int8 (same model: decoding and preprocessing only)'] = compare(
      p['edge int8 (numpy preprocessing)'], p['full int8 (TensorFlow preprocessing)'])
  return out


def main(argv):
  del argv
  os.environ['TF_CPP_MIN_LOG_LEVEL'] = '3'
  work = tempfile.mkdtemp(prefix='covidlib_edge_bench_')
  _log(f'work folder {work}')
  folder = os.path.join(work, 'images')
  files = _real_images(folder, _IMAGES.value)
  model_dir, model_note = _model(work)
  paths = _exports(model_dir, work)
  _log('parity on covid_xray_seed validation')
  parity = _parity(paths, model_dir)
  _log('edge venv')
  edge_bin = _edge_venv(work)
  baseline = _baseline(work)
  full_bin = os.path.dirname(sys.executable)
  env = _env()
  one = files[0]
  commands = {
      'edge (covidlib-predict-edge, uint8_image)': [
          os.path.join(edge_bin, 'covidlib-predict-edge'), f'--model={paths["uint8_image"]}',
          '--format=csv'],
      'edge (covidlib-predict-edge, int8)': [
          os.path.join(edge_bin, 'covidlib-predict-edge'), f'--model={paths["int8"]}',
          '--format=csv'],
      'full (covidlib-predict, int8)': [
          os.path.join(full_bin, 'covidlib-predict'), f'--model={paths["int8"]}', '--format=csv'],
      'full, no decoding threads (covidlib-predict --workers=0, int8)': [
          os.path.join(full_bin, 'covidlib-predict'), f'--model={paths["int8"]}', '--format=csv',
          '--workers=0'],
      "today's covidlib-predict (int8)": [
          sys.executable, '-m', 'covidlib.cli.predict', f'--model={paths["int8"]}',
          '--format=csv'],
      "article's way (Keras model.predict per image)": [
          sys.executable, '-c', ARTICLE, paths['keras']],
  }
  cwd = {"today's covidlib-predict (int8)": baseline}
  edge_python = os.path.join(edge_bin, 'python')
  steady = {  # route: (python, kind, model) for the in-process steady-state figure.
      'edge (covidlib-predict-edge, uint8_image)': (edge_python, 'edge', paths['uint8_image']),
      'edge (covidlib-predict-edge, int8)': (edge_python, 'edge', paths['int8']),
      'full (covidlib-predict, int8)': (sys.executable, 'full', paths['int8']),
      "today's covidlib-predict (int8)": (sys.executable, 'full', paths['int8'])}
  rows = {}
  for route, command in commands.items():
    _log(f'cold start: {route}')
    firsts = [_first_line_seconds(command + [one], env, cwd.get(route),
                                  marker=' ' if 'article' in route else ',')[0]
              for _ in range(_RUNS.value)]
    _log(f'folder of {len(files)}: {route}')
    _, total = _first_line_seconds(command + ([folder] if 'article' not in route else files),
                                   env, cwd.get(route), marker=' ' if 'article' in route else ',')
    rows[route] = {'cold_start_s': statistics.median(firsts), 'cold_starts_s': firsts,
                   'folder_wall_s': total, 'images_per_s': len(files) / total}
    if route in steady:
      python, kind, model = steady[route]
      done = subprocess.run([python, '-c', STEADY, kind, model, folder], capture_output=True,
                            text=True, env=env, cwd=cwd.get(route), timeout=600, check=True)
      rows[route]['steady_images_per_s'] = float(done.stdout.strip().splitlines()[-1])
  _log('install sizes')
  edge_mb, edge_dists = _closure_mb(os.path.join(edge_bin, 'python'),
                                    ['ai-edge-litert', 'numpy', 'pillow', 'pydicom', 'covidlib'])
  full_mb, full_dists = _closure_mb(sys.executable, ['covidlib[litert,dicom]'])
  article_mb, article_dists = _closure_mb(sys.executable, ['tensorflow', 'keras', 'pillow'])
  site = glob.glob(os.path.join(os.path.dirname(edge_bin), 'lib', 'python*', 'site-packages'))[0]
  install = {
      'edge': {'mb': edge_mb, 'distributions': edge_dists,
               'mb_without_pydicom': edge_mb - edge_dists.get('pydicom', 0.0),
               'venv_site_packages_du_mb': _du_mb(site)},
      'full': {'mb': full_mb, 'distributions': full_dists},
      'article': {'mb': article_mb, 'distributions': article_dists}}
  today = rows["today's covidlib-predict (int8)"]['images_per_s']
  report = {
      'machine': f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores, '
                 f'Python {platform.python_version()}',
      'load_average': os.getloadavg(), 'model': model_note, 'images': len(files),
      'baseline_commit': _BASELINE.value, 'rows': rows, 'install': install, 'parity': parity,
      'targets': {
          'edge_cold_start_s': {'target': '<= 1', 'value': min(
              v['cold_start_s'] for k, v in rows.items() if k.startswith('edge'))},
          'edge_install_mb': {'target': '<= 150', 'value': edge_mb},
          'throughput_vs_today': {'target': '>= 2', 'value': max(
              v['images_per_s'] for k, v in rows.items()
              if k.startswith(('edge', 'full'))) / today},
          'parity_agreement': {'target': '>= 0.99', 'value': min(
              r['agreement'] for k, r in parity['routes'].items()
              if k.startswith('edge uint8_image') or k.startswith('edge int8 vs full'))}}}
  for target in report['targets'].values():
    low = target['target'].startswith('<=')
    bound = float(target['target'].split()[-1])
    target['pass'] = target['value'] <= bound if low else target['value'] >= bound
  markdown = render(report)
  os.makedirs(_OUT.value, exist_ok=True)
  from covidlib import model_dir as model_dir_lib
  model_dir_lib.write_json(os.path.join(_OUT.value, 'edge.json'), report)
  model_dir_lib.write_bytes_atomic(os.path.join(_OUT.value, 'edge.md'), markdown.encode())
  print(markdown)
  shutil.rmtree(work, ignore_errors=True)


def render(report: dict) -> str:
  today = report['rows']["today's covidlib-predict (int8)"]['images_per_s']
  lines = [
      f'Machine: {report["machine"]}; load average {", ".join(f"{x:.1f}" for x in report["load_average"])} '
      f'(1/5/15 min) at the end. Model: {report["model"]}. Folder: {report["images"]} real '
      f'images. Today = commit {report["baseline_commit"]}.', '',
      '| route | cold start, first result (s) | folder: wall (s) | images/s | vs today | '
      'steady state, in-process (images/s) | vs today |',
      '|---|---|---|---|---|---|---|']
  steady_today = report['rows']["today's covidlib-predict (int8)"].get('steady_images_per_s')
  for route, row in report['rows'].items():
    steady = row.get('steady_images_per_s')
    steady_cells = ('- | -' if steady is None or not steady_today
                    else f'{steady:.1f} | {steady / steady_today:.2f}x')
    lines.append(f'| {route} | {row["cold_start_s"]:.2f} | {row["folder_wall_s"]:.1f} | '
                 f'{row["images_per_s"]:.1f} | {row["images_per_s"] / today:.2f}x | '
                 f'{steady_cells} |')
  install = report['install']
  lines += ['', '| route | install (MB) | distributions |', '|---|---|---|',
            f'| edge | {install["edge"]["mb"]:.0f} ({install["edge"]["mb_without_pydicom"]:.0f} '
            'without pydicom; `du` of the venv\'s site-packages after the runs, pip and '
            f'bytecode caches included: {install["edge"]["venv_site_packages_du_mb"]:.0f}) | '
            + ', '.join(f'{k} {v:g}' for k, v in install['edge']['distributions'].items())
            + ' |',
            f'| full (`covidlib[litert,dicom]`) | {install["full"]["mb"]:.0f} | '
            f'{len(install["full"]["distributions"])} distributions |',
            f'| article (tensorflow, keras, pillow) | {install["article"]["mb"]:.0f} | '
            f'{len(install["article"]["distributions"])} distributions |']
  parity = report['parity']
  lines += ['', f'Parity on covid_xray_seed validation at original sizes ({parity["n"]} images, '
            f'{parity["sizes"]}), against Keras through covidlib.preprocess, threshold '
            f'{parity["threshold"]:g}; numpy vs TensorFlow preprocessed tensors differ by at most '
            f'{parity["max_gray_levels_numpy_vs_tf_preprocessing"]:.4f} gray levels.', '',
            '| route | agreement | max abs dp | mean abs dp |', '|---|---|---|---|']
  for route, row in parity['routes'].items():
    lines.append(f'| {route} | {row["agreement"]:.4f} | {row["max_abs_dp"]:.4f} | '
                 f'{row["mean_abs_dp"]:.4f} |')
  lines += ['', '| target | value | verdict |', '|---|---|---|']
  names = {'edge_cold_start_s': 'edge cold start <= 1 s',
           'edge_install_mb': 'edge install <= 150 MB',
           'throughput_vs_today': "folder throughput >= 2x today's covidlib-predict",
           'parity_agreement': 'parity agreement >= 0.99 (uint8_image vs Keras; edge vs full)'}
  for key, target in report['targets'].items():
    lines.append(f'| {names[key]} | {target["value"]:.3g} | '
                 f'{"pass" if target["pass"] else "**FAIL**"} |')
  return '\n'.join(lines) + '\n'


if __name__ == '__main__':
  app.run(main)
