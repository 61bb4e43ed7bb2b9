"""Parity: does each exported variant answer like the Keras model it came from?

    from exporters import parity
    report = parity.parity_report('runs/seed_cnn', {'saved_model': 'exports/x/saved_model',
                                                    'tflite_int8': 'exports/x/model_int8.tflite'},
                                  images, labels)        # images: float32 (N, S, S, C) in [0, 1]
    parity.write_report('exports/x', report)             # export_report.json + export_report.md

(`covidlib-export` runs it on the validation split.) Every model, the Keras reference included,
is run through `covidlib.predict.Predictor`, so all see the same preprocessed tensors and apply
the same stored decision. Per variant: ROC-AUC, sensitivity, specificity and accuracy with 95%
intervals (`covidlib.metrics`), decision agreement with Keras, max and mean |dp| against Keras,
file size, and single-image latency (median of `latency_runs` after warm-up; the LiteRT
interpreter at 1 and 2 threads for .tflite, the `serving_preprocessed` signature for the
SavedModel, a direct Keras call for the reference).

The tflite_uint8_image variant takes the decoded image as it is: it is run on the split's images
at their original sizes (`raw`), against the Keras model on the same images (its shift score
too).
Shift score (issues #10, #17): when the Keras model carries one, each variant's `shift_score`
is compared with the Keras one on the same images: the share of images whose
out-of-distribution flag agrees, and the relative difference of the scores (median and max;
|score - Keras score| / max(|Keras score|, 1), since the standardised multi-depth score sits near
0 for ordinary images). A variant that carries one depth alone (int8: the penultimate one) is
compared with the Keras model's score of that depth. Informational, no pass/fail: int8
quantizes the score coarsely and only its flag is meant to survive.

Targets (pass/fail per variant, from the project's issue 5):
  int8 file <= 0.26 x the fp32 file; decision agreement >= 0.98; ROC-AUC drop <= 0.01.
`missed_targets(report)` names each miss ('tflite_int8: agreement 0.947 < 0.98'); covidlib-export
then writes nothing and exits 1, unless --allow_parity_miss (`ParityMissError`).
"""

from __future__ import annotations

import os
import time

import numpy as np

from covidlib import edge
from covidlib import errors
from covidlib import metrics
from covidlib import model_dir as model_dir_lib
from covidlib import predict

REPORT_JSON = 'export_report.json'
REPORT_MD = 'export_report.md'
TARGETS = {'int8_size_ratio_max': 0.26, 'agreement_min': 0.98, 'roc_auc_drop_max': 0.01}
THREADS = (1, 2)
REFERENCE = 'keras'
# The figure each target checks, for the one line naming a miss.
_TARGET_FIGURES = {'agreement': 'agreement', 'roc_auc_drop': 'ROC-AUC drop',
                   'size_ratio': 'size ratio to fp32'}
_MISSED_SIDE = {'>=': '<', '<=': '>'}


class ParityMissError(errors.CovidlibError):
  """An exported variant misses a parity target: the export is not written (exit status 1)."""


def file_size(path: str) -> int:
  """Bytes of a file, or of every file under a folder (a SavedModel)."""
  if os.path.isfile(path):
    return os.path.getsize(path)
  return sum(os.path.getsize(os.path.join(root, name))
             for root, _, names in os.walk(path) for name in names)


def _median_ms(run, runs: int, warmup: int = 3) -> float:
  for _ in range(warmup):
    run()
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return float(np.median(times) * 1000.0)


