"""Every Markdown table in the repository renders: a header, a delimiter row, equal columns.

    .venv/bin/python -m pytest tests/test_markdown_tables.py -q

GitHub-flavoured Markdown rules, as GitHub applies them: a table is a header row, then a
delimiter row (`|---|:--:|`) with the same number of cells, then body rows. A cell boundary is
any `|` not escaped as `\\|` (inside backticks too). A body row with more cells than the header
loses the excess, one with fewer is padded: both are mistakes here. A delimiter row whose line
above is not a header row (e.g. a table pasted into the middle of a sentence) renders as text.
Fenced code blocks are skipped. Reports the generators write (BENCHMARKS.md's tables come from
benchmarks/*.py) are checked as committed.
"""

import os
import re
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DELIMITER = re.compile(r'^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$')


def _markdown_files() -> list[str]:
  """The tracked .md files (git ls-files), or every .md outside build folders without git."""
  try:
    out = subprocess.run(['git', 'ls-files', '*.md'], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout.split()
    if out:
      return sorted(out)
  except (OSError, subprocess.CalledProcessError):
    pass
  found = []
  for folder, dirs, names in os.walk(REPO):
    dirs[:] = [d for d in dirs if not d.startswith('.') and d not in ('runs', 'tfds_data')]
    found += [os.path.relpath(os.path.join(folder, n), REPO) for n in names if n.endswith('.md')]
  return sorted(found)


def cells(line: str) -> list[str]:
  """The cells of a table row: split on unescaped pipes, outer pipes dropped."""
  parts = re.split(r'(?<!\\)\|', line.strip())
  if parts and parts[0].strip() == '':
    parts = parts[1:]
  if parts and parts[-1].strip() == '':
    parts = parts[:-1]
  return parts


def table_problems(text: str) -> list[str]:
  """'line N: what is wrong' for every table of a Markdown text."""
  problems = []
  lines = text.splitlines()
  fenced = False
  columns = None  # Inside a table: its number of columns.
  for i, line in enumerate(lines):
    if line.lstrip().startswith(('```', '~~~')):
      fenced = not fenced
      columns = None
      continue
    if fenced:
      continue
    if columns is not None:
      if '|' in line and line.strip():
        n = len(cells(line))
        if n != columns:
          problems.append(f'line {i + 1}: {n} cells in a table of {columns} columns')
        continue
      columns = None
    if DELIMITER.match(line) and '|' in line:
      header = lines[i - 1] if i else ''
      if not header.lstrip().startswith('|'):
        problems.append(f'line {i + 1}: a delimiter row whose header line does not start '
                        f'with "|" ({header[:60]!r}...): the table renders as text')
      elif len(cells(header)) != len(cells(line)):
        problems.append(f'line {i + 1}: delimiter has {len(cells(line))} cells, header '
                        f'{len(cells(header))}')
      columns = len(cells(line))
  return problems


def test_the_checker_finds_broken_tables():
  good = '| a | b |\n|---|---|\n| 1 | `x \\| y` |\n\ntext | not a table\n'
  assert table_problems(good) == []
  assert table_problems('| a | b |\n|---|---|\n| 1 | 2 | 3 |\n') == [
      'line 3: 3 cells in a table of 2 columns']
  pasted = 'its heat sits on the "POR| model | flags |\n|---|---|\n| x | y |\n'
  assert 'renders as text' in table_problems(pasted)[0]
  assert table_problems('```\n| a |\n|---|---|\n```\n') == []


@pytest.mark.parametrize('path', _markdown_files())
def test_tables_render(path):
  with open(os.path.join(REPO, path), encoding='utf-8') as f:
    problems = table_problems(f.read())
  assert not problems, f'{path}:\n  ' + '\n  '.join(problems)
