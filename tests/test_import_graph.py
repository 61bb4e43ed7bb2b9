"""The import graph of covidlib, read from the sources with `ast`: layers, no cycles.

    .venv/bin/python -m pytest tests/test_import_graph.py -q

Every module of covidlib sits on one layer of LAYERS and imports only modules of its own layer
or lower ones; no import cycle exists anywhere (function-level imports count too); covidlib
never imports exporters; the analyses on arrays import neither TensorFlow nor data code; and a
function-level import is allowed only for an optional dependency, with its reason in a comment
on the same line. The failure message prints the layers (BUILD.md, "Architecture", explains
them).
"""

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Bottom first. A module may import its own layer and the ones above it in this list.
LAYERS = [
    ('bottom: errors, the one preprocessing function, metrics, formats and helpers',
     ['covidlib', 'errors', 'preprocess', 'metrics', 'standardize', 'distribute', 'archive',
      'dicom', 'results', 'scored', 'beam_options']),
    ('data, models, model_dir (and the dataset builders, covidlib_tfds)',
     ['covidlib_tfds', 'model_dir', 'tflite_metadata', 'data', 'augment', 'models', 'explain']),
    ('the one scoring pass: a model over a split, folder or file list, once, into arrays',
     ['scoring']),
    ('analyses: plain functions of arrays (no data loading, no model)',
     ['calibration', 'threshold', 'shift', 'shortcuts', 'hold_out', 'confounds', 'reference',
      'sites']),
    ('orchestrators and serving: fit, train, evaluate, cross-validate, report, predict, ensemble',
     ['ensemble', 'shift_fit', 'train', 'evaluate', 'crossval', 'report', 'predict', 'edge',
      'beam_scoring', 'site', 'site_adapt']),
    ('binaries: the absl and argparse mains', ['cli']),
]
# Modules that work on arrays only: numpy, scipy and scikit-learn, never TensorFlow or data.
ARRAYS_ONLY = {'metrics', 'scored', 'calibration', 'threshold', 'shift', 'shortcuts',
               'hold_out', 'results', 'confounds', 'reference', 'sites'}
HEAVY = ('tensorflow', 'keras', 'tensorflow_datasets', 'covidlib.data', 'covidlib.scoring',
         'covidlib.models', 'covidlib_tfds')
# Function-level imports: optional dependencies only, each with a comment giving the reason.
OPTIONAL_EVERYWHERE = ('matplotlib', 'pydicom', 'ai_edge_litert')
OPTIONAL_IN = {
    'model_dir': ('keras', 'covidlib.standardize'),  # TensorFlow-free for model_dir readers.
    'data': ('covidlib_tfds',),                       # Registers the builders when installed.
    # covidlib-predict-beam: these import apache-beam (covidlib[beam]); without it, one line.
    'cli': ('covidlib.beam_scoring', 'covidlib.beam_options'),
    'beam_options': ('apache_beam',),  # Imported under a logging filter (see there).
}


def _layer_text() -> str:
  return '\n'.join(f'  {k}. {name}: {", ".join(mods)}'
                   for k, (name, mods) in enumerate(LAYERS)) + (
      '\nA module imports only its own layer and lower ones (BUILD.md, "Architecture").')


def _node(name: str) -> str:
  """covidlib.X.Y -> 'X' (cli/* -> 'cli'), covidlib -> 'covidlib', covidlib_tfds.* -> one node."""
  if name == 'covidlib':
    return 'covidlib'
  if name.startswith('covidlib_tfds'):
    return 'covidlib_tfds'
  return name.split('.')[1]


def _module_name(path: str) -> str:
  rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, '.')
  return rel[:-len('.__init__')] if rel.endswith('.__init__') else rel


def _sources(package: str):
  for folder, _, names in os.walk(os.path.join(REPO, package)):
    for name in sorted(names):
      if name.endswith('.py'):
        yield os.path.join(folder, name)


def _imports(path: str):
  """(imported module, line, at top level?, source line) for every import of a file."""
  text = open(path, encoding='utf-8').read()
  lines = text.splitlines()
  tree = ast.parse(text)
  top = {id(n) for n in tree.body}
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      names = []
      for alias in node.names:
        sub = f'{node.module}.{alias.name}'
        # `from covidlib import data` names a module; `from covidlib import CLASS_NAMES` not.
        base = os.path.join(REPO, *sub.split('.'))
        names.append(sub if os.path.exists(base + '.py') or os.path.isdir(base)
                     else node.module)
    else:
      continue
    for name in names:
      yield name, node.lineno, id(node) in top, lines[node.lineno - 1]


