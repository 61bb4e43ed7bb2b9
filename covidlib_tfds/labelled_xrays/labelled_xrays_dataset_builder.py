"""labelled_xrays: your own labelled chest X-rays (DICOM, PNG, JPEG) as a TFDS dataset.

One config per data set, named by you. Build it from a labels CSV (see covidlib_tfds/labels.py
for its columns; paths relative to the CSV's folder):

    export COVIDLIB_SALT='a long secret; keep it, later builds need it for the same pseudonyms'
    python -m covidlib_tfds.build --labels_csv=exports/labels.csv --name=site_2025 \
        --data_dir=tfds_data [--val_fraction=0.15 --test_fraction=0.15] [--frontal_only] \
        [--skip_bad] [--hash_filenames] [--unlisted=skip|fail] [--positive=pneumonia]

Then load it like any TFDS dataset, without the CSV (TFDS reads the built config from data_dir):

    import covidlib_tfds, tensorflow_datasets as tfds
    ds = tfds.load('labelled_xrays/site_2025', split='train', data_dir='tfds_data')
    # covidlib-train --dataset=labelled_xrays/site_2025 --data_dir=tfds_data --model_dir=...

The same build in Python: `tfds.builder('labelled_xrays/site_2025', data_dir=..., labels_csv=...,
salt=..., skip_bad=True).download_and_prepare()` (builder arguments below).

What the build does, streaming (one image in memory at a time, per worker thread):
1. Reads the CSV and finds its two classes (below); lists every image file under the CSV's
   folder that it does not list.
2. Reads and decodes every listed file once (DICOM through covidlib.dicom: modality LUT, VOI
   LUT / window, 12/16 bits, MONOCHROME1), keeping only a perceptual hash and a few header
   fields: PatientID where the CSV row has no patient_id, ViewPosition where it has no view,
   PatientAge / PatientSex where it has no age / sex. No other header element is read.
3. Splits by patient (site + patient id; without one, the file-name series, below) and
   near-duplicate image (covidlib_tfds.splitting,
   balance_groups=True: each split gets its share of the images, of each class's images and of
   the patients, within about one patient's images, whatever the patients' sizes), unless the
   CSV has a `split` column, which is then used as is.
4. Decodes each file again to write it: gray uint8 PNG, longest side capped at MAX_SIDE.

Classes: the CSV's `label` holds two names. covid and normal (or 1 and 0, any case) need nothing
more: label 1 is covid, and rows with another label are bad rows. Any other two names (e.g.
pneumonia and normal) need `positive` (--positive=pneumonia), the one that becomes label 1.
More than two names fail the build, each named with its row count. The names are recorded in
`info.metadata['class_names']`, [negative, positive] (index = label; the spelling of the first
row), read back by `covidlib.data.class_names`; the `label` feature's own names stay
normal/covid (one feature definition with covid_xray): the metadata says what 0 and 1 mean.

Example features: as covid_xray's (image, label, image/filename, patient_id, source, view, age)
plus finding and sex. `source` is the CSV's site ('' without one), so covidlib-evaluate's
per-source tables are per site and a site can be held out like any source. `patient_id` is a
salted hash (covidlib_tfds/privacy.py). `image/filename` is the CSV's relative path, or with
hash_filenames a hash of it. Ages above 89 are stored as 90 (HIPAA Safe Harbor), -1 unknown.

Image files in the CSV's folder that it does not list (a folder only partly labelled) are left
out: counted in one log line that names the first 5, and recorded in
`info.metadata['unlisted_files']` (the count) and `['unlisted_first']` (the first 10 names).
With unlisted='fail' (--unlisted=fail) they are bad files instead.
Bad input: files the CSV lists that are missing, unreadable or undecodable, and CSV rows with no
or a bad label, path, split or age. The build fails with one DataError line giving their count
and the first 20 (name: reason), and writes all of them, one a line, to bad_files.txt in a new
private temporary folder (mode 0700, not beside the dataset: the CSV's paths may name patients)
that the message names; unless skip_bad=True: then it goes on without them, logs each as a
warning, and lists them in `info.metadata['bad_files']` ('<name>: <reason>').
A file path that shows its patient's id or DICOM name fails the build (CSV line numbers named)
unless hash_filenames=True. Images with no patient id at all (neither in the CSV nor in a
DICOM header) are split by the series their path names (covidlib_tfds.splitting.series_key with
the folder kept: `scans/extubation-1.png` ... `scans/extubation-13.png` are series
`scans/extubation`, `<32 hex>-<4 hex>-<n>.jpg` uploads of one hash another; `x/scan-1.png` and
`y/scan-2.png` are two), each series as one group, as if it were one patient; a name without a
trailing counter is a series of its own. The rule reads names only: generic names with a counter
in one folder (`img_1.png`, `img_2.png`) become one group, whoever they show, so give patient
ids where you have them (then the rule is not used). They are counted in the log and in
`info.metadata['images_without_patient_id']`; the series of two or more images are listed in
`info.metadata['unknown_patient_series']` ({'series:<site>:<series>': [image/filename, ...]},
the series hashed with hash_filenames), which `covidlib_tfds.audit` checks. With a CSV split
column, series it puts on two sides are counted in `info.metadata['series_in_two_splits']`.
With frontal_only, views other than PA/AP are left out and listed in
`info.metadata['excluded_files']`; files of unknown view are kept (and counted in the log).

A build records what it was made from in `info.metadata['inputs']` (`input_fingerprint`: the
CSV's sha256, a digest of every file's path, size and mtime, a slow hash of the salt, the
arguments below). A config already built in data_dir is reused only when a new build from a
labels CSV has the same inputs; other inputs (an edited CSV, files added or touched, another
salt or argument) fail in one line naming what changed: build again with --overwrite
(download_mode=REUSE_CACHE_IF_EXISTS), or under a new name.

Builder arguments (build time only; none is stored in the dataset but in the fingerprint):
  labels_csv: the labels CSV.
  salt: the pseudonym salt (default: $COVIDLIB_SALT); required.
  skip_bad: build without the bad files instead of failing.
  unlisted: 'skip' (default) leaves out image files the CSV does not list; 'fail' counts them
    as bad files.
  positive: the label of class 1, needed unless the labels are covid/normal or 1/0.
  val_fraction, test_fraction: shares of the patient split (default 0.15 each; 0 leaves the
    split out). Ignored when the CSV has a split column.
  frontal_only: keep PA and AP views only.
  hash_filenames: store hashed file names instead of the CSV's paths.

On Apache Beam: a download config naming a beam_runner or beam_options (`python -m
covidlib_tfds.build ... --beam`, `tfds build ... --beam_pipeline_options=...`) runs both passes
over the files on Beam workers, and step 3 with the checks in the launching process, on the
same functions: the same dataset, example for example (beam_build.py). Without labels_csv, the
download config's manual_dir may hold it as labels.csv (`tfds build labelled_xrays/NAME
--imports=covidlib_tfds --manual_dir=FOLDER`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import io
import os
import re
import tempfile
import threading
from typing import Callable, Iterable, Iterator

from absl import logging
from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from covidlib import dicom
from covidlib import errors
from covidlib import preprocess
from covidlib_tfds import labels as labels_lib
from covidlib_tfds import perceptual_hash
from covidlib_tfds import privacy
from covidlib_tfds import splitting
from covidlib_tfds.covid_xray import covid_xray_dataset_builder

# As covid_xray: models use at most 512 x 512; a 1024 cap keeps the prepared dataset small.
MAX_SIDE = 1024
MAX_AGE = 90  # Ages above 89 are identifying (HIPAA Safe Harbor): stored as 90.
FRONTAL_VIEWS = ('PA', 'AP')  # First word of the view: 'AP SUPINE' is frontal.
DEFAULT_FRACTION = 0.15
_SPLIT_SEED = 2020
_WORKERS = min(4, os.cpu_count() or 1)
_DICOM_SUFFIXES = ('.dcm', '.dicom', '.dic')
_CONFIG_NAME = re.compile(r'^[A-Za-z0-9_][A-Za-z0-9_.-]*$')
UNLISTED = ('skip', 'fail')  # What to do with image files in the folder the CSV does not list.
_SHOWN = 20  # Bad files named in an error message (all of them go to a file).
_LOGGED = 5  # Unlisted files named in the log.
_RECORDED = 10  # Unlisted files named in info.metadata.


@dataclasses.dataclass
class LabelledXraysConfig(tfds.core.BuilderConfig):
  """A user's data set: how it is split and what is kept. Holds no path and no secret."""
  val_fraction: float = DEFAULT_FRACTION
  test_fraction: float = DEFAULT_FRACTION
  frontal_only: bool = False
  hash_filenames: bool = False


