"""Shortcut validation: does a model see COVID-19, or where an image came from?

    from covidlib import scoring, shortcuts
    evaluated = scoring.score_dataset(model, test_split)          # scores, labels, features
    other = scoring.score_every_split(model, config, 'covid_xray/other_findings', data_dir)
    figures = shortcuts.shortcut_report(decision, evaluated, other=other,
                                        unseen={'kaggle_pediatric': (pediatric, 'where')})

or from the shell, as the `shortcuts` section of `covidlib-evaluate` (on by default for the
covid_xray datasets; see covidlib/cli/evaluate.py, and covidlib.evaluate for which datasets it
scores). Every function here takes arrays (covidlib.scored.Scored) and returns a dict: none
loads data or runs a model.

On our public data every class comes from its own sources (COVID-19 from papers, normals from
one NIH site or one children's hospital), so a model can score near 1.0 on an internal test split
by telling sources apart. Pooled figures cannot show that; these four can:

- `within_source`: ROC-AUC (95% bootstrap interval) inside each source holding both classes, and
  ieee8023 COVID-19 against ieee8023 other findings (same papers and hospitals, different
  disease). Near 0.5 = the model cannot tell the disease apart once the source is fixed.
- `held_out_source`: specificity, at the operating threshold, on normals from a source that no
  training image came from: either a source never in the training set (evaluated directly), or
  one left out on purpose by `covidlib-crossval --hold_out=source` (read from its report).
- `source_probe`: a logistic regression on the model's penultimate features, cross-validated
  with patients kept within one fold, predicting the image's source; beside it the same probe
  predicting the label. A source probe near 1.0 among images of ONE class means the features
  encode where an image came from beyond anything the label needs.
- `other_findings`: the share of other findings (SARS, Pneumocystis, bacterial pneumonia, ...)
  called COVID-19 at the operating threshold. Their label 0 means "not COVID-19", not "normal".

Targets (issue 9): specificity >= 0.80 on a held-out normal source at sensitivity >= 0.90, and
within-source ieee8023 COVID-19 vs other findings ROC-AUC >= 0.75.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from covidlib import calibration
from covidlib import errors
from covidlib import metrics
from covidlib import model_dir as md
from covidlib import scored as scored_lib
from covidlib.scored import Scored

TARGET_SPECIFICITY = 0.80
TARGET_SENSITIVITY = 0.90
TARGET_WITHIN_SOURCE_AUC = 0.75
OTHER_FINDINGS_NOTE = ('label 0 in covid_xray/other_findings means "not COVID-19" (SARS, '
                       'Pneumocystis, bacterial pneumonia, ...), not "normal"')
EXPLANATION = (
    'Figures that internal validation cannot give. within_source: ROC-AUC with both classes '
    'from one source. held_out_source: specificity on normals from a source no training image '
    'came from. source_probe: how well the penultimate features predict where an image came '
    'from. other_findings: the share of other lung findings called COVID-19. Internal '
    'figures near 1.0 with these near chance mean the model learned the source, not the '
    'disease.')
PROBE_NOTE = (
    'A logistic probe on the penultimate features, cross-validated with each patient in one '
    'fold. source_within_label: how well the features tell sources apart among images of the '
    'same class; near 1.0 means the model encodes where an image came from beyond what the '
    'label needs, and its COVID-19 calls may rest on that. label: the same probe for the '
    'label. A source probe as high as the label probe is a confound warning, not a proof.')


def _source(s: Scored) -> np.ndarray:
  return s.column('source')


def _calibrated(scores: np.ndarray, decision: md.Decision) -> np.ndarray:
  return (calibration.apply_temperature(scores, decision.temperature)
          if decision.temperature != 1.0 else scores)


def _auc(labels, scores, n_bootstrap: int, seed: int) -> dict:
  return metrics.compute_metrics(labels, scores, 0.5, n_bootstrap=n_bootstrap,
                                 seed=seed).figures['roc_auc'].as_dict()


# --------------------------------------------------------------------------------------------
# The four figures.
# --------------------------------------------------------------------------------------------


def within_source(evaluated: Scored, other: Scored | None = None, *,
                  n_bootstrap: int = metrics.DEFAULT_BOOTSTRAP, seed: int = 0) -> dict:
  """ROC-AUC inside each source that holds both classes; COVID-19 vs other findings per source.

  Returns {name: {'source', 'negatives', 'n_covid', 'n_negative', 'roc_auc'}}: one entry per
  source of `evaluated` holding both classes, and one per source shared by `evaluated`'s
  COVID-19 images and `other`'s images ('<source>: COVID-19 vs other findings').
  """
  out = {}
  sources = _source(evaluated)
  for source in sorted(set(sources) - {''}):  # Images of no named source: no comparison.
    part = evaluated.select(sources == source)
    n_covid = int(part.labels.sum())
    if 0 < n_covid < len(part):
      out[source or '(unknown)'] = {
          'source': source, 'negatives': 'normal', 'n_covid': n_covid,
          'n_negative': len(part) - n_covid,
          'roc_auc': _auc(part.labels, part.scores, n_bootstrap, seed)}
  if other is not None and len(other):
    other_sources = _source(other)
    for source in sorted(set(other_sources)):
      covid = evaluated.select((sources == source) & (evaluated.labels == 1))
      negatives = other.select(other_sources == source)
      if not len(covid) or not len(negatives):
        continue
      labels = np.concatenate([np.ones(len(covid), np.int64), np.zeros(len(negatives), np.int64)])
      scores = np.concatenate([covid.scores, negatives.scores])
      out[f'{source or "(unknown)"}: COVID-19 vs other findings'] = {
          'source': source, 'negatives': 'other findings (not COVID-19)',
          'n_covid': len(covid), 'n_negative': len(negatives),
          'roc_auc': _auc(labels, scores, n_bootstrap, seed),
          'target': TARGET_WITHIN_SOURCE_AUC}
  return out


def unseen_source(evaluated: Scored, normals: Scored, decision: md.Decision, *, source: str,
                  description: str, n_bootstrap: int = metrics.DEFAULT_BOOTSTRAP,
                  seed: int = 0) -> dict:
  """Specificity at the operating threshold on normals of a source absent from training.

  Also: the evaluated split's sensitivity at the same threshold (the other half of the target),
  and the ROC-AUC of its COVID-19 images against these normals (threshold-free).
  """
  normals = normals.select(normals.labels == 0)
  if not len(normals):
    raise errors.DataError(f'{description}: no normal image of source {source!r}')
  threshold = decision.threshold
  p_normal = _calibrated(normals.scores, decision)
  covid = evaluated.select(evaluated.labels == 1)
  p_covid = _calibrated(covid.scores, decision)
  specificity = metrics.proportion(int((p_normal < threshold).sum()), len(normals),
                                   'normal images')
  sensitivity = metrics.proportion(int((p_covid >= threshold).sum()), len(covid),
                                   'COVID-19 images')
  entry = {
      'source': source, 'how': 'never in the training set: evaluated directly',
      'data': description, 'n_normal': len(normals), 'threshold': threshold,
      'specificity': specificity.as_dict(), 'n_covid': len(covid),
      'sensitivity': sensitivity.as_dict(),
      'roc_auc_covid_vs_these_normals': (
          _auc(np.concatenate([np.ones(len(covid)), np.zeros(len(normals))]),
               np.concatenate([covid.scores, normals.scores]), n_bootstrap, seed)
          if len(covid) else None),
  }
  entry['meets_target'] = meets_target(entry)
  return entry


def meets_target(entry: dict) -> bool | None:
  """specificity >= 0.80 and sensitivity >= 0.90 (None when either is undefined)."""
  spec = (entry.get('specificity') or {}).get('value')
  sens = (entry.get('sensitivity') or {}).get('value')
  if spec is None or sens is None:
    return None
  return bool(spec >= TARGET_SPECIFICITY and sens >= TARGET_SENSITIVITY)


def other_findings(other: Scored, decision: md.Decision, description: str) -> dict:
  """Share of other findings called COVID-19 at the operating threshold (with Wilson 95%)."""
  p = _calibrated(other.scores, decision)
  called = p >= decision.threshold
  out = {'data': description, 'n': len(other), 'threshold': decision.threshold,
         'called_covid': metrics.proportion(int(called.sum()), len(other),
                                            'other-finding images').as_dict(),
         'note': OTHER_FINDINGS_NOTE}
  findings = other.metadata.get('finding')
  if findings is not None and any(findings):
    out['by_finding'] = {
        (f or '(unknown)'): {'n': int((findings == f).sum()),
                             'called_covid': int(called[findings == f].sum())}
        for f in sorted(set(findings))}
  return out


def _probe(features: np.ndarray, targets: np.ndarray, groups: np.ndarray, n_folds: int,
           seed: int) -> dict:
  """Out-of-fold logistic-regression probe: ROC-AUC (macro one-vs-rest) and balanced accuracy."""
  classes, y = np.unique(targets, return_inverse=True)
  counts = {str(c): int((y == k).sum()) for k, c in enumerate(classes)}
  if classes.size < 2:
    return {'classes': counts, 'roc_auc': None, 'reason': 'one class only'}
  folds = min(n_folds, *(len(set(groups[y == k])) for k in range(classes.size)))
  if folds < 2:
    return {'classes': counts, 'roc_auc': None,
            'reason': 'a class has fewer than 2 patient groups'}
  splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
  proba = np.zeros((y.size, classes.size))
  for train_idx, test_idx in splitter.split(features, y, groups):
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.1))
    probe.fit(features[train_idx], y[train_idx])
    fitted = probe.predict_proba(features[test_idx])
    proba[np.ix_(test_idx, probe.classes_)] = fitted  # A fold may lack a class.
  if classes.size == 2:
    auc = roc_auc_score(y, proba[:, 1])
  else:
    auc = roc_auc_score(y, proba, multi_class='ovr', average='macro', labels=range(classes.size))
  return {'classes': counts, 'folds': folds, 'roc_auc': float(auc),
          'balanced_accuracy': float(balanced_accuracy_score(y, proba.argmax(axis=1)))}


def source_probe(pool: Scored, *, n_folds: int = 5, seed: int = 0) -> dict:
  """The source probe and the label probe on `pool`'s penultimate features, grouped by patient."""
  if pool.features is None:
    raise errors.UsageError('source probe needs the penultimate features (covidlib.scoring on a '
                            'model ending in Dense "logit")')
  sources = _source(pool)
  patients = np.asarray(pool.metadata.get('patient_id', np.full(len(pool), '', object)),
                        dtype=object)
  names = np.asarray(pool.metadata.get('filename', np.arange(len(pool)).astype(str)),
                     dtype=object)
  groups = np.asarray([f'{s}:{p}' if p else f'file:{n}'
                       for s, p, n in zip(sources, patients, names)], dtype=object)
  features = np.asarray(pool.features, np.float32)
  out = {'n': len(pool), 'features': int(features.shape[1]), 'note': PROBE_NOTE,
         'source': _probe(features, sources, groups, n_folds, seed),
         'label': _probe(features, np.where(pool.labels == 1, 'COVID-19', 'not COVID-19'),
                         groups, n_folds, seed),
         'source_within_label': {}}
  for label, name in ((0, 'not COVID-19'), (1, 'COVID-19')):
    mask = pool.labels == label
    if len(set(sources[mask])) >= 2:
      out['source_within_label'][name] = _probe(features[mask], sources[mask], groups[mask],
                                                n_folds, seed)
  return out


