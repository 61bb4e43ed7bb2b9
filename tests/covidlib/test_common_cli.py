"""What every binary shares (covidlib/cli/common.py, quiet_start.py): --help, quiet start-up.

    .venv/bin/python -m pytest tests/covidlib/test_common_cli.py -q

--help runs in-process for each console script of pyproject.toml and is checked against the
flags its module's source defines (read with `ast`). The real processes' stderr: see
tests/reliability/test_usage_errors.py::test_stderr_holds_only_our_line.
"""

import ast
import importlib
import os
import re
import sys
import tomllib

import pytest
from absl import flags

from covidlib.cli import common
from covidlib.cli import quiet_start

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
with open(os.path.join(REPO, 'pyproject.toml'), 'rb') as _f:
  SCRIPTS = tomllib.load(_f)['project']['scripts']  # prog -> 'module:function'
ARGPARSE = {'covidlib-predict-edge'}  # TensorFlow-free, so argparse, not absl.


def defined_in_source(path: str) -> set[str]:
  """Flag names the module's source defines: flags.DEFINE_x('name', ...),
  flag_util.define(flags.DEFINE_x, 'name', ...) / _DEFINE(...), parser.add_argument('--name')."""
  names = set()
  for node in ast.walk(ast.parse(open(path, encoding='utf-8').read())):
    if not isinstance(node, ast.Call):
      continue
    func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(
        node.func, 'id', '')
    strings = [a.value for a in node.args if isinstance(a, ast.Constant)
               and isinstance(a.value, str)]
    if not strings:
      continue
    if func.startswith('DEFINE_') or func in ('define', '_DEFINE'):
      names.add(strings[0])
    elif func == 'add_argument' and strings[0].startswith('--'):
      names.add(strings[0][2:])
  return names


@pytest.fixture
def absl_help_flags():
  """Puts absl's help flags back after a test replaced them with a binary's."""
  names = [n for n in ('help', 'helpshort', 'helpfull', '?') if n in flags.FLAGS]
  saved = {n: flags.FLAGS[n] for n in names}
  yield
  for name, flag in saved.items():
    flags.FLAGS[name] = flag


def _flat(text: str) -> str:
  return ''.join(text.split())  # absl wraps help at 80 columns, inside words too.


@pytest.mark.parametrize('prog', sorted(SCRIPTS))
def test_help_lists_the_binarys_own_flags_and_exits_0(prog, capsys, absl_help_flags):
  module = importlib.import_module(SCRIPTS[prog].split(':')[0])
  expected = defined_in_source(module.__file__)
  assert len(expected) >= 2, expected  # The reference read something (ensemble has two).
  with pytest.raises(SystemExit) as exited:
    if prog in ARGPARSE:
      module.call_main([prog, '--help'])
    else:
      common.define_help_flags(module)
      flags.FLAGS([prog, '--help'])
  assert exited.value.code in (0, None)
  out = capsys.readouterr().out
  if prog in ARGPARSE:
    listed = set(re.findall(r'^  --(\w+)', out, re.M))
    assert listed == expected and '--help' in out
    return
  assert out.startswith(module.__doc__.strip('\n').split('\n')[0])
  listed = set(re.findall(r'^  --(?:\[no\])?(\w+):', out, re.M))
  assert listed == expected  # Each of its own flags, and no absl or TensorFlow flag.
  for name in expected:
    flag = flags.FLAGS[name]
    assert _flat(flag.help) in _flat(out), name
    if flag.default_as_str:
      assert _flat(f'(default: {flag.default_as_str})') in _flat(out), name
  assert '--helpfull' in out


def test_helpfull_lists_absls_flags_too_and_exits_0(capsys, absl_help_flags):
  from covidlib.cli import fit_shift

  common.define_help_flags(fit_shift)
  with pytest.raises(SystemExit) as exited:
    flags.FLAGS(['covidlib-fit-shift', '--helpfull'])
  assert exited.value.code == 0
  out = capsys.readouterr().out
  for name in ('model_dir', 'policy', 'verbosity', 'logtostderr'):
    assert re.search(rf'^\s+(-\w,)?--(\[no\])?{name}:', out, re.M), name