@dataclasses.dataclass(frozen=True)
class _Image:
  """One usable file after the first pass. `group_key` holds the raw id: memory only."""
  path: str  # Relative to the CSV's folder.
  filename: str  # What image/filename stores (the path, or its hash).
  label: int  # Index into the class names: 1 = the positive class.
  split: str
  patient_id: str  # The pseudonym.
  group_key: str  # 'patient' NUL site NUL raw patient id, '' if unknown; for splitting only.
  series: str  # Without a patient id: 'series:<site>:<folder/series>' (memory only), else ''.
  source: str
  view: str
  age: int
  sex: str
  finding: str
  hash: int
  reveals: bool  # The path shows the patient's id or name.


def features() -> tfds.features.FeaturesDict:
  """The labelled_xrays example layout: covid_xray's, plus finding and sex."""
  return tfds.features.FeaturesDict({**covid_xray_dataset_builder.feature_specs(),
                                     'sex': tfds.features.Text()})


class Builder(tfds.core.GeneratorBasedBuilder):
  """Your labelled X-rays, split by patient; one config per data set, named when built."""

  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {
      '1.0.0': 'Initial release.',
      '1.1.0': 'Images without a patient id (in neither the CSV nor a DICOM header) are split by '
               'file-name series (folder kept: scans/extubation-1.png ... -13.png as one group), '
               'not each as its own patient, so splits with such images change; '
               '`info.metadata["unknown_patient_series"]` and, with a CSV split, '
               '`["series_in_two_splits"]`.',
  }
  # Named by the user: labelled_xrays/<name>. One is listed, the shipped example's (set at the
  # end of this module): `tfds build` refuses every config name of a builder that lists none.
  BUILDER_CONFIGS = []

  def __init__(self, *, config: str | LabelledXraysConfig | None = None,
               labels_csv: epath.PathLike | None = None, salt: str | None = None,
               skip_bad: bool = False, val_fraction: float = DEFAULT_FRACTION,
               test_fraction: float = DEFAULT_FRACTION, frontal_only: bool = False,
               hash_filenames: bool = False, unlisted: str = 'skip',
               positive: str | None = None, **kwargs):
    if config is None:
      raise errors.UsageError('labelled_xrays needs a config name: labelled_xrays/<name>, the '
                              'name given when it was built')
    if isinstance(config, str):
      config = make_config(config, val_fraction=val_fraction, test_fraction=test_fraction,
                           frontal_only=frontal_only, hash_filenames=hash_filenames)
    for name, value in (('skip_bad', skip_bad), ('frontal_only', config.frontal_only),
                        ('hash_filenames', config.hash_filenames)):
      if not isinstance(value, bool):
        raise errors.UsageError(f'{name} must be True or False, got {value!r}')
    if unlisted not in UNLISTED:
      raise errors.UsageError(f'unlisted must be one of {", ".join(UNLISTED)}, got {unlisted!r}')
    if positive is not None and (not isinstance(positive, str) or not positive.strip()):
      raise errors.UsageError(f'positive must be a label of the CSV, got {positive!r}')
    self._labels_csv = epath.Path(labels_csv) if labels_csv else None
    self._beam = None  # A beam_build.BeamBuild while a build runs on Beam.
    self._salt = salt
    self._skip_bad = skip_bad
    self._unlisted = unlisted
    self._positive = positive
    super().__init__(config=config, **kwargs)
    # For pickling only (TFDS re-creates builders from it); never written anywhere.
    self._original_state.update(labels_csv=labels_csv, salt=salt, skip_bad=skip_bad,
                                unlisted=unlisted, positive=positive)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=features(),
        supervised_keys=('image', 'label'),
        metadata=tfds.core.MetadataDict(),
    )

  def download_and_prepare(self, *, download_dir=None, download_config=None, **kwargs) -> None:
    """TFDS's, but a build from a labels CSV reuses a built config only if its inputs match.

    Without labels_csv, the download config's manual_dir may hold it as labels.csv (`tfds build
    labelled_xrays/NAME --manual_dir=FOLDER`). A download config that names a beam_runner or
    beam_options runs the build's per-file work on Beam (beam_build.py).

    Raises:
      UsageError: the config is built in data_dir from other inputs (CSV, files, salt or
        arguments; see `input_fingerprint`), and the download mode does not overwrite it.
    """
    download_config = download_config or tfds.download.DownloadConfig()
    mode = tfds.download.GenerateMode(download_config.download_mode)
    if self._labels_csv is None and download_config.manual_dir:
      found = epath.Path(download_config.manual_dir) / 'labels.csv'
      self._labels_csv = found if found.is_file() else None
    if (self._labels_csv is not None and not mode.overwrite_dataset
        and mode != tfds.download.GenerateMode.UPDATE_DATASET_INFO and self.data_path.exists()):
      self._check_same_inputs()
    if download_config.beam_runner is None and download_config.beam_options is None:
      super().download_and_prepare(download_dir=download_dir, download_config=download_config,
                                   **kwargs)
      return
    from covidlib_tfds.labelled_xrays import beam_build  # Needs apache-beam (covidlib[beam]).
    self._beam = beam_build.BeamBuild(download_config.beam_runner, download_config.beam_options,
                                      self.builder_config.name)
    if download_config.beam_runner is None:  # TFDS's pipeline on the same kind of runner.
      download_config = dataclasses.replace(
          download_config, beam_runner=beam_build.runner(self._beam.options))
    try:
      super().download_and_prepare(download_dir=download_dir, download_config=download_config,
                                   **kwargs)
    except Exception as e:  # A covidlib error on a worker arrives as the runner's error text.
      error = beam_build.covidlib_error(e)
      if error is None:
        raise
      raise error from None
    finally:
      self._beam.close()
      self._beam = None

  def _arguments(self) -> dict:
    """The build arguments that shape the dataset, as recorded in its fingerprint."""
    config = self.builder_config
    return {'val_fraction': config.val_fraction, 'test_fraction': config.test_fraction,
            'frontal_only': config.frontal_only, 'hash_filenames': config.hash_filenames,
            'skip_bad': self._skip_bad, 'unlisted': self._unlisted,
            'positive': _positive_key(self._positive)}

  def _check_same_inputs(self) -> None:
    name = f'labelled_xrays/{self.builder_config.name}'
    csv_path = self._labels_csv
    if not csv_path.is_file():
      raise errors.UsageError(f'labels CSV {csv_path} does not exist or is not a file')
    current = input_fingerprint(csv_path, privacy.resolve_salt(self._salt), self._arguments())
    stored = self.info.metadata.get('inputs')
    if stored == current:
      return
    if not isinstance(stored, dict):
      what = 'it holds no record of its inputs (built by an older covidlib)'
    else:
      changed = [label for key, label in (
          ('labels_csv_sha256', 'the labels CSV'), ('files_sha256', 'the files in its folder'),
          ('salt_check', 'the salt')) if stored.get(key) != current[key]]
      old_args = stored.get('arguments', {})
      changed += [f'{k} {old_args.get(k)!r} -> {v!r}' for k, v in current['arguments'].items()
                  if old_args.get(k) != v]
      what = 'changed: ' + ', '.join(changed or ['its record'])
    raise errors.UsageError(
        f'{name} is already built in {self.data_dir_root} from other inputs ({what}); rebuild '
        'it with --overwrite (download_mode=REUSE_CACHE_IF_EXISTS), or build under a new --name')

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # Everything is local.
    config = self.builder_config
    if self._labels_csv is None:
      raise errors.UsageError(
          f'labelled_xrays/{config.name} is not built in {self.data_dir_root}; build it from '
          f'its labels CSV: python -m covidlib_tfds.build --labels_csv=FILE --name={config.name} '
          f'--data_dir={self.data_dir_root}')
    salt = privacy.resolve_salt(self._salt)
    csv_path = self._labels_csv
    root = csv_path.parent
    rows, bad, columns = labels_lib.read_labels(csv_path)
    fingerprint = input_fingerprint(csv_path, salt, self._arguments())
    mentioned = {r.path for r in rows} | {b.name for b in bad}
    class_names, rows, other_labels = labels_lib.resolve_classes(rows, self._positive,
                                                                 csv_path.name)
    bad += other_labels
    self.info.metadata['class_names'] = list(class_names)
    logging.info('%s: classes %s (label 0), %s (label 1)', csv_path.name, *class_names)
    unlisted = labels_lib.unlisted_files(root, mentioned, skip={csv_path.name})
    stored_unlisted = [_stored_name(u.name, salt, config.hash_filenames) for u in unlisted]
    if self._unlisted == 'fail':
      bad += unlisted
      stored_unlisted = []
    elif unlisted:
      logging.warning('%d image file(s) in the folder of %s are not listed in it (no label): '
                      'left out (unlisted=fail, --unlisted=fail, to fail on them); the first: %s',
                      len(unlisted), csv_path.name, ', '.join(stored_unlisted[:_LOGGED]))
    self.info.metadata['unlisted_files'] = len(stored_unlisted)
    self.info.metadata['unlisted_first'] = stored_unlisted[:_RECORDED]
    logging.info('%s: %d rows to read (%s)', csv_path.name, len(rows), ', '.join(columns))

    images = []
    if self._beam is None:
      progress = tfds.core.utils.tqdm(
          bounded_map(lambda row: _inspect(root, row, salt, config.hash_filenames, class_names),
                      rows),
          total=len(rows), desc='Reading and checking files', unit=' files', leave=False)
    else:  # The same _inspect, on the Beam workers (beam_build.py).
      progress = self._beam.inspect(rows, root, salt, config.hash_filenames, class_names)
    for result in progress:
      (bad if isinstance(result, labels_lib.BadFile) else images).append(result)

    line_of = {r.path: r.line for r in rows}
    revealing = sorted(line_of[i.path] for i in images if i.reveals)
    if revealing and not config.hash_filenames:
      raise errors.DataError(
          f'{len(revealing)} file path(s) show the patient\'s id or name, which image/filename '
          f'would store: {csv_path.name} line(s) {_first(revealing, _SHOWN)}. Rename the '
          'files, or store hashed file names: --hash_filenames (hash_filenames=True)')

    if bad and not self._skip_bad:
      listing = _write_bad_list(config.name, bad)
      shown = '; '.join(map(str, bad[:_SHOWN]))
      more = f'; ... (the first {_SHOWN} shown)' if len(bad) > _SHOWN else ''
      raise errors.DataError(
          f'{len(bad)} bad file(s) (of {len(images) + len(bad)} in {csv_path.name}'
          f'{" and its folder" if self._unlisted == "fail" else ""}): {shown}{more}. All of '
          f'them are listed in {listing}. Fix them, or build without them: --skip_bad '
          '(skip_bad=True); they are then listed in info.metadata["bad_files"]')
    for b in bad:
      logging.warning('Left out (skip_bad=True): %s', b)
    csv_line = f'{csv_path.name} line '  # A bad row without a path: named by its line.
    self.info.metadata['bad_files'] = [
        str(b) if b.name.startswith(csv_line) else
        str(dataclasses.replace(b, name=_stored_name(b.name, salt, config.hash_filenames)))
        for b in bad]

    excluded = []
    if config.frontal_only:
      excluded = [i for i in images if i.view and i.view.split()[0] not in FRONTAL_VIEWS]
      for i in excluded:
        logging.info('Left out (frontal_only): %s, view %s', i.path, i.view)
      unknown = sum(1 for i in images if not i.view)
      if unknown:
        logging.warning('frontal_only: %d file(s) of unknown view are kept', unknown)
      images = [i for i in images if not i.view or i.view.split()[0] in FRONTAL_VIEWS]
    self.info.metadata['excluded_files'] = [f'{i.filename}: view {i.view}' for i in excluded]

    if not images:
      raise errors.DataError(f'{csv_path.name}: no usable image is left to build from')
    anonymous = sum(1 for i in images if not i.group_key)
    self.info.metadata['images_without_patient_id'] = anonymous
    series = _unknown_patient_series(images, salt, config.hash_filenames)
    self.info.metadata['unknown_patient_series'] = series
    if anonymous:
      logging.warning('%d of %d images have no patient id (no patient_id in the CSV, no '
                      'PatientID in a DICOM header): %s; %d of them are in %d file-name series '
                      'of 2 or more (info.metadata["unknown_patient_series"])',
                      anonymous, len(images),
                      'each file-name series is split as one group' if splitting.GROUP_SERIES
                      else 'each is split on its own (splitting.GROUP_SERIES is off)',
                      sum(map(len, series.values())), len(series))
    if 'split' in columns:
      self.info.metadata['split_from'] = 'csv'
      _warn_patients_in_two_splits(images, self.info.metadata)
      names = [s for s in labels_lib.SPLITS if any(i.split == s for i in images)]
    else:
      self.info.metadata['split_from'] = 'by_patient'
      fractions = split_fractions(config.val_fraction, config.test_fraction)
      images = _split_by_patient(images, fractions)
      names = list(fractions)
    for name in names:
      counts = collections.Counter(class_names[i.label] for i in images if i.split == name)
      patients = len({_split_key(i) or i.path for i in images if i.split == name})
      logging.info('labelled_xrays/%s %s: %d images of %d patients (%s)', config.name, name,
                   sum(counts.values()), patients,
                   ', '.join(f'{k} {v}' for k, v in sorted(counts.items())))
    # Last: a build that failed above records nothing, and the inputs are those read at start.
    self.info.metadata['inputs'] = fingerprint
    if self._beam is not None:
      return {name: self._beam.examples(name, root, [i for i in images if i.split == name])
              for name in names}
    return {name: self._generate_examples(root, [i for i in images if i.split == name])
            for name in names}

  def _generate_examples(self, root: epath.Path, images: list[_Image]):
    def load(image):
      return image, read_image(root, image.path)[0]

    for image, pixels in bounded_map(load, images):
      yield image.filename, example(image, pixels)


