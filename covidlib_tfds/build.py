"""Builds a covid_xray config, with one-line errors instead of tracebacks.

    python -m covidlib_tfds.build --config=adult --manual_dir=../shared/data --data_dir=DIR \
        --allow_missing
    python -m covidlib_tfds.build --config=other_findings --manual_dir=../shared/data \
        --data_dir=DIR --allow_missing
    python -m covidlib_tfds.build --config=seed --manual_dir=../shared/data --data_dir=DIR \
        --allow_missing

Configs: seed, patient_split, curated (the article's data), adult, adult_pediatric (adult
COVID-19 vs NIH adult normals, and also the Kaggle pediatric normals), other_findings (other
findings, evaluation only: label 0 means NOT COVID-19 there). One --manual_dir serves every config
but curated: the folder holding covid_xray_seed/, nih_adult_normals/ and ieee8023_more/ (seed and
patient_split also take the folder holding the archive's zip itself); whatever it lacks is
downloaded from GitHub at a pinned commit and verified.
The same as `tfds build covid_xray/<config>/allow_missing=True --imports=covidlib_tfds
--manual_dir=... --data_dir=...`, which needs apache-beam installed (the `tfds` command of
tensorflow-datasets 4.9.10 imports it at start-up); this one does not.
--allow_missing lets the build go on when images a manifest lists are absent (our offline copy of
the archive lacks one); they are logged by name, listed in `info.metadata['missing_files']`, and
printed here. Images a config leaves out on purpose (COVID-19 patients under 18 in the adult
configs; other findings linked to an adult COVID-19 image) are printed with the reason and listed
in `info.metadata['excluded']`.
A config already built in DATA_DIR is reused, not rebuilt (pass --overwrite to rebuild it).
Exit status: 0 built, 1 a data error (changed, missing, unexpected or undecodable image), 2 a
usage error (unknown config, bad flag).

Your own labelled X-rays (DICOM/PNG/JPEG and a labels CSV) become `labelled_xrays/NAME`:

    COVIDLIB_SALT=... python -m covidlib_tfds.build --labels_csv=exports/labels.csv \
        --name=site_2025 --data_dir=DIR [--val_fraction=0.15 --test_fraction=0.15] \
        [--frontal_only] [--skip_bad] [--hash_filenames] [--unlisted=skip|fail] \
        [--positive=pneumonia]

Image files in the CSV's folder that it does not list are left out, counted and the first few
named (--unlisted=fail: they are bad files instead). Bad files (missing, undecodable, unlabelled
rows) fail the build, counted, the first 20 named, all of them written to a file the message
names, unless --skip_bad. --positive names the label of class 1 when the CSV's two labels are
not covid and normal (e.g. pneumonia and normal). Building a NAME already built from other
inputs (CSV, files, salt, flags) fails: --overwrite, or a new --name. See
covidlib_tfds/labelled_xrays/labelled_xrays_dataset_builder.py.

The same build on Apache Beam (pip install 'covidlib[beam]'), for archives too big for one
process: --beam runs the per-file work (reading, decoding, hashing, encoding) on the DirectRunner
with one worker process per core; --beam_pipeline_options picks another runner or cluster, in
`tfds build`'s syntax (see README, "At scale", and labelled_xrays/beam_build.py):

    COVIDLIB_SALT=... python -m covidlib_tfds.build --labels_csv=exports/labels.csv \
        --name=site_2025 --data_dir=DIR --beam \
        [--beam_pipeline_options=runner=DirectRunner,direct_num_workers=2,\
direct_running_mode=multi_processing]

It writes the dataset a streaming build writes, example for example.
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app
from absl import flags
import tensorflow_datasets as tfds

import covidlib_tfds  # noqa: F401  (registers covid_xray)
from covidlib import errors
from covidlib_tfds import cli
from covidlib_tfds.labelled_xrays import labelled_xrays_dataset_builder as labelled_xrays

_BINARY = 'covidlib_tfds.build'

FLAGS = flags.FlagValues()  # This binary's own flags (see covidlib_tfds.cli).
_DATASET = flags.DEFINE_string('dataset', 'covid_xray', 'The TFDS dataset name.',
                               flag_values=FLAGS)
_CONFIG = flags.DEFINE_string('config', 'seed', 'The config to build: seed, patient_split, '
                              'curated, adult, adult_pediatric or other_findings.',
                              flag_values=FLAGS)
_MANUAL_DIR = flags.DEFINE_string('manual_dir', None, 'Folder holding covid_xray_seed/, '
                                  'nih_adult_normals/ and ieee8023_more/ (e.g. ../shared/data; '
                                  'what it lacks is downloaded), or the raw collections '
                                  '(curated).', flag_values=FLAGS)
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'Where to write the prepared dataset '
                                '(default: TFDS_DATA_DIR or ~/tensorflow_datasets).',
                                flag_values=FLAGS)
_ALLOW_MISSING = flags.DEFINE_bool('allow_missing', False, 'Build even if images the manifest '
                                   'lists are missing; they are reported and recorded.',
                                   flag_values=FLAGS)
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Rebuild even if already built.',
                               flag_values=FLAGS)
# labelled_xrays: your own data (then --dataset, --config, --manual_dir and --allow_missing are
# not used).
_LABELS_CSV = flags.DEFINE_string('labels_csv', None, 'Build labelled_xrays/NAME from this '
                                  'labels CSV (columns path,label[,patient_id,site,view,age,sex,'
                                  'split,finding]; paths relative to its folder).',
                                  flag_values=FLAGS)
_NAME = flags.DEFINE_string('name', None, 'With --labels_csv: the config name, as in '
                            'labelled_xrays/NAME.', flag_values=FLAGS)
_SALT = flags.DEFINE_string('salt', None, 'With --labels_csv: the secret salt of the patient id '
                            'hashes (default: $COVIDLIB_SALT, which stays out of the process '
                            'list). Stored nowhere.', flag_values=FLAGS)
_VAL_FRACTION = flags.DEFINE_float('val_fraction', labelled_xrays.DEFAULT_FRACTION,
                                   'With --labels_csv: validation share of the patient split.',
                                   flag_values=FLAGS)
_TEST_FRACTION = flags.DEFINE_float('test_fraction', labelled_xrays.DEFAULT_FRACTION,
                                    'With --labels_csv: test share of the patient split (0: no '
                                    'test split).', flag_values=FLAGS)
_FRONTAL_ONLY = flags.DEFINE_bool('frontal_only', False, 'With --labels_csv: keep PA and AP '
                                  'views only (others are listed).', flag_values=FLAGS)
_SKIP_BAD = flags.DEFINE_bool('skip_bad', False, 'With --labels_csv: build without bad files '
                              '(each listed, and recorded in info.metadata) instead of failing.',
                              flag_values=FLAGS)
_HASH_FILENAMES = flags.DEFINE_bool('hash_filenames', False, 'With --labels_csv: store hashed '
                                    'file names, not the CSV\'s paths.', flag_values=FLAGS)
_UNLISTED = flags.DEFINE_enum('unlisted', 'skip', list(labelled_xrays.UNLISTED),
                              'With --labels_csv: image files in the CSV\'s folder that it does '
                              'not list are left out and counted (skip), or are bad files (fail).',
                              flag_values=FLAGS)
_POSITIVE = flags.DEFINE_string('positive', None, 'With --labels_csv: the label of the positive '
                                'class (label 1), e.g. pneumonia; needed unless the labels are '
                                'covid/normal or 1/0.', flag_values=FLAGS)
_BEAM = flags.DEFINE_bool('beam', False, 'With --labels_csv: build on Apache Beam (pip install '
                          '\'covidlib[beam]\'), by default on the DirectRunner with one worker '
                          'process per core.', flag_values=FLAGS)
_BEAM_OPTIONS = flags.DEFINE_string(
    'beam_pipeline_options', None, 'With --labels_csv: build on Apache Beam with these pipeline '
    'options, comma-separated as `tfds build` takes them, e.g. runner=FlinkRunner,'
    'flink_master=HOST:8081,environment_type=LOOPBACK (implies --beam).', flag_values=FLAGS)


def build(name: str, *, manual_dir: str | None, data_dir: str | None, allow_missing: bool,
          overwrite: bool = False) -> tfds.core.DatasetBuilder:
  """Prepares dataset `name` (e.g. 'covid_xray/seed') and returns its builder."""
  if manual_dir is not None and not os.path.isdir(manual_dir):
    # Checked here: TFDS would quietly fall back to downloading the archive.
    raise errors.UsageError(f'--manual_dir {manual_dir} does not exist or is not a folder')
  builder = tfds.builder(cli.check_name(name), data_dir=data_dir,
                         allow_missing=allow_missing)
  mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if overwrite
          else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=manual_dir, download_mode=mode))
  return builder


def beam_options(text: str | None):
  """Beam PipelineOptions from --beam_pipeline_options' text (None: the embedded default).

  Raises:
    UsageError: apache-beam is not installed, or the text is not name=value,...
  """
  try:
    from covidlib import beam_options as options_lib  # Imports apache_beam: only Beam needs it.
  except ImportError as e:
    if not (e.name or '').startswith('apache_beam'):
      raise
    raise errors.UsageError("--beam needs Apache Beam, which is not installed: pip install "
                            "'covidlib[beam]'") from None
  # Beam logs a line per type hint and per stage at INFO: the build's own lines drown in them.
  logging.getLogger('apache_beam').setLevel(logging.WARNING)
  return options_lib.parse(text)


def build_labelled(labels_csv: str, name: str, *, data_dir: str | None, salt: str | None,
                   val_fraction: float = labelled_xrays.DEFAULT_FRACTION,
                   test_fraction: float = labelled_xrays.DEFAULT_FRACTION,
                   frontal_only: bool = False, skip_bad: bool = False,
                   hash_filenames: bool = False, unlisted: str = 'skip',
                   positive: str | None = None, overwrite: bool = False,
                   beam_options=None) -> tfds.core.DatasetBuilder:
  """Prepares labelled_xrays/`name` from a labels CSV and returns its builder.

  beam_options: None builds streaming, in this process; Beam PipelineOptions (`beam_options()`)
  build on that Beam runner.
  """
  if not name:
    raise errors.UsageError('--labels_csv needs --name (the dataset becomes labelled_xrays/NAME)')
  config = labelled_xrays.make_config(name, val_fraction=val_fraction,
                                      test_fraction=test_fraction, frontal_only=frontal_only,
                                      hash_filenames=hash_filenames)
  builder = labelled_xrays.Builder(config=config, data_dir=data_dir, labels_csv=labels_csv,
                                   salt=salt, skip_bad=skip_bad, unlisted=unlisted,
                                   positive=positive)
  mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if overwrite
          else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      download_mode=mode, beam_options=beam_options))
  return builder


def _main_labelled() -> int:
  try:
    options = None
    if _BEAM.value or _BEAM_OPTIONS.value:
      options = beam_options(_BEAM_OPTIONS.value)
    builder = build_labelled(
        _LABELS_CSV.value, _NAME.value, data_dir=_DATA_DIR.value, salt=_SALT.value,
        val_fraction=_VAL_FRACTION.value, test_fraction=_TEST_FRACTION.value,
        frontal_only=_FRONTAL_ONLY.value, skip_bad=_SKIP_BAD.value,
        hash_filenames=_HASH_FILENAMES.value, unlisted=_UNLISTED.value,
        positive=_POSITIVE.value, overwrite=_OVERWRITE.value, beam_options=options)
  except errors.CovidlibError as e:
    print(f'{_BINARY}: error: {" ".join(str(e).split())}', file=sys.stderr)
    return 2 if isinstance(e, errors.UsageError) else 1
  sizes = ', '.join(f'{s} {info.num_examples}' for s, info in builder.info.splits.items())
  print(f'labelled_xrays/{_NAME.value}:{builder.version} in {builder.data_dir}: {sizes}')
  metadata = builder.info.metadata
  negative, positive = metadata.get('class_names', ['normal', 'covid'])
  print(f'classes: {negative} (label 0), {positive} (label 1)')
  unlisted, first = metadata.get('unlisted_files', 0), metadata.get('unlisted_first', [])
  print(f'unlisted image files left out: {unlisted}' + ''.join(f'\n  {m}' for m in first)
        + (f'\n  ... ({unlisted - len(first)} more)' if unlisted > len(first) else ''))
  shown = [('bad_files', 'bad files left out (--skip_bad)')]
  if _FRONTAL_ONLY.value:
    shown.append(('excluded_files', 'views left out (--frontal_only)'))
  for key, what in shown:
    listed = builder.info.metadata.get(key, [])
    print(f'{what}: {len(listed)}' + ''.join(f'\n  {m}' for m in listed))
  return 0


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    print(f'{_BINARY}: error: unexpected arguments: {" ".join(argv[1:])}', file=sys.stderr)
    return 2
  # Each way of building has its own flags; one given to the other is a mistake, not ignored.
  labelled_only = ('name', 'salt', 'val_fraction', 'test_fraction', 'frontal_only', 'skip_bad',
                   'hash_filenames', 'unlisted', 'positive', 'beam', 'beam_pipeline_options')
  archive_only = ('dataset', 'config', 'manual_dir', 'allow_missing')
  given = [f for f in (archive_only if _LABELS_CSV.value else labelled_only) if FLAGS[f].present]
  if given:
    print(f'{_BINARY}: error: --{given[0]} '
          + ('does not go with --labels_csv' if _LABELS_CSV.value else 'needs --labels_csv'),
          file=sys.stderr)
    return 2
  if _LABELS_CSV.value:
    return _main_labelled()
  name = f'{_DATASET.value}/{_CONFIG.value}'
  try:
    builder = build(name, manual_dir=_MANUAL_DIR.value, data_dir=_DATA_DIR.value,
                    allow_missing=_ALLOW_MISSING.value, overwrite=_OVERWRITE.value)
  except errors.CovidlibError as e:
    print(f'{_BINARY}: error: {e}', file=sys.stderr)
    return 2 if isinstance(e, errors.UsageError) else 1
  sizes = ', '.join(f'{s} {info.num_examples}' for s, info in builder.info.splits.items())
  print(f'{name}:{builder.version} in {builder.data_dir}: {sizes}')
  missing = builder.info.metadata.get('missing_files', [])
  print(f'missing images (allowed): {len(missing)}' + ''.join(f'\n  {m}' for m in missing))
  excluded = builder.info.metadata.get('excluded', [])
  print(f'excluded images: {len(excluded)}' + ''.join(f'\n  {e}' for e in excluded))
  note = builder.info.metadata.get('label_note')
  if note:
    print(f'note: {note}')
  return 0


def run() -> None:
  app.run(main, flags_parser=lambda argv: cli.parse_flags(argv, FLAGS, _BINARY, __doc__))


if __name__ == '__main__':
  run()
