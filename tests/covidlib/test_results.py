"""covidlib.results: the ordered thread-pool map both prediction routes decode with, and the rows.

    .venv/bin/python -m pytest tests/covidlib/test_results.py -q
"""

import random
import threading
import time

import pytest

from covidlib import errors
from covidlib import results


@pytest.mark.parametrize('workers', [0, 1, 3])
def test_map_ordered_keeps_order_reports_bad_items_and_bounds_the_work_ahead(workers):
  lock = threading.Lock()
  state = {'running': 0, 'most': 0, 'consumed': 0, 'ahead': 0}
  rs = random.Random(workers)
  delays = [rs.uniform(0, 0.01) for _ in range(30)]

  def work(i):
    with lock:
      state['running'] += 1
      state['most'] = max(state['most'], state['running'])
      state['ahead'] = max(state['ahead'], i - state['consumed'])
    time.sleep(delays[i])
    with lock:
      state['running'] -= 1
    if i % 7 == 3:
      raise errors.InvalidImageError(f'f{i}', 'not a decodable image (test)')
    return i * i

  out = []
  for value, error in results.map_ordered(work, list(range(30)), workers):
    out.append(value if error is None else error.path)
    state['consumed'] += 1
  assert out == [f'f{i}' if i % 7 == 3 else i * i for i in range(30)]
  assert state['most'] <= max(workers, 1)
  assert state['ahead'] <= 2 * max(workers, 1)


def test_map_ordered_lets_other_errors_through():
  def work(i):
    if i == 2:
      raise RuntimeError('a bug, not a bad file')
    return i

  with pytest.raises(RuntimeError, match='a bug'):
    list(results.map_ordered(work, list(range(5)), workers=2))


def test_rows_and_failure_line():
  good = results.prediction('a.png', 0.7, 0.5)
  bad = results.Prediction('b.png', None, None, 0.5, 'empty file (0 bytes)')
  assert (good.label, good.class_name, bad.class_name) == (1, 'covid', None)
  assert results.format_results([good, bad], 'csv', 'm').splitlines() == [
      'path,probability,label,class_name,threshold,error,shift_score,in_distribution,decision',
      'a.png,0.700000,1,covid,0.5,,,,covid', 'b.png,,,,0.5,empty file (0 bytes),,,']
  assert results.failure_message([good, bad]) == (
      '1 of 2 files could not be read: b.png: empty file (0 bytes)')
  assert results.failure_message([good]) is None


def test_table_header_names_a_users_positive_class():
  own = results.prediction('a.png', 0.7, 0.5, class_names=('normal', 'pneumonia'))
  table = results.format_results([own], 'table', model='m')
  assert table.split('\n')[0].split()[:2] == ['file', 'P(pneumonia)']
  assert own.class_name == 'pneumonia' and own.decision == 'pneumonia'
  stock = results.format_results([results.prediction('a.png', 0.7, 0.5)], 'table', model='m')
  assert stock.split('\n')[0].split()[:2] == ['file', 'P(COVID-19)']