def example(image: _Image, pixels: np.ndarray) -> dict:
  """The stored example of one image (the streaming and the Beam build share it)."""
  return {
      'image': pixels,
      'label': image.label,
      'image/filename': image.filename,
      'patient_id': image.patient_id,
      'source': image.source,
      'view': image.view,
      'age': image.age,
      'sex': image.sex,
      'finding': image.finding,
  }


def make_config(name: str, *, val_fraction: float = DEFAULT_FRACTION,
                test_fraction: float = DEFAULT_FRACTION, frontal_only: bool = False,
                hash_filenames: bool = False) -> LabelledXraysConfig:
  """The config of a user's data set named `name`.

  Raises:
    UsageError: a name TFDS cannot use as a folder, or fractions that leave no training data.
  """
  if not isinstance(name, str) or not _CONFIG_NAME.match(name):
    raise errors.UsageError(f'dataset name {name!r}: use letters, digits, _, . and - only '
                            '(it becomes a folder of data_dir)')
  split_fractions(val_fraction, test_fraction)
  kept = 'PA and AP views only' if frontal_only else 'every view'
  files = 'hashed file names' if hash_filenames else 'file names as in the labels CSV'
  config = LabelledXraysConfig(
      name=name, val_fraction=val_fraction, test_fraction=test_fraction,
      frontal_only=frontal_only, hash_filenames=hash_filenames,
      description=(f'Labelled chest X-rays "{name}" built from a labels CSV: split by patient '
                   f'and near-duplicate image (validation {val_fraction:g}, test '
                   f'{test_fraction:g}) unless the CSV gives the split; {kept}; {files}; '
                   'patient ids as salted hashes.'))
  # TFDS refuses a config named as a listed one unless it is that very object.
  listed = next((c for c in Builder.BUILDER_CONFIGS if c.name == name), None)
  if listed is None:
    return config
  if listed != config:
    raise errors.UsageError(f'dataset name {name!r} is the shipped example\'s (dummy_data/, '
                            'default options): choose another name')
  return listed