def _graph(package: str, full: bool = False) -> dict[str, dict[str, list[str]]]:
  """{node: {imported node: ['file:line', ...]}} of imports between project modules.

  Nodes are layer names (covidlib.cli.* is 'cli') unless `full`, then module names; the dataset
  builders (covidlib_tfds) are one node, so a cycle through them shows too.
  """
  def node(name):
    if name.startswith('covidlib_tfds'):
      return 'covidlib_tfds'
    if full or name.startswith('exporters'):
      return name
    return _node(name)

  graph: dict[str, dict[str, list[str]]] = {}
  packages = [package] + (['covidlib_tfds'] if package == 'covidlib' else [])
  for folder in packages:
    for path in _sources(folder):
      here = node(_module_name(path))
      for name, line, _, _ in _imports(path):
        if not name.startswith(('covidlib', 'exporters')):
          continue
        target = node(name)
        if target != here:
          graph.setdefault(here, {}).setdefault(target, []).append(
              f'{os.path.relpath(path, REPO)}:{line}')
  return graph


def _cycle(graph: dict) -> list[str] | None:
  """One import cycle as [a, b, ..., a], or None."""
  state: dict[str, int] = {}
  stack: list[str] = []

  def visit(node):
    state[node] = 1
    stack.append(node)
    for target in sorted(graph.get(node, {})):
      if state.get(target) == 1:
        return stack[stack.index(target):] + [target]
      if not state.get(target):
        found = visit(target)
        if found:
          return found
    stack.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if not state.get(node):
      found = visit(node)
      if found:
        return found
  return None


def test_every_module_has_a_layer():
  placed = {m for _, mods in LAYERS for m in mods}
  nodes = {_node(_module_name(p)) for p in _sources('covidlib')}
  assert nodes - placed == set(), (
      f'modules on no layer: {sorted(nodes - placed)}; add them to LAYERS:\n{_layer_text()}')


def test_no_upward_import_in_covidlib():
  layer = {m: k for k, (_, mods) in enumerate(LAYERS) for m in mods}
  upward = []
  for module, targets in _graph('covidlib').items():
    if module not in layer:
      continue  # covidlib_tfds' own imports of covidlib: covered by the cycle test.
    for target, where in targets.items():
      if target.startswith('exporters'):
        upward.append(f'{module} -> {target} ({", ".join(where)}): covidlib never imports '
                      'exporters')
      elif layer[target] > layer[module]:
        upward.append(f'{module} (layer {layer[module]}) -> {target} (layer {layer[target]}) '
                      f'at {", ".join(where)}')
  assert not upward, 'upward imports:\n  ' + '\n  '.join(upward) + '\nLayers:\n' + _layer_text()


@pytest.mark.parametrize('package', ['covidlib', 'exporters'])
def test_no_import_cycle(package):
  graph = _graph(package, full=True)
  cycle = _cycle(graph)
  if cycle:
    steps = [f'{a} -> {b} ({graph[a][b][0]})' for a, b in zip(cycle, cycle[1:])]
    pytest.fail('import cycle:\n  ' + '\n  '.join(steps) + '\nLayers:\n' + _layer_text())


def test_the_analyses_import_no_tensorflow_and_no_data_code():
  found = []
  for path in _sources('covidlib'):
    module = _node(_module_name(path))
    if module in ARRAYS_ONLY:
      for name, line, _, _ in _imports(path):
        if name == 'covidlib_tfds' or name.startswith(HEAVY):
          found.append(f'{os.path.relpath(path, REPO)}:{line} imports {name}')
  assert not found, ('analyses on arrays must not load data or models:\n  ' + '\n  '.join(found)
                     + '\nLayers:\n' + _layer_text())


@pytest.mark.parametrize('package', ['covidlib', 'exporters'])
def test_function_level_imports_are_optional_dependencies_with_a_reason(package):
  found = []
  for path in _sources(package):
    module = _node(_module_name(path)) if package == 'covidlib' else None
    allowed = OPTIONAL_EVERYWHERE + OPTIONAL_IN.get(module, ())
    for name, line, at_top, text in _imports(path):
      if at_top:
        continue
      where = f'{os.path.relpath(path, REPO)}:{line} ({name})'
      if not name.startswith(allowed):
        found.append(f'{where}: not an optional dependency; import it at the top')
      elif '#' not in text:
        found.append(f'{where}: give the reason in a comment on the same line')
  assert not found, 'function-level imports:\n  ' + '\n  '.join(found)


def test_the_checks_see_a_violation():
  """The graph functions find a planted cycle and an upward edge (the test can fail)."""
  assert _cycle({'a': {'b': ['x']}, 'b': {'c': ['y']}, 'c': {'a': ['z']}}) == ['a', 'b', 'c', 'a']
  assert _cycle({'a': {'b': ['x']}, 'b': {}}) is None
  assert _node('covidlib.cli.evaluate') == 'cli' and _node('covidlib_tfds.build') == 'covidlib_tfds'
