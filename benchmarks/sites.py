"""covidlib-site on real sites: check's detection and false alarms, adapt across sites, and how
many local films adapting needs (issue 17).

    nice -n 10 .venv/bin/python benchmarks/sites.py \\
        --nih_dir=runs/sites/nih --guangzhou_dir=runs/sites/guangzhou \\
        --data_dir=/work/main/tfds_data --work=runs/sites_bench --out=benchmarks/results/sites \\
        --parts=check,matrix,curve,covid --covid_dir=runs/sites/covid_adult

The two model_dirs are `make same-site`'s (compact_resnet, 224 px, 30 epochs, seed 0, trained on
labelled_xrays/nih_pneumonia and labelled_xrays/guangzhou_pneumonia), copied, with their
reference and multi-depth shift score added by `covidlib-fit-shift`; --covid_dir is a copy of
`make main`'s runs/default/compact_resnet (covid_xray/adult), likewise refitted. Every film of
each dataset is read once into memory and each model scores each dataset once (with taps) for
the check part (once more for the per-image flag, cached on its own).

Parts (--parts):
  check   100 random 50-film batches of the OTHER site (every split) and 100 of the model's OWN
          test split, each tested against the model's reference (covidlib.sites.two_sample_test,
          1000 permutations, alpha 0.01): detection and false-alarm rates. Beside them the
          per-image shift flag's share of films flagged (all films of the other site; the own
          test split).
  matrix  NIH -> Guangzhou and Guangzhou -> NIH: covidlib.site_adapt.adapt with each method
          on the other site's films (hold-out 0.3 by patient, seed 0; the same split for every
          method): the parent's and the adapted model's hold-out figures.
  curve   NIH -> Guangzhou with k labelled Guangzhou films (k/2 per class, drawn at random per
          draw), every other Guangzhou film of another patient as the hold-out: hold-out ROC-AUC
          of threshold / finetune / adabn+finetune, and of a compact_resnet trained from
          scratch on the same k films (covidlib.site_adapt.train_on_films: same inner split,
          epochs and batch; learning rate 1e-3, covidlib-train's default). Mean +- sd over draws.
          The pieces of covidlib.site_adapt.adapt, without its model_dir and reports, so that
          each hold-out is scored by the parent once per draw.
  covid   --covid_dir (make main's covid_xray/adult model), if given: its specificity on the
          pediatric normals of covid_xray/adult_pediatric before and after adapt (normals only:
          specificity only).
Finished runs are cached in <work>/runs.json, so an interrupted benchmark resumes; a run with
fewer --parts reports only those (the cache keeps the others).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

_NIH = flags.DEFINE_string('nih_dir', 'runs/sites/nih', 'NIH pneumonia model_dir (copied).')
_GZ = flags.DEFINE_string('guangzhou_dir', 'runs/sites/guangzhou',
                          'Guangzhou pneumonia model_dir (copied).')
_DATA_DIR = flags.DEFINE_string('data_dir', '/work/main/tfds_data',
                                'TFDS data_dir holding labelled_xrays/{nih,guangzhou}_pneumonia.')
_COVID = flags.DEFINE_string('covid_dir', None, "make main's covid_xray/adult model_dir (copied).")
_WORK = flags.DEFINE_string('work', 'runs/sites_bench', 'Scratch folder (adapted model_dirs).')
_OUT = flags.DEFINE_string('out', 'benchmarks/results/sites', 'Report path, no suffix.')
_PARTS = flags.DEFINE_list('parts', ['check', 'matrix', 'curve'], 'check, matrix, curve, covid.')
_KS = flags.DEFINE_list('ks', ['10', '20', '50', '100', '200'], 'Labelled local films.')
_DRAWS = flags.DEFINE_integer('draws', 5, 'Random draws per k.')
_EPOCHS = flags.DEFINE_integer('epochs', 15, 'Fine-tuning (and from-scratch) epochs.')
_BATCHES = flags.DEFINE_integer('batches', 100, 'Random batches per check row.')
_BATCH_FILMS = flags.DEFINE_integer('batch_films', 50, 'Films per check batch.')
_MACHINE = flags.DEFINE_string('machine', '2-core AMD EPYC VM, no GPU, shared with other jobs',
                               'The machine, for the report.')
_CURVE_METHODS = flags.DEFINE_list('curve_methods',
                                   ['threshold', 'finetune', 'adabn+finetune', 'scratch'],
                                   'Methods of the learning curve.')

NIH_DATA = 'labelled_xrays/nih_pneumonia'
GZ_DATA = 'labelled_xrays/guangzhou_pneumonia'


class Cache:
  """{key: result} in <work>/runs.json, written after every finished run."""

  def __init__(self, path: str):
    self.path = path
    self.runs = json.load(open(path)) if os.path.exists(path) else {}

  def get(self, key, compute):
    if key not in self.runs:
      start = time.time()
      self.runs[key] = {**compute(), 'seconds': round(time.time() - start, 1)}
      from covidlib import model_dir as md
      md.write_json(self.path, self.runs)
      print(f'{key}: {json.dumps(self.runs[key])[:300]}', flush=True)
    return self.runs[key]


def _films(spec, model_dir, data_dir):
  from covidlib import model_dir as md
  from covidlib import site
  return site.load_films(spec, md.load_config(model_dir), labelled=True, data_dir=data_dir)


# --------------------------------------------------------------------------------------------
# check


def _check_rows(model_dir, own_test, other, cache, name) -> dict:
  import numpy as np

  from covidlib import model_dir as md
  from covidlib import reference
  from covidlib import shift
  from covidlib import site
  from covidlib import sites

  model = md.load_model(model_dir)
  ref = reference.load(model_dir)
  out = {'reference': {'n': ref.n, 'split': ref.split}}
  for part, films in (('own', own_test), ('other', other)):
    def run(films=films, part=part):
      s = site.score_films(model, films, taps=True)
      rng = np.random.default_rng(0 if part == 'own' else 1)
      p, auc = [], []
      for _ in range(_BATCHES.value):
        pick = rng.choice(len(s), size=min(_BATCH_FILMS.value, len(s)), replace=False)
        test = sites.two_sample_test(ref.features, [s.taps[t][pick] for t in ref.taps],
                                     ref.taps, seed=int(rng.integers(1 << 30)),
                                     per_tap_classifier=False)
        p.append(test['p_value'])
        auc.append(test['domain_roc_auc']['value'])
      return {'p_values': p, 'domain_roc_auc': auc, 'n_films': len(s),
              'flagged': float(np.mean(np.asarray(p) < sites.DEFAULT_ALPHA))}

    def per_image(films=films):
      # Its own entry: the batch rows above may come from a run before the multi-depth score
      # (their 'share_flagged_per_image', if any, is issue 10's penultimate-only score).
      shift_model = shift.load(model_dir)
      s = site.score_films(model, films, taps=True)
      return {'share_flagged': site.share_flagged(model_dir, s), 'n_films': len(s),
              'depths': [t.name for t in shift_model.taps], 'format': shift_model.format,
              'threshold': shift_model.threshold, 'policy': shift_model.policy}
    row = {k: v for k, v in cache.get(f'check/{name}/{part}', run).items()
           if k != 'share_flagged_per_image'}
    out[part] = {**row, 'per_image': cache.get(f'check/{name}/{part}/per_image', per_image)}
  return out


# --------------------------------------------------------------------------------------------
# matrix and curve


def _adapt(parent, films, method, work, key, cache, **kwargs) -> dict:
  from covidlib import site_adapt

  def run():
    new = os.path.join(work, key.replace('/', '_').replace('+', '_'))
    shutil.rmtree(new, ignore_errors=True)
    report = site_adapt.adapt(parent, new, films, method=method, epochs=_EPOCHS.value,
                              n_bootstrap=500, **kwargs)
    lineage = json.load(open(os.path.join(new, 'lineage.json')))
    shutil.rmtree(new)
    return {'n_adapt': report['n_adapt'], 'n_hold_out': report['n_hold_out'],
            'notes': report['notes'], 'parent': lineage['hold_out']['parent'],
            'adapted': lineage['hold_out']['adapted'], 'decision': report['decision']}
  return cache.get(key, run)


def _curve_run(parent, films, holdout, parent_scores, method, work, key, cache, seed) -> dict:
  """One method on k films, hold-out ROC-AUC (and sensitivity, specificity at its threshold).

  The pieces of covidlib.site_adapt (inner_split, adabn, train_on_films, choose_decision), run
  without writing a model_dir, so the parent scores each hold-out once per draw, not once per
  method. 'threshold' leaves the network, hence the ROC-AUC, as it is.
  """
  from covidlib import calibration
  from covidlib import metrics
  from covidlib import model_dir as md
  from covidlib import site
  from covidlib import site_adapt
  from covidlib import threshold

  def run():
    folder = os.path.join(work, key.replace('/', '_').replace('+', '_'))
    shutil.rmtree(folder, ignore_errors=True)
    train_films, inner, note = site_adapt.inner_split(films, seed)
    config = md.load_config(parent)
    if method == 'threshold':
      model, decision_films, held_scores = None, films, parent_scores
    else:
      init_from, rate = parent, site_adapt.DEFAULT_LEARNING_RATE
      if method == 'adabn+finetune':
        model = md.load_model(parent)
        site_adapt.adabn(model, films.images)
        init_from = folder + '.adabn.keras'
        model.save(init_from)
      elif method == 'scratch':
        init_from, rate = None, 1e-3  # covidlib-train's default rate for a fresh network.
      model = site_adapt.train_on_films(
          config, folder, train_films, inner, init_from=init_from, learning_rate=rate,
          epochs=_EPOCHS.value, batch_size=site_adapt.DEFAULT_BATCH_SIZE, seed=seed,
          description=f'{len(films)} films ({method})')
      decision_films = inner if inner is not None else films
      held_scores = site.score_films(model, holdout).scores
    decision_scores = (site.score_films(model, decision_films).scores if model is not None
                       else site.score_films(md.load_model(parent), decision_films).scores)
    decision, _ = threshold.choose_decision(decision_films.labels, decision_scores, 'youden',
                                            True, 'adapt')
    called = calibration.apply_temperature(held_scores, decision.temperature) >= \
        decision.threshold
    y = holdout.labels
    shutil.rmtree(folder, ignore_errors=True)
    if os.path.exists(folder + '.adabn.keras'):
      os.remove(folder + '.adabn.keras')
    return {'roc_auc': float(metrics.roc_auc(y, held_scores)[0]),
            'sensitivity': float(called[y == 1].mean()),
            'specificity': float((~called[y == 0]).mean()), 'note': note}
  return cache.get(key, run)


def _draw(films, k, seed):
  """k films (k/2 per class) at random; the hold-out: every film of another patient."""
  import numpy as np

  rng = np.random.default_rng(seed)
  pick = np.concatenate([rng.choice(np.flatnonzero(films.labels == c), k // 2, replace=False)
                         for c in (0, 1)])
  keys = films.patient_keys()
  chosen = set(keys[pick].tolist()) - {''}
  rest = np.flatnonzero(~np.isin(keys, list(chosen)))
  rest = np.setdiff1d(rest, pick)
  return films.select(np.sort(pick)), films.select(rest)


def _covid_row(covid_dir, data_dir, cache) -> dict:
  """make main's adult COVID-19 model at a site of pediatric normals only (specificity only).

  validate and adapt need both classes, so they refuse these films (as they should); what can
  be measured is check (batches of pediatric normals), the specificity at the model's own
  operating point, and AdaBN (no labels needed) on 70% of the normals' patients, the threshold
  kept, with the specificity on the other 30%.
  """
  import numpy as np

  from covidlib import calibration
  from covidlib import metrics
  from covidlib import model_dir as md
  from covidlib import reference
  from covidlib import site
  from covidlib import site_adapt
  from covidlib import sites

  config = md.load_config(covid_dir)
  every = site.load_films('covid_xray/adult_pediatric', config, labelled=True, data_dir=data_dir)
  normals = every.select((every.metadata['site'] == 'kaggle_pediatric') & (every.labels == 0))
  adult = site.load_films('covid_xray/adult:test', config, labelled=True, data_dir=data_dir)
  out = {'n_normals': len(normals),
         'check': _check_rows(covid_dir, adult, normals, cache, 'covid_adult')}
  decision = md.load_decision(covid_dir)

  def specificity(model, films):
    p = calibration.apply_temperature(site.score_films(model, films).scores,
                                      decision.temperature)
    return metrics.proportion(int(np.sum(p < decision.threshold)), len(films),
                              'normal films').as_dict()

  def run():
    groups = site_adapt.patient_groups(normals)
    rng = np.random.default_rng(0)
    unique = np.unique(groups)
    held_groups = rng.choice(unique, size=int(round(0.3 * unique.size)), replace=False)
    held = np.isin(groups, held_groups)
    model = md.load_model(covid_dir)
    before_all = specificity(model, normals)
    before = specificity(model, normals.select(held))
    site_adapt.adabn(model, normals.select(~held).images)
    return {'all_normals': before_all, 'hold_out_before': before,
            'hold_out_after_adabn': specificity(model, normals.select(held)),
            'n_adapt': int((~held).sum()), 'n_hold_out': int(held.sum()),
            'reference': reference.load(covid_dir).split}
  out['specificity'] = cache.get('covid/specificity', run)
  del sites
  return out


# --------------------------------------------------------------------------------------------
# report


def _mean_sd(values):
  import numpy as np
  values = [v for v in values if v is not None]
  if not values:
    return '—'
  sd = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
  return f'{np.mean(values):.3f} ± {sd:.3f}'


def _fig(summary, name):
  f = summary[name]
  if f['value'] is None:
    return '—'
  low, high = f['ci95']
  return f'{f["value"]:.3f} [{low:.3f}, {high:.3f}]'


def _check_line(name, rows, part, label) -> str:
  import numpy as np
  r = rows[part]
  per_image = r['per_image']['share_flagged']
  return (f'| {name} ({rows["reference"]["n"]} {rows["reference"]["split"]} films) | {label} | '
          f'{r["n_films"]} | {r["flagged"]:.0%} of {len(r["p_values"])} | '
          f'{np.median(r["p_values"]):.3g} | {np.mean(r["domain_roc_auc"]):.3f} | '
          + ('—' if per_image is None else f'{per_image:.1%}') + ' |')


def _paired(row, method, against='scratch'):
  """mean ± sd over draws of method - against, and the draws where method is ahead."""
  import numpy as np
  a, b = np.asarray(row[method], float), np.asarray(row[against], float)
  d = a - b
  sd = float(np.std(d, ddof=1)) if d.size > 1 else 0.0
  return f'{d.mean():+.3f} ± {sd:.3f} ({int(np.sum(d > 0))} of {d.size})'


def render(results: dict) -> str:
  import numpy as np

  parts = ', '.join(f'{name} {minutes:.0f} min' for name, minutes in
                    results['part_minutes'].items())
  lines = ['# covidlib-site on real sites (issue 17)', '',
           f'Command: `{results["command"]}`. Machine: {results["machine"]}. Date: '
           f'{results["date"]}. Wall time of this invocation {results["wall_minutes"]:.0f} min '
           f'(load average {results["load_average"][0]:.1f} at its start, '
           f'{results["load_average"][1]:.1f} at its end); every run it reports (most cached '
           f'from earlier invocations, resumed after interruptions) took '
           f'{results["compute_minutes"]:.0f} min: {parts}.', '']
  if 'check' in results:
    lines += ['## check: batches of 50 films against the model\'s reference', '',
              '| model (reference) | batches from | films | batches flagged | median p | '
              'mean domain ROC-AUC | films flagged one by one (the model\'s shift score) |',
              '|---|---|---|---|---|---|---|']
    for name, rows in results['check'].items():
      for part, label in (('other', 'the other site (every split)'),
                          ('own', 'its own test split')):
        lines.append(_check_line(name, rows, part, label))
    lines += ['', 'Batches flagged: combined p-value < 0.01 (1000 permutations, min-p over the '
              'taps). Films flagged one by one: the multi-depth shift score of each model_dir '
              '(covidlib-fit-shift), threshold `quantile:0.99` of its validation split, over '
              'every film of the row.', '']
  if 'matrix' in results:
    lines += ['## Across sites: each method, hold-out figures before and after', '',
              '| direction | method | adapt / hold-out films | ROC-AUC before → after | '
              'sensitivity before → after | specificity before → after | adapted verdict |',
              '|---|---|---|---|---|---|---|']
    for key, r in results['matrix'].items():
      direction, method = key.split('/')[1:3]
      lines.append(
          f'| {direction} | {method} | {r["n_adapt"]} / {r["n_hold_out"]} | '
          + ' | '.join(f'{_fig(r["parent"], n)} → {_fig(r["adapted"], n)}'
                       for n in ('roc_auc', 'sensitivity', 'specificity'))
          + f' | {r["adapted"]["result"]} |')
    lines.append('')
  if 'curve' in results:
    curve = results['curve']
    methods = curve['methods']
    lines += ['## Learning curve NIH → Guangzhou: hold-out ROC-AUC, mean ± sd over draws', '',
              '| k labelled local films | draws | hold-out films | NIH model unadapted | '
              + ' | '.join(methods) + ' |', '|---|---|---|---|' + '---|' * len(methods)]
    for k, row in curve['rows'].items():
      lines.append(f'| {k} | {row["draws"]} | {row["hold_out"]} | {_mean_sd(row["parent"])} | '
                   + ' | '.join(_mean_sd(row[m]) for m in methods) + ' |')
    lines.append('')
    ahead = [m for m in methods if m not in ('scratch', 'threshold')]
    if 'scratch' in methods and ahead:
      lines += ['Ahead of from-scratch on the same films: hold-out ROC-AUC difference per draw '
                '(same k films, same hold-out), mean ± sd, and the draws where it is ahead:', '',
                '| k | ' + ' | '.join(f'{m} − scratch' for m in ahead) + ' |',
                '|---|' + '---|' * len(ahead)]
      for k, row in curve['rows'].items():
        lines.append(f'| {k} | ' + ' | '.join(_paired(row, m) for m in ahead) + ' |')
      lines.append('')
    lines += ['Sensitivity / specificity on the hold-out at the threshold each method chose '
              '(youden, on the inner validation, or on the k films when there is none), mean '
              'over draws:', '', '| k | ' + ' | '.join(methods) + ' |',
              '|---|' + '---|' * len(methods)]
    for k, row in curve['rows'].items():
      lines.append(f'| {k} | ' + ' | '.join(
          f'{np.mean(row["sensitivity"][m]):.3f} / {np.mean(row["specificity"][m]):.3f}'
          for m in methods) + ' |')
    lines.append('')
  if results.get('covid'):
    c = results['covid']
    spec = c['specificity']
    lines += ['## make main\'s covid_xray/adult model at a site of pediatric normals', '',
              f'{c["n_normals"]} pediatric normals of covid_xray/adult_pediatric (source '
              'kaggle_pediatric, every split); normals only, so validate and adapt refuse them '
              '(one class) and only specificity can be measured, at the model\'s own operating '
              'point (Wilson intervals, films).', '',
              '| what | films | specificity [95%] |', '|---|---|---|',
              f'| every pediatric normal, unadapted | {c["n_normals"]} | '
              f'{_fig(spec, "all_normals")} |',
              f'| hold-out (30% of patients), unadapted | {spec["n_hold_out"]} | '
              f'{_fig(spec, "hold_out_before")} |',
              f'| hold-out, after AdaBN on the other {spec["n_adapt"]} normals (threshold kept) | '
              f'{spec["n_hold_out"]} | {_fig(spec, "hold_out_after_adabn")} |', '']
    lines += ['check, batches of 50 films:', '',
              '| model (reference) | batches from | films | batches flagged | median p | '
              'mean domain ROC-AUC | films flagged one by one (the model\'s shift score) |',
              '|---|---|---|---|---|---|---|']
    for part, label in (('other', 'pediatric normals'), ('own', 'its own test split')):
      lines.append(_check_line('covid_xray/adult model', c['check'], part, label))
    lines.append('')
  return '\n'.join(lines)


def main(argv):
  del argv
  import numpy as np

  start = time.time()
  os.makedirs(_WORK.value, exist_ok=True)
  cache = Cache(os.path.join(_WORK.value, 'runs.json'))
  data_dir = _DATA_DIR.value
  if set(_PARTS.value) & {'check', 'matrix', 'curve'}:
    gz = _films(GZ_DATA, _NIH.value, data_dir)
    nih = _films(NIH_DATA, _NIH.value, data_dir)
    print(f'films: Guangzhou {len(gz)}, NIH {len(nih)}', flush=True)
  results = {'command': 'nice -n 10 .venv/bin/python benchmarks/sites.py ' + ' '.join(
                 a for a in sys.argv[1:]),
             'machine': _MACHINE.value, 'date': time.strftime('%Y-%m-%d'),
             'load_average': [os.getloadavg()[0]]}
  if 'check' in _PARTS.value:
    results['check'] = {
        'NIH model': _check_rows(_NIH.value, nih.select(nih.metadata['split'] == 'test'), gz,
                                 cache, 'nih'),
        'Guangzhou model': _check_rows(_GZ.value, gz.select(gz.metadata['split'] == 'test'),
                                       nih, cache, 'guangzhou')}
  if 'matrix' in _PARTS.value:
    results['matrix'] = {}
    for direction, parent, films in (('nih->guangzhou', _NIH.value, gz),
                                     ('guangzhou->nih', _GZ.value, nih)):
      for method in ('threshold', 'adabn', 'finetune', 'adabn+finetune'):
        key = f'matrix/{direction}/{method}'
        results['matrix'][key] = _adapt(parent, films, method, _WORK.value, key, cache, seed=0)
  if 'curve' in _PARTS.value:
    from covidlib import metrics
    from covidlib import model_dir as md
    from covidlib import site
    methods = list(_CURVE_METHODS.value)
    ks = [int(k) for k in _KS.value]
    parent_model = md.load_model(_NIH.value)
    rows = {k: {**{m: [] for m in methods + ['parent']}, 'draws': 0, 'hold_out': [],
                'sensitivity': {m: [] for m in methods},
                'specificity': {m: [] for m in methods}} for k in ks}
    for d in range(_DRAWS.value):  # Draws outermost: a cut-short run still has every k.
      for k in ks:
        seed = 1000 * k + d
        adapt_films, holdout = _draw(gz, k, seed)
        parent_scores = None
        row = rows[k]
        for method in methods:
          key = f'curve/k{k}/d{d}/{method}'
          if key not in cache.runs and parent_scores is None:
            parent_scores = site.score_films(parent_model, holdout).scores
          r = _curve_run(_NIH.value, adapt_films, holdout, parent_scores, method, _WORK.value,
                         key, cache, seed)
          row[method].append(r['roc_auc'])
          row['sensitivity'][method].append(r['sensitivity'])
          row['specificity'][method].append(r['specificity'])

        def parent_auc(holdout=holdout, scores=parent_scores):
          if scores is None:
            scores = site.score_films(parent_model, holdout).scores
          return {'roc_auc': float(metrics.roc_auc(holdout.labels, scores)[0])}
        row['parent'].append(cache.get(f'curve/k{k}/d{d}/parent', parent_auc)['roc_auc'])
        row['draws'] += 1
        row['hold_out'].append(len(holdout))
    for row in rows.values():
      row['hold_out'] = f'{min(row["hold_out"])}-{max(row["hold_out"])}'
    results['curve'] = {'methods': methods, 'rows': rows}
  if 'covid' in _PARTS.value and _COVID.value:
    results['covid'] = _covid_row(_COVID.value, data_dir, cache)
  results['wall_minutes'] = (time.time() - start) / 60
  results['load_average'].append(os.getloadavg()[0])
  reported = {k: r for k, r in cache.runs.items() if k.split('/')[0] in _PARTS.value
              or (k.startswith('check/covid_adult') and 'covid' in _PARTS.value)}
  results['compute_minutes'] = sum(r.get('seconds', 0) for r in reported.values()) / 60
  results['part_minutes'] = {}
  for part in _PARTS.value:
    keys = [k for k in reported if (k.split('/')[0] == part and 'covid_adult' not in k)
            or (part == 'covid' and 'covid_adult' in k)]
    results['part_minutes'][part] = sum(reported[k].get('seconds', 0) for k in keys) / 60
  results['runs'] = cache.runs
  os.makedirs(os.path.dirname(_OUT.value) or '.', exist_ok=True)
  with open(_OUT.value + '.json', 'w') as f:
    json.dump(results, f, indent=1, default=float)
  with open(_OUT.value + '.md', 'w') as f:
    f.write(render(results))
  print(render(results))
  del np


if __name__ == '__main__':
  app.run(main)