def split_fractions(val_fraction: float, test_fraction: float) -> dict[str, float]:
  """{'train': ..., 'validation': ..., 'test': ...}, splits of fraction 0 left out."""
  for name, value in (('val_fraction', val_fraction), ('test_fraction', test_fraction)):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
      raise errors.UsageError(f'{name} must be a number in [0, 1), got {value!r}')
  train = 1.0 - val_fraction - test_fraction
  if train <= 0:
    raise errors.UsageError(f'val_fraction ({val_fraction}) + test_fraction ({test_fraction}) '
                            'must be below 1, to leave images to train on')
  fractions = {'train': train, 'validation': val_fraction, 'test': test_fraction}
  return {k: float(v) for k, v in fractions.items() if v > 0}


def bounded_map(fn: Callable, items: Iterable, workers: int = _WORKERS) -> Iterator:
  """`map(fn, items)` in worker threads, in order, with at most 2 x workers results pending.

  The bound is what keeps memory flat: a plain Executor.map would run ahead and hold every
  decoded image the consumer (TFDS's writer) has not taken yet.
  """
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    pending = collections.deque()
    for item in items:
      pending.append(pool.submit(fn, item))
      if len(pending) >= 2 * workers:
        yield pending.popleft().result()
    while pending:
      yield pending.popleft().result()


