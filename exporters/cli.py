"""covidlib-export: a trained model_dir -> SavedModel, TFLite variants, parity report, model card.

    covidlib-export --model_dir=runs/seed_cnn --out=exports/seed_cnn \\
        [--formats=saved_model,tflite_fp32,tflite_dynamic,tflite_fp16,tflite_int8,tflite_uint8_image] \\
        [--int8_io] \\
        [--dataset=covid_xray/patient_split --data_dir=tfds_data] [--overwrite] \\
        [--allow_parity_miss]

(also `python -m exporters.cli ...`). The int8 calibration images come from --calibration_split
(train) and the parity report runs on --parity_split (validation) of --dataset, by default the
dataset the model was trained on (config.json); `--dataset=folder:ROOT` reads
ROOT/<split>/{covid,normal}/*. The output folder appears complete or not at all (see
exporters/export.py); errors print one line, exit 2 for usage errors and 1 for other failures.
A variant that misses a parity target (exporters/parity.py, TARGETS) is one of those failures:
the line names each miss (`tflite_int8: agreement 0.947 < 0.98`), nothing is written and the
exit status is 1; --allow_parity_miss writes the export anyway, says so in one warning line and
exits 0.
"""

import logging
import sys

from absl import flags

from covidlib.cli import quiet_start  # noqa: F401  First: TensorFlow starts quietly (see there).
from covidlib import errors
from covidlib.cli import common
from covidlib.cli import flag_util
from exporters import export
from exporters import parity

PROG = 'covidlib-export'

_DEFINE = flag_util.define  # Tolerates another binary's identical flag in one test process.

_MODEL_DIR = _DEFINE(flags.DEFINE_string, 'model_dir', None, 'A finished covidlib-train run.',
                     required=True)
# Not required=True: covidlib-evaluate and -crossval define an optional --out, and a required
# flag's validator would then refuse their default in a process that imported this binary too.
_OUT = _DEFINE(flags.DEFINE_string, 'out', None,
               'Output folder (required); must not exist unless --overwrite.')
_FORMATS = _DEFINE(flags.DEFINE_list, 'formats', list(export.FORMATS),
                   f'Comma-separated subset of {",".join(export.FORMATS)}.')
_INT8_IO = _DEFINE(flags.DEFINE_bool, 'int8_io', False,
                   'tflite_int8 with int8 input and output tensors (integer-only accelerators); '
                   'the caller quantizes with the input scale and zero point.')
_DATASET = _DEFINE(flags.DEFINE_string, 'dataset', None,
                   "TFDS 'name/config' or 'folder:ROOT' for calibration and parity; default: "
                   'the training dataset from config.json.')
_DATA_DIR = _DEFINE(flags.DEFINE_string, 'data_dir', None, 'TFDS data_dir; default: config.json.')
_CALIBRATION_SPLIT = _DEFINE(flags.DEFINE_string, 'calibration_split', 'train',
                             'Split the int8 representative images come from.')
_CALIBRATION_IMAGES = _DEFINE(flags.DEFINE_integer, 'calibration_images', 200,
                              'Representative images for int8 (a seeded random subset).')
_PARITY_SPLIT = _DEFINE(flags.DEFINE_string, 'parity_split', 'validation',
                        "Split for the parity report; '' to skip parity.")
_LATENCY_RUNS = _DEFINE(flags.DEFINE_integer, 'latency_runs', 30,
                        'Timed single-image runs per model and thread count.')
_EVAL_REPORT = _DEFINE(flags.DEFINE_string, 'eval_report', None,
                       "covidlib-evaluate's report.json for the model card; default: the newest "
                       'in model_dir or one folder below.')
_OVERWRITE = _DEFINE(flags.DEFINE_bool, 'overwrite', False,
                     'Replace an existing --out, atomically.')
_ALLOW_PARITY_MISS = _DEFINE(flags.DEFINE_bool, 'allow_parity_miss', False,
                             'Write the export even when a variant misses a parity target '
                             '(one warning line names each miss). Without it such an export '
                             'writes nothing and exits 1.')


def main(argv):
  common.reject_extra_args(argv)
  if not _OUT.value:
    raise errors.UsageError('flag --out is required')
  logging.getLogger('exporters').setLevel(logging.INFO)  # Our progress lines (the rest: WARNING).
  report = export.export_model_dir(
      _MODEL_DIR.value, _OUT.value, formats=_FORMATS.value, int8_io=_INT8_IO.value,
      dataset=_DATASET.value, data_dir=_DATA_DIR.value,
      calibration_split=_CALIBRATION_SPLIT.value, calibration_images=_CALIBRATION_IMAGES.value,
      parity_split=_PARITY_SPLIT.value or None, latency_runs=_LATENCY_RUNS.value,
      eval_report=_EVAL_REPORT.value, overwrite=_OVERWRITE.value,
      allow_parity_miss=_ALLOW_PARITY_MISS.value)
  print(f'exported to {_OUT.value}')
  if report is None:
    return
  missed = parity.missed_targets(report)
  if missed:  # Only with --allow_parity_miss: export_model_dir refuses it otherwise.
    print(f'{PROG}: warning: parity target missed, written anyway (--allow_parity_miss): '
          f'{"; ".join(missed)}; see {_OUT.value}/export_report.md', file=sys.stderr, flush=True)
    return
  verdict = {True: 'all parity targets met',
             None: 'some parity targets undefined'}[report['all_targets_met']]
  print(f'{verdict}: see {_OUT.value}/export_report.md')


def run():
  common.run_main(main, prog=PROG)


if __name__ == '__main__':
  run()
