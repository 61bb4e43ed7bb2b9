"""The labels CSV of a user's own X-rays: which file is positive (COVID-19, pneumonia...), which
normal, and what else.

    from covidlib_tfds import labels
    rows, bad, columns = labels.read_labels('exports/labels.csv')
    class_names, rows, bad_labels = labels.resolve_classes(rows, positive='pneumonia')
    unlisted = labels.unlisted_files('exports', {r.path for r in rows}, skip={'labels.csv'})

The CSV has a header row with the columns `path` and `label`, and optionally `patient_id`,
`site`, `view`, `age`, `sex`, `split` and `finding` (other columns are ignored, and named in the
log). `path` is relative to the CSV's folder, with '/' or '\\' separators; absolute paths and
paths leaving that folder ('..') are refused, so that no local path reaches the dataset.
`label` names the class, one of two: `covid` or `normal` (any case), or 1 (COVID-19) or 0
(normal), or two names of your own (e.g. `pneumonia` and `normal`), of which `resolve_classes`'s
`positive` says which is label 1. `split`, where given, is `train`, `validation` or `test`. `age`
is whole years.

Nothing is dropped silently: each row that cannot be used (no label, bad path, split or age, a
path listed twice; from `resolve_classes`, a label of neither class) becomes a `BadFile` naming
the file (or the CSV line, when the path is missing) and the reason. The values of `patient_id`
are never part of a message.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import os
import posixpath
from typing import Iterator

from absl import logging
from etils import epath

from covidlib import errors

REQUIRED = ('path', 'label')
OPTIONAL = ('patient_id', 'site', 'view', 'age', 'sex', 'split', 'finding')
SPLITS = ('train', 'validation', 'test')
LABELS = {'covid': 'covid', '1': 'covid', 'normal': 'normal', '0': 'normal'}
DEFAULT_CLASSES = ('normal', 'covid')  # index = label: [negative, positive].
# Files in the CSV's folder that count as images (and so are unlisted when the CSV lacks them);
# files with no suffix count when they hold a DICOM header (DICOM exports often have none).
IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.dcm', '.dicom', '.dic')
_MAX_SHOWN = 24  # Characters of a bad value quoted in a message.


@dataclasses.dataclass(frozen=True)
class Row:
  """One usable row of the labels CSV. `patient_id` is the raw id: keep it in memory only."""
  line: int
  path: str  # Relative to the CSV's folder, '/' separators.
  label: str  # As written in the CSV; after resolve_classes, one of the two class names.
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
  split = record.get('split', '').lower()
  if 'split' in record and split not in SPLITS:
    return None, BadFile(path, f'split {_quote(split)} is not one of {", ".join(SPLITS)} '
                               f'({name} line {line})')
  age = parse_age(record.get('age', ''))
  if age is None:
    return None, BadFile(path, f'age {_quote(record["age"])} is not a whole number of years '
                               f'({name} line {line})')
  return Row(line=line, path=path, label=label,
             patient_id=record.get('patient_id', ''), site=record.get('site', ''),
             view=record.get('view', '').upper(), age=age,
             sex=record.get('sex', '').upper()[:1], split=split,
             finding=record.get('finding', '')), None


def class_key(label: str) -> str:
  """How labels are compared: any case; 1 and 0 are covid and normal."""
  key = label.strip().lower()
  return LABELS.get(key, key)


def resolve_classes(rows: list[Row], positive: str | None = None, csv_name: str = 'labels.csv'
                    ) -> tuple[tuple[str, str], list[Row], list[BadFile]]:
  """The two class names, the rows of those classes (label = the class name), and the others.

  Without `positive`, the classes are normal and covid (label 1), as `covid`/`normal` or 1/0
  in any case; other labels beside them are bad rows. With `positive` (the label of class 1,
  any case; covid and 1 mean the default classes), the CSV's labels must be that one and one
  other, the negative class; a name keeps the spelling of its first row.

  Returns:
    ((negative, positive), rows, bad): rows with `label` set to its class name, and one BadFile
    per row whose label is neither.

  Raises:
    UsageError: the labels are not covid/normal and `positive` is not given, or `positive` is no
      row's label. DataError: more than two label names (each named, with its row count), or
      only one beside `positive`.
  """
  counts, spelling = {}, {}
  for r in rows:
    key = class_key(r.label)
    counts[key] = counts.get(key, 0) + 1
    spelling.setdefault(key, r.label.strip())
  listed = ', '.join(f'{_quote(spelling[k])} ({n} row{"s" * (n != 1)})'
                     for k, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
  positive_key = class_key(positive) if positive else None
  if positive_key in (None, 'covid'):
    if set(counts) <= {'covid', 'normal'} or {'covid', 'normal'} <= set(counts):
      classes = DEFAULT_CLASSES
      keys = {'normal': 'normal', 'covid': 'covid'}
      kept = [dataclasses.replace(r, label=keys[class_key(r.label)]) for r in rows
              if class_key(r.label) in keys]
      bad = [BadFile(r.path, f'label {_quote(r.label)} is not covid, normal, 1 or 0 '
                             f'({csv_name} line {r.line})')
             for r in rows if class_key(r.label) not in keys]
      return classes, kept, bad
    if positive_key is None:
      raise errors.UsageError(
          f'{csv_name} labels its rows {listed}, not covid and normal: say which label is the '
          'positive class (label 1) with --positive=NAME (positive=NAME)'
          + ('; labelled_xrays takes two classes' if len(counts) > 2 else ''))
  if positive_key not in counts:
    raise errors.UsageError(f'--positive={positive}: no row of {csv_name} has that label; its '
                            f'labels are {listed}')
  if len(counts) > 2:
    raise errors.DataError(
        f'{csv_name} has {len(counts)} label names, {listed}; labelled_xrays takes two (the '
        f'positive class {spelling[positive_key]!r} and one negative class): relabel or leave '
        'out the rows of the others')
  if len(counts) < 2:
    raise errors.DataError(f'{csv_name}: every row is labelled {spelling[positive_key]!r}; a '
                           'second (negative) class is needed')
  [negative_key] = set(counts) - {positive_key}
  names = {positive_key: spelling[positive_key], negative_key: spelling[negative_key]}
  kept = [dataclasses.replace(r, label=names[class_key(r.label)]) for r in rows]
  return (names[negative_key], names[positive_key]), kept, []


def _looks_like_image(path: str) -> bool:
  suffix = os.path.splitext(path)[1].lower()
  if suffix:
    return suffix in IMAGE_SUFFIXES
  try:
    with open(path, 'rb') as f:
      return f.read(132)[128:132] == b'DICM'
  except OSError:
    return False


def _walk(root: str, skip: set[str]) -> Iterator[tuple[str, str]]:
  """(relative path, full path) of each file under root, sorted; '.' names and `skip` passed."""
  for directory, subdirs, files in os.walk(root):
    subdirs[:] = sorted(d for d in subdirs if not d.startswith('.'))
    for file_name in sorted(files):
      if file_name.startswith('.'):
        continue
      full = os.path.join(directory, file_name)
      relative = os.path.relpath(full, root).replace(os.sep, '/')
      if relative not in skip:
        yield relative, full


def unlisted_files(root: epath.PathLike, listed: set[str], skip: set[str] = frozenset()
                   ) -> list[BadFile]:
  """Image files under `root` that the CSV does not list (so have no label), one BadFile each.

  Names starting with '.' are not looked at; `skip` holds relative paths to pass over (the CSV
  itself). Files that are not images (by suffix, or for files without one, a DICOM header) are
  counted in the log, not reported.
  """
  unlisted, others = [], 0
  for relative, full in _walk(os.fspath(root), set(skip)):
    if relative in listed:
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


def folder_fingerprint(root: epath.PathLike, skip: set[str] = frozenset()) -> tuple[str, int]:
  """(sha256 hex digest, number of files) of the relative path, size and mtime of each file.

  The same files as `unlisted_files` looks at ('.' names and `skip` passed over): any file
  added, removed, renamed, rewritten or touched changes the digest. Contents are not read.
  """
  digest, count = hashlib.sha256(), 0
  for relative, full in _walk(os.fspath(root), set(skip)):
    stat = os.stat(full)
    digest.update(f'{relative}\0{stat.st_size}\0{stat.st_mtime_ns}\n'.encode('utf-8'))
    count += 1
  return digest.hexdigest(), count