def _positive_key(positive: str | None) -> str:
  """The positive class as recorded: '' for the default (covid), else its lowercase name."""
  key = labels_lib.class_key(positive) if positive else ''
  return '' if key == 'covid' else key


def _first(items: list, n: int) -> str:
  """'a, b, c' for the first n items, with '... (N more)' after them."""
  shown = ', '.join(map(str, items[:n]))
  return shown + (f', ... ({len(items) - n} more)' if len(items) > n else '')


def input_fingerprint(csv_path: epath.PathLike, salt: str, arguments: dict) -> dict:
  """What a build is made from, as recorded in `info.metadata['inputs']`; no name, no secret.

  {'labels_csv_sha256': sha256 of the CSV's bytes, 'files_sha256': sha256 of the relative path,
  size and mtime of every file in the CSV's folder (names starting with '.' and the CSV itself
  left out), 'files': how many, 'salt_check': a slow salted hash of the salt (PBKDF2, so that
  the record does not make guessing a weak salt any easier than the pseudonyms already do),
  'arguments': `arguments`}.
  """
  csv_path = epath.Path(csv_path)
  files, count = labels_lib.folder_fingerprint(csv_path.parent, skip={csv_path.name})
  salt_check = hashlib.pbkdf2_hmac('sha256', salt.encode('utf-8'),
                                   b'covidlib labelled_xrays salt check', 100_000)
  return {'labels_csv_sha256': hashlib.sha256(csv_path.read_bytes()).hexdigest(),
          'files_sha256': files, 'files': count,
          'salt_check': salt_check.hex()[:32], 'arguments': dict(arguments)}


