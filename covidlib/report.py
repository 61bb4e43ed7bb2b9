"""Writing an evaluation: report.json, report.md and PNG plots into one folder.

    from covidlib import evaluate, report
    result = evaluate.evaluate_model_dir('runs/compact_resnet', split='test')
    paths = report.write_report('runs/compact_resnet/eval', result,
                                history=report.load_history('runs/compact_resnet'))

Files (each written atomically: temporary file, then rename):
  report.json              everything below as numbers (see covidlib.evaluate)
  report.md                research-only caveat, metrics with 95% intervals, confusion matrix,
                           per-group tables, threshold, calibration, Grad-CAM, plot list
  confusion_matrix.png     counts and row shares
  roc.png                  ROC curve with the operating point marked
  pr.png                   precision-recall curve with the operating point marked
  reliability.png          reliability diagram before and after temperature scaling
  training_curves.png      loss / accuracy / AUC per epoch from history.json (if present)
  gradcam_grid.png         Grad-CAM overlays of the most confident errors, then the most
                           confident correct predictions (PIL, not matplotlib)
  predictions.csv          one row per evaluated image, to audit cases without code: file,
                           patient (a hash), source, view, label, probability (calibrated),
                           decision, shift_score, in_distribution (blank without a shift score)

matplotlib is optional (`pip install covidlib[plots]`, Agg backend): without it the PNG plots
other than the Grad-CAM grid are skipped and report.md says so.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os

import numpy as np
from sklearn import metrics as sk

from covidlib import confounds
from covidlib import explain
from covidlib import metrics
from covidlib import model_dir as md
from covidlib import shift
from covidlib import shortcuts

REPORT_JSON = 'report.json'
REPORT_MD = 'report.md'
PREDICTIONS_CSV = 'predictions.csv'
PREDICTION_COLUMNS = ('file', 'patient', 'source', 'view', 'label', 'probability', 'decision',
                      'shift_score', 'in_distribution')
GRID = 'gradcam_grid.png'
PLOTS = ('confusion_matrix.png', 'roc.png', 'pr.png', 'reliability.png', 'training_curves.png')
NAMES = {'accuracy': 'Accuracy', 'sensitivity': 'Sensitivity (COVID-19 recall)',
         'specificity': 'Specificity (normal recall)', 'ppv': 'PPV (precision)', 'npv': 'NPV',
         'f1': 'F1', 'roc_auc': 'ROC-AUC', 'pr_auc': 'PR-AUC (average precision)',
         'brier': 'Brier score', 'ece': 'ECE', 'nll': 'NLL (log loss)'}


def load_history(model_dir: str) -> dict | None:
  """model_dir/history.json, or None when the run wrote none."""
  path = os.path.join(model_dir, md.HISTORY)
  return md.read_json(path) if os.path.exists(path) else None


def _fmt(value, digits: int = 3) -> str:
  return '—' if value is None else f'{value:.{digits}f}'


def _interval(figure: dict, digits: int = 3) -> str:
  low, high = figure['ci95']
  return '—' if low is None else f'[{low:.{digits}f}, {high:.{digits}f}]'


def _counts(name: str, c: dict) -> str:
  """'k/n' behind a proportion, from the confusion counts."""
  tn, fp, fn, tp = c['tn'], c['fp'], c['fn'], c['tp']
  k, n = {'accuracy': (tp + tn, tn + fp + fn + tp), 'sensitivity': (tp, tp + fn),
          'specificity': (tn, tn + fp), 'ppv': (tp, tp + fp), 'npv': (tn, tn + fn)}[name]
  return f'{k}/{n}'


def _cell(figure: dict) -> str:
  if figure['value'] is None:
    return '—'
  return f'{figure["value"]:.3f} {_interval(figure, 2)}'


def render_markdown(report: dict, plots: dict) -> str:
  """report.md from report.json's content and the plot paths (or the reason they were skipped)."""
  m = report['metrics']
  d = report['decision']
  data = report['data']
  neg, pos = (md.display_name(n) for n in md.class_names(report))
  names = {**NAMES, 'sensitivity': f'Sensitivity ({pos} recall)',
           'specificity': f'Specificity ({neg} recall)'}
  out = [f'# Evaluation: {report["model"]} on {data["description"]}', '',
         f'> **{report["caveat"]}**', '',
         f'{data["n"]} images: {data["n_covid"]} {pos}, {data["n_normal"]} {neg}. '
         f'Model: `{report["model_dir"]}` ({report["model"]}, {report["image_size"]} px, '
         f'{report["channels"]} channel(s)). Label = P({pos}) >= {d["threshold"]:.4f} '
         f'(policy `{d["policy"]}`), P = sigmoid(logit / {d["temperature"]:.3f}).', '',
         '## Metrics with 95% intervals', '',
         '| Figure | Value | 95% interval | Counts | Method |',
         '|---|---|---|---|---|']
  for name, figure in m['figures'].items():
    value = _fmt(figure['value']) if figure['value'] is not None else (
        f'— ({figure.get("reason", "undefined")})')
    counts = _counts(name, m['confusion']) if name in metrics.PROPORTIONS else ''
    method = figure['method']
    if method == 'bootstrap':
      boot = report['bootstrap']
      method = f'bootstrap ({boot["n"]}, stratified, seed {boot["seed"]})'
    out.append(f'| {names.get(name, name)} | {value} | {_interval(figure)} | {counts} | '
               f'{method} |')
  c = m['confusion']
  out += ['', f'ECE uses {report["calibration"]["n_bins"]} equal-width bins. Wilson intervals for '
          'proportions; percentile bootstrap for the rest.', '',
          '## Confusion matrix', '',
          f'| | predicted {neg} | predicted {pos} |', '|---|---|---|',
          f'| **true {neg}** | {c["tn"]} (TN) | {c["fp"]} (FP) |',
          f'| **true {pos}** | {c["fn"]} (FN) | {c["tp"]} (TP) |', '']
  for feature, by_value in report['groups'].items():
    out += [f'## By {feature}', '',
            f'| {feature} | n | {pos} / {neg} | accuracy | sensitivity | specificity | '
            'ROC-AUC |', '|---|---|---|---|---|---|---|']
    for value, g in by_value.items():
      f = g['figures']
      out.append(f'| {value} | {g["n"]} | {g["n_covid"]} / {g["n_normal"]} | '
                 f'{_cell(f["accuracy"])} | {_cell(f["sensitivity"])} | '
                 f'{_cell(f["specificity"])} | {_cell(f["roc_auc"])} |')
    out += ['', f'— = undefined in that group (e.g. sensitivity where it holds no {pos} '
            'image, ROC-AUC with one class only). A group holding one class only measures '
            'that class alone.', '']
  out += confounds.render_markdown(report.get('confounds'), pos)
  if 'shortcuts' in report:
    out += shortcuts.render_markdown(report['shortcuts'], positive=pos)
  if 'shift' in report:
    out += shift.render_markdown(report['shift'], plots.get('shift_histogram'))
  out += ['## Operating threshold', '']
  if d['chosen_now']:
    choice = d['threshold_choice']
    out.append(f'Chosen now on split `{d["split"]}` ({d.get("threshold_data", "")}, '
               f'{choice["n"]} images) by policy `{choice["policy"]}`: threshold '
               f'{choice["threshold"]:.4f}, where sensitivity = {_fmt(choice["sensitivity"])} '
               f'and specificity = {_fmt(choice["specificity"])}.')
    if d.get('written_to'):
      out.append(f'Written to `{d["written_to"]}`: covidlib-predict and the exports now '
                 'apply this threshold and temperature.')
    else:
      out.append('Not written to the model_dir (write_decision off).')
    if d.get('warning'):
      out.append(f'**Warning:** {d["warning"]}.')
  else:
    out.append(f'Not chosen now: threshold {d["threshold"]:.4f} (policy `{d["policy"]}`) from '
               f'{d["loaded_from"]}.')
  cal = report['calibration']
  out += ['', '## Calibration', '']
  fit = d.get('temperature_fit')
  if fit:
    if fit['separable']:
      out.append(f'Temperature scaling asked for, but split `{d["split"]}` is perfectly '
                 'separated by the scores: nothing to calibrate on, temperature kept at 1.')
    else:
      out.append(f'Temperature fitted on split `{d["split"]}` ({fit["n"]} images) by minimising '
                 f'NLL: T = {fit["temperature"]:.3f} (NLL {fit["nll_before"]:.3f} -> '
                 f'{fit["nll_after"]:.3f}, ECE {fit["ece_before"]:.3f} -> '
                 f'{fit["ece_after"]:.3f} there).' + (' The fit stopped at a bound.'
                                                      if fit['at_bound'] else ''))
  else:
    out.append(f'Temperature {cal["temperature"]:.3f} ('
               + ('no temperature scaling' if cal['temperature'] == 1.0 else 'stored decision')
               + ').')
  out += ['', f'On this split: ECE {cal["ece_before"]:.3f} before, {cal["ece_after"]:.3f} after; '
          f'NLL {cal["nll_before"]:.3f} before, {cal["nll_after"]:.3f} after.', '']
  cam = report.get('gradcam')
  out += ['## Grad-CAM', '']
  if cam:
    lung = cam['lung_focus']
    out += [f'Grid of {cam["selection"]}: `{plots.get("gradcam_grid", GRID)}` '
            f'(layer `{cam["layer"]}`, heat for {cam["target"]}).', '',
            f'| file | true label | P({pos}) | lung focus |', '|---|---|---|---|']
    for item in cam['grid_items']:
      out.append(f'| {item["filename"] or "—"} | {item["label"]} | {item["p_covid"]:.3f} | '
                 f'{_fmt(item["lung_focus"], 2)} |')
    out += ['', f'Lung-focus score (share of the Grad-CAM heat inside two fixed lung ellipses; '
            f'a uniform map scores {lung["region_share"]:.2f}): mean {_fmt(lung["all"]["mean"], 2)}'
            f' over {lung["all"]["n"]} images'
            + (f' ({lung["empty_maps"]} more had an all-zero map: no positive evidence for '
               'their predicted class, so no score)' if lung.get('empty_maps') else '')
            + f'; {neg} {_fmt(lung["by_label"]["normal"]["mean"], 2)}, {pos} '
            f'{_fmt(lung["by_label"]["covid"]["mean"], 2)}.']
    for key, by_value in lung.items():
      if key.startswith('by_') and key != 'by_label':
        out.append(f'By {key[3:]}: ' + ', '.join(
            f'{v} {_fmt(s["mean"], 2)} (n={s["n"]})' for v, s in by_value.items()) + '.')
    out += ['', 'A coarse shortcut alarm, not a segmentation: it assumes a centred frontal '
            'film; scores well under the uniform share mean the heat sits mostly outside the '
            'lungs (borders, labels, shoulders, abdomen). See covidlib/explain.py.', '']
  else:
    out += ['Not computed.', '']
  out += ['## Plots', '']
  if plots.get('skipped'):
    out.append(f'Plots skipped: {plots["skipped"]}.')
  for key, path in plots.items():
    if key != 'skipped':
      out.append(f'- {key}: `{path}`')
  history = report.get('history')
  if history:
    kept = history.get('kept')
    out += ['', '## Training', '', f'{history["epochs"]} epochs'
            f'{_extended_text(history.get("extended_from_epochs"))}. '
            + (f'The model holds {kept["text"]}. ' if kept else '')
            + 'Last epoch: ' + _figures_text(history['last']) + '.']
  return '\n'.join(out) + '\n'


