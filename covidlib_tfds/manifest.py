"""The pinned image manifest: which images a source archive must hold, and their checksums.

    from covidlib_tfds import manifest
    entries = manifest.read_manifest('covidlib_tfds/covid_xray/manifest.tsv')
    missing = manifest.compare_listing(entries, archive_paths, archive='the.zip',
                                       allow_missing=False)
    manifest.verify_image(entries[path], contents)   # DataError naming the file if it differs

A manifest is a TSV with the columns `path split label bytes git_blob_sha1 sha256 present`, one
row per image, paths relative to the archive's root folder. Either checksum is enough: the
sha256 where the image was at hand when the manifest was made, otherwise the git blob id (the
SHA-1 git gives the file, `sha1(b'blob <size>\\0' + content)`), which the repository's tree
records for every file. `present` says whether the copy the manifest was made from held the
image; it is informational: the archive, not the manifest, decides what is there.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io

from absl import logging
from etils import epath

from covidlib import errors

_COLUMNS = ('path', 'split', 'label', 'bytes', 'git_blob_sha1', 'sha256', 'present')
_SHOWN = 10  # How many file names an error message lists before "... and N more".


@dataclasses.dataclass(frozen=True)
class Entry:
  """One image the manifest pins."""
  path: str
  split: str
  label: str
  size: int | None
  git_blob_sha1: str
  sha256: str


def _tsv_reader(path: epath.Path, columns) -> csv.DictReader:
  """A DictReader over a manifest TSV; DataError naming it if missing or lacking a column."""
  try:
    text = path.read_text()
  except FileNotFoundError:
    raise errors.DataError(f'{path}: manifest not found') from None
  reader = csv.DictReader(io.StringIO(text), delimiter='\t')
  absent = [c for c in columns if c not in (reader.fieldnames or ())]
  if absent:
    raise errors.DataError(f'{path}: manifest lacks column(s) {", ".join(absent)}')
  return reader


def read_manifest(path: epath.PathLike) -> dict[str, Entry]:
  """Reads a manifest TSV into {path: Entry}, in file order.

  Raises:
    DataError: naming the file, if it is missing, lacks a column, repeats a path or has a row
      without any checksum.
  """
  path = epath.Path(path)
  reader = _tsv_reader(path, _COLUMNS)
  entries = {}
  for line, row in enumerate(reader, start=2):
    if row['path'] in entries:
      raise errors.DataError(f'{path}:{line}: {row["path"]} is listed twice')
    if not row['sha256'] and not row['git_blob_sha1']:
      raise errors.DataError(f'{path}:{line}: {row["path"]} has no checksum')
    entries[row['path']] = Entry(
        path=row['path'], split=row['split'], label=row['label'],
        size=int(row['bytes']) if row['bytes'] else None,
        git_blob_sha1=row['git_blob_sha1'].lower(), sha256=row['sha256'].lower())
  if not entries:
    raise errors.DataError(f'{path}: manifest lists no images')
  return entries


def git_blob_sha1(contents: bytes) -> str:
  """The id git gives a file with these contents (`git hash-object`)."""
  return hashlib.sha1(b'blob %d\0' % len(contents) + contents).hexdigest()


def verify_image(entry: Entry, contents: bytes) -> None:
  """Checks `contents` against the manifest entry.

  Raises:
    DataError: naming the file, with the expected and actual checksum.
  """
  if entry.sha256:
    actual, expected, kind = hashlib.sha256(contents).hexdigest(), entry.sha256, 'sha256'
  else:
    actual, expected, kind = git_blob_sha1(contents), entry.git_blob_sha1, 'git blob id'
  if actual != expected:
    raise errors.DataError(
        f'{entry.path}: differs from the pinned manifest ({kind} {actual}, expected {expected}, '
        f'{len(contents)} bytes): the archive is not the pinned version or the file is corrupt')


def name_list(paths: list[str]) -> str:
  """'a, b, c' or 'a, b, ... and 7 more', for error messages."""
  shown = ', '.join(paths[:_SHOWN])
  return shown if len(paths) <= _SHOWN else f'{shown} ... and {len(paths) - _SHOWN} more'


def compare_listing(entries: dict[str, Entry], paths: list[str], *, archive: str,
                    allow_missing: bool) -> list[str]:
  """Compares the images an archive holds with the manifest.

  Args:
    entries: the manifest.
    paths: the image paths the archive holds, relative like the manifest's.
    archive: how to name the archive in messages (a file name, not a local path).
    allow_missing: whether images the manifest lists but the archive lacks are acceptable.

  Returns:
    The sorted paths the manifest lists but the archive lacks (logged as a warning).

  Raises:
    DataError: naming every unexpected image (in the archive, not in the manifest), or, unless
      `allow_missing`, every missing image with how to allow them.
  """
  present = set(paths)
  unexpected = sorted(present - set(entries))
  if unexpected:
    raise errors.DataError(
        f'{archive} holds {len(unexpected)} image(s) the manifest does not list: '
        f'{name_list(unexpected)}')
  missing = sorted(set(entries) - present)
  if missing and not allow_missing:
    raise errors.DataError(
        f'{archive} lacks {len(missing)} image(s) the manifest lists: {name_list(missing)}. '
        'To build without them, allow it explicitly: '
        '`tfds build covid_xray/<config>/allow_missing=True ...` or '
        '`python -m covidlib_tfds.build --allow_missing ...`')
  for path in missing:
    logging.warning('Missing image, allowed by allow_missing=True: %s', path)
  if missing:
    logging.warning('%d image(s) of the manifest are missing from %s; the build goes on without '
                    'them (recorded in info.metadata["missing_files"])', len(missing), archive)
  return missing


# The manifests of the prepared collections (`nih_adult_normals/`, `ieee8023_more/`): one row per
# prepared file, with where its original came from and both checksums.
_SOURCE_COLUMNS = ('file', 'label', 'finding', 'source', 'original_repo', 'commit',
                   'original_path', 'original_sha256', 'sha256', 'patient_id', 'age', 'sex',
                   'view', 'width', 'height', 'licence')


@dataclasses.dataclass(frozen=True)
class SourceEntry:
  """One prepared image of a collection and the original it was made from."""
  file: str  # Relative to the collection's folder, e.g. 'images/00001280_004.png'.
  label: str  # 'normal', 'covid' or 'other'.
  finding: str
  source: str  # 'nih' or 'ieee8023'.
  original_repo: str  # GitHub owner/name.
  commit: str
  original_path: str  # Inside the repository at `commit`.
  original_sha256: str
  sha256: str  # Of the prepared file.
  patient_id: str
  age: str  # As written; blank when unknown.
  sex: str
  view: str
  width: str  # Of the prepared image, in pixels.
  height: str


def read_source_manifest(path: epath.PathLike) -> dict[str, SourceEntry]:
  """Reads a prepared collection's manifest TSV into {file: SourceEntry}, in file order.

  Raises:
    DataError: naming the file, if it is missing, lacks a column, repeats a file or has a row
      without both checksums.
  """
  path = epath.Path(path)
  reader = _tsv_reader(path, _SOURCE_COLUMNS)
  fields = [f.name for f in dataclasses.fields(SourceEntry)]
  entries = {}
  for line, row in enumerate(reader, start=2):
    if row['file'] in entries:
      raise errors.DataError(f'{path}:{line}: {row["file"]} is listed twice')
    if not row['sha256'] or not row['original_sha256']:
      raise errors.DataError(f'{path}:{line}: {row["file"]} lacks sha256 or original_sha256')
    entries[row['file']] = SourceEntry(**{f: (row[f] or '').strip() for f in fields})
  if not entries:
    raise errors.DataError(f'{path}: manifest lists no images')
  return entries


def verify_sha256(name: str, contents: bytes, expected: str, pinned_by: str) -> None:
  """Checks `contents` against a pinned sha256.

  Args:
    name: the file, as messages should name it (relative, never a local path).
    contents: its bytes.
    expected: the pinned sha256 (hex).
    pinned_by: what pins it, for the message (e.g. 'ieee8023_more.tsv').

  Raises:
    DataError: naming the file, with the expected and actual checksum.
  """
  actual = hashlib.sha256(contents).hexdigest()
  if actual != expected.lower():
    raise errors.DataError(
        f'{name}: differs from {pinned_by} (sha256 {actual}, expected {expected}, '
        f'{len(contents)} bytes): not the pinned version or the file is corrupt')
