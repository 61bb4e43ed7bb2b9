"""covidlib-evaluate: clinical metrics with intervals, threshold, calibration, Grad-CAM, plots.

    covidlib-evaluate --model_dir=runs/compact_resnet --dataset=covid_xray/patient_split \\
        --data_dir=tfds_data --split=test --threshold_policy=youden --calibrate \\
        --group_by=source,view --out=runs/compact_resnet/eval_test

    covidlib-evaluate --model_dir=runs/seed_cnn --split=validation      # the training dataset
    covidlib-evaluate --model_dir=runs/seed_cnn --folder=adult_xrays/   # adult_xrays/{covid,normal}

(or `python -m covidlib.cli.evaluate ...`). Writes report.json, report.md and PNG plots into
--out (default: <model_dir>/eval_<split>, or <model_dir>/eval_folder). With --threshold_policy
or --calibrate it chooses the operating point on --threshold_split and writes it to
<model_dir>/decision.json (unless --nowrite_decision), which covidlib-predict and the exports
apply. Policies: fixed:T, youden, sensitivity:X, specificity:X (see covidlib/threshold.py).
With --folder, a threshold or temperature is fitted on --threshold_split of the training
dataset (the folder has no splits).

Shortcut figures (report.json `shortcuts`, report.md "Shortcuts"; see covidlib/shortcuts.py):
within-source ROC-AUC, specificity on normal sources never trained on, a source probe on the
penultimate features, and the share of other findings called COVID-19. By default (`auto`) the
other findings come from covid_xray/other_findings and the unseen normals from the covid_xray
configs holding NIH adults / pediatric normals, where built in --data_dir and absent from the
training split; --held_out_report adds the figures of `covidlib-crossval --hold_out=source`:

    covidlib-evaluate --model_dir=runs/default/compact_resnet --dataset=covid_xray/adult \\
        --split=test --threshold_policy=sensitivity:0.9 --held_out_report=runs/default/holdout

Exit status: 0 done; 2 bad flags or usage; 1 other failures (one line on stderr, no traceback).
"""

from __future__ import annotations

import os

from absl import flags

from covidlib.cli import quiet_start  # noqa: F401  First: TensorFlow starts quietly (see there).
from covidlib import evaluate
from covidlib import report
from covidlib.cli import common
from covidlib.cli import flag_util

_DEFINE = flag_util.define
_MODEL_DIR = _DEFINE(flags.DEFINE_string, 'model_dir', None, 'A finished covidlib-train run.',
                     required=True)
_DATASET = _DEFINE(
    flags.DEFINE_string, 'dataset', None,
    "TFDS 'name/config' or 'folder:ROOT' (ROOT/<split>/{covid,normal}); default: the "
    "model_dir's training dataset.")
_DATA_DIR = _DEFINE(flags.DEFINE_string, 'data_dir', None,
                    'TFDS data_dir; default: the training one.')
_SPLIT = _DEFINE(flags.DEFINE_string, 'split', 'test', 'The split to evaluate.')
_FOLDER = _DEFINE(flags.DEFINE_string, 'folder', None,
                  'Evaluate ROOT/{covid,normal}/* instead of a dataset split.')
_THRESHOLD_POLICY = _DEFINE(
    flags.DEFINE_string, 'threshold_policy', None,
    'Choose the threshold on --threshold_split: fixed:T, youden, sensitivity:X or '
    'specificity:X. Default: keep the decision stored in model_dir.')
_THRESHOLD_SPLIT = _DEFINE(flags.DEFINE_string, 'threshold_split', 'validation',
                           'Split the threshold (and temperature) are fitted on.')
_CALIBRATE = _DEFINE(flags.DEFINE_boolean, 'calibrate', False,
                     'Fit temperature scaling on --threshold_split.')
_WRITE_DECISION = _DEFINE(flags.DEFINE_boolean, 'write_decision', True,
                          'Store a newly chosen threshold/temperature in model_dir.')
_GROUP_BY = _DEFINE(
    flags.DEFINE_list, 'group_by', None,
    'Per-group tables by these metadata features (source, view, patient_id, filename, age); '
    'default: source when the data has it.')
_OUT = _DEFINE(flags.DEFINE_string, 'out', None,
               'Report folder; default <model_dir>/eval_<split>.')
_N_BOOTSTRAP = _DEFINE(flags.DEFINE_integer, 'n_bootstrap', 1000,
                       'Bootstrap resamples for the intervals.', lower_bound=0)
_SEED = _DEFINE(flags.DEFINE_integer, 'seed', 0, 'Bootstrap seed.')
_BINS = _DEFINE(flags.DEFINE_integer, 'bins', 10,
                'Equal-width bins for ECE and the reliability diagram.', lower_bound=2)
_GRADCAM = _DEFINE(flags.DEFINE_boolean, 'gradcam', True,
                   'Grad-CAM grid and lung-focus scores.')
_GRADCAM_LAYER = _DEFINE(flags.DEFINE_string, 'gradcam_layer', None,
                         'Grad-CAM target layer; default: the last feature map.')
