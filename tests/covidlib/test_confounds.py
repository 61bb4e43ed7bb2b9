"""covidlib.confounds: a feature alone against the model within each of its values.

    .venv/bin/python -m pytest tests/covidlib/test_confounds.py -q
"""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from covidlib import confounds
from covidlib import errors


def _data(seed=0, n=400):
  """Pneumonia films more often AP; the score sees the finding (and not the view)."""
  rs = np.random.RandomState(seed)
  labels = rs.rand(n) < 0.5
  views = np.where(rs.rand(n) < np.where(labels, 0.8, 0.3), 'AP', 'PA').astype(object)
  scores = 1 / (1 + np.exp(-(2.0 * labels - 1 + rs.randn(n))))
  return labels.astype(np.int64), scores, views


def test_feature_alone_and_within_each_value_match_sklearn():
  labels, scores, views = _data()
  views[:7] = ''  # Unknown: left out and counted.
  section = confounds.confound_section(labels, scores, {'view': views}, n_bootstrap=0)
  e = section['view']
  known = views != ''
  share = {v: labels[known][views[known] == v].mean() for v in ('AP', 'PA')}
  alone = roc_auc_score(labels[known], [share[v] for v in views[known]])
  assert e['alone']['value'] == pytest.approx(alone)
  assert e['model']['value'] == pytest.approx(roc_auc_score(labels[known], scores[known]))
  for view in ('AP', 'PA'):
    mask = known & (views == view)
    assert e['within'][view]['roc_auc']['value'] == pytest.approx(
        roc_auc_score(labels[mask], scores[mask]))
    assert e['within'][view]['n'] == int(mask.sum())
  assert e['n_unknown'] == 7 and e['n'] == len(labels) - 7
  assert 0.6 < alone < 0.8  # The view alone carries signal here; the model more.
  assert e['model']['value'] > 0.8


def test_a_value_with_one_class_has_no_within_figure_and_markdown_says_so():
  labels = np.array([1, 1, 0, 0, 1, 0])
  section = confounds.confound_section(labels, np.array([0.9, 0.8, 0.2, 0.1, 0.7, 0.3]),
                                       {'view': np.array(['AP', 'AP', 'PA', 'PA', 'AP', 'PA'],
                                                         object)}, n_bootstrap=0)
  assert section['view']['within'] == {}
  assert section['view']['alone']['value'] == 1.0  # The view alone separates them here.
  text = '\n'.join(confounds.render_markdown(section, 'pneumonia'))
  assert 'no value holds both classes' in text and 'pneumonia' in text


def test_mismatched_lengths_are_refused():
  with pytest.raises(errors.UsageError, match="confound 'view': 2 values for 3 images"):
    confounds.confound_section([0, 1, 0], [0.1, 0.9, 0.2], {'view': np.array(['a', 'b'])})
