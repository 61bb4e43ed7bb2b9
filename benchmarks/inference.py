"""Inference speed of every way to run a covidlib model, side by side, with file sizes.

    python benchmarks/inference.py                       # seed_cnn and compact_resnet, 224 px
    python benchmarks/inference.py --model_dirs=runs/seed_cnn,runs/compact_resnet \\
        --dataset=covid_xray/patient_split --data_dir=tfds_data --runs=100

Writes benchmarks/results/inference.md and inference.json (atomically) and prints the table.

For each model (a trained model_dir when one is given or found under /work/runs or ./runs, else
an untrained model of the same architecture: latency does not depend on the weights' values, and
the table says which was used):
  - article's way: Keras `model.predict(x)` on one image at a time (what the 2020 notebook did);
  - Keras call: `model(x, training=False)`, no predict() machinery;
  - SavedModel: the `serving_preprocessed` signature (tensor in), and `serving_default` fed one
    encoded 1024x1024 PNG (decode + resize inside the graph, the cost a server pays);
  - TFLite fp32 / dynamic / fp16 / int8 with the LiteRT interpreter, 1 and 2 threads.
Single-image latency: median of --runs calls after --warmup calls, one preprocessed image.
Batch throughput: images per second on batches of --batch_size (median of --batch_runs).
int8 calibration: --calibration_images of the training split through the one preprocessing
function when --dataset is given (or the model_dir's dataset is built), else generated
X-ray-like images (fine for latency; not for the int8 model's accuracy, see export_report.md).
Target (issue 5): int8 TFLite single-image latency <= 1/10 of the article's way.
"""

from __future__ import annotations

import glob
import io
import json
import os
import platform
import sys
import tempfile
import time

from absl import app
from absl import flags

_MODELS = flags.DEFINE_list('models', ['seed_cnn', 'compact_resnet'],
                            'Architectures to benchmark (covidlib.models.MODELS).')
_MODEL_DIRS = flags.DEFINE_list('model_dirs', [],
                                'Trained model_dirs to use (matched to --models by config.json).')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 224, 'Input side for untrained models.')
_DATASET = flags.DEFINE_string('dataset', None,
                               "Calibration data: TFDS 'name/config' or 'folder:ROOT'.")
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'TFDS data_dir.')
_CALIBRATION_IMAGES = flags.DEFINE_integer('calibration_images', 100, 'int8 calibration images.')
_RUNS = flags.DEFINE_integer('runs', 50, 'Timed single-image calls per row.')
_WARMUP = flags.DEFINE_integer('warmup', 5, 'Untimed calls first.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 32, 'Batch for the throughput column.')
_BATCH_RUNS = flags.DEFINE_integer('batch_runs', 5, 'Timed batches per row.')
_OUT = flags.DEFINE_string('out', os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                               'results'), 'Where inference.md/json go.')
_SEARCH = ('/work/runs/*/config.json', 'runs/*/config.json')
QUANT_TYPES = ('fp32', 'dynamic', 'fp16', 'int8')


def _median_seconds(function, runs: int, warmup: int) -> float:
  import numpy as np
  for _ in range(warmup):
    function()
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    function()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def _find_model_dir(name: str, given: list[str]) -> str | None:
  from covidlib import model_dir as model_dir_lib
  candidates = [os.path.join(d, 'config.json') for d in given]
  if not given:
    candidates = [p for pattern in _SEARCH for p in glob.glob(pattern)]
  matches = []
  for path in candidates:
    try:
      config = model_dir_lib.read_json(path)
    except Exception:  # An unfinished or foreign run: not ours to use.
      continue
    folder = os.path.dirname(path)
    if config.get('model') == name and os.path.isfile(os.path.join(folder, 'model.keras')):
      matches.append(folder)
  return max(matches, key=os.path.getmtime) if matches else None


def _generated_images(n: int, size: int, channels: int, seed: int = 0):
  """X-ray-like uint8 gray images (smooth blobs + noise) -> preprocessed float32 batch."""
  import numpy as np
  from covidlib import preprocess
  rs = np.random.RandomState(seed)
  out = []
  for _ in range(n):
    yy, xx = np.mgrid[0:256, 0:256] / 256.0
    image = sum(rs.rand() * np.exp(-((yy - rs.rand()) ** 2 + (xx - rs.rand()) ** 2)
                                   / (2 * (0.1 + 0.3 * rs.rand()) ** 2)) for _ in range(3))
    image = np.clip(image / image.max() * 220 + rs.normal(0, 8, image.shape), 0, 255)
    out.append(preprocess.preprocess(image.astype(np.uint8)[..., None], size, channels).numpy())
  return np.stack(out)


