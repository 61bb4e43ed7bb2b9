"""Leakage audit of a built dataset: patients, file-name series and near-duplicates on two sides.

    python -m covidlib_tfds.audit --config=seed --data_dir=DIR            # exit 1: leakage
    python -m covidlib_tfds.audit --config=patient_split --data_dir=DIR   # exit 0: clean
    python -m covidlib_tfds.audit --config=adult --data_dir=DIR           # exit 0: clean
    python -m covidlib_tfds.audit --config=seed --data_dir=DIR --allow_leakage  # report, exit 0

Library use: `report = audit('covid_xray/seed', data_dir=DIR); print(report.format())`.

It reads every example of every split, and lists:
- every patient (same `source` and non-empty `patient_id`) found in more than one split;
- the images without a patient id, the file-name series they were grouped into (the builder's
  record `info.metadata['unknown_patient_series']`; for a build without it, `splitting.series_key`
  of the stored file names, the folder kept for labelled_xrays), and every series of them found
  in more than one split;
- every pair of images in different splits whose perceptual hashes are near-duplicates (the hash
  and threshold of `covidlib_tfds.perceptual_hash`, the ones the patient splitter uses);
- per split: examples, class balance and source mix (and, for other_findings, that label 0
  means "not COVID-19" there).
Exit status: 0 clean (or --allow_leakage), 1 leakage found (a patient, a series or a near-duplicate
pair on two sides) or a data error, 2 usage error (unknown config, config not built), each error
as one line on stderr.
"""

from __future__ import annotations

import collections
import dataclasses
import sys

from absl import app
from absl import flags
from absl import logging
from etils import epath
import tensorflow_datasets as tfds

import covidlib_tfds  # noqa: F401  (registers covid_xray)
from covidlib import errors
from covidlib_tfds import cli
from covidlib_tfds import perceptual_hash
from covidlib_tfds import splitting

_ALONE_SHOWN = 20  # Images without a patient id alone in their series, named in the report.


@dataclasses.dataclass(frozen=True)
class SplitSummary:
  examples: int
  labels: dict[str, int]  # Class name -> count.
  sources: dict[str, int]  # Source -> count.


@dataclasses.dataclass(frozen=True)
class SharedPatient:
  source: str
  patient_id: str
  files: dict[str, list[str]]  # Split -> file names of this patient there.


@dataclasses.dataclass(frozen=True)
class Series:
  """A file-name series of two or more images without a patient id, and where they went."""
  key: str  # 'series:<source>:<series>'.
  files: dict[str, list[str]]  # Split -> file names of the series there.


@dataclasses.dataclass(frozen=True)
class NearDuplicate:
  distance: int  # Differing hash bits, out of perceptual_hash.HASH_BITS.
  split_a: str
  file_a: str
  split_b: str
  file_b: str