@pytest.mark.parametrize('argv, verbosity', [
    (['prog'], None), (['prog', '--model_dir=x'], None), (['prog', '-v', '1'], 1),
    (['prog', '--verbosity=0'], 0), (['prog', '-v=-2'], -2), (['prog', '--v', '2'], 2),
    (['prog', '--verbose=2'], None), (['prog', '-v', 'tests/x.py'], None),
    (['prog', '--', '-v', '1'], None), (['prog', '-v'], None)])
def test_verbosity_is_read_from_argv_as_absl_would(argv, verbosity):
  assert quiet_start.verbosity_from_argv(argv) == verbosity
  if verbosity is not None:  # absl's own parser agrees.
    values = flags.FlagValues()
    flags.DEFINE_integer('verbosity', -1, '', short_name='v', flag_values=values)
    values(argv)
    assert values.verbosity == verbosity


def test_level_follows_verbosity():
  assert [quiet_start.level_for(v) for v in (None, 2, 0, -1, -2, -3, -9)] == [3, 0, 0, 1, 2, 3, 3]


# Lines TF 2.21 wrote at import on a machine without a GPU, before absl::InitializeLog.
STARTUP = [
    'WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n',
    'I0000 00:00:1796310036.013756    7010 cudart_stub.cc:31] Could not find cuda drivers on '
    'your machine, GPU will not be used.\n',
    'W0000 00:00:1796310036.1    7010 some_file.cc:12] a warning\n',
    'E0000 00:00:1796310041.701980    7010 cuda_platform.cc:52] failed call to cuInit: INTERNAL\n',
]
KEPT = 'DeprecationWarning: a Python warning during the import\n'


@pytest.mark.parametrize('level, kept', [(3, [KEPT]), (2, STARTUP[3:] + [KEPT]),
                                         (1, STARTUP[2:] + [KEPT]), (0, STARTUP + [KEPT])])
def test_import_keeps_only_lines_at_or_above_the_level(level, kept, tmp_path, monkeypatch,
                                                       capfd):
  """A real import whose module writes TF's start-up lines to file descriptor 2."""
  name = f'noisy_import_{level}'
  (tmp_path / f'{name}.py').write_text(
      f'import os\nos.write(2, {"".join(STARTUP + [KEPT]).encode()!r})\n')
  monkeypatch.syspath_prepend(str(tmp_path))
  monkeypatch.delitem(sys.modules, name, raising=False)
  quiet_start.import_quietly(name, level)
  assert name in sys.modules
  assert capfd.readouterr().err == ''.join(kept)


def test_a_failing_import_restores_stderr_and_raises(tmp_path, monkeypatch, capfd):
  (tmp_path / 'broken_import.py').write_text(
      f'import os\nos.write(2, {STARTUP[1].encode()!r} + b"before the error\\n")\n'
      'raise RuntimeError("broken")\n')
  monkeypatch.syspath_prepend(str(tmp_path))
  with pytest.raises(RuntimeError, match='broken'):
    quiet_start.import_quietly('broken_import', 3)
  os.write(2, b'after\n')
  assert capfd.readouterr().err == 'before the error\nafter\n'


class _Terminal:
  def __init__(self, tty):
    self.tty = tty

  def isatty(self):
    return self.tty


def test_fit_verbose_auto_is_bars_on_a_terminal_else_a_line_per_epoch(monkeypatch):
  monkeypatch.setattr(sys, 'stdout', _Terminal(True))
  assert common.fit_verbose('auto') == 1
  monkeypatch.setattr(sys, 'stdout', _Terminal(False))
  assert common.fit_verbose('auto') == 2
  assert [common.fit_verbose(v) for v in ('0', '1', '2', 0, 2)] == [0, 1, 2, 0, 2]