def _png_1024() -> bytes:
  import numpy as np
  from PIL import Image
  rs = np.random.RandomState(1)
  ramp = np.linspace(20, 220, 1024)[None, :] + np.linspace(0, 30, 1024)[:, None]
  buffer = io.BytesIO()
  Image.fromarray(np.clip(ramp + rs.normal(0, 10, ramp.shape), 0, 255).astype(np.uint8)).save(
      buffer, 'PNG')
  return buffer.getvalue()


def _tflite_rows(path: str, x, batch, runs, warmup, batch_runs):
  from ai_edge_litert.interpreter import Interpreter
  with open(path, 'rb') as f:
    content = f.read()
  rows = {}
  for threads in (1, 2):
    interpreter = Interpreter(model_content=content, num_threads=threads)
    interpreter.allocate_tensors()
    (detail,), (output,) = interpreter.get_input_details(), interpreter.get_output_details()

    def one():
      interpreter.set_tensor(detail['index'], x)
      interpreter.invoke()
      return interpreter.get_tensor(output['index'])
    latency = _median_seconds(one, runs, warmup)
    interpreter.resize_tensor_input(detail['index'], batch.shape)
    interpreter.allocate_tensors()

    def many():
      interpreter.set_tensor(detail['index'], batch)
      interpreter.invoke()
      return interpreter.get_tensor(output['index'])
    assert many().shape[0] == len(batch)
    rows[threads] = (latency, len(batch) / _median_seconds(many, batch_runs, 1))
  return rows