def _write_bad_list(name: str, bad: list[labels_lib.BadFile]) -> str:
  """Writes every bad file, one a line, to a new private temporary folder; returns the path.

  Not beside the dataset: the names are the CSV's paths, which may name patients (the dataset
  stores hashed names with hash_filenames). Written to a temporary name and renamed: atomic.
  """
  folder = epath.Path(tempfile.mkdtemp(prefix=f'labelled_xrays-{name}-'))  # Mode 0700.
  partial = folder / 'bad_files.txt.partial'
  partial.write_text(''.join(f'{b}\n' for b in bad), encoding='utf-8')
  return os.fspath(partial.rename(folder / 'bad_files.txt'))


# ---------------------------------------------------------------------------------------------
# Reading one file.

_quiet_lock = threading.Lock()
_quiet_users = 0
_saved_mode = None


@contextlib.contextmanager
def _pydicom_quiet():
  """pydicom's reading validation off: its warnings quote element values (names, dates)."""
  global _quiet_users, _saved_mode
  from pydicom import config
  with _quiet_lock:
    if _quiet_users == 0:
      _saved_mode = config.settings.reading_validation_mode
      config.settings.reading_validation_mode = config.IGNORE
    _quiet_users += 1
  try:
    yield
  finally:
    with _quiet_lock:
      _quiet_users -= 1
      if _quiet_users == 0:
        config.settings.reading_validation_mode = _saved_mode


