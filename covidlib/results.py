"""What both prediction routes share, without TensorFlow: results, their formats, batching.

    from covidlib import results
    paths = results.expand_inputs(['xray.png', 'scans/'])       # folders, recursively, sorted
    for item, error in results.map_ordered(load, paths):        # decoded ahead, in a thread pool
      ...
    print(results.format_results(predictions, 'csv', model='model_int8.tflite'))

Used by `covidlib.predict` and `covidlib-predict` (the full route, TensorFlow) and by
`covidlib.edge` and `covidlib-predict-edge` (LiteRT, numpy and Pillow only), so both print the
same rows. Label 1 = COVID-19.
"""

from __future__ import annotations

import collections
import concurrent.futures
import csv
import dataclasses
import io
import json
import os
from typing import Any, Callable, Iterable, Iterator, Sequence

from covidlib import errors

CLASS_NAMES = ('normal', 'covid')  # = covidlib.CLASS_NAMES; index = label.
OUT_OF_DISTRIBUTION = 'out_of_distribution'  # The decision of an abstention (covidlib.shift).


@dataclasses.dataclass(frozen=True)
class Prediction:
  """One image's result: probability and label, or the error that kept it from being read."""
  path: str
  probability: float | None
  label: int | None
  threshold: float
  error: str | None = None
  class_names: tuple[str, ...] = dataclasses.field(default=CLASS_NAMES, compare=False,
                                                   repr=False)
  shift_score: float | None = None        # None: the model carries no shift score.
  in_distribution: bool | None = None     # shift_score <= the shift threshold.
  abstained: bool = False                 # on_shift='abstain' and out of distribution.

  @property
  def ok(self) -> bool:
    return self.error is None

  @property
  def class_name(self) -> str | None:
    return None if self.label is None else self.class_names[self.label]

  @property
  def decision(self) -> str | None:
    """The class name, or 'out_of_distribution' for an abstention; None for an error."""
    return OUT_OF_DISTRIBUTION if self.abstained else self.class_name

  def to_dict(self) -> dict:
    return {'path': self.path, 'probability': self.probability, 'label': self.label,
            'class_name': self.class_name, 'threshold': self.threshold, 'error': self.error,
            'shift_score': self.shift_score, 'in_distribution': self.in_distribution,
            'decision': self.decision}


def prediction(path: str, probability: float, threshold: float,
               class_names: Sequence[str] = CLASS_NAMES) -> Prediction:
  """A readable file's result: label = probability >= threshold."""
  probability = float(probability)
  return Prediction(path, probability, int(probability >= threshold), float(threshold),
                    class_names=tuple(class_names))


def map_ordered(function: Callable[[Any], Any], items: Sequence[Any],
                workers: int | None = None) -> Iterator[tuple[Any, errors.InvalidImageError | None]]:
  """Yields (function(item), None) or (None, the InvalidImageError it raised), in item order.

  Up to `workers` threads (default: the CPU count; 0 = on the calling thread) run ahead of the
  consumer by at most 2 x workers items, so decoding overlaps whatever the consumer does with
  each result (inference) and memory stays bounded. Other exceptions propagate.
  """
  def call(item):
    try:
      return function(item), None
    except errors.InvalidImageError as e:
      return None, e

  workers = (os.cpu_count() or 1) if workers is None else workers
  if workers <= 0 or len(items) <= 1:
    yield from (call(item) for item in items)
    return
  with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix='covidlib-decode') \
      as pool:
    pending = collections.deque()
    iterator = iter(items)
    for item in iterator:
      pending.append(pool.submit(call, item))
      if len(pending) >= 2 * workers:
        break
    while pending:
      yield pending.popleft().result()
      for item in iterator:
        pending.append(pool.submit(call, item))
        break