def _figures_text(figures: dict) -> str:
  return ', '.join(f'{k} {v:.4f}' for k, v in figures.items())


def _extended_text(extended_from: int | None) -> str:
  return f' (extended from {extended_from})' if extended_from else ''


def _epoch_count(history: dict) -> int:
  lengths = [len(v) for v in history.values() if isinstance(v, list)]
  return max(lengths) if lengths else 0


def kept_epoch_text(history: dict | None) -> str | None:
  """The epoch whose weights model.keras holds, with its figures, from history.json:

      'epoch 23 of 30 (highest val_auc): val_auc 0.8600, val_loss 0.4100'

  (train and AUC loss without validation data). None for a history.json without the record
  (written before covidlib.train recorded the kept epoch).
  """
  if not history or not history.get('kept_epoch'):
    return None
  figures = history.get('kept_metrics') or {}
  keys = [k for k in ('val_auc', 'val_loss') if k in figures] or \
      [k for k in ('auc', 'loss') if k in figures]
  return (f'epoch {history["kept_epoch"]} of {_epoch_count(history)} '
          f'({history.get("kept_reason") or history.get("kept_by")}): '
          + _figures_text({k: figures[k] for k in keys}))


def _history_summary(history: dict | None) -> dict | None:
  """report.json's 'history': epochs, the last epoch's figures and the kept epoch (if known)."""
  if not history:
    return None
  summary = {'epochs': _epoch_count(history),
             'last': {k: float(v[-1]) for k, v in sorted(history.items())
                      if isinstance(v, list) and v and isinstance(v[-1], (int, float))}}
  if history.get('kept_epoch'):
    summary['kept'] = {'epoch': history['kept_epoch'], 'by': history.get('kept_by'),
                       'reason': history.get('kept_reason'),
                       'metrics': dict(sorted((history.get('kept_metrics') or {}).items())),
                       'text': kept_epoch_text(history)}
  if history.get('extended_from_epochs'):
    summary['extended_from_epochs'] = history['extended_from_epochs']
  return summary


