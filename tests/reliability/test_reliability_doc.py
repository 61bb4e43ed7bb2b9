"""RELIABILITY.md cannot drift from the tests: every test it names exists, every reliability test
and every case of the reliability tables is in it, and every case failing today says so.

    .venv/bin/python -m pytest tests/reliability/test_reliability_doc.py -q

Reads the test files' syntax trees (no import: test modules cannot import each other).
"""

import ast
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOC = os.path.join(REPO, 'RELIABILITY.md')
HERE = os.path.join(REPO, 'tests', 'reliability')
REFERENCE = re.compile(r'(tests/[\w/.-]+\.py)::(\w+)(?:\[([\w.-]+)\])?')


def _doc() -> str:
  with open(DOC, encoding='utf-8') as f:
    return f.read()


def _tree(path: str) -> ast.Module:
  with open(path, encoding='utf-8') as f:
    return ast.parse(f.read())


def _test_functions(path: str) -> set[str]:
  return {node.name for node in _tree(path).body
          if isinstance(node, ast.FunctionDef) and node.name.startswith('test_')}


def _dict_keys(node: ast.AST) -> list[str]:
  assert isinstance(node, ast.Dict), ast.dump(node)[:200]
  return [key.value for key in node.keys]


def _module_dict(path: str, name: str) -> list[str]:
  """Keys of the dict literal assigned to `name` at module level."""
  for node in _tree(path).body:
    if isinstance(node, ast.Assign) and [ast.unparse(t) for t in node.targets] == [name]:
      return _dict_keys(node.value)
  raise AssertionError(f'{path} has no {name} = {{...}}')


def _bad_input_cases() -> list[str]:
  """Keys of the dict `_cases()` returns in test_bad_input.py: the bad-input table."""
  for node in _tree(os.path.join(HERE, 'test_bad_input.py')).body:
    if isinstance(node, ast.FunctionDef) and node.name == '_cases':
      returned = node.body[-1]
      assert isinstance(returned, ast.Return)
      return _dict_keys(returned.value)
  raise AssertionError('test_bad_input.py has no _cases()')


def test_every_referenced_test_exists():
  references = REFERENCE.findall(_doc())
  assert len(references) > 60
  for path, test, param in references:
    full = os.path.join(REPO, path)
    assert os.path.isfile(full), f'RELIABILITY.md names {path}, which does not exist'
    assert test in _test_functions(full), f'RELIABILITY.md names {path}::{test}: no such test'
    if param:  # A parameter id must be a key of the file's case table.
      with open(full, encoding='utf-8') as f:
        assert f"'{param}'" in f.read(), f'{path}::{test}[{param}]: no such case'


def test_every_reliability_test_and_case_is_documented():
  doc = _doc()
  named = {(path, test) for path, test, _ in REFERENCE.findall(doc)}
  for name in sorted(os.listdir(HERE)):
    if name.startswith('test_') and name.endswith('.py'):
      for test in _test_functions(os.path.join(HERE, name)):
        assert (f'tests/reliability/{name}', test) in named, f'{name}::{test} not in RELIABILITY.md'
  usage = os.path.join(HERE, 'test_usage_errors.py')
  tables = _bad_input_cases() + _module_dict(usage, 'CASES')
  assert len(tables) == 13 + len(_module_dict(usage, 'CASES'))
  rows = {line.split('|')[1].strip().strip('`'): line for line in doc.splitlines()
          if line.startswith('| `')}
  for case in tables:
    assert case in rows, f'case {case!r} has no row in RELIABILITY.md'
  failing = set(_module_dict(usage, 'KNOWN_BUGS'))
  for case in _module_dict(usage, 'CASES'):
    assert ('**fails today**' in rows[case]) == (case in failing), case
