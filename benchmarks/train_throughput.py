"""Training throughput of seed_cnn: the article's Keras recipe against covidlib's pipeline.

    .venv/bin/python benchmarks/train_throughput.py \
        --data_dir=/tmp/tfds_real --out=benchmarks/results/train_throughput.md

Same network (seed_cnn at 224 x 224 x 3, as the article), same images (the `seed` training split:
the article's CovidDataset/Train, 224 images), batch 32, Adam, binary cross-entropy:

  (a) the article's recipe as it runs today: Keras' legacy ImageDataGenerator(rescale=1/255,
      shear_range=0.2, zoom_range=0.2, horizontal_flip=True).flow_from_directory(target_size=
      (224, 224), batch_size=32, class_mode='binary') on the extracted Train folder, then fit.
      Keras 3 no longer exports ImageDataGenerator under `keras.preprocessing.image` (the
      article's import fails); `tf.keras.preprocessing.image` still reaches Keras 3's legacy
      class, so that is the one-line change that runs the recipe today.
  (b) covidlib: `covidlib.data.load_tfds('covid_xray/seed', 'train', channels=3)` (decode and
      resize once, cached, shuffled, prefetched; tf.data's autotuner off on a CPU-only host, as
      `covidlib.train` does) and `covidlib.train.build_models` (augmentation layers inside the
      training model), in float32 like (a) ...
  (b16) ... and with covidlib's default precision on this CPU (`--mixed_precision=auto`:
      mixed_bfloat16 on a CPU with native bfloat16).

Epochs alternate between the variants (a, b, b16, a, b, b16, ...) after one warm-up epoch each,
so a neighbour's load on a shared machine hits all of them alike; the table shows the median.
The ceiling is the FLOP-bound rate: seed_cnn's training FLOPs per image (3 x its forward FLOPs:
forward, gradient with respect to activations, gradient with respect to weights) divided by the
measured rate of a large tf.matmul on this machine, in float32 (and in bfloat16 for b16).
If `covid_xray/seed` is not built in --data_dir, it is built from --manual_dir first.
"""

from __future__ import annotations

import glob
import os
import platform
import statistics
import sys
import tempfile
import time
import zipfile

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

_DATA_DIR = flags.DEFINE_string('data_dir', '/tmp/tfds_real', 'TFDS data_dir of covid_xray/seed.')
_MANUAL_DIR = flags.DEFINE_string(
    'manual_dir', os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'data',
                               'covid_xray_seed'),
    "Folder holding the article's archive (to build the dataset and to extract Train for (a)).")
_EPOCHS = flags.DEFINE_integer('epochs', 3, 'Timed epochs per variant (after one warm-up).')
_VARIANTS = flags.DEFINE_list('variants', ['a', 'b', 'b16'], 'Which of a, b, b16 to run.')
_OUT = flags.DEFINE_string('out', 'benchmarks/results/train_throughput.md',
                           'Markdown report (written atomically).')

BATCH = 32
IMAGE_SIZE = 224


def matmul_rate(dtype, n: int = 4096, repeats: int = 10) -> float:
  """FLOP/s of an n x n x n tf.matmul (2 n^3 FLOPs), the best of `repeats` after a warm-up."""
  import tensorflow as tf
  a = tf.cast(tf.random.normal((n, n)), dtype)
  b = tf.cast(tf.random.normal((n, n)), dtype)
  tf.matmul(a, b).numpy()
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    tf.matmul(a, b).numpy()
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best


def extract_train(manual_dir: str, target: str) -> str:
  """Extracts CovidDataset/Train/{Covid,Normal} of the article's archive; returns that folder."""
  archives = glob.glob(os.path.join(manual_dir, 'Covid-19-Detection-*.zip'))
  if len(archives) != 1:
    sys.exit(f'train_throughput: expected one Covid-19-Detection-*.zip in {manual_dir}, found '
             f'{len(archives)}')
  with zipfile.ZipFile(archives[0]) as archive:
    for member in archive.infolist():
      if '/CovidDataset/Train/' in member.filename and not member.is_dir():
        relative = member.filename.split('/CovidDataset/Train/', 1)[1]
        path = os.path.join(target, relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, 'wb') as f:
          f.write(archive.read(member))
  return target


def article_variant(train_dir: str):
  """(a): the article's generator and compile, on covidlib's seed_cnn (the same network)."""
  import keras
  import tensorflow as tf

  from covidlib import models

  # The article: `from keras.preprocessing.image import ImageDataGenerator` (gone in Keras 3).
  generator = tf.keras.preprocessing.image.ImageDataGenerator(
      rescale=1. / 255, shear_range=0.2, zoom_range=0.2, horizontal_flip=True)
  flow = generator.flow_from_directory(train_dir, target_size=(IMAGE_SIZE, IMAGE_SIZE),
                                       batch_size=BATCH, class_mode='binary')
  model = models.build_model('seed_cnn', IMAGE_SIZE, 3, seed=0)
  model.compile(loss=keras.losses.binary_crossentropy, optimizer='adam', metrics=['accuracy'])
  return model, flow, flow.samples