def benchmark_model(name: str, model_dir: str | None, work: str) -> dict:
  """All rows for one architecture; `model_dir` None means an untrained model."""
  import keras
  import numpy as np
  import tensorflow as tf

  from covidlib import model_dir as model_dir_lib
  from covidlib import models
  from exporters import export
  from exporters import parity
  from exporters import saved_model
  from exporters import tflite

  if model_dir is None:
    model = models.build_model(name, image_size=_IMAGE_SIZE.value, channels=1, seed=0)
    model_dir = os.path.join(work, name)
    os.makedirs(model_dir)
    model.save(os.path.join(model_dir, 'model.keras'))
    model_dir_lib.write_json(os.path.join(model_dir, 'config.json'), {
        'model': name, 'image_size': _IMAGE_SIZE.value, 'channels': 1})
    weights = 'untrained (same architecture; latency does not depend on weight values)'
  else:
    model = model_dir_lib.load_model(model_dir)
    weights = f'trained: {os.path.abspath(model_dir)}'
  config = model_dir_lib.load_config(model_dir)
  decision = model_dir_lib.load_decision(model_dir)
  size, channels = model.input_shape[1], model.input_shape[3]
  dataset = _DATASET.value or (config.get('dataset') if 'dataset' in config else None)
  try:
    if not dataset:
      raise ValueError('no dataset')
    calibration, _, _, description = export.load_arrays(
        config, 'train', dataset=dataset, data_dir=_DATA_DIR.value,
        limit=_CALIBRATION_IMAGES.value)
    calibration_note = f'{len(calibration)} images of {description}'
  except Exception as e:  # No built dataset here: latency does not need real images.
    calibration = _generated_images(_CALIBRATION_IMAGES.value, size, channels)
    calibration_note = f'{len(calibration)} generated images ({type(e).__name__}: {e})'[:200]
  x = calibration[:1]
  batch = np.concatenate([calibration] * (1 + _BATCH_SIZE.value // len(calibration)))
  batch = batch[:_BATCH_SIZE.value]
  runs, warmup, batch_runs = _RUNS.value, _WARMUP.value, _BATCH_RUNS.value
  rows = []

  def add(way, latency, throughput, size_bytes=None, threads=None):
    rows.append({'way': way, 'latency_ms': latency * 1000, 'images_per_s': throughput,
                 'file_size_bytes': size_bytes, 'threads': threads})

  keras_size = os.path.getsize(os.path.join(model_dir, 'model.keras'))
  add("article's way: Keras model.predict, one image",
      _median_seconds(lambda: model.predict(x, verbose=0), runs, warmup),
      len(batch) / _median_seconds(lambda: model.predict(batch, verbose=0), batch_runs, 1),
      keras_size)
  add('Keras model(x), direct call',
      _median_seconds(lambda: model(x, training=False), runs, warmup),
      len(batch) / _median_seconds(lambda: model(batch, training=False), batch_runs, 1),
      keras_size)

  sm_dir = saved_model.export_saved_model(model_dir, os.path.join(work, f'{name}_sm'),
                                          model=model)
  loaded = tf.saved_model.load(sm_dir)
  tensor_fn = loaded.signatures['serving_preprocessed']
  bytes_fn = loaded.signatures['serving_default']
  tx, tbatch = tf.constant(x), tf.constant(batch)
  png = tf.constant([_png_1024()])
  pngs = tf.constant([_png_1024()] * len(batch))
  sm_size = parity.file_size(sm_dir)
  add('SavedModel serving_preprocessed (tensor in)',
      _median_seconds(lambda: tensor_fn(images=tx), runs, warmup),
      len(batch) / _median_seconds(lambda: tensor_fn(images=tbatch), batch_runs, 1), sm_size)
  add('SavedModel serving_default (1024x1024 PNG in: decode + preprocess inside)',
      _median_seconds(lambda: bytes_fn(image_bytes=png), runs, warmup),
      len(batch) / _median_seconds(lambda: bytes_fn(image_bytes=pngs), batch_runs, 1), sm_size)

  for quant_type in QUANT_TYPES:
    data = tflite.convert_tflite(model, quant_type,
                                 calibration if quant_type == 'int8' else None,
                                 decision=decision)
    path = os.path.join(work, f'{name}_{quant_type}.tflite')
    with open(path, 'wb') as f:
      f.write(data)
    for threads, (latency, throughput) in _tflite_rows(path, x, batch, runs, warmup,
                                                       batch_runs).items():
      add(f'TFLite {quant_type}', latency, throughput, len(data), threads)
  keras.backend.clear_session()

  article = rows[0]['latency_ms']
  int8 = [r for r in rows if r['way'] == 'TFLite int8']
  best_int8 = min(r['latency_ms'] for r in int8)
  return {
      'model': name, 'weights': weights, 'image_size': size, 'channels': channels,
      'params': int(model.count_params()), 'calibration': calibration_note, 'rows': rows,
      'target': {'int8_latency_ms': best_int8, 'article_latency_ms': article,
                 'ratio': best_int8 / article, 'target_ratio_max': 0.1,
                 'pass': best_int8 <= 0.1 * article},
  }


def render_markdown(results: list[dict], machine: str, settings: str) -> str:
  lines = ['# Inference benchmark', '',
           f'Machine: {machine}. {settings}', '',
           'Latency: one preprocessed image per call, median. Throughput: images/s on batches '
           f'of {_BATCH_SIZE.value}. Sizes: model.keras, SavedModel folder, .tflite files.', '']
  for result in results:
    t = result['target']
    lines += [f'## {result["model"]} ({result["params"]:,} parameters, '
              f'{result["image_size"]}x{result["image_size"]}x{result["channels"]})', '',
              f'Weights: {result["weights"]}. int8 calibration: {result["calibration"]}.', '',
              '| Way | Threads | Latency (ms) | Speed-up vs article | Throughput (img/s) | '
              'File size |', '|---|---|---|---|---|---|']
    article = result['rows'][0]['latency_ms']
    for r in result['rows']:
      size = '' if r['file_size_bytes'] is None else f'{r["file_size_bytes"] / 2**20:.2f} MiB'
      lines.append(f'| {r["way"]} | {r["threads"] or "TF default"} | {r["latency_ms"]:.2f} | '
                   f'{article / r["latency_ms"]:.1f}x | {r["images_per_s"]:.1f} | {size} |')
    verdict = 'PASS' if t['pass'] else 'FAIL'
    lines += ['', f'Target int8 latency <= 1/10 of the article\'s way: {t["int8_latency_ms"]:.2f} '
              f'ms vs {t["article_latency_ms"]:.2f} ms = {t["ratio"]:.3f}x: **{verdict}**.', '']
  return '\n'.join(lines)


def main(argv):
  del argv
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  from covidlib import model_dir as model_dir_lib

  results = []
  with tempfile.TemporaryDirectory(prefix='covidlib_bench_') as work:
    for name in _MODELS.value:
      found = _find_model_dir(name, _MODEL_DIRS.value)
      print(f'{name}: {found or "untrained"}', flush=True)
      results.append(benchmark_model(name, found, work))
  cpus = os.cpu_count()
  machine = f'{platform.processor() or platform.machine()}, {cpus} CPUs visible, no GPU used'
  settings = (f'Runs: {_RUNS.value} timed single-image calls after {_WARMUP.value} warm-up, '
              f'{_BATCH_RUNS.value} timed batches. Command: '
              f'`{" ".join(["python benchmarks/inference.py"] + sys.argv[1:])}`.')
  markdown = render_markdown(results, machine, settings)
  os.makedirs(_OUT.value, exist_ok=True)
  model_dir_lib.write_json(os.path.join(_OUT.value, 'inference.json'),
                           {'machine': machine, 'results': results})
  model_dir_lib.write_bytes_atomic(os.path.join(_OUT.value, 'inference.md'), markdown.encode())
  print(markdown)


if __name__ == '__main__':
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')  # The CPU figures, even on a GPU machine.
  app.run(main)