_PLOTS = _DEFINE(flags.DEFINE_boolean, 'plots', True, 'Write matplotlib plots (if installed).')
_SHORTCUTS = _DEFINE(flags.DEFINE_boolean, 'shortcuts', True,
                     'Add the shortcut figures (within-source, unseen sources, source probe, '
                     'other findings).')
_OTHER_FINDINGS = _DEFINE(
    flags.DEFINE_string, 'other_findings', 'auto',
    "Dataset of other findings (label 0 = not COVID-19), e.g. covid_xray/other_findings; "
    "'auto': that one if built; '' for none.")
_UNSEEN = _DEFINE(
    flags.DEFINE_list, 'unseen_sources', ['auto'],
    "Normals of sources absent from training, as DATASET:SOURCE (e.g. "
    "covid_xray/adult_pediatric:kaggle_pediatric); 'auto': the covid_xray ones that are built; "
    "'' for none.")
_HELD_OUT = _DEFINE(flags.DEFINE_list, 'held_out_report', [],
                    'Folders or hold_out.json files of covidlib-crossval --hold_out=source.')
_PROBE = _DEFINE(flags.DEFINE_boolean, 'source_probe', True,
                 'Fit the source probe on the penultimate features.')
_CONFOUNDS = _DEFINE(
    flags.DEFINE_list, 'confounds', [],
    'Metadata features (e.g. view) for the Confounds section: ROC-AUC of the feature alone and '
    "the model's ROC-AUC within each of its values.")
_BATCH_SIZE = _DEFINE(flags.DEFINE_integer, 'batch_size', 32, 'Evaluation batch size.',
                      lower_bound=1)

def main(argv: list[str]) -> None:
  common.reject_extra_args(argv)
  out = _OUT.value or os.path.join(
      _MODEL_DIR.value, 'eval_folder' if _FOLDER.value else f'eval_{_SPLIT.value}')
  result = evaluate.evaluate_model_dir(
      _MODEL_DIR.value, split=_SPLIT.value, dataset=_DATASET.value, data_dir=_DATA_DIR.value,
      folder=_FOLDER.value, threshold_policy=_THRESHOLD_POLICY.value,
      threshold_split=_THRESHOLD_SPLIT.value, calibrate=_CALIBRATE.value,
      write_decision=_WRITE_DECISION.value, group_by=_GROUP_BY.value,
      n_bootstrap=_N_BOOTSTRAP.value, seed=_SEED.value, n_bins=_BINS.value,
      gradcam=_GRADCAM.value, gradcam_layer=_GRADCAM_LAYER.value, batch_size=_BATCH_SIZE.value,
      shortcut_options=None if not _SHORTCUTS.value else {
          'other_dataset': _OTHER_FINDINGS.value or None,
          'unseen': 'auto' if _UNSEEN.value == ['auto'] else [u for u in _UNSEEN.value if u],
          'held_out_reports': _HELD_OUT.value, 'probe': _PROBE.value},
      confounds=[c for c in _CONFOUNDS.value if c])
  paths = report.write_report(out, result, history=report.load_history(_MODEL_DIR.value),
                              plots=_PLOTS.value)
  figures = result.report['metrics']['figures']

  def show(name):
    f = figures[name]
    if f['value'] is None:
      return f'{name} n/a'
    low, high = f['ci95']
    return f'{name} {f["value"]:.3f}' + ('' if low is None else f' [{low:.3f}, {high:.3f}]')

  d = result.decision
  print(f'{result.report["data"]["description"]}: {len(result.predictions)} images; threshold '
        f'{d.threshold:.4f} ({d.policy}), temperature {d.temperature:.3f}')
  print('; '.join(show(n) for n in ('accuracy', 'sensitivity', 'specificity', 'roc_auc')))
  if result.report['decision'].get('written_to'):
    print(f'decision written to {result.report["decision"]["written_to"]}')
  cuts = result.report.get('shortcuts')
  if cuts:
    for name, w in cuts['within_source'].items():
      if w['roc_auc']['value'] is not None:
        print(f'within source {name}: ROC-AUC {w["roc_auc"]["value"]:.3f}')
    for e in cuts['held_out_source']:
      if 'skipped' not in e:
        how = 'left out of training' if 'left out' in e['how'] else 'never in training'
        print(f'{e["source"]} normals ({how}): specificity {e["specificity"]["value"]:.3f} '
              f'({e["n_normal"]} images)')
    if cuts.get('other_findings'):
      print(f'other findings called COVID-19: '
            f'{cuts["other_findings"]["called_covid"]["value"]:.3f} '
            f'({cuts["other_findings"]["n"]} images, label 0 = not COVID-19)')
  moved = result.report.get('shift')
  if moved:
    print(f'out of distribution (shift score > {moved["threshold"]:.4g}): {moved["n_flagged"]} '
          f'of {moved["n"]} images'
          + ''.join(f'; unseen {e["source"]} normals: {e["share_flagged"]:.1%} flagged, ROC-AUC '
                    f'{e["roc_auc"]["value"]:.3f}' for e in moved['unseen_sources']
                    if e['roc_auc'].get('value') is not None))
  print(f'report: {paths["report_md"]}')


def run() -> None:
  common.run_main(main, prog='covidlib-evaluate')


if __name__ == '__main__':
  run()
