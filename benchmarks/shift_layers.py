"""Which layer's features make the better shift score? A comparison on the benchmark's models.

    .venv/bin/python benchmarks/shift_layers.py --runs_dir=runs/shift \\
        --seed_data_dir=tfds_data --adult_data_dir=/work/main/tfds_data \\
        --nih_dir=../shared/data/nih_adult_normals/images --out=benchmarks/results/shift_layers

Reuses the two compact_resnet model_dirs benchmarks/shift.py trained (seed, adult). For each
stage of the network (global-average-pooled output) and for the penultimate features that
covidlib.shift uses, it fits the same score (class means, shared Ledoit-Wolf covariance) on the
training split, sets the threshold at quantile 0.99 of the validation scores, and reports the
share of held-out-source normals flagged and the ROC-AUC against the model's own evaluation
images (seed: NIH adult normals vs seed validation; adult: pediatric normals vs adult test).
Exploration only: the library uses the penultimate features.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

_RUNS_DIR = flags.DEFINE_string('runs_dir', 'runs/shift', 'benchmarks/shift.py --runs_dir.')
_SEED_DATA_DIR = flags.DEFINE_string('seed_data_dir', 'tfds_data', 'data_dir of covid_xray/seed.')
_ADULT_DATA_DIR = flags.DEFINE_string('adult_data_dir', 'tfds_data',
                                      'data_dir of covid_xray/adult.')
_NIH_DIR = flags.DEFINE_string('nih_dir', '../shared/data/nih_adult_normals/images',
                               'Folder of NIH adult normal films.')
_OUT = flags.DEFINE_string('out', 'benchmarks/results/shift_layers', 'Report path, no suffix.')

LAYERS = ('stem_pool', 'stage1_out', 'stage2_out', 'stage3_out', 'stage4_out')


def _split(config, dataset, data_dir, split):
  import numpy as np

  from covidlib import scoring

  ds, _ = scoring.load_split(config, split, dataset=dataset, data_dir=data_dir)
  xs, ys = [], []
  for x, y, _ in ds:
    xs.append(x.numpy())
    ys.append(y.numpy().reshape(-1))
  return np.concatenate(xs), np.concatenate(ys).astype(int)


def _features(model, images):
  import keras
  import numpy as np

  outputs = [keras.layers.GlobalAveragePooling2D()(model.get_layer(n).output) for n in LAYERS]
  extractor = keras.Model(model.input, outputs + [model.get_layer('logit').input])
  parts = [extractor(images[i:i + 32], training=False) for i in range(0, len(images), 32)]
  return {name: np.concatenate([np.asarray(p[k]) for p in parts])
          for k, name in enumerate(LAYERS + ('penultimate',))}


def _compare(model, train, validation, own, held_out) -> dict:
  import numpy as np
  from sklearn.metrics import roc_auc_score

  from covidlib import shift

  (tx, ty), (vx, _), ox, hx = train, validation, own, held_out
  f_train, f_val, f_own, f_held = (_features(model, x) for x in (tx, vx, ox, hx))
  rows = {}
  for name in f_train:
    fitted = shift.fit_shift(f_train[name], ty)
    threshold = float(np.quantile(fitted.score(f_val[name]), 0.99))
    own_s, held_s = fitted.score(f_own[name]), fitted.score(f_held[name])
    rows[name] = {
        'dim': int(f_train[name].shape[1]),
        'own_flagged': float(np.mean(own_s > threshold)),
        'held_out_flagged': float(np.mean(held_s > threshold)),
        'roc_auc': float(roc_auc_score(np.r_[np.zeros(len(own_s)), np.ones(len(held_s))],
                                       np.r_[own_s, held_s]))}
  return rows


def main(argv):
  del argv
  import numpy as np

  from covidlib import model_dir as md
  from covidlib import preprocess

  results = {}
  seed_dir = os.path.join(_RUNS_DIR.value, 'seed')
  config = md.load_config(seed_dir)
  files = sorted(os.listdir(_NIH_DIR.value))
  nih = np.stack([preprocess.preprocess(preprocess.load_image(os.path.join(_NIH_DIR.value, f)),
                                        224, 1).numpy() for f in files])
  val = _split(config, 'covid_xray/seed', _SEED_DATA_DIR.value, 'validation')
  results['seed: NIH adult normals vs seed validation'] = _compare(
      md.load_model(seed_dir), _split(config, 'covid_xray/seed', _SEED_DATA_DIR.value, 'train'),
      val, val[0], nih)
  adult_dir = os.path.join(_RUNS_DIR.value, 'adult')
  config = md.load_config(adult_dir)
  pediatric = [_split(config, 'covid_xray/seed', _SEED_DATA_DIR.value, s) for s in
               ('train', 'validation')]
  pediatric = np.concatenate([x[y == 0] for x, y in pediatric])
  results['adult: pediatric normals vs adult test'] = _compare(
      md.load_model(adult_dir),
      _split(config, 'covid_xray/adult', _ADULT_DATA_DIR.value, 'train'),
      _split(config, 'covid_xray/adult', _ADULT_DATA_DIR.value, 'validation'),
      _split(config, 'covid_xray/adult', _ADULT_DATA_DIR.value, 'test')[0], pediatric)
  lines = ['| comparison | features | dim | own images flagged | held-out normals flagged | '
           'ROC-AUC |', '|---|---|---|---|---|---|']
  for comparison, rows in results.items():
    for name, r in rows.items():
      lines.append(f'| {comparison} | {name} | {r["dim"]} | {r["own_flagged"]:.1%} | '
                   f'{r["held_out_flagged"]:.1%} | {r["roc_auc"]:.3f} |')
  text = '\n'.join(lines) + '\n'
  with open(_OUT.value + '.json', 'w') as f:
    json.dump(results, f, indent=2, sort_keys=True)
  with open(_OUT.value + '.md', 'w') as f:
    f.write(text)
  print(text)


if __name__ == '__main__':
  app.run(main)