def measure_latency(path: str, image: np.ndarray, runs: int = 30) -> dict[str, float]:
  """Median single-image latency in ms: {'1_thread', '2_threads'} for .tflite, else {'default'}.

  Args:
    path: a model path `covidlib.predict.Predictor` accepts.
    image: one preprocessed image, float32 (S, S, C); for a variant that takes the decoded image
      (tflite_uint8_image), one uint8 (H, W, 1) image, whose resize is then part of the time.
  """
  if image.dtype == np.uint8:
    out = {}
    for threads in THREADS:
      model = edge.EdgePredictor(path, num_threads=threads)
      prepared = model.prepare(image)
      out[f'{threads}_thread' + ('s' if threads > 1 else '')] = _median_ms(
          lambda: model.run(prepared), runs)
    return out
  batch = np.asarray(image, np.float32)[np.newaxis]
  if predict.detect_format(path) != predict.TFLITE:
    predictor = predict.Predictor(path)
    return {'default': _median_ms(lambda: predictor.predict_preprocessed(batch), runs)}
  from ai_edge_litert.interpreter import Interpreter  # Optional (covidlib[litert]).

  with open(path, 'rb') as f:
    content = f.read()
  out = {}
  for threads in THREADS:
    interpreter = Interpreter(model_content=content, num_threads=threads)
    interpreter.allocate_tensors()
    (detail,), output = interpreter.get_input_details(), interpreter.get_output_details()[0]
    x = batch
    if detail['dtype'] != np.float32:  # int8 io: quantizing is part of the caller's cost.
      scale, zero_point = detail['quantization']
      x = np.clip(np.round(batch / scale + zero_point), -128, 127).astype(detail['dtype'])

    def run():
      interpreter.set_tensor(detail['index'], x)
      interpreter.invoke()
      interpreter.get_tensor(output['index'])
    out[f'{threads}_thread' + ('s' if threads > 1 else '')] = _median_ms(run, runs)
  return out


def _figures(labels, p, threshold, n_bootstrap, seed) -> dict:
  result = metrics.compute_metrics(labels, p, threshold, n_bootstrap=n_bootstrap, seed=seed)
  return {name: result.figures[name].as_dict()
          for name in ('roc_auc', 'sensitivity', 'specificity', 'accuracy')}


