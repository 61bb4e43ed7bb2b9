"""Confounds: does a feature such as the view predict the label by itself, and how does the
model do within each of its values?

    from covidlib import confounds
    section = confounds.confound_section(labels, scores, {'view': views}, n_bootstrap=1000)
    section['view']['alone']['value']            # ROC-AUC of the view alone
    section['view']['within']['AP']['roc_auc']   # the model's ROC-AUC among AP films only

or `covidlib-evaluate --confounds=view` (report.json `confounds`, report.md "Confounds").

On NIH's pneumonia films the view is confounded with the label (pneumonia films are more often
AP, taken at the bedside): a model could score well by telling AP from PA. Two figures tell
that apart from seeing the finding:
- `alone`: the ROC-AUC of the label predicted from the feature only, each image scored by the
  share of positives among the evaluated images with its value. Computed on the same images, it
  is the best any rule that sees only the feature can do there (an upper bound).
- `within`: the model's ROC-AUC inside each value holding both classes. A model that learned the
  finding keeps its ROC-AUC within each view; one that learned the view drops to about 0.5.
Images with an empty value are left out of both, and counted.

Plain functions of arrays: no data loading, no model.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from covidlib import errors
from covidlib import metrics


def _auc(labels: np.ndarray, scores: np.ndarray, n_bootstrap: int, seed: int) -> dict:
  return metrics.compute_metrics(labels, scores, 0.5, n_bootstrap=n_bootstrap,
                                 seed=seed).figures['roc_auc'].as_dict()


def feature_alone_scores(labels, values) -> np.ndarray:
  """Each image's score from its value alone: the share of positives among images with it."""
  labels = np.asarray(labels).reshape(-1)
  values = np.asarray(values, dtype=object).reshape(-1)
  if labels.shape != values.shape:
    raise errors.UsageError(f'{labels.size} labels but {values.size} feature values')
  share = {v: float(labels[values == v].mean()) for v in set(values.tolist())}
  return np.asarray([share[v] for v in values], np.float64)


def confound_section(labels, scores, features: Mapping[str, np.ndarray], *,
                     n_bootstrap: int = metrics.DEFAULT_BOOTSTRAP, seed: int = 0) -> dict:
  """report['confounds']: per feature, the ROC-AUC of the feature alone and the model's within
  each of its values.

  Args:
    labels: (n,) 0/1; scores: (n,) the model's P(positive) (raw or calibrated: AUC is the same).
    features: {name: (n,) values}, e.g. {'view': views}; '' means unknown.
  """
  labels = np.asarray(labels).reshape(-1).astype(np.int64)
  scores = np.asarray(scores, np.float64).reshape(-1)
  section = {}
  for name, values in features.items():
    values = np.asarray(values, dtype=object).reshape(-1)
    if values.shape != labels.shape:
      raise errors.UsageError(f'confound {name!r}: {values.size} values for {labels.size} images')
    known = values != ''
    y, v, p = labels[known], values[known], scores[known]
    entry = {'n': int(known.sum()), 'n_unknown': int((~known).sum()),
             'values': {str(k): int((v == k).sum()) for k in sorted(set(v.tolist()))},
             'alone': None, 'model': None, 'within': {}}
    if 0 < y.sum() < y.size:
      entry['alone'] = _auc(y, feature_alone_scores(y, v), n_bootstrap, seed)
      entry['model'] = _auc(y, p, n_bootstrap, seed)
    for k in sorted(set(v.tolist())):
      mask = v == k
      n_pos = int(y[mask].sum())
      if 0 < n_pos < mask.sum():
        entry['within'][str(k)] = {'n': int(mask.sum()), 'n_positive': n_pos,
                                   'roc_auc': _auc(y[mask], p[mask], n_bootstrap, seed)}
    section[name] = entry
  return section


def render_markdown(section: dict | None, positive: str = 'COVID-19') -> list[str]:
  """The "Confounds" part of report.md."""
  if not section:
    return []
  out = ['## Confounds', '',
         'ROC-AUC of the label predicted from each feature alone (the share of '
         f'{positive} images among those with the same value, on these images: an upper bound '
         'for any rule that sees only the feature), beside the model\'s ROC-AUC within each '
         'value. A model that sees the finding keeps its ROC-AUC within each value.', '',
         '| feature | images | feature alone | model, all | within each value |',
         '|---|---|---|---|---|']
  for name, e in section.items():
    within = '; '.join(f'{k} {metrics.format_figure(w["roc_auc"])} (n={w["n"]})'
                       for k, w in e['within'].items()) or '— (no value holds both classes)'
    unknown = f' ({e["n_unknown"]} unknown, left out)' if e['n_unknown'] else ''
    out.append(f'| {name} | {e["n"]}{unknown} | {metrics.format_figure(e["alone"])} | '
               f'{metrics.format_figure(e["model"])} | {within} |')
  return out + ['']