@dataclasses.dataclass(frozen=True)
class AuditReport:
  dataset: str  # e.g. 'covid_xray/seed:1.0.0'.
  splits: dict[str, SplitSummary]
  shared_patients: list[SharedPatient]
  near_duplicates: list[NearDuplicate]
  max_bits: int
  note: str = ''  # What the labels mean where it is not the usual (other_findings).
  series: list[Series] = dataclasses.field(default_factory=list)  # Of 2+ images without an id.
  alone: dict[str, str] = dataclasses.field(default_factory=dict)  # Other such image -> split.

  @property
  def split_series(self) -> list[Series]:
    """The series of images without a patient id found in more than one split."""
    return [s for s in self.series if len(s.files) > 1]

  @property
  def leakage(self) -> bool:
    return bool(self.shared_patients or self.split_series or self.near_duplicates)

  def format(self) -> str:
    """The report as plain text, one fact per line."""
    label_names = sorted({n for s in self.splits.values() for n in s.labels})
    lines = [f'Leakage audit of {self.dataset}'] + ([f'Note: {self.note}'] if self.note else [])
    lines += ['',
             f'{"split":<12}{"examples":>9}' + ''.join(f'{n:>9}' for n in label_names)
             + '  sources']
    for name, split in self.splits.items():
      mix = ', '.join(f'{s} {c}' for s, c in sorted(split.sources.items()))
      lines.append(f'{name:<12}{split.examples:>9}'
                   + ''.join(f'{split.labels.get(n, 0):>9}' for n in label_names) + f'  {mix}')
    lines += ['', f'Patients in more than one split: {len(self.shared_patients)}']
    for p in self.shared_patients:
      where = '; '.join(f'{s}: {", ".join(f)}' for s, f in p.files.items())
      lines.append(f'  {p.source} patient {p.patient_id} -> {where}')
    without_id = len(self.alone) + sum(len(f) for s in self.series for f in s.files.values())
    lines += ['', f'Images without a patient id: {without_id} ({without_id - len(self.alone)} in '
                  f'{len(self.series)} file-name series of 2 or more, {len(self.alone)} alone)']
    for s in self.series:
      where = '; '.join(f'{split}: {", ".join(f)}' for split, f in s.files.items())
      lines.append(f'  {s.key} -> {where}')
    if self.alone:
      shown = ', '.join(f'{f} ({split})' for f, split in list(self.alone.items())[:_ALONE_SHOWN])
      more = f', ... ({len(self.alone) - _ALONE_SHOWN} more)' if len(self.alone) > _ALONE_SHOWN \
          else ''
      lines.append(f'  alone: {shown}{more}')
    lines += ['', f'Series in more than one split: {len(self.split_series)}']
    for s in self.split_series:
      where = '; '.join(f'{split}: {", ".join(f)}' for split, f in s.files.items())
      lines.append(f'  {s.key} -> {where}')
    lines += ['', f'Near-duplicate pairs across splits (<= {self.max_bits} of '
                  f'{perceptual_hash.HASH_BITS} hash bits apart): {len(self.near_duplicates)}']
    for d in self.near_duplicates:
      lines.append(f'  {d.distance:>3} bits  {d.split_a}: {d.file_a}  <->  '
                   f'{d.split_b}: {d.file_b}')
    lines += ['', 'Leakage: ' + (f'FOUND ({len(self.shared_patients)} patient(s), '
                                 f'{len(self.split_series)} series, '
                                 f'{len(self.near_duplicates)} near-duplicate pair(s))'
                                 if self.leakage else 'none found')]
    return '\n'.join(lines)


def load_builder(name: str, data_dir: epath.PathLike | None = None) -> tfds.core.DatasetBuilder:
  """The builder of a built dataset config, e.g. 'covid_xray/seed'.

  Raises:
    UsageError: naming the dataset, for an unknown dataset or config or one not built there.
  """
  # TFDS warns ("Variant folder ... has no dataset_info.json") while looking for a config that
  # is not built; the error below says it in one line, so the warning is silenced here.
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    builder = tfds.builder(cli.check_name(name), data_dir=data_dir)
    prepared = builder.is_prepared()
  finally:
    logging.set_verbosity(verbosity)
  if not prepared:
    config = builder.builder_config.name
    source = (f'--labels_csv=... --name={config}' if builder.name == 'labelled_xrays'
              else f'--config={config} --manual_dir=...')
    raise errors.UsageError(
        f'{name} is not built in {builder.data_dir_root}; build it first: '
        f'python -m covidlib_tfds.build {source} --data_dir={builder.data_dir_root}')
  return builder


