"""The weights of the best validation epoch against those of the last, over seeds, on test.

    make same-site                      # builds labelled_xrays/nih_pneumonia into tfds_data
    .venv/bin/python benchmarks/keep_best.py --data_dir=tfds_data --seeds=0,1,2 \\
        --image_size=128 --out=runs/keep_best

For each seed, covidlib-train's recipe (compact_resnet, --epochs) runs twice on the dataset,
once with --keep=best (the highest validation ROC-AUC epoch, the default) and once with
--keep=last; on one machine both runs of a seed follow the same trajectory, so the two differ
only in which epoch's weights are kept. Each model is then evaluated as README's own-data
recipe does (threshold and temperature on validation, `youden`; ROC-AUC with a 1,000-resample
bootstrap interval on the untouched test split). Writes results.json and results.md into --out
and prints the table (BENCHMARKS.md, "Your own data: same-site sets").
"""

import json
import os
import platform
import sys
import time

from absl import app
from absl import flags

_DATA_DIR = flags.DEFINE_string('data_dir', 'tfds_data', 'TFDS data_dir holding the dataset.')
_DATASET = flags.DEFINE_string('dataset', 'labelled_xrays/nih_pneumonia', 'The dataset.')
_SEEDS = flags.DEFINE_list('seeds', ['0', '1', '2'], 'Training seeds.')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 224, 'Model input size.')
_EPOCHS = flags.DEFINE_integer('epochs', 30, 'Epochs per run.')
_OUT = flags.DEFINE_string('out', 'runs/keep_best', 'Where the model_dirs and results go.')


def _run(seed: int, keep: str) -> dict:
  from covidlib import evaluate
  from covidlib import train

  model_dir = os.path.join(_OUT.value, f'seed{seed}_{keep}')
  config = train.make_config(model='compact_resnet', dataset=_DATASET.value,
                             data_dir=_DATA_DIR.value, image_size=_IMAGE_SIZE.value,
                             epochs=_EPOCHS.value, seed=seed, keep=keep)
  start = time.time()
  history = train.train(config, model_dir, verbose=0)
  seconds = time.time() - start
  result = evaluate.evaluate_model_dir(model_dir, split='test', threshold_policy='youden',
                                       calibrate=True, gradcam=False, n_bootstrap=1000)
  figures = result.report['metrics']['figures']
  return {'seed': seed, 'keep': keep, 'kept_epoch': history.get('kept_epoch'),
          'kept_val_auc': (history.get('kept_metrics') or {}).get('val_auc'),
          'test_roc_auc': figures['roc_auc'], 'test_sensitivity': figures['sensitivity'],
          'test_specificity': figures['specificity'], 'train_seconds': round(seconds, 1)}


def _markdown(rows: list[dict]) -> str:
  def auc(r):
    f = r['test_roc_auc']
    return f'{f["value"]:.3f} [{f["ci95"][0]:.3f}, {f["ci95"][1]:.3f}]'

  out = ['| seed | keep | kept epoch (val ROC-AUC) | test ROC-AUC [95%] | train s |',
         '|---|---|---|---|---|']
  for r in rows:
    val = r['kept_val_auc']
    out.append(f'| {r["seed"]} | {r["keep"]} | {r["kept_epoch"]} '
               f'({"—" if val is None else f"{val:.3f}"}) | {auc(r)} | {r["train_seconds"]} |')
  for keep in ('best', 'last'):
    values = [r['test_roc_auc']['value'] for r in rows if r['keep'] == keep]
    if values:
      mean = sum(values) / len(values)
      sd = (sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1)) ** 0.5
      out.append(f'| mean +- sd | {keep} | | {mean:.3f} +- {sd:.3f} | |')
  return '\n'.join(out) + '\n'


def main(argv):
  del argv
  os.makedirs(_OUT.value, exist_ok=True)
  rows = [_run(int(seed), keep) for seed in _SEEDS.value for keep in ('best', 'last')]
  machine = f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores'
  with open(os.path.join(_OUT.value, 'results.json'), 'w') as f:
    json.dump({'dataset': _DATASET.value, 'image_size': _IMAGE_SIZE.value,
               'epochs': _EPOCHS.value, 'machine': machine, 'rows': rows}, f, indent=2)
  table = _markdown(rows)
  with open(os.path.join(_OUT.value, 'results.md'), 'w') as f:
    f.write(table)
  sys.stdout.write(table)


if __name__ == '__main__':
  app.run(main)
