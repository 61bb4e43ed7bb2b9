"""covidlib-predict-beam: covidlib-predict's CSV rows for an archive, on Apache Beam.

    covidlib-predict-beam --model=runs/compact_resnet --output=scores/run1 scans/ 'more/**/*.dcm'
    covidlib-predict-beam --model=exports/saved_model --output=scores/run1 --file_list=films.txt \
        [--beam_pipeline_options=runner=DirectRunner,direct_num_workers=2,\
direct_running_mode=multi_processing] [--shard_size=1000] [--on_shift=abstain]

(or `python -m covidlib.cli.predict_beam ...`; needs pip install 'covidlib[beam]'). Inputs are
files, folders (recursive, as covidlib-predict) and quoted glob patterns, after the flags, and/or
--file_list (one path a line). --model is a model.keras, a model_dir, a SavedModel folder or a
.tflite file, as for covidlib-predict. The files are scored with Beam's RunInference, by default
on the DirectRunner with one worker process per core; --beam_pipeline_options picks another
runner or a cluster (README, "At scale"). Writes OUTPUT-SSSSS-of-NNNNN.csv (covidlib-predict's
--format=csv rows, --shard_size input files a shard in input order, each shard with the header)
and OUTPUT-manifest.json; prints one summary line. See covidlib/beam_scoring.py.

A file that cannot be read gets a row with its error and no probability, never a failed
pipeline; the exit status is then 1 and stderr names the first few (all are in the CSV). Run
again with the same --output and inputs, it scores only the shards missing (an interrupted
run goes on); other inputs or another model into the same --output is a usage error. Exit
status: 0 every file scored, 1 some file could not be read (or a shard lost), 2 a usage error
(bad flag, missing input, apache-beam not installed). Research software, not a diagnostic
device.
"""

from __future__ import annotations

from absl import flags

from covidlib.cli import quiet_start  # noqa: F401  First: TensorFlow starts quietly (see there).
from covidlib import errors
from covidlib import predict
from covidlib.cli import common
from covidlib.cli import flag_util

PROG = 'covidlib-predict-beam'
SHARD_SIZE = 1000  # = beam_scoring.SHARD_SIZE (that module needs apache-beam to import).
_DEFINE = flag_util.define

_MODEL = _DEFINE(flags.DEFINE_string, 'model', None,
                 'A model.keras, model_dir, SavedModel folder or .tflite file.')
_OUTPUT = _DEFINE(flags.DEFINE_string, 'output', None,
                  'Output prefix: writes OUTPUT-SSSSS-of-NNNNN.csv and OUTPUT-manifest.json (a '
                  'local path or any filesystem Beam writes, e.g. gs://bucket/scores/run1).')
_FILE_LIST = _DEFINE(flags.DEFINE_string, 'file_list', None,
                     'A text file of image paths, one a line, scored before any given after the '
                     'flags.')
_SHARD_SIZE = _DEFINE(flags.DEFINE_integer, 'shard_size', SHARD_SIZE,
                      'Input files per output shard (the unit a re-run skips when complete).',
                      lower_bound=1)
_BATCH_SIZE = _DEFINE(flags.DEFINE_integer, 'batch_size', None,
                      'Largest batch handed to the model (default: 32 for Keras and SavedModel, '
                      '8 for .tflite).', lower_bound=1)
_BEAM_OPTIONS = _DEFINE(flags.DEFINE_string, 'beam_pipeline_options', None,
                        'Beam pipeline options, comma-separated as `tfds build` takes them '
                        '(default: runner=DirectRunner,direct_running_mode=multi_processing,'
                        'direct_num_workers=<cores>).')
_ON_SHIFT = _DEFINE(lambda name, default, help_text, **kwargs: flags.DEFINE_enum(
                        name, default, predict.ON_SHIFT, help_text, **kwargs),
                    'on_shift', 'warn',
                    'For images unlike the training data (shift score above its threshold): '
                    'warn (label them) or abstain (decision out_of_distribution, no label).')


def main(argv):
  if not _MODEL.value:
    raise errors.UsageError('flag --model is required')
  if not _OUTPUT.value:
    raise errors.UsageError('flag --output is required (an output prefix, e.g. scores/run1)')
  try:
    from covidlib import beam_scoring  # Optional: needs apache-beam (covidlib[beam]).
  except ImportError as e:
    if not (e.name or '').startswith('apache_beam'):
      raise
    raise errors.UsageError(f"{PROG} needs Apache Beam, which is not installed: pip install "
                            "'covidlib[beam]'") from None
  from covidlib import beam_options  # Needs apache-beam too (imported just above if present).
  paths = beam_scoring.expand(argv[1:], _FILE_LIST.value)
  summary = beam_scoring.score_files(
      _MODEL.value, paths, _OUTPUT.value, shard_size=_SHARD_SIZE.value,
      batch_size=_BATCH_SIZE.value, on_shift=_ON_SHIFT.value or 'warn',
      options=beam_options.parse(_BEAM_OPTIONS.value))
  print(f'{summary.files} files scored into {summary.shard_pattern} ({summary.shards} shards, '
        f'{summary.skipped_shards} already complete): {summary.rows} rows, {summary.errors} '
        f'error rows, {summary.out_of_distribution} out of distribution', flush=True)
  if summary.errors:
    more = f'; ... (the first {len(summary.failed)} shown)' if summary.errors > len(
        summary.failed) else ''
    common.print_error(PROG, f'{summary.errors} of {summary.files} files could not be read (the '
                             f'error column of their rows says why): '
                             + '; '.join(summary.failed) + more)
    return common.EXIT_FAILURE
  return 0


def run():
  common.run_main(main, prog=PROG)


if __name__ == '__main__':
  run()
