"""Model x training set x measure against the shortcut figures (issue 9's table).

    .venv/bin/python benchmarks/shortcuts.py --data_dir=tfds_data --runs_dir=runs/shortcuts \
        --out=benchmarks/results/shortcuts

Needs covid_xray/{seed,patient_split,adult,adult_pediatric,other_findings} built in --data_dir
(`python -m covidlib_tfds.build --config=NAME --manual_dir=../shared/data --data_dir=DIR
--allow_missing`). For each row it runs what a user would run:

  1. covidlib-train with the row's settings            -> RUNS_DIR/<row>/model
  2. covidlib-crossval --hold_out=source --recipe=...   -> RUNS_DIR/<row>/holdout
     (only where the training set has two normal sources; with one, leaving it out leaves no
     normal image to train on, and a source the set lacks is scored directly instead)
  3. covidlib-evaluate --threshold_policy=sensitivity:0.9 --calibrate --held_out_report=...
                                                        -> RUNS_DIR/<row>/report

and puts one line per row in <out>.md / <out>.json: the internal test figures beside the
within-source, unseen-source, other-findings and source-probe figures. A row whose report
exists is not run again (delete RUNS_DIR/<row> to redo it). Rows are listed in ROWS below, with
the covidlib-train flags that make each.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

_DATA_DIR = flags.DEFINE_string('data_dir', 'tfds_data', 'TFDS data_dir of covid_xray.')
_RUNS_DIR = flags.DEFINE_string('runs_dir', 'runs/shortcuts', 'Where the runs go.')
_ROWS = flags.DEFINE_list('rows', None, 'Which rows (default: all of ROWS, in order).')
_OUT = flags.DEFINE_string('out', 'benchmarks/results/shortcuts', 'Report path without suffix.')
_POLICY = flags.DEFINE_string('threshold_policy', 'sensitivity:0.9',
                              'Operating threshold policy, chosen on validation.')

# Every row: 30 epochs (compact_resnet) or 10 (seed_cnn), seed 0, batch 32, Adam 1e-3.
STRONG = {'augment_preset': 'strong'}
ROWS = {
    # name: (covidlib-train config overrides, evaluation split)
    'compact_resnet/seed/none': (dict(dataset='covid_xray/seed'), 'validation'),
    'compact_resnet/patient_split/none': (dict(dataset='covid_xray/patient_split'), 'test'),
    'compact_resnet/adult/none': (dict(dataset='covid_xray/adult'), 'test'),
    'compact_resnet/adult/crop': (dict(dataset='covid_xray/adult', crop=0.1), 'test'),
    'compact_resnet/adult/equalize': (dict(dataset='covid_xray/adult', equalize='histogram'),
                                      'test'),
    'compact_resnet/adult/clahe': (dict(dataset='covid_xray/adult', equalize='clahe'), 'test'),
    'compact_resnet/adult/strong_aug': (dict(dataset='covid_xray/adult', **STRONG), 'test'),
    'compact_resnet/adult/low_res': (dict(dataset='covid_xray/adult', image_size=128), 'test'),
    'compact_resnet/adult/all': (dict(dataset='covid_xray/adult', crop=0.1,
                                      equalize='histogram', **STRONG), 'test'),
    'compact_resnet/adult_pediatric/none': (dict(dataset='covid_xray/adult_pediatric'), 'test'),
    'compact_resnet/adult_pediatric/balance': (dict(dataset='covid_xray/adult_pediatric',
                                                    balance='source'), 'test'),
    'compact_resnet/adult_pediatric/all': (dict(dataset='covid_xray/adult_pediatric', crop=0.1,
                                                equalize='histogram', balance='source',
                                                **STRONG), 'test'),
    'seed_cnn/seed/none': (dict(model='seed_cnn', dataset='covid_xray/seed', channels=3,
                                epochs=10), 'validation'),
    'seed_cnn/adult/none': (dict(model='seed_cnn', dataset='covid_xray/adult', channels=3,
                                 epochs=10), 'test'),
}


def _flags(overrides: dict) -> str:
  """The covidlib-train flags of a row (for the report)."""
  parts = []
  for key, value in overrides.items():
    if key == 'augment_preset':
      parts.append(f'--augment={value}')
    else:
      parts.append(f'--{key}={value}')
  return ' '.join(parts)


def _value(figure):
  return None if not figure else figure.get('value')


def _summary(report: dict) -> dict:
  cuts = report.get('shortcuts') or {}
  f = report['metrics']['figures']
  row = {'internal_roc_auc': _value(f['roc_auc']), 'internal_sensitivity': _value(
      f['sensitivity']), 'internal_specificity': _value(f['specificity']),
         'threshold': report['decision']['threshold']}
  for name, w in (cuts.get('within_source') or {}).items():
    if 'other findings' in name:
      row['ieee8023_covid_vs_other_auc'] = _value(w['roc_auc'])
  for e in cuts.get('held_out_source') or []:
    if 'skipped' in e:
      continue
    key = {'nih': 'nih', 'kaggle_pediatric': 'pediatric'}.get(e['source'], e['source'])
    row[f'{key}_specificity'] = _value(e['specificity'])
    row[f'{key}_sensitivity'] = _value(e['sensitivity'])
    row[f'{key}_how'] = 'left out' if 'left out' in e['how'] else 'never in training'
  of = cuts.get('other_findings')
  row['other_called_covid'] = _value(of['called_covid']) if of else None
  probe = cuts.get('source_probe') or {}
  within = (probe.get('source_within_label') or {}).get('not COVID-19') or {}
  row['probe_source_within_not_covid'] = within.get('roc_auc')
  row['probe_label'] = (probe.get('label') or {}).get('roc_auc')
  return row


def run_row(name: str, overrides: dict, split: str, data_dir: str, runs_dir: str,
            policy: str) -> dict:
  from covidlib import crossval
  from covidlib import evaluate
  from covidlib import report as report_lib
  from covidlib import train

  root = os.path.join(runs_dir, name.replace('/', '__'))
  report_dir = os.path.join(root, 'report')
  if os.path.exists(os.path.join(report_dir, report_lib.REPORT_JSON)):
    return report_lib.read_report(report_dir)
  config = train.make_config(**{'epochs': 30, 'seed': 0, 'data_dir': data_dir, **overrides})
  model_dir = os.path.join(root, 'model')
  start = time.time()
  if not os.path.exists(os.path.join(model_dir, 'model.keras')):
    train.train(config, model_dir)
  train_s = time.time() - start
  held_out = []
  pools = None
  sources = set()
  for split_name in ('train', 'validation', 'test'):
    try:
      pools = pools or {}
      pools[split_name] = crossval.load_pool(config['dataset'], [split_name], data_dir=data_dir,
                                             image_size=config['image_size'],
                                             channels=config['channels'])
      normal = pools[split_name].labels == 0
      sources |= set(pools[split_name].metadata['source'][normal])
    except Exception:  # noqa: BLE001  covid_xray/seed has no test split.
      pools = None
      break
  if pools and len(sources) >= 2:
    hold_dir = os.path.join(root, 'holdout')
    crossval.hold_out_sources(config, hold_dir, pools, threshold_policy=policy)
    held_out = [hold_dir]
  del pools
  result = evaluate.evaluate_model_dir(
      model_dir, split=split, data_dir=data_dir, threshold_policy=policy, calibrate=True,
      shortcut_options={'held_out_reports': held_out})
  result.report['benchmark'] = {'row': name, 'flags': _flags(overrides), 'train_s': train_s,
                                'held_out_reports': held_out}
  report_lib.write_report(report_dir, result, history=report_lib.load_history(model_dir))
  return result.report


def _fmt(v):
  return '—' if v is None else f'{v:.2f}'


def render(rows: dict) -> str:
  out = ['| model / training set / measure | covidlib-train flags | internal ROC-AUC | '
         'internal sens / spec | ieee8023 COVID-19 vs other findings AUC | NIH normals spec '
         '(sens) | pediatric normals spec (sens) | other findings called COVID-19 | '
         'source probe among non-COVID | label probe |',
         '|---|---|---|---|---|---|---|---|---|---|']
  for name, (flags_text, s) in rows.items():

    def held(key):
      if f'{key}_specificity' not in s:
        return 'n/a (only normal source)'
      how = '' if s[f'{key}_how'] == 'never in training' else ' (left out)'
      return f'{_fmt(s[f"{key}_specificity"])} ({_fmt(s[f"{key}_sensitivity"])}){how}'

    out.append(f'| {name} | `{flags_text}` | {_fmt(s["internal_roc_auc"])} | '
               f'{_fmt(s["internal_sensitivity"])} / {_fmt(s["internal_specificity"])} | '
               f'{_fmt(s.get("ieee8023_covid_vs_other_auc"))} | {held("nih")} | '
               f'{held("pediatric")} | {_fmt(s["other_called_covid"])} | '
               f'{_fmt(s["probe_source_within_not_covid"])} | {_fmt(s["probe_label"])} |')
  return '\n'.join(out) + '\n'


def main(argv):
  del argv
  from covidlib import model_dir as md

  names = _ROWS.value or list(ROWS)
  unknown = [n for n in names if n not in ROWS]
  if unknown:
    sys.exit(f'unknown rows {unknown}; rows: {", ".join(ROWS)}')
  done = {}
  json_path = _OUT.value + '.json'
  if os.path.exists(json_path):
    with open(json_path) as f:
      done = json.load(f)
  for name in names:
    overrides, split = ROWS[name]
    print(f'== {name}', flush=True)
    start = time.time()
    report = run_row(name, overrides, split, _DATA_DIR.value, _RUNS_DIR.value, _POLICY.value)
    done[name] = [_flags(overrides), _summary(report)]
    print(f'   {time.time() - start:.0f} s: {done[name][1]}', flush=True)
    md.write_json(json_path, done)
    md.write_bytes_atomic(_OUT.value + '.md', render(
        {n: done[n] for n in ROWS if n in done}).encode())


if __name__ == '__main__':
  app.run(main)