def _is_dicom(path: str, contents: bytes) -> bool:
  return contents[128:132] == b'DICM' or path.lower().endswith(_DICOM_SUFFIXES)


def _dicom_age(text: str) -> int:
  """Years from a DICOM Age String ('045Y'; months, weeks and days are 0 years); -1 unknown."""
  match = re.fullmatch(r'(\d{1,3})([DWMY])', text.strip().upper())
  if not match:
    return -1
  return int(match.group(1)) if match.group(2) == 'Y' else 0


def read_image(root: epath.Path, path: str) -> tuple[np.ndarray, dict]:
  """The stored image (gray uint8 (H, W, 1), longest side <= MAX_SIDE) and header fields.

  The header fields (DICOM only; {} for other files) are 'patient_id', 'names' (the parts of
  PatientName, to check paths against), 'view', 'age' and 'sex'. Nothing else is read.

  Raises:
    InvalidImageError: naming `path` (relative, never the local root) for a missing,
      unreadable or undecodable file.
  """
  try:
    contents = (root / path).read_bytes()
  except FileNotFoundError:
    raise errors.InvalidImageError(path, 'no such file (listed in the labels CSV)') from None
  except IsADirectoryError:
    raise errors.InvalidImageError(path, 'is a folder, not an image file') from None
  except OSError as e:
    raise errors.InvalidImageError(path, f'cannot read: {e.strerror}') from None
  header = {}
  if _is_dicom(path, contents):
    try:
      import pydicom
    except ImportError:
      raise errors.InvalidImageError(
          path, "reading DICOM needs pydicom: pip install 'covidlib[dicom]'") from None
    with _pydicom_quiet():
      try:
        ds = pydicom.dcmread(io.BytesIO(contents))
      except pydicom.errors.InvalidDicomError:
        raise errors.InvalidImageError(path, 'not a DICOM file (no DICM header)') from None
      except Exception as e:  # Truncated or malformed: pydicom raises many kinds.
        # The type only: pydicom's messages can quote element values.
        raise errors.InvalidImageError(
            path, f'not a readable DICOM file ({type(e).__name__})') from None
      try:
        image = dicom.to_uint8(ds, path)
        name = ds.get('PatientName')
        header = {
            'patient_id': str(ds.get('PatientID', '') or '').strip(),
            'names': [str(part) for part in (name.components if name else ()) if part],
            'view': str(ds.get('ViewPosition', '') or '').strip().upper(),
            'age': _dicom_age(str(ds.get('PatientAge', '') or '')),
            'sex': str(ds.get('PatientSex', '') or '').strip().upper()[:1],
        }
      except errors.InvalidImageError:
        raise
      except Exception as e:  # E.g. a required pixel-module element missing.
        raise errors.InvalidImageError(
            path, f'DICOM image cannot be displayed ({type(e).__name__})') from None
  else:
    image = preprocess.decode_bytes(contents, path)
  return preprocess.resize_longest_side(image, MAX_SIDE).numpy(), header


