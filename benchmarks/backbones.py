"""The networks side by side: parameters, FLOPs, and training time per epoch on this machine.

    .venv/bin/python benchmarks/backbones.py --data_dir=/work/main/tfds_data \
        --runs_dir=runs/backbones --sizes=128,224

Each (network, size) is `covidlib.train.train` for --epochs epochs on
labelled_xrays/nih_pneumonia (the same as `covidlib-train --model_dir=RUNS_DIR/<net>_<size>
--dataset=labelled_xrays/nih_pneumonia --data_dir=DATA_DIR --model=<net> --image_size=<size>
--epochs=2 --weights=none`, every other flag at its default: batch 32, Adam 1e-3, the article's
augmentation, mixed_precision auto = mixed_bfloat16 on this CPU), into a fresh model_dir. The
time of an epoch is wall time from its start to its end, validation pass included; the first
epoch also traces the training graph, so the steady figure is the LAST epoch's. The figures
say nothing about accuracy (2 epochs from random weights): see benchmarks/recipes.py for that.
Results accumulate in --out_json, one entry per (network, size), so networks can be timed in
separate runs (--models); the Markdown table is rewritten from all entries each time.
"""

from __future__ import annotations

import json
import os
import platform
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

_DATA_DIR = flags.DEFINE_string('data_dir', '/work/main/tfds_data',
                                'TFDS data_dir holding labelled_xrays/nih_pneumonia.')
_DATASET = flags.DEFINE_string('dataset', 'labelled_xrays/nih_pneumonia', 'Dataset to time on.')
_RUNS_DIR = flags.DEFINE_string('runs_dir', 'runs/backbones', 'Where the model_dirs go.')
_MODELS = flags.DEFINE_list('models', None, 'Networks to time (default: all of MODELS).')
_SIZES = flags.DEFINE_list('sizes', ['128', '224'], 'Image sizes.')
_EPOCHS = flags.DEFINE_integer('epochs', 2, 'Epochs per run (the last one is the steady time).')
_OUT_JSON = flags.DEFINE_string('out_json', 'benchmarks/results/backbones.json',
                                'Accumulated results.')
_OUT = flags.DEFINE_string('out', 'benchmarks/results/backbones.md', 'Markdown report.')


def _timer():
  """A Keras callback recording each epoch's seconds (keras is imported in main, not above)."""
  import keras

  class Timer(keras.callbacks.Callback):

    def __init__(self):
      super().__init__()
      self.seconds, self.cpu_seconds = [], []
      self._start = self._cpu = None

    def on_epoch_begin(self, epoch, logs=None):
      self._start, self._cpu = time.perf_counter(), time.process_time()

    def on_epoch_end(self, epoch, logs=None):
      self.seconds.append(time.perf_counter() - self._start)
      self.cpu_seconds.append(time.process_time() - self._cpu)

  return Timer()


def _markdown(results: dict) -> str:
  from covidlib import models
  order = {name: i for i, name in enumerate(models.MODELS)}
  rows = sorted(results.values(), key=lambda r: (order.get(r['model'], 99), r['image_size']))
  lines = [
      '# Networks: parameters, FLOPs, training time per epoch',
      '',
      'Written by `benchmarks/backbones.py` (see its docstring for the exact commands).',
      '',
      '| network | size | parameters | GFLOPs / image | train images | epoch 1 (traces) | '
      'last epoch | its CPU seconds | images / s | load average | precision | date |',
      '|---|---|---|---|---|---|---|---|---|---|---|---|',
  ]
  for r in rows:
    cpu = r.get('epoch_cpu_seconds')
    lines.append(
        f'| {r["model"]} | {r["image_size"]} | {r["params"] / 1e6:.2f} M | '
        f'{r["flops"] / 1e9:.3f} | {r["train_images"]} | {r["epoch_seconds"][0]:.0f} s | '
        f'{r["epoch_seconds"][-1]:.0f} s | {f"{cpu[-1]:.0f} s" if cpu else "-"} | '
        f'{r["train_images"] / r["epoch_seconds"][-1]:.1f} | {r.get("load_average", "-")} | '
        f'{r["precision"]} | {r["date"]} |')
  lines += ['', f'Machine: {rows[0]["machine"] if rows else ""}. Epoch times are wall time and '
            'include the validation pass; CPU seconds are the process\'s (all threads) over the '
            'same epoch, steadier than wall time on a shared machine; images / s = training '
            'images / last epoch wall seconds; load average: 1-minute, at the end of the run.', '']
  return '\n'.join(lines)


def main(argv):
  del argv
  from covidlib import distribute
  from covidlib import models
  from covidlib import train
  from covidlib import model_dir as md

  results = {}
  if os.path.exists(_OUT_JSON.value):
    with open(_OUT_JSON.value) as f:
      results = json.load(f)
  names = _MODELS.value or list(models.MODELS)
  for name in names:
    for size in map(int, _SIZES.value):
      config = train.make_config(model=name, image_size=size, dataset=_DATASET.value,
                                 data_dir=_DATA_DIR.value, epochs=_EPOCHS.value)
      run_dir = os.path.join(_RUNS_DIR.value, f'{name}_{size}')
      timer = _timer()
      print(f'{name} at {size} px: training {_EPOCHS.value} epochs into {run_dir}', flush=True)
      train.train(config, run_dir, overwrite=True, callbacks=[timer], verbose=2)
      model = models.build_model(name, size, 1)
      counts = train._config_class_counts(config)  # pylint: disable=protected-access
      results[f'{name}_{size}'] = {
          'model': name, 'image_size': size, 'params': models.count_params(model),
          'flops': models.count_flops(model), 'train_images': int(sum(counts)),
          'epoch_seconds': [round(s, 1) for s in timer.seconds],
          'epoch_cpu_seconds': [round(s, 1) for s in timer.cpu_seconds],
          'load_average': round(os.getloadavg()[0], 1),
          'precision': distribute.resolve_precision(config['mixed_precision']),
          'date': time.strftime('%Y-%m-%d'),
          'machine': f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores, '
                     'shared with other jobs',
      }
      md.write_json(_OUT_JSON.value, results)
      with md.atomic_path(_OUT.value, suffix='.md') as tmp:
        with open(tmp, 'w') as f:
          f.write(_markdown(results))
      print(json.dumps(results[f'{name}_{size}']), flush=True)


if __name__ == '__main__':
  app.run(main)
