"""Issue 6's safe loading: no pickle anywhere, Keras safe_mode never off, no zip slip.

    .venv/bin/python -m pytest tests/reliability/test_safe_loading.py -q

The source scan reads the syntax tree of every .py file of covidlib/, covidlib_tfds/ and
exporters/ (so docstrings and comments that name pickle do not count), and is itself tested on
planted sources. Archive extraction (`covidlib.archive.extract_zip`) is tested with hostile
archives built here: every one is refused with DataError naming the member, before anything is
written.
"""

from __future__ import annotations

import ast
import contextlib
import os
import stat
import zipfile

import pytest

from covidlib import archive
from covidlib import errors

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGES = ('covidlib', 'covidlib_tfds', 'exporters')

# Modules whose loading runs code chosen by whoever wrote the file.
UNSAFE_MODULES = {'pickle', 'cPickle', '_pickle', 'dill', 'cloudpickle', 'joblib', 'shelve',
                  'marshal'}


def unsafe_uses(source: str) -> list[str]:
  """What in `source` could execute code from a data or model file, one string per finding."""
  found = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      found += [f'import {a.name}' for a in node.names
                if a.name.split('.')[0] in UNSAFE_MODULES]
    elif isinstance(node, ast.ImportFrom) and (node.module or '').split('.')[0] in UNSAFE_MODULES:
      found.append(f'from {node.module} import ...')
    elif isinstance(node, ast.Call):
      func = ast.unparse(node.func)
      keywords = {k.arg: k.value for k in node.keywords}
      if func.split('.')[-1] in ('load', 'loads') and func.split('.')[0] in UNSAFE_MODULES:
        found.append(f'{func}(...)')
      if 'allow_pickle' in keywords and not (
          isinstance(keywords['allow_pickle'], ast.Constant)
          and keywords['allow_pickle'].value is False):
        found.append(f'{func}(allow_pickle={ast.unparse(keywords["allow_pickle"])})')
      if 'safe_mode' in keywords and not (
          isinstance(keywords['safe_mode'], ast.Constant) and keywords['safe_mode'].value is True):
        found.append(f'{func}(safe_mode={ast.unparse(keywords["safe_mode"])})')
      if func.endswith('enable_unsafe_deserialization'):
        found.append(f'{func}()')
      if func.split('.')[-1] == 'load' and func.split('.')[0] in ('yaml', 'torch'):
        found.append(f'{func}(...)')
  return found


def _sources():
  for package in PACKAGES:
    for folder, _, names in os.walk(os.path.join(REPO, package)):
      for name in sorted(names):
        if name.endswith('.py'):
          yield os.path.join(folder, name)


def test_the_scanner_finds_planted_uses():
  planted = '\n'.join([
      'import pickle', 'import joblib as jl', 'from dill import loads', 'import numpy as np',
      'import keras', 'x = np.load("a.npy", allow_pickle=True)', 'y = pickle.loads(b"")',
      'm = keras.saving.load_model("m.keras", safe_mode=False)', 'flag = False',
      'n = keras.models.load_model("m.keras", safe_mode=flag)',
      'keras.config.enable_unsafe_deserialization()', 'import marshal'])
  assert sorted(unsafe_uses(planted)) == sorted([
      'import pickle', 'import joblib', 'from dill import ...',
      'np.load(allow_pickle=True)', 'pickle.loads(...)',
      'keras.saving.load_model(safe_mode=False)', 'keras.models.load_model(safe_mode=flag)',
      'keras.config.enable_unsafe_deserialization()', 'import marshal'])
  safe = ('"""Never pickle."""\nimport numpy as np\n# pickle.load is banned\n'
          'np.load("a.npy", allow_pickle=False)\nimport keras\n'
          'keras.saving.load_model("m.keras", safe_mode=True)\n')
  assert unsafe_uses(safe) == []


def test_no_pickle_and_no_unsafe_model_loading_in_the_sources():
  sources = list(_sources())
  assert len(sources) > 20  # The scan really sees the packages.
  findings = {os.path.relpath(path, REPO): unsafe_uses(open(path, encoding='utf-8').read())
              for path in sources}
  assert {path: found for path, found in findings.items() if found} == {}


def test_every_keras_load_in_the_sources_goes_through_model_dir_load_model():
  """One loader (covidlib.model_dir.load_model, safe_mode=True) for every .keras file."""
  callers = []
  for path in _sources():
    for node in ast.walk(ast.parse(open(path, encoding='utf-8').read())):
      if isinstance(node, ast.Call) and ast.unparse(node.func).endswith(
          ('saving.load_model', 'models.load_model')):
        callers.append((os.path.relpath(path, REPO), ast.unparse(node)))
  assert callers == [('covidlib/model_dir.py',
                      'keras.saving.load_model(path, compile=False, safe_mode=True)')]


# ---------------------------------------------------------------------------------------------
# covidlib.archive.extract_zip.

def _zip(path, members):
  """members: (name, bytes) or (ZipInfo, bytes)."""
  with zipfile.ZipFile(path, 'w') as z:
    for name, content in members:
      z.writestr(name, content)
  return path