def parity_report(model_path: str, variants: dict[str, str], images: np.ndarray,
                  labels: np.ndarray, *, split: str = '', latency_runs: int = 30,
                  n_bootstrap: int = 1000, seed: int = 0,
                  raw: tuple[list[np.ndarray], np.ndarray] | None = None) -> dict:
  """Measures every variant against the Keras model on preprocessed, labelled images.

  Args:
    model_path: the reference: a model_dir or .keras file.
    variants: name -> exported model path, e.g. {'tflite_int8': '.../model_int8.tflite'}; names
      'tflite_fp32' and 'tflite_int8' enable the size-ratio target.
    images: float32 (N, S, S, C) in [0, 1]; labels: (N,) 1 = COVID-19, 0 = normal.
    split: what the images are, for the report.
    latency_runs: timed single-image runs per model and thread count (0 = skip latency).
    raw: (uint8 (H, W, 1) images at their original sizes, labels) of the same split, for
      variants that take the decoded image (tflite_uint8_image): they and the Keras reference
      (through covidlib.preprocess) are compared on these.

  Returns:
    A JSON-ready dict: {'split', 'n', 'threshold', 'targets', 'models': {name: {...}},
    'all_targets_met'}. Variant paths are recorded by base name (they sit in the export folder).

  Raises:
    UsageError: no variants, images/labels of different lengths.
  """
  images = np.asarray(images, np.float32)
  labels = np.asarray(labels).reshape(-1).astype(np.int64)
  if not variants:
    raise errors.UsageError('parity needs at least one exported variant')
  if images.ndim != 4 or len(images) != len(labels) or not len(labels):
    raise errors.UsageError(
        f'parity needs N >= 1 images (N, S, S, C) and N labels; got images {images.shape} and '
        f'{labels.size} labels')
  reference = predict.Predictor(model_path)
  threshold = float(reference.decision.threshold)
  p_ref = reference.predict_preprocessed(images).astype(np.float64)
  _, shift_ref = reference.predict_preprocessed_with_shift(images)
  keras_figures = _figures(labels, p_ref, threshold, n_bootstrap, seed)
  keras_file = model_path
  if os.path.isdir(keras_file):
    keras_file = os.path.join(keras_file, model_dir_lib.MODEL)
  models = {REFERENCE: {
      'path': os.path.abspath(keras_file), 'format': predict.KERAS,
      'file_size_bytes': file_size(keras_file), 'figures': keras_figures,
      'latency_ms': measure_latency(model_path, images[0], latency_runs) if latency_runs else {},
  }}
  sizes = {name: file_size(path) for name, path in variants.items()}
  raw_reference = None
  for name, path in variants.items():
    predictor = predict.Predictor(path)
    if predictor.decision.threshold != threshold:
      raise errors.UsageError(
          f'variant {name!r} has threshold {predictor.decision.threshold}, the Keras model '
          f'{threshold}: they were not exported from the same model_dir')
    v_labels, v_ref, v_keras, latency_image = labels, p_ref, keras_figures, images[0]
    v_shift_ref = shift_ref
    if predictor.takes_uint8_image:
      if raw is None or not len(raw[0]):
        raise errors.UsageError(f'variant {name!r} takes decoded images: parity needs `raw`')
      raw_images, v_labels = raw[0], np.asarray(raw[1]).reshape(-1).astype(np.int64)
      if raw_reference is None:
        raw_reference, raw_shift_ref = _probabilities_and_scores(reference, raw_images)
        raw_figures = _figures(v_labels, raw_reference, threshold, n_bootstrap, seed)
      v_ref, v_keras, latency_image = raw_reference, raw_figures, raw_images[0]
      v_shift_ref = raw_shift_ref
      p, scores = _probabilities_and_scores(predictor, raw_images)
    else:
      p, scores = predictor.predict_preprocessed_with_shift(images)
      p = p.astype(np.float64)
    figures = _figures(v_labels, p, threshold, n_bootstrap, seed)
    agreement = float(np.mean((p >= threshold) == (v_ref >= threshold)))
    auc, auc_ref = figures['roc_auc']['value'], v_keras['roc_auc']['value']
    auc_drop = None if auc is None or auc_ref is None else auc_ref - auc
    entry = {
        'path': os.path.basename(os.path.normpath(path)), 'format': predictor.format,
        'file_size_bytes': sizes[name], 'figures': figures,
        'agreement': agreement, 'n_disagree': int(round((1 - agreement) * len(v_labels))),
        'max_abs_dp': float(np.max(np.abs(p - v_ref))),
        'mean_abs_dp': float(np.mean(np.abs(p - v_ref))),
        'roc_auc_drop': auc_drop,
        'latency_ms': measure_latency(path, latency_image, latency_runs) if latency_runs else {},
    }
    checks = {
        'agreement': {'value': agreement, 'target': f'>= {TARGETS["agreement_min"]}',
                      'pass': agreement >= TARGETS['agreement_min']},
        'roc_auc_drop': {'value': auc_drop, 'target': f'<= {TARGETS["roc_auc_drop_max"]}',
                         'pass': None if auc_drop is None
                         else auc_drop <= TARGETS['roc_auc_drop_max'] + 1e-12},
    }
    if name == 'tflite_int8' and 'tflite_fp32' in sizes:
      ratio = sizes[name] / sizes['tflite_fp32']
      entry['size_ratio_vs_fp32'] = ratio
      checks['size_ratio'] = {'value': ratio, 'target': f'<= {TARGETS["int8_size_ratio_max"]}',
                              'pass': ratio <= TARGETS['int8_size_ratio_max']}
    elif name.startswith('tflite_') and 'tflite_fp32' in sizes:
      entry['size_ratio_vs_fp32'] = sizes[name] / sizes['tflite_fp32']
    if predictor.takes_uint8_image:
      entry['input'] = 'decoded uint8 image at its original size (resize in the graph)'
      entry['n'] = int(len(v_labels))
    entry['targets'] = checks
    if shift_ref is not None:
      ref_threshold = reference.shift_threshold
      depths = predictor.shift_taps
      if (scores is not None and depths and len(depths) == 1
          and depths != reference.shift_taps and not predictor.takes_uint8_image):
        # The int8 file carries one depth (exporters.tflite.int8_shift_model): against the
        # Keras model's score of that depth, with its threshold.
        v_shift_ref, ref_threshold = reference.shift_scores_at(images, depths[0])
      entry['shift'] = _shift_parity(scores, predictor.shift_threshold, v_shift_ref,
                                     ref_threshold)
      if depths and depths != reference.shift_taps:
        entry['shift']['taps'] = list(depths)
    models[name] = entry
  verdicts = [c['pass'] for m in models.values() for c in m.get('targets', {}).values()]
  return {
      'split': split, 'n': int(labels.size), 'n_covid': int(labels.sum()),
      'n_normal': int(labels.size - labels.sum()), 'threshold': threshold,
      'temperature': float(reference.decision.temperature), 'targets': TARGETS,
      'latency_runs': latency_runs, 'threads': list(THREADS), 'models': models,
      'all_targets_met': None if None in verdicts else all(verdicts),
      'shift': None if shift_ref is None else {
          'threshold': reference.shift_threshold,
          'keras_share_flagged': float(np.mean(shift_ref > reference.shift_threshold))},
  }


