"""covidlib-predict: P(COVID-19) and a decision for image files, DICOM included.

    covidlib-predict --model=exports/seed_cnn/model_int8.tflite xray1.png scans/ [--format=csv]
    covidlib-predict --model=runs/seed_cnn chest.dcm --grad_cam_dir=cams/

(or `python -m covidlib.cli.predict ...`). --model is a model.keras, a model_dir, a SavedModel
folder or a .tflite file; the threshold and temperature are those stored with it (see
covidlib/predict.py). Folders are searched recursively; names starting with '.' are skipped.
Output on stdout, one row per file, in input order: --format=table (default), json or csv.
A file that cannot be read (empty, truncated, not an image, DICOM without pixels) gets a row
with its error and no probability; the others are still predicted, and the exit status is 1.
A missing model or input path, or a bad flag: one line on stderr, exit 2. Research software,
not a diagnostic device.

Distribution shift (issue #10): for a model that carries a shift score (see covidlib/shift.py)
every format also gives `shift_score` and `in_distribution` per file (the table adds two
columns; csv and json always hold the fields, empty or null without a score). --on_shift=warn
(default) labels every image and names the out-of-distribution ones in a warning on stderr;
--on_shift=abstain gives them the decision `out_of_distribution` and no label. Either way the
exit status stays 0 for them:

    covidlib-predict --model=runs/compact_resnet --on_shift=abstain --format=json scans/
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from typing import Sequence

from absl import flags

from covidlib import errors
from covidlib import predict
from covidlib.cli import common
from covidlib.cli import flag_util

PROG = 'covidlib-predict'
FORMATS = ('table', 'json', 'csv')
_DEFINE = flag_util.define

_MODEL = _DEFINE(flags.DEFINE_string, 'model', None,
                 'A model.keras, model_dir, SavedModel folder or .tflite file.')
_FORMAT = _DEFINE(lambda name, default, help_text, **kwargs: flags.DEFINE_enum(
                      name, default, FORMATS, help_text, **kwargs),
                  'format', 'table', f'Output format on stdout: {", ".join(FORMATS)}.')
_GRAD_CAM_DIR = _DEFINE(flags.DEFINE_string, 'grad_cam_dir', None,
                        'Write a Grad-CAM overlay PNG per readable image here (.keras models).')
_NUM_THREADS = _DEFINE(flags.DEFINE_integer, 'num_threads', None,
                       'TFLite interpreter threads (default: LiteRT chooses).')
_ON_SHIFT = _DEFINE(lambda name, default, help_text, **kwargs: flags.DEFINE_enum(
                        name, default, predict.ON_SHIFT, help_text, **kwargs),
                    'on_shift', 'warn',
                    'For images unlike the training data (shift score above its threshold): '
                    'warn (label them, warn on stderr) or abstain (decision '
                    'out_of_distribution, no label). Exit status 0 either way.')


def expand_inputs(inputs: Sequence[str]) -> list[str]:
  """Files as given, folders as their files (recursive, sorted, names starting '.' skipped).

  Raises:
    UsageError: no inputs, an input path that does not exist, or folders holding no file.
  """
  if not inputs:
    raise errors.UsageError('no input: give image files or folders after the flags')
  paths = []
  for item in inputs:
    if not os.path.exists(item):
      raise errors.UsageError(f'input {item!r} does not exist')
    if not os.path.isdir(item):
      paths.append(item)
      continue
    found = []
    for root, dirs, names in os.walk(item):
      dirs[:] = [d for d in dirs if not d.startswith('.')]
      found.extend(os.path.join(root, n) for n in names if not n.startswith('.'))
    paths.extend(sorted(found))
  if not paths:
    raise errors.UsageError(f'no files found in {", ".join(map(repr, inputs))}')
  return paths


def format_results(results: Sequence[predict.Prediction], fmt: str, model: str) -> str:
  """The results as a table, a JSON document or CSV (header + one row per file)."""
  if fmt == 'json':
    return json.dumps({'model': model, 'n': len(results),
                       'n_failed': sum(not r.ok for r in results),
                       'results': [r.to_dict() for r in results]}, indent=2) + '\n'
  if fmt == 'csv':
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator='\n')
    writer.writerow(['path', 'probability', 'label', 'class_name', 'threshold', 'error',
                     *_SHIFT_COLUMNS])
    for r in results:
      writer.writerow([r.path, '' if r.probability is None else f'{r.probability:.6f}',
                       '' if r.label is None else r.label, r.class_name or '',
                       f'{r.threshold:.6g}', r.error or '', *_shift_cells(r)])
    return buffer.getvalue()
  with_shift = any(r.shift_score is not None for r in results)
  width = max([len('file')] + [len(r.path) for r in results])
  shift_head = '  shift_score  in_dist' if with_shift else ''
  decision_width = max([8] + [len(r.decision or '') for r in results])
  lines = [f'{"file":<{width}}  P(COVID-19)  {"decision":<{decision_width}}  threshold'
           f'{shift_head}  error']
  for r in results:
    p = '' if r.probability is None else f'{r.probability:.4f}'
    shift_cells = ''
    if with_shift:
      score, inside = _shift_cells(r, table=True)
      shift_cells = f'  {score:>11}  {inside:<7}'
    lines.append(f'{r.path:<{width}}  {p:>11}  {r.decision or "-":<{decision_width}}  '
                 f'{r.threshold:>9.4g}{shift_cells}  {r.error or ""}'.rstrip())
  return '\n'.join(lines) + '\n'


_SHIFT_COLUMNS = ('shift_score', 'in_distribution', 'decision')


def _shift_cells(r: predict.Prediction, table: bool = False) -> tuple[str, ...]:
  """shift_score, in_distribution (and, for csv, decision) as text; '' without a score."""
  score = '' if r.shift_score is None else (f'{r.shift_score:.4g}' if table
                                            else f'{r.shift_score:.6g}')
  inside = '' if r.in_distribution is None else ('yes' if r.in_distribution else 'NO')
  if table:
    return score or '-', inside or '-'
  inside = '' if r.in_distribution is None else str(r.in_distribution).lower()
  return score, inside, r.decision or ''


def warn_out_of_distribution(results: Sequence[predict.Prediction], threshold: float | None,
                             abstained: bool) -> None:
  """One warning line on stderr naming the images flagged as unlike the training data."""
  flagged = [r for r in results if r.in_distribution is False]
  if not flagged:
    return
  what = ('no label given (decision out_of_distribution)' if abstained
          else 'their answers are not reliable')
  print(f'{PROG}: warning: {len(flagged)} of {len(results)} images are unlike the training '
        f'data (shift_score > {threshold:.4g}), {what}: '
        + ', '.join(r.path for r in flagged), file=sys.stderr, flush=True)


def write_grad_cams(predictor: predict.Predictor, results: Sequence[predict.Prediction],
                    out_dir: str) -> list[str]:
  """One overlay PNG per readable file: <out_dir>/<index>_<file name>.png."""
  from covidlib import explain
  from covidlib import preprocess

  written = []
  for i, result in enumerate(results):
    if not result.ok:
      continue
    image = predict.read_image(result.path, predictor.max_pixels)
    x = preprocess.preprocess(image, predictor.image_size, predictor.channels).numpy()
    heat = explain.grad_cam(predictor.model, x)
    path = os.path.join(out_dir, f'{i:04d}_{os.path.basename(result.path)}.png')
    explain.save_overlay(path, x, heat)
    written.append(path)
  return written


def main(argv):
  if not _MODEL.value:
    raise errors.UsageError('flag --model is required')
  paths = expand_inputs(argv[1:])
  predictor = predict.Predictor(_MODEL.value, num_threads=_NUM_THREADS.value,
                                on_shift=_ON_SHIFT.value or 'warn')
  if _GRAD_CAM_DIR.value and predictor.format != predict.KERAS:
    raise errors.UsageError(
        f'--grad_cam_dir needs a .keras model or model_dir (Grad-CAM differentiates the Keras '
        f'model), not a {predictor.format} model')
  results = predictor.predict_files(paths)
  sys.stdout.write(format_results(results, _FORMAT.value, _MODEL.value))
  sys.stdout.flush()
  warn_out_of_distribution(results, predictor.shift_threshold,
                           predictor.on_shift == 'abstain')
  if _GRAD_CAM_DIR.value:
    write_grad_cams(predictor, results, _GRAD_CAM_DIR.value)
  failed = [r for r in results if not r.ok]
  if failed:
    common.print_error(PROG, f'{len(failed)} of {len(results)} files could not be read: '
                       + '; '.join(f'{r.path}: {r.error}' for r in failed))
    return common.EXIT_FAILURE
  return 0


def run():
  common.run_main(main, prog=PROG)


if __name__ == '__main__':
  run()
