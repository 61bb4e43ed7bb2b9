"""The hold-out report: the file `covidlib-crossval --hold_out=source` writes and
`covidlib-evaluate --held_out_report` (and the model card) read.

    from covidlib import hold_out
    report = hold_out.read('runs/default/holdout')       # the folder, or its hold_out.json
    for entry in report['held_out']:                      # one per source left out of training
      entry['source'], entry['specificity']['value'], entry.get('skipped')

Files, in the out folder: hold_out.json (below) and hold_out.md (`render_markdown`).

hold_out.json: {'caveat', 'data' (the dataset's description), 'config' (the training recipe),
'threshold_policy', 'calibrate', 'held_out': [entry, ...]}. An entry is either
{'source', 'skipped': why} or {'source', 'how', 'data', 'model_dir', 'reused', 'n_train',
'policy', 'threshold', 'temperature', 'n_normal', 'specificity', 'n_covid', 'sensitivity',
'sensitivity_data', 'roc_auc_covid_vs_these_normals', 'meets_target'} (+ 'n_covid_in_source'
and 'sensitivity_in_source' for a source holding both classes), where each figure is
covidlib.metrics' {'value', 'ci95', 'method'}.
"""

from __future__ import annotations

import os

from covidlib import errors
from covidlib import metrics
from covidlib import model_dir as md

HOLD_OUT_JSON = 'hold_out.json'
HOLD_OUT_MD = 'hold_out.md'


def write(out_dir: str, report: dict) -> None:
  """hold_out.json and hold_out.md into out_dir, each atomically."""
  md.write_json(os.path.join(out_dir, HOLD_OUT_JSON), report)
  md.write_bytes_atomic(os.path.join(out_dir, HOLD_OUT_MD), render_markdown(report).encode())


def read(path: str) -> dict:
  """A hold_out.json (or the folder holding it) written by covidlib.crossval.hold_out_sources."""
  if os.path.isdir(path):
    path = os.path.join(path, HOLD_OUT_JSON)
  if not os.path.isfile(path):
    raise errors.UsageError(f'{path}: no hold-out report (run covidlib-crossval '
                            '--hold_out=source first)')
  report = md.read_json(path)
  if not isinstance(report, dict) or 'held_out' not in report:
    raise errors.DataError(f'{path}: not a covidlib-crossval --hold_out=source report')
  return report


def render_markdown(report: dict) -> str:
  c = report['config']
  out = [f'# Held-out sources: {c["model"]} on {report["data"]}', '',
         f'> **{report["caveat"]}**', '',
         f'Each row trains {c["model"]} ({c["epochs"]} epochs, seed {c["seed"]}) with every '
         'image of one normal source left out, chooses the threshold on the validation split '
         f'without it (policy `{report["threshold_policy"]}`), and scores that source\'s '
         'normals (every split) and the test split\'s COVID-19 images of other sources. '
         f'Target: specificity >= 0.80 at sensitivity >= 0.90.', '',
         '| left out | normals | specificity [95%] | COVID-19 | sensitivity [95%] | '
         'ROC-AUC COVID-19 vs these normals | target met | model_dir |',
         '|---|---|---|---|---|---|---|---|']
  for e in report['held_out']:
    if 'skipped' in e:
      out.append(f'| {e["source"]} | — | skipped: {e["skipped"]} | | | | | |')
      continue
    met = {True: 'yes', False: 'no', None: '—'}[e['meets_target']]
    out.append(f'| {e["source"]} | {e["n_normal"]} | {metrics.format_figure(e["specificity"])} | '
               f'{e["n_covid"]} | {metrics.format_figure(e["sensitivity"])} | '
               f'{metrics.format_figure(e["roc_auc_covid_vs_these_normals"])} | {met} | '
               f'`{e["model_dir"]}` |')
  return '\n'.join(out) + '\n'