def _probabilities_and_scores(predictor, images) -> tuple[np.ndarray, np.ndarray | None]:
  """P and shift scores (None without a shift score) of decoded uint8 images, one at a time."""
  results = [predictor.predict_array(x) for x in images]
  p = np.array([r.probability for r in results], np.float64)
  if not predictor.has_shift:
    return p, None
  return p, np.array([r.shift_score for r in results], np.float64)


def _figure_against(value: float, bound: float) -> str:
  """`value` with the digits that keep it on its side of `bound` (0.97999 is not '0.98')."""
  below = value < bound
  for digits in range(3, 17):
    text = f'{value:.{digits}g}'
    if (float(text) < bound) == below and float(text) != bound:
      return text
  return repr(value)


def missed_targets(report: dict) -> list[str]:
  """One entry per variant that misses a target: '<variant>: <figure> <value> <side> <target>'.

      >>> parity.missed_targets(report)
      ['tflite_int8: agreement 0.947 < 0.98, size ratio to fp32 0.274 > 0.26']

  Undefined verdicts (ROC-AUC of one class) are not misses; `report['all_targets_met']` is None
  for them.
  """
  missed = []
  for name, model in report['models'].items():
    figures = []
    for check, result in model.get('targets', {}).items():
      if result['pass'] is not False:
        continue
      op, bound = result['target'].split()
      figures.append(f'{_TARGET_FIGURES.get(check, check)} '
                     f'{_figure_against(result["value"], float(bound))} {_MISSED_SIDE[op]} {bound}')
    if figures:
      missed.append(f'{name}: {", ".join(figures)}')
  return missed


def _shift_parity(scores: np.ndarray | None, threshold: float | None, reference: np.ndarray,
                  reference_threshold: float) -> dict:
  """A variant's shift scores against the Keras ones: flag agreement and relative differences."""
  if scores is None:
    return {'missing': 'the variant has no shift_score output'}
  # Ordinary images score near 0 (each depth is standardised on validation images), where a
  # ratio means nothing: below 1 the difference is taken as it is.
  relative = np.abs(scores - reference) / np.maximum(np.abs(reference), 1.0)
  flags, flags_ref = scores > threshold, reference > reference_threshold
  return {'flag_agreement': float(np.mean(flags == flags_ref)),
          'share_flagged': float(np.mean(flags)),
          'median_rel_diff': float(np.median(relative)), 'max_rel_diff': float(relative.max())}


def _value(figure: dict) -> str:
  if figure.get('value') is None:
    return 'n/a'
  low, high = figure.get('ci95', [None, None])
  if low is None:
    return f'{figure["value"]:.3f}'
  return f'{figure["value"]:.3f} [{low:.3f}, {high:.3f}]'


def _verdict(check: dict | None) -> str:
  if check is None:
    return ''
  return {True: 'pass', False: '**FAIL**', None: 'n/a'}[check['pass']]


def _kib(n: int) -> str:
  return f'{n / 1024:,.1f} KiB' if n < 1024 * 1024 else f'{n / 1024 / 1024:,.2f} MiB'