def _symlink_info(name, target_mode=stat.S_IFLNK):
  info = zipfile.ZipInfo(name)
  info.create_system = 3  # Unix.
  info.external_attr = (target_mode | 0o777) << 16
  return info


def test_extracts_a_normal_archive(tmp_path):
  path = _zip(tmp_path / 'a.zip', [('root/', b''), ('root/Train/Covid/x.png', b'\x89PNG...'),
                                   ('root/readme.md', b'hello')])
  out = tmp_path / 'out'
  files = archive.extract_zip(path, out)
  assert files == [str(out / 'root/Train/Covid/x.png'), str(out / 'root/readme.md')]
  assert (out / 'root/Train/Covid/x.png').read_bytes() == b'\x89PNG...'
  assert (out / 'root/readme.md').read_bytes() == b'hello'
  assert sorted(os.listdir(out / 'root')) == ['Train', 'readme.md']  # No temporary files left.
  selected = archive.extract_zip(path, tmp_path / 'some', select=lambda n: '/Train/' in n)
  assert selected == [str(tmp_path / 'some/root/Train/Covid/x.png')]
  assert sorted(os.listdir(tmp_path / 'some/root')) == ['Train']


@pytest.mark.parametrize('member, reason', [
    ('../evil.txt', "'..' in the path would escape the target folder"),
    ('good/../../evil.txt', "'..' in the path would escape the target folder"),
    ('/tmp/evil.txt', 'absolute path'),
    ('C:/evil.txt', 'absolute path'),
    ('..\\evil.txt', 'backslash in the name'),
    ('link', 'symbolic link'),
    ('fifo', 'not a regular file or folder'),
    ('good.txt', 'a second member with the same name'),
])
def test_zip_slip_members_are_refused_before_anything_is_written(tmp_path, member, reason):
  content = b'owned'
  if member in ('link', 'fifo'):
    name = _symlink_info(member, stat.S_IFLNK if member == 'link' else stat.S_IFIFO)
    content = b'/etc/passwd'
  else:
    name = member
  path = tmp_path / 'evil.zip'
  with zipfile.ZipFile(path, 'w') as z:
    z.writestr('good.txt', b'fine')  # A good member first: it must not be written either.
    with pytest.warns(UserWarning) if member == 'good.txt' else contextlib.nullcontext():
      z.writestr(name, content)
  out = tmp_path / 'target' / 'inner'
  with pytest.raises(errors.DataError) as raised:
    archive.extract_zip(path, out)
  assert str(raised.value).startswith(f'{path}: refused to extract member {member!r}: {reason}')
  with pytest.raises(errors.DataError, match='refused'):  # Even when it is not selected.
    archive.extract_zip(path, out, select=lambda name: name == 'good.txt')
  assert not (tmp_path / 'target').exists()
  assert sorted(os.listdir(tmp_path)) == ['evil.zip']  # Nothing escaped either.


def test_a_symlink_already_in_the_target_cannot_redirect_a_member(tmp_path):
  outside = tmp_path / 'outside'
  outside.mkdir()
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'data').symlink_to(outside, target_is_directory=True)
  path = _zip(tmp_path / 'a.zip', [('data/x.txt', b'owned')])
  with pytest.raises(errors.DataError, match=r"member 'data/x.txt': resolves to .*outside"):
    archive.extract_zip(path, out)
  assert os.listdir(outside) == []


def test_size_limit_corrupt_and_missing_archives(tmp_path):
  path = _zip(tmp_path / 'big.zip', [('a.bin', b'\0' * 600), ('b.bin', b'\0' * 600)])
  with pytest.raises(errors.DataError, match="member 'b.bin': the archive declares more than "
                     'max_total_bytes=1000 bytes'):
    archive.extract_zip(path, tmp_path / 'out', max_total_bytes=1000)
  assert len(archive.extract_zip(path, tmp_path / 'out', max_total_bytes=1200)) == 2

  corrupt = bytearray(_zip(tmp_path / 'c.zip', [('x.txt', b'hello world' * 10)]).read_bytes())
  at = corrupt.index(b'hello world')
  corrupt[at:at + 5] = b'HELLO'  # Stored data no longer matches its CRC.
  (tmp_path / 'c.zip').write_bytes(bytes(corrupt))
  with pytest.raises(errors.DataError, match="member 'x.txt' is corrupt"):
    archive.extract_zip(tmp_path / 'c.zip', tmp_path / 'c')
  assert os.listdir(tmp_path / 'c') == []  # No partial file under any name.

  (tmp_path / 'notes.zip').write_text('not a zip')
  with pytest.raises(errors.DataError, match='notes.zip: not a readable zip archive'):
    archive.extract_zip(tmp_path / 'notes.zip', tmp_path / 'n')
  with pytest.raises(errors.DataError, match='gone.zip: no such archive'):
    archive.extract_zip(tmp_path / 'gone.zip', tmp_path / 'n')