def shortcut_report(decision: md.Decision, evaluated: Scored, *,
                    other: Scored | None = None, other_description: str = '',
                    unseen: Mapping[str, tuple[Scored, str]] | None = None,
                    held_out: Sequence[dict] = (), probe: bool = True,
                    n_bootstrap: int = metrics.DEFAULT_BOOTSTRAP, seed: int = 0) -> dict:
  """The `shortcuts` section of report.json.

  Args:
    decision: the operating point (threshold, temperature).
    evaluated: the evaluation split's predictions, with features if `probe`.
    other: predictions on covid_xray/other_findings (label 0 = not COVID-19), or None.
    unseen: {source: (predictions on its normals, description)} for sources never trained on.
    held_out: entries of `covidlib-crossval --hold_out=source` reports (see crossval).
    probe: run the source probe on evaluated + other + unseen images.
  """
  unseen = dict(unseen or {})
  report = {
      'explanation': EXPLANATION,
      'targets': {'held_out_specificity': TARGET_SPECIFICITY,
                  'held_out_sensitivity': TARGET_SENSITIVITY,
                  'within_source_roc_auc': TARGET_WITHIN_SOURCE_AUC},
      'within_source': within_source(evaluated, other, n_bootstrap=n_bootstrap, seed=seed),
      'held_out_source': [
          unseen_source(evaluated, normals, decision, source=source, description=description,
                        n_bootstrap=n_bootstrap, seed=seed)
          for source, (normals, description) in sorted(unseen.items())] + list(held_out),
      'other_findings': (other_findings(other, decision, other_description)
                         if other is not None and len(other) else None),
  }
  if probe:
    pool = scored_lib.concat([evaluated, *([other] if other is not None else []),
                   *(normals for normals, _ in unseen.values())])
    report['source_probe'] = source_probe(pool, seed=seed)
  else:
    report['source_probe'] = None
  return report