def render_markdown(report: dict) -> str:
  """export_report.md: one table of metrics, one of agreement, size and latency, with verdicts."""
  lines = [
      '# Export parity report', '',
      'Research software, not a diagnostic device. Every exported variant against the Keras '
      'model it came from, on the same preprocessed images.', '',
      f'Data: {report["split"] or "(given arrays)"}: {report["n"]} images ({report["n_covid"]} '
      f'COVID-19, {report["n_normal"]} normal). Threshold {report["threshold"]:.4g}, temperature '
      f'{report["temperature"]:.4g} (label = P(COVID-19) >= threshold). Intervals: 95% '
      '(Wilson for proportions, stratified bootstrap for ROC-AUC).', '',
      '| Model | ROC-AUC | Sensitivity | Specificity | Accuracy |',
      '|---|---|---|---|---|',
  ]
  for name, m in report['models'].items():
    f = m['figures']
    lines.append(f'| {name} | {_value(f["roc_auc"])} | {_value(f["sensitivity"])} | '
                 f'{_value(f["specificity"])} | {_value(f["accuracy"])} |')
  lines += [
      '', f'Latency: median of {report["latency_runs"]} single-image runs after 3 warm-up runs '
      '(LiteRT interpreter for .tflite at 1 and 2 threads; SavedModel signature and direct Keras '
      'call otherwise). Size ratio: against tflite_fp32.', '',
      '| Model | Agreement with Keras | max abs dp | mean abs dp | ROC-AUC drop | File size | '
      'Size ratio | Latency 1 thread (ms) | Latency 2 threads (ms) |',
      '|---|---|---|---|---|---|---|---|---|',
  ]
  for name, m in report['models'].items():
    lat = m.get('latency_ms', {})
    one = lat.get('1_thread', lat.get('default'))
    two = lat.get('2_threads')
    if name == REFERENCE:
      lines.append(f'| {name} (reference) | - | - | - | - | {_kib(m["file_size_bytes"])} | - | '
                   f'{_fmt(one)} | {_fmt(two)} |')
      continue
    ratio = m.get('size_ratio_vs_fp32')
    drop = m['roc_auc_drop']
    lines.append(
        f'| {name} | {m["agreement"]:.4f} ({m["n_disagree"]} differ) | {m["max_abs_dp"]:.4f} | '
        f'{m["mean_abs_dp"]:.4f} | {"n/a" if drop is None else f"{drop:+.4f}"} | '
        f'{_kib(m["file_size_bytes"])} | {"-" if ratio is None else f"{ratio:.3f}"} | '
        f'{_fmt(one)} | {_fmt(two)} |')
  lines += ['', '## Targets', '',
            '| Model | Agreement >= 0.98 | ROC-AUC drop <= 0.01 | int8 size <= 0.26x fp32 |',
            '|---|---|---|---|']
  for name, m in report['models'].items():
    if name == REFERENCE:
      continue
    t = m['targets']
    lines.append(f'| {name} | {_verdict(t.get("agreement"))} | {_verdict(t.get("roc_auc_drop"))} '
                 f'| {_verdict(t.get("size_ratio"))} |')
  raw = [name for name, m in report['models'].items() if m.get('input')]
  if raw:
    lines += ['', f'{", ".join(raw)}: fed the decoded uint8 images at their original sizes '
              '(resize inside the model), against the Keras model on the same images through '
              'covidlib.preprocess.']
  verdict = {True: 'all targets met', False: 'SOME TARGETS MISSED',
             None: 'some targets undefined (e.g. ROC-AUC with one class)'}
  lines += ['', f'Overall: {verdict[report["all_targets_met"]]}.', '']
  if report.get('shift'):
    lines += ['## Shift score', '',
              f'Out of distribution = shift_score > {report["shift"]["threshold"]:.4g}; the '
              f'Keras model flags {report["shift"]["keras_share_flagged"]:.1%} of these images. '
              'Relative difference = |score - Keras score| / max(|Keras score|, 1).', '',
              '| Model | Flag agreement with Keras | Share flagged | Median rel. diff | '
              'Max rel. diff |', '|---|---|---|---|---|']
    for name, m in report['models'].items():
      sh = m.get('shift')
      if name == REFERENCE or sh is None:
        continue
      if 'missing' in sh:
        lines.append(f'| {name} | {sh["missing"]} | | | |')
        continue
      mark = ' (*)' if sh.get('taps') else ''
      lines.append(f'| {name}{mark} | {sh["flag_agreement"]:.4f} | {sh["share_flagged"]:.1%} | '
                   f'{sh["median_rel_diff"]:.2e} | {sh["max_rel_diff"]:.2e} |')
    lines.append('')
    if any((m.get('shift') or {}).get('taps') for m in report['models'].values()):
      lines += ['(*) carries the score of one depth alone, with its own threshold (int8: 8-bit '
                'activations do not carry the earlier depths; exporters/tflite.py), and is '
                'compared with the Keras model\'s score of that depth.', '']
  return '\n'.join(lines)


def _fmt(value) -> str:
  return '-' if value is None else f'{value:.3f}'


def write_report(out_dir: str, report: dict) -> tuple[str, str]:
  """Writes export_report.json and export_report.md atomically; returns their paths."""
  json_path = os.path.join(out_dir, REPORT_JSON)
  md_path = os.path.join(out_dir, REPORT_MD)
  model_dir_lib.write_json(json_path, report)
  model_dir_lib.write_bytes_atomic(md_path, render_markdown(report).encode())
  return json_path, md_path
