"""Compares two JSON reports (report.json, hold_out.json, crossval.json) field by field.

    python benchmarks/compare_reports.py OLD/report.json NEW/report.json [--ignore=model_dir]

Prints every path whose value differs (with both values and, for numbers, the absolute
difference), every key present on one side only, and a closing count; exits 0 when the two are
identical apart from the ignored keys, 1 otherwise. Used to check that a refactoring leaves
covidlib-evaluate's and covidlib-crossval's reports unchanged (BENCHMARKS.md, "Structure").
No TensorFlow: runs with any Python 3.
"""

import argparse
import json
import sys


def differences(old, new, path='', ignore=()):
  """[(path, old value, new value)] for every leaf that differs; '<missing>' for absent keys."""
  if isinstance(old, dict) and isinstance(new, dict):
    out = []
    for key in sorted(set(old) | set(new)):
      if key in ignore:
        continue
      here = f'{path}/{key}'
      if key not in old or key not in new:
        out.append((here, old.get(key, '<missing>'), new.get(key, '<missing>')))
      else:
        out += differences(old[key], new[key], here, ignore)
    return out
  if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
    out = []
    for i, (a, b) in enumerate(zip(old, new)):
      out += differences(a, b, f'{path}[{i}]', ignore)
    return out
  return [] if old == new else [(path or '/', old, new)]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('old')
  parser.add_argument('new')
  parser.add_argument('--ignore', default='', help='comma-separated keys to skip anywhere')
  args = parser.parse_args(argv)
  with open(args.old) as f:
    old = json.load(f)
  with open(args.new) as f:
    new = json.load(f)
  found = differences(old, new, ignore=tuple(k for k in args.ignore.split(',') if k))
  for path, a, b in found:
    delta = ''
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
      delta = f'  (|difference| {abs(a - b):.3g})'
    print(f'{path}: {json.dumps(a)[:80]} -> {json.dumps(b)[:80]}{delta}')
  print(f'{len(found)} differing field(s)')
  return 1 if found else 0


if __name__ == '__main__':
  sys.exit(main())