# --------------------------------------------------------------------------------------------
# Markdown, shared by report.md and the model card.
# --------------------------------------------------------------------------------------------


def _fmt_figure(figure: dict | None) -> str:
  return metrics.format_figure(figure, reason=True)


def render_markdown(section: dict | None, heading: str = '##',
                    positive: str = 'COVID-19') -> list[str]:
  """The shortcut figures as Markdown lines (a heading, four tables, and what they mean).

  positive: the display name of label 1. For a user's own classes (not COVID-19) only what was
  measured is shown, in their names: no covid_xray targets, no empty public-data tables.
  """
  if section and positive != 'COVID-19':
    return _render_own(section, heading, positive)
  out = [f'{heading} Shortcuts: source, not disease?', '']
  if not section:
    return out + ['Not measured (covidlib-evaluate --shortcuts was off, or this report predates '
                  'it). Without these figures, nothing here shows that the model tells COVID-19 '
                  'from normal rather than one hospital from another.', '']
  out += [section['explanation'], '']
  t = section['targets']
  out += [f'{heading}# Within one source', '',
          '| comparison | COVID-19 | negatives | ROC-AUC [95%] |', '|---|---|---|---|']
  for name, w in section['within_source'].items():
    out.append(f'| {name} | {w["n_covid"]} | {w["n_negative"]} ({w["negatives"]}) | '
               f'{_fmt_figure(w["roc_auc"])} |')
  if not section['within_source']:
    out.append('| none: no source of the evaluated data holds both classes, and no other '
               'findings were given | | | |')
  out += ['', f'Target for ieee8023 COVID-19 vs other findings: ROC-AUC >= '
          f'{t["within_source_roc_auc"]:.2f}. 0.5 is chance.', '',
          f'{heading}# Normals from a source never trained on', '',
          '| source | how | normals | specificity [95%] | sensitivity [95%] | '
          'ROC-AUC COVID-19 vs these normals | target met |', '|---|---|---|---|---|---|---|']
  for e in section['held_out_source']:
    if 'skipped' in e:
      out.append(f'| {e["source"]} | skipped: {e["skipped"]} | | | | | |')
      continue
    met = {True: 'yes', False: '**no**', None: '—'}[e.get('meets_target')]
    out.append(f'| {e["source"]} | {e["how"]} | {e["n_normal"]} | {_fmt_figure(e["specificity"])} | '
               f'{_fmt_figure(e["sensitivity"])} (n={e["n_covid"]}) | '
               f'{_fmt_figure(e.get("roc_auc_covid_vs_these_normals"))} | {met} |')
  if not section['held_out_source']:
    out.append('| none available | | | | | | |')
  out += ['', f'Target: specificity >= {t["held_out_specificity"]:.2f} at sensitivity >= '
          f'{t["held_out_sensitivity"]:.2f}, at the operating threshold of the model that was '
          'evaluated (for left-out rows, the threshold chosen without that source).', '']
  of = section.get('other_findings')
  out += [f'{heading}# Other findings called COVID-19', '']
  if of:
    out.append(f'{_fmt_figure(of["called_covid"])} of {of["n"]} images of other lung findings are '
               f'called COVID-19 at threshold {of["threshold"]:.4f} ({of["note"]}).')
    if of.get('by_finding'):
      out.append('By finding: ' + ', '.join(f'{k} {v["called_covid"]}/{v["n"]}'
                                            for k, v in of['by_finding'].items()) + '.')
  else:
    out.append('Not measured: no other-findings data.')
  probe = section.get('source_probe')
  out += ['', f'{heading}# Source probe', '']
  if probe:
    out += ['| probe target | images | classes | ROC-AUC | balanced accuracy |',
            '|---|---|---|---|---|']

    def row(name, p):
      auc = '—' if p.get('roc_auc') is None else f'{p["roc_auc"]:.3f}'
      bal = '—' if p.get('balanced_accuracy') is None else f'{p["balanced_accuracy"]:.3f}'
      classes = ', '.join(f'{k or "(unknown)"} {v}' for k, v in p['classes'].items())
      return f'| {name} | {sum(p["classes"].values())} | {classes} | {auc} | {bal} |'

    out.append(row('label (COVID-19 or not)', probe['label']))
    out.append(row('source', probe['source']))
    for name, p in probe['source_within_label'].items():
      out.append(row(f'source, among {name} images only', p))
    out += ['', probe['note']]
  else:
    out.append('Not run.')
  for note in section.get('notes') or []:
    out.append(f'- Not measured: {note}.')
  return out + ['']


