"""Safe extraction of zip archives: no member may land outside the target folder.

    from covidlib import archive
    files = archive.extract_zip('shared/data/covid_xray_seed/Covid-19-Detection-<commit>.zip',
                                '/tmp/seed_images')   # -> ['/tmp/seed_images/Covid-19-...', ...]
    train = archive.extract_zip(zip_path, '/tmp/seed', select=lambda n: '/Train/' in n)

A zip member is a path chosen by whoever made the archive. `zipfile.ZipFile.extractall` strips
'..' and leading '/' silently, which hides a hostile or broken archive instead of reporting it, and
neither it nor `shutil.unpack_archive` looks at what already lies in the target (a symlink there
sends a member elsewhere). Here every member is checked before anything is written, and the
archive is refused as a whole, with `covidlib.errors.DataError` naming the member, for:

  - an absolute path ('/etc/passwd', 'C:/x', '\\\\server\\share\\x'),
  - a path that climbs out ('../x', 'a/../../x') or resolves outside the target through a
    symlink that already exists in it,
  - a symlink member (Unix mode S_IFLNK in the external attributes) or any other non-regular
    file type,
  - a name with a NUL byte or a backslash (a Windows separator: the same archive would extract
    elsewhere on Windows), two members with the same name,
  - more bytes in all than `max_total_bytes`, when given (a zip bomb; the sizes checked are the
    declared ones, and `zipfile` never inflates a member past its declared size).

Each file is written to a temporary name and renamed into place, so a file under its final name
is always complete.
"""

from __future__ import annotations

import os
import shutil
import stat
import zipfile
from typing import Callable

from covidlib import errors

_CHUNK = 1 << 20


def _refuse(path: str, member: str, reason: str) -> errors.DataError:
  return errors.DataError(f'{path}: refused to extract member {member!r}: {reason}')


def _unix_mode(info: zipfile.ZipInfo) -> int:
  """The Unix file type and permission bits of a member (0 if the archive recorded none)."""
  return (info.external_attr >> 16) & 0xFFFF if info.create_system == 3 else 0


def _check_member(path: str, info: zipfile.ZipInfo, real_target: str) -> str:
  """The absolute destination of one member, or DataError naming it."""
  name = info.filename
  if not name or '\0' in name:
    raise _refuse(path, name, 'empty name or NUL byte in the name')
  if '\\' in name:
    raise _refuse(path, name, 'backslash in the name (a Windows path separator)')
  if name.startswith('/') or (len(name) > 1 and name[0].isalpha() and name[1] == ':'):
    raise _refuse(path, name, 'absolute path')
  if '..' in name.split('/'):
    raise _refuse(path, name, "'..' in the path would escape the target folder")
  mode = _unix_mode(info)
  kind = stat.S_IFMT(mode)
  if stat.S_ISLNK(mode):
    raise _refuse(path, name, 'symbolic link')
  if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
    raise _refuse(path, name, f'not a regular file or folder (mode {oct(mode)})')
  destination = os.path.realpath(os.path.join(real_target, name))
  if os.path.commonpath([destination, real_target]) != real_target:
    raise _refuse(path, name, f'resolves to {destination}, outside {real_target}')
  return destination


def _write_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, destination: str) -> None:
  """Writes one member to a temporary name, then renames it into place."""
  partial = f'{destination}.partial-{os.getpid()}'
  try:
    with archive.open(info) as source, open(partial, 'wb') as sink:
      shutil.copyfileobj(source, sink, _CHUNK)
    os.replace(partial, destination)
  finally:
    if os.path.exists(partial):
      os.remove(partial)


def extract_zip(path: str | os.PathLike, target: str | os.PathLike, *,
                select: Callable[[str], bool] | None = None,
                max_total_bytes: int | None = None) -> list[str]:
  """Extracts the members of a zip archive under `target` after checking all of them.

  Args:
    path: the .zip file.
    target: the folder to extract into (created if missing; existing files are overwritten).
    select: extract only the members whose name it returns True for (e.g.
      `lambda name: '/CovidDataset/Train/' in name`); every member is still checked.
    max_total_bytes: refuse archives whose selected members declare more bytes than this in all.

  Returns:
    The paths of the extracted files (not folders), in archive order, each under `target`.

  Raises:
    DataError: naming the archive and the offending member (see the module docstring), or a
      file that is not a readable zip archive. Nothing is written when a member is refused.
  """
  path, target = os.fspath(path), os.fspath(target)
  try:
    archive = zipfile.ZipFile(path)
  except FileNotFoundError:
    raise errors.DataError(f'{path}: no such archive') from None
  except (zipfile.BadZipFile, OSError) as e:
    raise errors.DataError(f'{path}: not a readable zip archive ({e})') from None
  with archive:
    real_target = os.path.realpath(target)
    members, seen, total = [], set(), 0
    for info in archive.infolist():
      destination = _check_member(path, info, real_target)
      if info.filename.rstrip('/') in seen:
        raise _refuse(path, info.filename, 'a second member with the same name')
      seen.add(info.filename.rstrip('/'))
      if select is not None and not select(info.filename):
        continue
      total += info.file_size
      if max_total_bytes is not None and total > max_total_bytes:
        raise _refuse(path, info.filename,
                      f'the archive declares more than max_total_bytes={max_total_bytes} bytes')
      members.append((info, destination))

    os.makedirs(target, exist_ok=True)
    extracted = []
    for info, destination in members:
      try:
        if info.is_dir():
          os.makedirs(destination, exist_ok=True)
          continue
        os.makedirs(os.path.dirname(destination), exist_ok=True)
        _write_member(archive, info, destination)
      except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as e:
        raise errors.DataError(f'{path}: member {info.filename!r} is corrupt ({e})') from None
      except (NotADirectoryError, IsADirectoryError, FileExistsError) as e:
        raise _refuse(path, info.filename,
                      f'clashes with a file or folder ({e.strerror})') from None
      extracted.append(destination)
    return extracted