def audit(builder_or_name: tfds.core.DatasetBuilder | str, data_dir: epath.PathLike | None = None,
          max_bits: int = perceptual_hash.NEAR_DUPLICATE_BITS) -> AuditReport:
  """Audits every split of a built dataset for cross-split patients, series and near-duplicates.

  Args:
    builder_or_name: a prepared builder, or a name such as 'covid_xray/seed'.
    data_dir: where the dataset was built (with a name only).
    max_bits: near-duplicate threshold in hash bits.

  Raises:
    UsageError: for an unknown or unbuilt dataset.
  """
  builder = (load_builder(builder_or_name, data_dir) if isinstance(builder_or_name, str)
             else builder_or_name)
  label_names = builder.info.features['label'].names
  summaries, files, hashes, patients = {}, [], [], collections.defaultdict(dict)
  without_id = []  # (split, file name, source) of each image without a patient id.
  for split in builder.info.splits:
    labels, source_mix = collections.Counter(), collections.Counter()
    for example in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)):
      name = example['image/filename'].decode()
      source = example['source'].decode()
      patient = example['patient_id'].decode()
      labels[label_names[example['label']]] += 1
      source_mix[source] += 1
      files.append((split, name))
      hashes.append(perceptual_hash.image_hash(example['image']))
      if patient:
        patients[(source, patient)].setdefault(split, []).append(name)
      else:
        without_id.append((split, name, source))
    summaries[split] = SplitSummary(examples=sum(labels.values()), labels=dict(labels),
                                    sources=dict(source_mix))
  shared = [SharedPatient(source, patient, {s: sorted(f) for s, f in by_split.items()})
            for (source, patient), by_split in sorted(patients.items()) if len(by_split) > 1]
  duplicates = sorted(
      (NearDuplicate(d, *files[i], *files[j])
       for i, j, d in perceptual_hash.near_duplicate_pairs(hashes, max_bits)
       if files[i][0] != files[j][0]),
      key=lambda d: (d.distance, d.file_a, d.file_b))
  series, alone = _series(without_id, builder)
  version = f'{builder.name}/{builder.builder_config.name}:{builder.version}'
  return AuditReport(dataset=version, splits=summaries, shared_patients=shared,
                     near_duplicates=duplicates, max_bits=max_bits,
                     note=builder.info.metadata.get('label_note', ''), series=series,
                     alone=alone)


def _series(without_id: list[tuple[str, str, str]], builder: tfds.core.DatasetBuilder
            ) -> tuple[list[Series], dict[str, str]]:
  """The series of 2+ images without a patient id, and the split of each image left alone.

  From the builder's record where it has one (it holds hashed series for hashed file names);
  for a build without it, from the stored file names by the builder's rule.
  """
  record = builder.info.metadata.get('unknown_patient_series')
  if isinstance(record, dict):
    series_of = {name: key for key, names in record.items() for name in names}
  else:  # Built before the series rule (covid_xray < 1.2.0, labelled_xrays < 1.1.0).
    keep_folder = builder.name == 'labelled_xrays'
    series_of = {name: splitting.series_group_key(source, splitting.series_key(name, keep_folder))
                 for _, name, source in without_id}
  members = collections.defaultdict(list)
  for split, name, _ in without_id:
    members[series_of.get(name) or f'\0{name}'].append((split, name))  # '\0': alone.
  series, alone = [], {}
  for key, found in sorted(members.items()):
    if len(found) == 1:
      alone[found[0][1]] = found[0][0]
      continue
    by_split = {}
    for split, name in found:
      by_split.setdefault(split, []).append(name)
    series.append(Series(key, {s: sorted(n) for s, n in by_split.items()}))
  return series, dict(sorted(alone.items()))


FLAGS = flags.FlagValues()  # This binary's own flags (see covidlib_tfds.cli).
_DATASET = flags.DEFINE_string('dataset', 'covid_xray', 'The TFDS dataset name.',
                               flag_values=FLAGS)
_CONFIG = flags.DEFINE_string('config', 'seed', 'The config to audit, e.g. seed, patient_split, '
                              'adult, adult_pediatric, other_findings.', flag_values=FLAGS)
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'Where the dataset was built '
                                '(default: TFDS_DATA_DIR or ~/tensorflow_datasets).',
                                flag_values=FLAGS)
_ALLOW_LEAKAGE = flags.DEFINE_bool('allow_leakage', False,
                                   'Exit 0 even when leakage is found (the report is the same).',
                                   flag_values=FLAGS)


_BINARY = 'covidlib_tfds.audit'


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    print(f'{_BINARY}: error: unexpected arguments: {" ".join(argv[1:])}', file=sys.stderr)
    return 2
  logging.set_verbosity(logging.WARNING)  # TFDS's INFO lines would bury the report.
  try:
    report = audit(f'{_DATASET.value}/{_CONFIG.value}', data_dir=_DATA_DIR.value)
  except errors.CovidlibError as e:
    print(f'{_BINARY}: error: {e}', file=sys.stderr)
    return 2 if isinstance(e, errors.UsageError) else 1
  print(report.format())
  return 1 if report.leakage and not _ALLOW_LEAKAGE.value else 0


def run() -> None:
  app.run(main, flags_parser=lambda argv: cli.parse_flags(argv, FLAGS, _BINARY, __doc__))


if __name__ == '__main__':
  run()
