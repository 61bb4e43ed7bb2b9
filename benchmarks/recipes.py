"""Training recipes and networks on the same-site sets, over seeds (issue 18).

    make same-site        # builds labelled_xrays/nih_pneumonia and guangzhou_pneumonia
    nice -n 10 .venv/bin/python benchmarks/recipes.py --data_dir=tfds_data --image_size=128 \\
        --epochs=30 --seeds=0,1,2 --out=runs/recipes

Rows (each trained once per seed with `covidlib.train.train`, the library covidlib-train runs):
  today            compact_resnet, the recipe before issue 18 (Adam 1e-3 constant, keep=best)
  new              compact_resnet with NEW below (AdamW, cosine with warm-up, label smoothing,
                   EMA, mixup)
  new - X          NEW without one part (the ablation that says which parts earn their place);
                   NIH only
  steady           STEADY below: NEW without mixup, label smoothing and weight decay
  new + tta        the `new` models flip-averaged (covidlib.ensemble.flip_average): no training
  new: ensemble    the `new` models of all seeds averaged into one model (write_ensemble)
  init_from        NEW started from the other site's `new` model of seed 0
  new, 60 epochs   NEW trained twice as long (NIH): is the recipe short of epochs?
  adult            today, new and steady on covid_xray/adult at make main's settings (224 px,
                   --adult_epochs, compact_resnet): which recipe should make main default to?
  BACKBONE         each keras.applications backbone covidlib offers, from scratch, NEW; two
                   epochs are timed before the row is committed (--backbone_budget_s)
Each model is scored on its site's test split: ROC-AUC with a 1,000-resample bootstrap interval
and, where the dataset records the view (NIH), within AP and within PA films
(`covidlib.confounds`); covid_xray/adult models on its test split (as make main evaluates) and
its COVID-19 films against every film of covid_xray/other_findings (the same ieee8023 source:
does the model see COVID-19, or the source?);
NIH-trained models also on every Guangzhou film (cross-site). Seconds
per epoch: the median wall time of an epoch, validation included, the first (tracing, filling
the input cache) left out (rows trained before the timer existed: train() wall time over the
epochs; the machine is shared: see load_average in results.json). "val ROC-AUC swing": max - min
of validation ROC-AUC over the last 5 epochs (how much the run still moves where it stops).

Every row starts from covidlib.train.PLAIN_RECIPE (the recipe before issue 18) and sets its own
parts on top, so a row means the same whatever covidlib.train.DEFAULT_CONFIG is.

    make dataset  # covid_xray/{adult,adult_pediatric,other_findings}
    nice -n 10 .venv/bin/python benchmarks/recipes.py --data_dir=tfds_data --rows=adult \\
        --seeds=0,1,2,3,4

Finished model_dirs are reused and an interrupted run resumes (covidlib.train), so the
benchmark started again goes on where it stopped; scores are cached in --out/scores/; rows of
earlier invocations (other --rows) stay in the table. Writes --out/results.json and
--out/results.md, and copies both to benchmarks/results/recipes.{json,md}.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import shutil
import statistics
import sys
import time

from absl import app
from absl import flags

_DATA_DIR = flags.DEFINE_string('data_dir', 'tfds_data', 'TFDS data_dir holding both sets.')
_SEEDS = flags.DEFINE_list('seeds', ['0', '1', '2'], 'Training seeds.')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 128, 'Model input size.')
_EPOCHS = flags.DEFINE_integer('epochs', 30, 'Epochs per run.')
_OUT = flags.DEFINE_string('out', 'runs/recipes', 'Where the model_dirs and results go.')
_ROWS = flags.DEFINE_list('rows', ['all'], 'Row groups to run: today, new, init_from, ablation, '
                          'steady, backbones, long, or all.')
_BACKBONE_BUDGET_S = flags.DEFINE_float(
    'backbone_budget_s', 1800.0, 'A backbone row runs all seeds only if its timed epoch x '
    'epochs x seeds fits in this many seconds; else fewer seeds, then fewer epochs.')
_ABLATIONS = flags.DEFINE_list(
    'ablations', ['cosine', 'ema', 'mixup', 'label_smoothing', 'adamw'],
    'The parts of NEW the ablation rows leave out, one row each.')
_BACKBONE_MIN_EPOCHS = flags.DEFINE_integer(
    'backbone_min_epochs', 10, 'A backbone row cut below this many epochs is not run: a '
    'network trained from scratch for fewer says nothing about the recipe.')
_BACKBONE_EPOCH_SECONDS = flags.DEFINE_list(
    'backbone_epoch_seconds', [], 'NAME:SECONDS per epoch already measured here (e.g. by '
    'benchmarks/backbones.py): no timing run for those.')
_ADULT_EPOCHS = flags.DEFINE_integer('adult_epochs', 30, 'Epochs of the adult rows (make main: '
                                     '30).')
_RESULTS = flags.DEFINE_string('results', 'benchmarks/results', 'Where recipes.{md,json} go.')

NIH = 'labelled_xrays/nih_pneumonia'
GUANGZHOU = 'labelled_xrays/guangzhou_pneumonia'
SITES = {'nih': NIH, 'guangzhou': GUANGZHOU}
ADULT = 'covid_xray/adult'  # make main's dataset (built by `make dataset`).
OTHER_FINDINGS = 'covid_xray/other_findings'  # ieee8023's other findings: label 0, not COVID-19.
DATASETS = {**SITES, 'covid_adult': ADULT}
NEW = dict(weight_decay=0.05, lr_schedule='cosine', warmup_epochs=2, label_smoothing=0.1,
           ema=0.99, mixup=0.2)
ABLATIONS = {  # The NEW config without one part.
    'cosine': dict(lr_schedule='constant', warmup_epochs=0),
    'ema': dict(ema=0.0),
    'mixup': dict(mixup=0.0),
    'label_smoothing': dict(label_smoothing=0.0),
    'adamw': dict(weight_decay=0.0),
}
# The parts of NEW that steady the end of a run (see BENCHMARKS.md), without mixup, label
# smoothing and weight decay: the candidate default.
STEADY = dict(lr_schedule='cosine', warmup_epochs=2, ema=0.99)
BACKBONES = ('mobilenetv3small', 'efficientnetv2b0', 'densenet121', 'resnet50v2')


def _out(*parts: str) -> str:
  return os.path.join(_OUT.value, *parts)


def _train(site: str, name: str, seed: int, overrides: dict, epochs: int | None = None) -> dict:
  """Trains (or reuses) one model_dir; returns its record (dir, seconds per epoch)."""
  import keras
  from covidlib import model_dir as md
  from covidlib import train

  model_dir = _out(site, f'{name}_seed{seed}')
  config = train.make_config(
      **{'model': 'compact_resnet', 'dataset': DATASETS[site], 'data_dir': _DATA_DIR.value,
         'image_size': _IMAGE_SIZE.value, 'epochs': epochs or _EPOCHS.value, 'seed': seed,
         **train.PLAIN_RECIPE, **overrides})
  timing_path = os.path.join(model_dir, 'benchmark_timing.json')
  if os.path.exists(os.path.join(model_dir, md.MODEL)) and os.path.exists(timing_path):
    return {**md.read_json(timing_path), 'model_dir': model_dir}
  class EpochTimer(keras.callbacks.Callback):
    def __init__(self):
      super().__init__()
      self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
      self.start = time.time()

    def on_epoch_end(self, epoch, logs=None):
      self.seconds.append(time.time() - self.start)

  timer = EpochTimer()
  load_before = os.getloadavg()[0]
  start = time.time()
  history = train.train(config, model_dir, verbose=0, callbacks=[timer])
  seconds = time.time() - start
  # An epoch's wall time, validation included; the first (tracing, filling the cache) left out
  # when there are others.
  steady = timer.seconds[1:] or timer.seconds
  timing = {'train_seconds': round(seconds, 1), 'epochs_run': len(history['loss']),
            'seconds_per_epoch': round(statistics.median(steady), 2),
            'first_epoch_seconds': round(timer.seconds[0], 2) if timer.seconds else None,
            'load_average': [round(load_before, 1), round(os.getloadavg()[0], 1)],
            'kept_epoch': history['kept_epoch']}
  md.write_json(timing_path, timing)
  keras.backend.clear_session()
  gc.collect()
  print(f'  trained {model_dir}: {timing}', flush=True)
  return {**timing, 'model_dir': model_dir}


def _auc(labels, scores) -> dict:
  from covidlib import metrics
  return metrics.compute_metrics(labels, scores, 0.5, n_bootstrap=1000,
                                 seed=0).figures['roc_auc'].as_dict()


def _score(key: str, model_dir: str, transform: str = 'none') -> dict:
  """Test ROC-AUC (overall, within each view) and the cross-site AUC of NIH models; cached."""
  import keras
  from covidlib import confounds
  from covidlib import ensemble
  from covidlib import model_dir as md
  from covidlib import scoring
  from covidlib import shortcuts

  path = _out('scores', f'{key}.json')
  if os.path.exists(path):
    return md.read_json(path)
  config = md.load_config(model_dir)
  model = md.load_model(model_dir)
  if transform == 'flip':
    model = ensemble.flip_average(model)
  dataset, _ = scoring.load_split(config, 'test', cache=False)
  scored = scoring.score_dataset(model, dataset, features=False)
  result = {'test': _auc(scored.labels, scored.scores)}
  views = scored.metadata.get('view')
  if views is not None and any(views):
    within = confounds.confound_section(scored.labels, scored.scores, {'view': views},
                                        n_bootstrap=1000)['view']['within']
    result['views'] = {v: w['roc_auc'] for v, w in within.items() if v in ('AP', 'PA')}
  if config['dataset'] == NIH:
    other = scoring.score_every_split(model, config, GUANGZHOU, _DATA_DIR.value,
                                      keep_images=False)
    result['cross_site'] = _auc(other.labels, other.scores)
  if config['dataset'] == ADULT:  # The test COVID-19 films against other findings, same source.
    other = scoring.score_every_split(model, config, OTHER_FINDINGS, _DATA_DIR.value,
                                      keep_images=False)
    within = shortcuts.within_source(scored, other, n_bootstrap=1000)
    result['vs_other_findings'] = within['ieee8023: COVID-19 vs other findings']['roc_auc']
  md.write_json(path, result)
  keras.backend.clear_session()
  gc.collect()
  return result


def _mean_sd(values: list[float]) -> tuple[float, float]:
  mean = statistics.fmean(values)
  return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def _row(label: str, site: str, runs: list[dict], scores: list[dict], note: str = '') -> dict:
  row = {'row': label, 'site': site, 'n': len(scores), 'note': note,
         'runs': [{**r, **s} for r, s in zip(runs, scores)] if runs else scores}
  for key in ('test', 'cross_site', 'vs_other_findings'):
    values = [s[key]['value'] for s in scores if key in s]
    if values:
      row[key] = _mean_sd(values)
  for view in ('AP', 'PA'):
    values = [s['views'][view]['value'] for s in scores if view in s.get('views', {})]
    if values:
      row[view] = _mean_sd(values)
  per_epoch = [r['seconds_per_epoch'] for r in runs if r.get('seconds_per_epoch')]
  if per_epoch:
    row['seconds_per_epoch'] = _mean_sd(per_epoch)
  swings = [_swing(r['model_dir']) for r in runs]
  if swings:
    row['val_swing'] = _mean_sd(swings)
  return row


def _swing(model_dir: str, last: int = 5) -> float:
  """How much validation ROC-AUC still moves at the end: max - min over the last epochs."""
  with open(os.path.join(model_dir, 'history.json')) as f:
    values = json.load(f)['val_auc'][-last:]
  return max(values) - min(values)


def _recipe_rows(site: str, name: str, overrides: dict, seeds: list[int],
                 label: str | None = None, epochs: int | None = None,
                 note: str = '') -> tuple[dict, list[dict]]:
  runs = [_train(site, name, s, overrides, epochs) for s in seeds]
  scores = [_score(f'{site}_{name}_seed{s}', r['model_dir']) for s, r in zip(seeds, runs)]
  return _row(label or name, site, runs, scores, note), runs


def _epoch_seconds(site: str, model: str) -> float:
  """Wall seconds of the second epoch of `model` (NEW recipe), trained into a scratch model_dir
  (the first traces the model and fills the input cache)."""
  probe = _train(site, f'probe_{model}', 0, {**NEW, 'model': model}, epochs=2)
  return probe['seconds_per_epoch']


def main(argv):
  del argv
  from covidlib import ensemble
  from covidlib import models

  groups = set(_ROWS.value)
  run_all = 'all' in groups
  seeds = [int(s) for s in _SEEDS.value]
  os.makedirs(_out('scores'), exist_ok=True)
  rows = []
  started = time.time()

  # Rows of earlier invocations (other --rows) stay, unless this one measures them again.
  # From --out, else from the committed results (a fresh clone has no runs/).
  previous = []
  for path in (_out('results.json'), os.path.join(_RESULTS.value, 'recipes.json')):
    if os.path.exists(path):
      with open(path) as f:
        previous = json.load(f)['rows']
      break

  def save():
    machine = f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores'
    measured = {(r['site'], r['row']) for r in rows}
    kept = [r for r in previous if (r['site'], r['row']) not in measured]
    result = {'image_size': _IMAGE_SIZE.value, 'epochs': _EPOCHS.value, 'seeds': seeds,
              'new_recipe': NEW, 'machine': machine, 'wall_seconds': round(time.time() - started),
              'rows': kept + rows}
    with open(_out('results.json'), 'w') as f:
      json.dump(result, f, indent=2)
    table = _markdown(kept + rows)
    with open(_out('results.md'), 'w') as f:
      f.write(table)
    os.makedirs(_RESULTS.value, exist_ok=True)
    shutil.copyfile(_out('results.json'), os.path.join(_RESULTS.value, 'recipes.json'))
    shutil.copyfile(_out('results.md'), os.path.join(_RESULTS.value, 'recipes.md'))
    return table

  new_runs = {}
  for site in SITES:
    if run_all or 'today' in groups:
      rows.append(_recipe_rows(site, 'today', {}, seeds)[0])
      save()
    if run_all or 'new' in groups:
      row, runs = _recipe_rows(site, 'new', NEW, seeds)
      rows.append(row)
      new_runs[site] = runs
      flip = [_score(f'{site}_new_seed{s}_flip', r['model_dir'], 'flip')
              for s, r in zip(seeds, runs)]
      rows.append(_row('new + tta flip', site, [], flip))
      ensemble_dir = _out(site, 'new_ensemble')
      if not os.path.exists(os.path.join(ensemble_dir, 'model.keras')):
        ensemble.write_ensemble([r['model_dir'] for r in runs], ensemble_dir)
      rows.append(_row(f'new: ensemble of {len(seeds)} seeds', site, [],
                       [_score(f'{site}_new_ensemble', ensemble_dir)]))
      save()
  if run_all or 'init_from' in groups:
    for site, other in (('nih', 'guangzhou'), ('guangzhou', 'nih')):
      source = _out(other, 'new_seed0')
      rows.append(_recipe_rows(site, 'new_init_from_other', {**NEW, 'init_from': source}, seeds,
                               label=f'new, init_from {other} new seed 0')[0])
      save()
  if run_all or 'ablation' in groups:
    for part in _ABLATIONS.value:
      change = ABLATIONS[part]
      rows.append(_recipe_rows('nih', f'new_without_{part}', {**NEW, **change}, seeds,
                               label=f'new - {part}')[0])
      save()
  if run_all or 'steady' in groups:
    for site in SITES:
      rows.append(_recipe_rows(site, 'steady', STEADY, seeds,
                               label='steady: cosine + warm-up + EMA')[0])
      save()
  if run_all or 'adult' in groups:  # make main's dataset, image size and epochs.
    adult = {'image_size': 224}
    note = f'{adult["image_size"]} px, {_ADULT_EPOCHS.value} epochs (make main)'
    for name, recipe, label in (('today', {}, 'today'), ('new', NEW, 'new'),
                                ('steady', STEADY, 'steady: cosine + warm-up + EMA')):
      rows.append(_recipe_rows('covid_adult', name, {**recipe, **adult}, seeds, label=label,
                               epochs=_ADULT_EPOCHS.value, note=note)[0])
      save()
  if run_all or 'backbones' in groups:
    for backbone in BACKBONES:
      if backbone not in models.MODELS:
        rows.append({'row': backbone, 'site': 'nih', 'n': 0,
                     'note': 'not measured: not a covidlib model in this build'})
        continue
      known = dict(item.split(':') for item in _BACKBONE_EPOCH_SECONDS.value)
      per_epoch = float(known[backbone]) if backbone in known else _epoch_seconds('nih', backbone)
      budget = _BACKBONE_BUDGET_S.value
      n_seeds, epochs = len(seeds), _EPOCHS.value
      while n_seeds > 1 and per_epoch * epochs * n_seeds > budget:
        n_seeds -= 1
      while epochs > 0 and per_epoch * epochs * n_seeds > budget:
        epochs -= 5  # In steps of 5 epochs.
      if epochs < _BACKBONE_MIN_EPOCHS.value:
        rows.append({'row': f'{backbone}, new', 'site': 'nih', 'n': 0,
                     'note': f'not measured ({per_epoch:.0f} s/epoch here: '
                             f'{_EPOCHS.value} epochs x {len(seeds)} seeds = '
                             f'{per_epoch * _EPOCHS.value * len(seeds) / 3600:.1f} h)'})
        save()
        continue
      cut = []
      if n_seeds < len(seeds):
        cut.append(f'{n_seeds} seed{"s" if n_seeds > 1 else ""}')
      if epochs < _EPOCHS.value:
        cut.append(f'{epochs} epochs')
      note = f'cut to {" and ".join(cut)} ({per_epoch:.0f} s/epoch)' if cut else ''
      rows.append(_recipe_rows('nih', f'{backbone}_new', {**NEW, 'model': backbone},
                               seeds[:n_seeds], label=f'{backbone}, new', epochs=epochs,
                               note=note)[0])
      save()
  if run_all or 'long' in groups:  # Is the NEW recipe short of epochs? Twice as many, NIH.
    rows.append(_recipe_rows('nih', 'new_60_epochs', NEW, seeds, label='new, 60 epochs',
                             epochs=2 * _EPOCHS.value)[0])
    save()
  sys.stdout.write(save())


def _fmt(pair, digits: int = 3) -> str:
  return '—' if pair is None else f'{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}'


def _markdown(rows: list[dict]) -> str:
  out = ['| site | row | n | test ROC-AUC | within AP | within PA | cross-site (all Guangzhou) '
         '| COVID-19 vs other findings (covid_adult) | val ROC-AUC swing, last 5 epochs '
         '| s/epoch | note |',
         '|---|---|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    out.append(f'| {r["site"]} | {r["row"]} | {r["n"]} | {_fmt(r.get("test"))} | '
               f'{_fmt(r.get("AP"))} | {_fmt(r.get("PA"))} | {_fmt(r.get("cross_site"))} | '
               f'{_fmt(r.get("vs_other_findings"))} | '
               f'{_fmt(r.get("val_swing"))} | {_fmt(r.get("seconds_per_epoch"), 1)} | '
               f'{r.get("note", "")} |')
  return '\n'.join(out) + '\n'


if __name__ == '__main__':
  app.run(main)
