"""The labels CSV of a user's own X-rays: which file is COVID-19, which normal, and what else.

    from covidlib_tfds import labels
    rows, bad, columns = labels.read_labels('exports/labels.csv')
    bad += labels.unlisted_files('exports', rows, skip={'labels.csv'})

The CSV has a header row with the columns `path` and `label`, and optionally `patient_id`,
`site`, `view`, `age`, `sex`, `split` and `finding` (other columns are ignored, and named in the
log). `path` is relative to the CSV's folder, with '/' or '\\' separators; absolute paths and
paths leaving that folder ('..') are refused, so that no local path reaches the dataset.
`label` is `covid` or `normal` (any case), or 1 (COVID-19) or 0 (normal). `split`, where given,
is `train`, `validation` or `test`. `age` is whole years.

Nothing is dropped silently: each row that cannot be used (no or bad label, bad path, split or
age, a path listed twice) becomes a `BadFile` naming the file (or the CSV line, when the path is
missing) and the reason. The values of `patient_id` are never part of a message.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import posixpath

from absl import logging
from etils import epath

from covidlib import errors

REQUIRED = ('path', 'label')
OPTIONAL = ('patient_id', 'site', 'view', 'age', 'sex', 'split', 'finding')
SPLITS = ('train', 'validation', 'test')
LABELS = {'covid': 'covid', '1': 'covid', 'normal': 'normal', '0': 'normal'}
# Files in the CSV's folder that count as images (and must therefore be listed in the CSV);
# files with no suffix count when they hold a DICOM header (DICOM exports often have none).
IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.dcm', '.dicom', '.dic')
_MAX_SHOWN = 24  # Characters of a bad value quoted in a message.


@dataclasses.dataclass(frozen=True)
class Row:
  """One usable row of the labels CSV. `patient_id` is the raw id: keep it in memory only."""
  line: int
  path: str  # Relative to the CSV's folder, '/' separators.
  label: str  # 'covid' or 'normal'.
  patient_id: str = ''
  site: str = ''
  view: str = ''
  age: int = -1
  sex: str = ''
  split: str = ''
  finding: str = ''


@dataclasses.dataclass(frozen=True)
class BadFile:
  """A file (or CSV line) left out of the dataset, and why."""
  name: str  # Relative path as in the CSV, or 'labels.csv line N'.
  reason: str

  def __str__(self) -> str:
    return f'{self.name}: {self.reason}'


def _quote(value: str) -> str:
  return repr(value if len(value) <= _MAX_SHOWN else value[:_MAX_SHOWN] + '...')


def normalise_path(path: str) -> str | None:
  """'a\\b/./c.png' -> 'a/b/c.png'; None for an absolute path or one that leaves the folder."""
  path = path.strip().replace('\\', '/')
  if not path or path.startswith('/') or (len(path) > 1 and path[1] == ':'):
    return None
  normal = posixpath.normpath(path)
  if normal == '..' or normal.startswith('../') or normal == '.':
    return None
  return normal


def parse_age(text: str) -> int | None:
  """Whole years from '45', '45.0' or ''; None when it is not an age."""
  text = text.strip()
  if not text:
    return -1
  try:
    age = float(text)
  except ValueError:
    return None
  if not 0 <= age < 150 or age != age:
    return None
  return int(age)


def read_labels(csv_path: epath.PathLike) -> tuple[list[Row], list[BadFile], list[str]]:
  """Reads and checks the labels CSV.

  Returns:
    (rows, bad, columns): the usable rows in file order, one BadFile per unusable row, and the
    known columns the CSV has (REQUIRED + those of OPTIONAL present).

  Raises:
    UsageError: the CSV does not exist.
    DataError: naming the CSV, when it is not a CSV with a header holding `path` and `label`, or
      holds no row.
  """
  csv_path = epath.Path(csv_path)
  name = csv_path.name
  if not csv_path.is_file():
    raise errors.UsageError(f'labels CSV {csv_path} does not exist or is not a file')
  try:
    text = csv_path.read_bytes().decode('utf-8-sig')  # Excel writes a byte-order mark.
  except UnicodeDecodeError as e:
    raise errors.DataError(f'{name}: not UTF-8 text ({e.reason} at byte {e.start})') from None
  reader = csv.DictReader(text.splitlines())
  header = [h.strip().lower() for h in reader.fieldnames or []]
  absent = [c for c in REQUIRED if c not in header]
  if absent:
    raise errors.DataError(
        f'{name}: the header must have the columns path and label (and optionally '
        f'{", ".join(OPTIONAL)}); it lacks {", ".join(absent)}; header: {",".join(header)[:200]}')
  if len(set(header)) != len(header):
    raise errors.DataError(f'{name}: a column appears twice in the header')
  reader.fieldnames = header
  ignored = [h for h in header if h not in REQUIRED + OPTIONAL]
  if ignored:
    logging.info('%s: ignoring the columns %s', name, ', '.join(ignored))
  columns = [c for c in REQUIRED + OPTIONAL if c in header]
  rows, bad, first_line = [], [], {}
  try:
    for line, record in enumerate(reader, start=2):
      record = {k: (v or '').strip() for k, v in record.items() if k is not None}
      if not any(record.values()):
        continue  # A blank line.
      row, problem = _parse_row(line, record, name)
      if problem:
        bad.append(problem)
      elif row.path in first_line:
        bad.append(BadFile(row.path, f'listed twice in {name} (lines {first_line[row.path]} '
                                     f'and {line}); neither copy is used'))
      else:
        first_line[row.path] = line
        rows.append(row)
  except csv.Error as e:
    raise errors.DataError(f'{name} line {reader.line_num}: not valid CSV ({e})') from None
  # A path listed twice: drop its first copy too (which label is right?).
  twice = {b.name for b in bad if b.reason.startswith('listed twice')}
  rows = [r for r in rows if r.path not in twice]
  if not rows and not bad:
    raise errors.DataError(f'{name}: holds no rows below its header')
  return rows, bad, columns


def _parse_row(line: int, record: dict[str, str], name: str) -> tuple[Row | None, BadFile | None]:
  raw_path = record.get('path', '')
  if not raw_path:
    return None, BadFile(f'{name} line {line}', 'no path')
  path = normalise_path(raw_path)
  if path is None:
    return None, BadFile(f'{name} line {line}',
                         f'path {_quote(raw_path)} is absolute or leaves the CSV\'s folder; paths '
                         'must be relative to it')
  label = record.get('label', '')
  if not label:
    return None, BadFile(path, f'unlabelled (empty label, {name} line {line})')
  if label.lower() not in LABELS:
    return None, BadFile(path, f'label {_quote(label)} is not covid, normal, 1 or 0 '
                               f'({name} line {line})')
  split = record.get('split', '').lower()
  if 'split' in record and split not in SPLITS:
    return None, BadFile(path, f'split {_quote(split)} is not one of {", ".join(SPLITS)} '
                               f'({name} line {line})')
  age = parse_age(record.get('age', ''))
  if age is None:
    return None, BadFile(path, f'age {_quote(record["age"])} is not a whole number of years '
                               f'({name} line {line})')
  return Row(line=line, path=path, label=LABELS[label.lower()],
             patient_id=record.get('patient_id', ''), site=record.get('site', ''),
             view=record.get('view', '').upper(), age=age,
             sex=record.get('sex', '').upper()[:1], split=split,
             finding=record.get('finding', '')), None


def _looks_like_image(path: str) -> bool:
  suffix = os.path.splitext(path)[1].lower()
  if suffix:
    return suffix in IMAGE_SUFFIXES
  try:
    with open(path, 'rb') as f:
      return f.read(132)[128:132] == b'DICM'
  except OSError:
    return False


def unlisted_files(root: epath.PathLike, listed: set[str], skip: set[str] = frozenset()
                   ) -> list[BadFile]:
  """Image files under `root` that the CSV does not list (so have no label), one BadFile each.

  Names starting with '.' are not looked at; `skip` holds relative paths to pass over (the CSV
  itself). Files that are not images (by suffix, or for files without one, a DICOM header) are
  counted in the log, not reported.
  """
  root = os.fspath(root)
  unlisted, others = [], 0
  for directory, subdirs, files in os.walk(root):
    subdirs[:] = sorted(d for d in subdirs if not d.startswith('.'))
    for file_name in sorted(files):
      if file_name.startswith('.'):
        continue
      full = os.path.join(directory, file_name)
      relative = os.path.relpath(full, root).replace(os.sep, '/')
      if relative in listed or relative in skip:
        continue
      if _looks_like_image(full):
        unlisted.append(BadFile(relative, 'an image file in the folder that the labels CSV does '
                                          'not list (unlabelled)'))
      else:
        others += 1
  if others:
    logging.info('%d file(s) beside the labels CSV are not images and not listed; not used',
                 others)
  return unlisted