def _inspect(root: epath.Path, row: labels_lib.Row, salt: str, hash_filenames: bool,
             class_names: tuple[str, str]) -> _Image | labels_lib.BadFile:
  """First pass over one file: decode it, keep its hash and metadata, drop its pixels."""
  try:
    image, header = read_image(root, row.path)
  except errors.InvalidImageError as e:
    return labels_lib.BadFile(row.path, e.reason)
  patient = row.patient_id or header.get('patient_id', '')
  age = row.age if row.age >= 0 else header.get('age', -1)
  return _Image(
      path=row.path,
      filename=_stored_name(row.path, salt, hash_filenames),
      label=class_names.index(row.label),
      split=row.split,
      patient_id=privacy.pseudonym(salt, row.site, patient),
      # 'patient' first: no patient key can equal a series key, which starts with 'series:'.
      group_key=f'patient\0{row.site}\0{patient}' if patient else '',
      series='' if patient else splitting.series_group_key(
          row.site, splitting.series_key(row.path, keep_folder=True)),
      source=row.site,
      view=row.view or header.get('view', ''),
      age=min(age, MAX_AGE),
      sex=row.sex or header.get('sex', ''),
      finding=row.finding,
      hash=perceptual_hash.image_hash(image),
      reveals=privacy.reveals(row.path, [patient] + header.get('names', [])),
  )


def _stored_name(path: str, salt: str, hash_filenames: bool) -> str:
  return privacy.hashed_filename(salt, path) if hash_filenames else path


# ---------------------------------------------------------------------------------------------
# Splitting.

def _split_key(image: _Image) -> str:
  """What splits group by: the patient, else (splitting.GROUP_SERIES) the file-name series."""
  return image.group_key or (image.series if splitting.GROUP_SERIES else '')


def _unknown_patient_series(images: list[_Image], salt: str, hash_filenames: bool
                            ) -> dict[str, list[str]]:
  """{series key: stored file names} of each series of 2+ images without a patient id.

  With hash_filenames the series (a folder and a name stem, which may name someone) is hashed:
  'series:<site>:<16 hex digits>'. Recorded whether or not splits group by series.
  """
  members = collections.defaultdict(list)
  for i in images:
    if i.series:
      members[i.series].append(i)
  record = {}
  for key, group in members.items():
    if len(group) > 1:
      site = group[0].source
      if hash_filenames:
        key = splitting.series_group_key(
            site, privacy.hashed_series(salt, site, key[len(f'series:{site}:'):]))
      record[key] = sorted(i.filename for i in group)
  return dict(sorted(record.items()))


def _split_by_patient(images: list[_Image], fractions: dict[str, float]) -> list[_Image]:
  """Assigns whole patient (or series) / near-duplicate groups to splits (see splitting)."""
  groups = splitting.group_images([_split_key(i) for i in images], [i.hash for i in images])
  names = splitting.split_groups(groups, [i.label for i in images], fractions, seed=_SPLIT_SEED,
                                 balance_groups=True)
  empty = [name for name in fractions if name not in names]
  if empty:
    raise errors.DataError(
        f'{len(images)} images in {len(set(groups))} patient / near-duplicate groups are too few '
        f'to fill the {", ".join(fractions)} splits: {", ".join(empty)} would be empty (lower '
        'or zero --val_fraction / --test_fraction, or add images)')
  logging.info('%d images in %d patient / near-duplicate groups', len(images), len(set(groups)))
  return [dataclasses.replace(i, split=name) for i, name in zip(images, names)]


def _warn_patients_in_two_splits(images: list[_Image], metadata: dict) -> None:
  """The CSV's own split is kept, but patients (and series) it puts on two sides are counted."""
  splits = collections.defaultdict(set)
  for i in images:
    if i.group_key or i.series:
      splits[i.group_key or i.series].add(i.split)
  on_two_sides = [key for key, sides in splits.items() if len(sides) > 1]
  series = sum(1 for key in on_two_sides if key.startswith('series:'))
  metadata['patients_in_two_splits'] = len(on_two_sides) - series
  metadata['series_in_two_splits'] = series
  if on_two_sides:
    logging.warning('The CSV\'s split puts %d patient(s) and %d file-name series of images '
                    'without a patient id in more than one split (kept as given; python -m '
                    'covidlib_tfds.audit lists them)', len(on_two_sides) - series, series)


# The example built from dummy_data/ (`tfds build labelled_xrays --imports=covidlib_tfds
# --manual_dir=covidlib_tfds/labelled_xrays/dummy_data`): listed so that `tfds build` takes
# config names at all (labelled_xrays/NAME); every other name is the user's.
EXAMPLE_CONFIG = 'dummy'
Builder.BUILDER_CONFIGS = [make_config(EXAMPLE_CONFIG)]