def covidlib_variant(precision: str):
  """(b) / (b16): covidlib's input pipeline and training model, as covidlib.train builds them."""
  import keras

  from covidlib import data
  from covidlib import distribute
  from covidlib import train

  config = train.make_config(model='seed_cnn', image_size=IMAGE_SIZE, channels=3,
                             dataset='covid_xray/seed', data_dir=_DATA_DIR.value,
                             batch_size=BATCH, mixed_precision=precision, seed=0,
                             # The article's recipe, as the Keras variant it is compared with.
                             weight_decay=0.0, lr_schedule='constant', warmup_epochs=0,
                             label_smoothing=0.0, ema=0.0, mixup=0.0)
  previous = keras.config.dtype_policy()
  policy = distribute.set_precision(precision)
  try:
    _, model = train.build_models(config)
  finally:
    keras.config.set_dtype_policy(previous)
  dataset = train.input_for_training(data.load_tfds(
      'covid_xray/seed', 'train', data_dir=_DATA_DIR.value, image_size=IMAGE_SIZE, channels=3,
      batch_size=BATCH, shuffle=True, seed=0))
  return model, dataset, data.num_examples('covid_xray/seed', 'train', _DATA_DIR.value), policy


def machine() -> str:
  import keras
  import tensorflow as tf
  cpu = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      cpu = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
  except (OSError, StopIteration):
    pass
  load = ' / '.join(f'{x:.1f}' for x in os.getloadavg())
  return (f'{cpu}, {os.cpu_count()} cores visible, load average {load} (1/5/15 min) at the end; '
          f'TensorFlow {tf.__version__}, Keras {keras.__version__}, Python '
          f'{platform.python_version()}')


def main(argv):
  del argv
  started = time.time()
  from covidlib import models
  from covidlib import train

  # Build the dataset if needed (a no-op when it is built).
  train.load_datasets(train.make_config(dataset='covid_xray/seed', data_dir=_DATA_DIR.value,
                                        manual_dir=os.path.abspath(_MANUAL_DIR.value)))
  import tensorflow as tf
  rate32 = matmul_rate(tf.float32)
  rate16 = matmul_rate(tf.bfloat16)
  forward = models.count_flops(models.build_model('seed_cnn', IMAGE_SIZE, 3))
  per_image = 3 * forward

  variants = {}
  with tempfile.TemporaryDirectory() as tmp:
    if 'a' in _VARIANTS.value:
      variants['a'] = article_variant(extract_train(os.path.abspath(_MANUAL_DIR.value), tmp))
    if 'b' in _VARIANTS.value:
      variants['b'] = covidlib_variant('off')[:3]
    if 'b16' in _VARIANTS.value:
      model, dataset, n, policy = covidlib_variant('auto')
      if policy != 'mixed_bfloat16':
        print(f'covidlib default precision here is {policy}, not mixed_bfloat16')
      variants['b16'] = (model, dataset, n)

    rates = {name: [] for name in variants}
    for epoch in range(_EPOCHS.value + 1):  # Epoch 0 warms up (traces, fills the cache).
      for name, (model, dataset, n) in variants.items():
        start = time.perf_counter()
        model.fit(dataset, epochs=1, verbose=0)
        seconds = time.perf_counter() - start
        if epoch:
          rates[name].append(n / seconds)
        print(f'{"warm-up" if not epoch else f"epoch {epoch}"} {name}: {n / seconds:.2f} '
              f'images/s ({seconds:.1f} s)', flush=True)

  ceiling32 = rate32 / per_image
  ceiling16 = rate16 / per_image
  median = {name: statistics.median(r) for name, r in rates.items()}
  labels = {
      'a': "(a) article: ImageDataGenerator + flow_from_directory, float32",
      'b': '(b) covidlib: load_tfds + augmentation layers, float32',
      'b16': '(b16) covidlib default on this CPU: mixed_bfloat16',
  }
  lines = [
      '# Training throughput: seed_cnn, 224x224x3, batch 32, `seed` train split (224 images)',
      '',
      f'Command: `.venv/bin/python benchmarks/train_throughput.py --data_dir={_DATA_DIR.value} '
      f'--epochs={_EPOCHS.value}` ({time.time() - started:.0f} s wall time in all)',
      '',
      f'Machine: {machine()}.',
      '',
      f'seed_cnn forward: {forward / 1e9:.2f} GFLOPs per image (multiply-add = 2 FLOPs); '
      f'training = 3 x forward = {per_image / 1e9:.2f} GFLOPs per image.',
      f'Measured tf.matmul 4096^3: {rate32 / 1e9:.0f} GFLOP/s float32, {rate16 / 1e9:.0f} '
      f'GFLOP/s bfloat16 -> FLOP-bound ceiling {ceiling32:.2f} images/s (float32), '
      f'{ceiling16:.2f} images/s (bfloat16).',
      '',
      '| variant | images/s: median (each epoch) | best | per epoch | vs (a), median | '
      '% of float32 ceiling | % of own-precision ceiling |',
      '|---|---|---|---|---|---|---|',
  ]
  for name in variants:
    own = ceiling16 if name == 'b16' else ceiling32
    vs_a = f'{median[name] / median["a"]:.2f}x' if 'a' in median else 'n/a'
    runs = ', '.join(f'{r:.2f}' for r in rates[name])
    lines.append(f'| {labels[name]} | {median[name]:.2f} ({runs}) | {max(rates[name]):.2f} | '
                 f'{variants[name][2] / median[name]:.1f} s | {vs_a} | '
                 f'{100 * median[name] / ceiling32:.0f}% | {100 * median[name] / own:.0f}% |')
  lines += ['', f'Epochs alternate between variants after one warm-up epoch each; '
            f'{_EPOCHS.value} timed epochs each ("best" = the least disturbed epoch on a shared '
            'machine). Percentages use the median. Targets: (b) >= 2.0x (a); (b) >= 70% of the '
            'ceiling.', '']
  report = '\n'.join(lines)
  print(report)
  if _OUT.value:
    from covidlib import model_dir
    model_dir.write_bytes_atomic(_OUT.value, report.encode())


if __name__ == '__main__':
  app.run(main)
