"""covidlib-predict: P(COVID-19) and a decision for image files, DICOM included.

    covidlib-predict --model=exports/seed_cnn/model_int8.tflite xray1.png scans/ [--format=csv]
    covidlib-predict --model=runs/seed_cnn chest.dcm --grad_cam_dir=cams/

(or `python -m covidlib.cli.predict ...`). --model is a model.keras, a model_dir, a SavedModel
folder or a .tflite file; the threshold and temperature are those stored with it (see
covidlib/predict.py). Folders are searched recursively; names starting with '.' are skipped.
Files are decoded by a thread pool (--workers, default the CPU count) while the model runs, and
printed in input order on stdout: --format=table (default), json or csv. Without TensorFlow
(LiteRT, numpy and Pillow only), covidlib-predict-edge does the same for .tflite files.
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

import os
import sys
from typing import Sequence

from absl import flags

from covidlib.cli import quiet_start  # noqa: F401  First: TensorFlow starts quietly (see there).
from covidlib import errors
from covidlib import explain
from covidlib import predict
from covidlib import preprocess
from covidlib import results
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
_WORKERS = _DEFINE(flags.DEFINE_integer, 'workers', None,
                   'Threads decoding files ahead of inference (default: the CPU count; 0: none).',
                   lower_bound=0)

_ON_SHIFT = _DEFINE(lambda name, default, help_text, **kwargs: flags.DEFINE_enum(
                        name, default, predict.ON_SHIFT, help_text, **kwargs),
                    'on_shift', 'warn',
                    'For images unlike the training data (shift score above its threshold): '
                    'warn (label them, warn on stderr) or abstain (decision '
                    'out_of_distribution, no label). Exit status 0 either way.')


# Shared with covidlib-predict-edge (covidlib.results has no TensorFlow in it).
expand_inputs = results.expand_inputs
format_results = results.format_results


def warn_out_of_distribution(predictions: Sequence[predict.Prediction],
                             threshold: float | None, abstained: bool) -> None:
  """One warning line on stderr naming the images flagged as unlike the training data."""
  flagged = [r for r in predictions if r.in_distribution is False]
  if not flagged:
    return
  what = ('no label given (decision out_of_distribution)' if abstained
          else 'their answers are not reliable')
  print(f'{PROG}: warning: {len(flagged)} of {len(predictions)} images are unlike the training '
        f'data (shift_score > {threshold:.4g}), {what}: '
        + ', '.join(r.path for r in flagged), file=sys.stderr, flush=True)


def write_grad_cams(predictor: predict.Predictor, results: Sequence[predict.Prediction],
                    out_dir: str) -> list[str]:
  """One overlay PNG per readable file: <out_dir>/<index>_<file name>.png."""
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
  predictions = predictor.predict_files(paths, workers=_WORKERS.value)
  sys.stdout.write(format_results(predictions, _FORMAT.value, _MODEL.value))
  sys.stdout.flush()
  warn_out_of_distribution(predictions, predictor.shift_threshold,
                           predictor.on_shift == 'abstain')
  if _GRAD_CAM_DIR.value:
    write_grad_cams(predictor, predictions, _GRAD_CAM_DIR.value)
  failure = results.failure_message(predictions)
  if failure:
    common.print_error(PROG, failure)
    return common.EXIT_FAILURE
  return 0


def run():
  common.run_main(main, prog=PROG)


if __name__ == '__main__':
  run()