def _save_figure(figure, path: str) -> None:
  buffer = io.BytesIO()
  figure.savefig(buffer, format='png', dpi=100, bbox_inches='tight')
  md.write_bytes_atomic(path, buffer.getvalue())


def _plot(out_dir: str, evaluation, history: dict | None) -> dict:
  """Writes the matplotlib plots; returns {name: path} or {'skipped': reason}."""
  try:
    import matplotlib  # Optional (covidlib[plots]): without it the plots are skipped.
    matplotlib.use('Agg')  # No display: files only.
    from matplotlib import pyplot as plt  # Optional, as above.
  except ImportError:
    return {'skipped': 'matplotlib is not installed (pip install covidlib[plots])'}

  report = evaluation.report
  y = evaluation.predictions.labels
  p = evaluation.calibrated_scores
  t = evaluation.decision.threshold
  c = report['metrics']['confusion']
  figures = report['metrics']['figures']
  paths = {}

  fig, ax = plt.subplots(figsize=(4, 3.6))
  matrix = np.array(c['matrix'])
  share = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
  ax.imshow(share, cmap='Blues', vmin=0, vmax=1)
  for (i, j), count in np.ndenumerate(matrix):
    ax.text(j, i, f'{count}\n{share[i, j]:.0%}', ha='center', va='center',
            color='white' if share[i, j] > 0.5 else 'black')
  ax.set_xticks([0, 1], ['normal', 'COVID-19'])
  ax.set_yticks([0, 1], ['normal', 'COVID-19'])
  ax.set_xlabel('predicted')
  ax.set_ylabel('true')
  ax.set_title(f'Confusion matrix (threshold {t:.3f})')
  paths['confusion_matrix'] = os.path.join(out_dir, 'confusion_matrix.png')
  _save_figure(fig, paths['confusion_matrix'])
  plt.close(fig)

  both = 0 < y.sum() < y.size
  if both:
    fig, ax = plt.subplots(figsize=(4.2, 4))
    fpr, tpr, _ = sk.roc_curve(y, p)
    auc = figures['roc_auc']
    ax.plot(fpr, tpr, label=f'ROC-AUC {auc["value"]:.3f} {_interval(auc, 2)}')
    ax.plot([0, 1], [0, 1], ':', color='gray')
    sens, spec = figures['sensitivity']['value'], figures['specificity']['value']
    ax.plot([1 - spec], [sens], 'o', color='red', label=f'operating point (t={t:.3f})')
    ax.set_xlabel('1 - specificity')
    ax.set_ylabel('sensitivity')
    ax.set_title('ROC')
    ax.legend(loc='lower right', fontsize=8)
    paths['roc'] = os.path.join(out_dir, 'roc.png')
    _save_figure(fig, paths['roc'])
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(4.2, 4))
    precision, recall, _ = sk.precision_recall_curve(y, p)
    ap = figures['pr_auc']
    ax.step(recall, precision, where='post', label=f'AP {ap["value"]:.3f} {_interval(ap, 2)}')
    ax.axhline(y.mean(), linestyle=':', color='gray', label=f'prevalence {y.mean():.2f}')
    if figures['ppv']['value'] is not None:
      ax.plot([sens], [figures['ppv']['value']], 'o', color='red',
              label=f'operating point (t={t:.3f})')
    ax.set_xlabel('recall (sensitivity)')
    ax.set_ylabel('precision (PPV)')
    ax.set_ylim(0, 1.02)
    ax.set_title('Precision-recall')
    ax.legend(loc='lower left', fontsize=8)
    paths['pr'] = os.path.join(out_dir, 'pr.png')
    _save_figure(fig, paths['pr'])
    plt.close(fig)

  cal = report['calibration']
  fig, ax = plt.subplots(figsize=(4.2, 4))
  ax.plot([0, 1], [0, 1], ':', color='gray', label='perfect calibration')
  curves = [('before', cal['reliability_before'], cal['ece_before'])]
  if cal['temperature'] != 1.0:
    curves.append(('after', cal['reliability_after'], cal['ece_after']))
  for name, bins, ece in curves:
    filled = [b for b in bins if b['count']]
    ax.plot([b['mean_score'] for b in filled], [b['fraction_covid'] for b in filled], 'o-',
            label=f'{name} (ECE {ece:.3f})')
  ax.set_xlabel('mean P(COVID-19) in bin')
  ax.set_ylabel('fraction COVID-19 in bin')
  ax.set_title(f'Reliability ({cal["n_bins"]} bins, T={cal["temperature"]:.2f})')
  ax.legend(loc='upper left', fontsize=8)
  paths['reliability'] = os.path.join(out_dir, 'reliability.png')
  _save_figure(fig, paths['reliability'])
  plt.close(fig)

  if 'shift' in report:
    paths['shift_histogram'] = os.path.join(out_dir, 'shift_histogram.png')
    shift.plot_histogram(report['shift'], paths['shift_histogram'], plt)

  if history:
    keys = [k for k in ('loss', 'accuracy', 'auc') if k in history]
    if keys:
      fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
      for ax, key in zip(axes[0], keys):
        epochs = np.arange(1, len(history[key]) + 1)
        ax.plot(epochs, history[key], label='train')
        if f'val_{key}' in history:
          ax.plot(epochs, history[f'val_{key}'], label='validation')
        ax.set_xlabel('epoch')
        ax.set_title(key)
        ax.legend(fontsize=8)
      paths['training_curves'] = os.path.join(out_dir, 'training_curves.png')
      _save_figure(fig, paths['training_curves'])
      plt.close(fig)
  return paths