def _render_own(section: dict, heading: str, positive: str) -> list[str]:
  """render_markdown for a user's own two classes: the figures measured, nothing else."""
  out = [f'{heading} Shortcuts: site, not finding?', '',
         'Within one site: ROC-AUC with both classes from that site (near 0.5: the model cannot '
         'tell the classes apart once the site is fixed). Source probe: how well the penultimate '
         'features tell the sites apart, beside how well they tell the label.', '',
         f'{heading}# Within one site', '',
         f'| site | {positive} | negatives | ROC-AUC [95%] |', '|---|---|---|---|']
  for name, w in section['within_source'].items():
    out.append(f'| {name} | {w["n_covid"]} | {w["n_negative"]} | {_fmt_figure(w["roc_auc"])} |')
  if not section['within_source']:
    out.append('| none: no site of the evaluated data holds both classes | | | |')
  out.append('')
  rows = [e for e in section['held_out_source'] if 'skipped' not in e]
  if rows:
    out += [f'{heading}# Sites never trained on', '',
            f'| site | how | label-0 images | specificity [95%] | sensitivity [95%] |',
            '|---|---|---|---|---|']
    for e in rows:
      out.append(f'| {e["source"]} | {e["how"]} | {e["n_normal"]} | '
                 f'{_fmt_figure(e["specificity"])} | {_fmt_figure(e["sensitivity"])} '
                 f'(n={e["n_covid"]}) |')
    out.append('')
  probe = section.get('source_probe')
  if probe and len(probe['source']['classes']) > 1:
    out += [f'{heading}# Source probe', '', '| probe target | images | ROC-AUC |', '|---|---|---|']
    for name, p in [('label', probe['label']), ('site', probe['source']),
                    *((f'site, among {k} images only', v)
                      for k, v in probe['source_within_label'].items())]:
      auc = '—' if p.get('roc_auc') is None else f'{p["roc_auc"]:.3f}'
      out.append(f'| {name} | {sum(p["classes"].values())} | {auc} |')
    out.append('')
  for note in section.get('notes') or []:
    out.append(f'- Not measured: {note}.')
  return out + ['']