def expand_inputs(inputs: Sequence[str]) -> list[str]:
  """Files as given, folders as their files (recursive, sorted, names starting '.' skipped).

  Raises:
    UsageError: no inputs, an input path that does not exist, or folders holding no file.
  """
  if not inputs:
    raise errors.UsageError('no input: give image files or folders after the flags')
  paths = []
  for item in inputs:
    if not os.path.exists(item):
      raise errors.UsageError(f'input {item!r} does not exist')
    if not os.path.isdir(item):
      paths.append(item)
      continue
    found = []
    for root, dirs, names in os.walk(item):
      dirs[:] = [d for d in dirs if not d.startswith('.')]
      found.extend(os.path.join(root, n) for n in names if not n.startswith('.'))
    paths.extend(sorted(found))
  if not paths:
    raise errors.UsageError(f'no files found in {", ".join(map(repr, inputs))}')
  return paths


def format_results(predictions: Iterable[Prediction], fmt: str, model: str) -> str:
  """The results as a table, a JSON document or CSV (header + one row per file).

  The shift columns (shift_score, in_distribution, decision) are blank for a model without a
  shift score; the table shows them only when some result has one.
  """
  predictions = list(predictions)
  if fmt == 'json':
    return json.dumps({'model': model, 'n': len(predictions),
                       'n_failed': sum(not r.ok for r in predictions),
                       'results': [r.to_dict() for r in predictions]}, indent=2) + '\n'
  if fmt == 'csv':
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator='\n')
    writer.writerow(['path', 'probability', 'label', 'class_name', 'threshold', 'error',
                     *SHIFT_COLUMNS])
    for r in predictions:
      writer.writerow([r.path, '' if r.probability is None else f'{r.probability:.6f}',
                       '' if r.label is None else r.label, r.class_name or '',
                       f'{r.threshold:.6g}', r.error or '', *_shift_cells(r)])
    return buffer.getvalue()
  with_shift = any(r.shift_score is not None for r in predictions)
  width = max([len('file')] + [len(r.path) for r in predictions])
  shift_head = '  shift_score  in_dist' if with_shift else ''
  decision_width = max([8] + [len(r.decision or '') for r in predictions])
  positive = predictions[0].class_names[1] if predictions else CLASS_NAMES[1]
  header = f'P({"COVID-19" if positive == "covid" else positive})'
  lines = [f'{"file":<{width}}  {header:>11}  {"decision":<{decision_width}}  threshold'
           f'{shift_head}  error']
  for r in predictions:
    p = '' if r.probability is None else f'{r.probability:.4f}'
    shift_cells = ''
    if with_shift:
      score, inside = _shift_cells(r, table=True)
      shift_cells = f'  {score:>11}  {inside:<7}'
    lines.append(f'{r.path:<{width}}  {p:>11}  {r.decision or "-":<{decision_width}}  '
                 f'{r.threshold:>9.4g}{shift_cells}  {r.error or ""}'.rstrip())
  return '\n'.join(lines) + '\n'


SHIFT_COLUMNS = ('shift_score', 'in_distribution', 'decision')


def _shift_cells(r: Prediction, table: bool = False) -> tuple[str, ...]:
  """shift_score, in_distribution (and, for csv, decision) as text; '' without a score."""
  score = '' if r.shift_score is None else (f'{r.shift_score:.4g}' if table
                                            else f'{r.shift_score:.6g}')
  if table:
    inside = '' if r.in_distribution is None else ('yes' if r.in_distribution else 'NO')
    return score or '-', inside or '-'
  inside = '' if r.in_distribution is None else str(r.in_distribution).lower()
  return score, inside, r.decision or ''


def failure_message(predictions: Sequence[Prediction]) -> str | None:
  """'<k> of <n> files could not be read: <path>: <reason>; ...', or None if all were read."""
  failed = [r for r in predictions if not r.ok]
  if not failed:
    return None
  return (f'{len(failed)} of {len(predictions)} files could not be read: '
          + '; '.join(f'{r.path}: {r.error}' for r in failed))