def write_report(out_dir: str, evaluation, history: dict | None = None,
                 plots: bool = True) -> dict:
  """Writes report.json, report.md, the plots and the Grad-CAM grid; returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  report = dict(evaluation.report)
  report['history'] = _history_summary(history)
  paths = _plot(out_dir, evaluation, history) if plots else {'skipped': 'plots turned off'}
  if evaluation.heatmaps is not None and evaluation.grid_indices:
    items = report['gradcam']['grid_items']
    captions = [f'{(it["filename"] or "")[-28:]}\ntrue {it["label"]}, P={it["p_covid"]:.2f}\n'
                f'lung focus {_fmt(it["lung_focus"], 2)}' for it in items]
    images = [evaluation.predictions.images[i] for i in evaluation.grid_indices]
    heatmaps = [evaluation.heatmaps[i] for i in evaluation.grid_indices]
    paths['gradcam_grid'] = os.path.join(out_dir, GRID)
    explain.save_grid(paths['gradcam_grid'], images, heatmaps, captions)
  report['files'] = {k: os.path.basename(v) for k, v in paths.items() if k != 'skipped'}
  if 'skipped' in paths:
    report['plots_skipped'] = paths['skipped']
  md.write_json(os.path.join(out_dir, REPORT_JSON), report)
  relative = {k: (v if k == 'skipped' else os.path.basename(v)) for k, v in paths.items()}
  markdown = render_markdown(report, relative)
  md.write_bytes_atomic(os.path.join(out_dir, REPORT_MD), markdown.encode())
  paths['predictions_csv'] = os.path.join(out_dir, PREDICTIONS_CSV)
  md.write_bytes_atomic(paths['predictions_csv'], predictions_csv(evaluation).encode())
  paths['report_json'] = os.path.join(out_dir, REPORT_JSON)
  paths['report_md'] = os.path.join(out_dir, REPORT_MD)
  return paths


def _patient_hash(source: str, patient: str) -> str:
  """A short hash of source and patient id ('' when unknown): groups a patient's rows without
  printing the id (labelled_xrays ids are salted HMACs already)."""
  if not patient:
    return ''
  return hashlib.sha256(f'{source}:{patient}'.encode()).hexdigest()[:16]


def predictions_csv(evaluation) -> str:
  """predictions.csv: one row per evaluated image (PREDICTION_COLUMNS), in dataset order."""
  scored = evaluation.predictions
  threshold = evaluation.decision.threshold
  shift_scores = evaluation.shift_scores
  names = md.class_names(evaluation.report)
  files, sources = scored.column('filename'), scored.column('source')
  patients, views = scored.column('patient_id'), scored.column('view')
  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator='\n')
  writer.writerow(PREDICTION_COLUMNS)
  for i in range(len(scored)):
    p = float(evaluation.calibrated_scores[i])
    if shift_scores is None:
      shift_cells = ['', '']
    else:
      shift_cells = [f'{shift_scores[i]:.6g}',
                     str(bool(shift_scores[i] <= evaluation.shift_threshold)).lower()]
    writer.writerow([files[i], _patient_hash(sources[i], patients[i]), sources[i], views[i],
                     int(scored.labels[i]), f'{p:.6f}', names[int(p >= threshold)],
                     *shift_cells])
  return buffer.getvalue()


def read_report(out_dir: str) -> dict:
  with open(os.path.join(out_dir, REPORT_JSON)) as f:
    return json.load(f)
