"""Adapting a model to a new site on a few labelled local films, and proving it on others.

    from covidlib import site, site_adapt
    films = site.load_films('newsite/labels.csv', config, labelled=True)
    report = site_adapt.adapt('runs/mysite', 'runs/mysite_at_newsite', films,
                              method='finetune', site_name='newsite')
    report['hold_out']['parent']['verdict'], report['hold_out']['adapted']['verdict']

or `covidlib-site adapt --model_dir=runs/mysite --films=newsite/labels.csv --method=finetune
--new_model_dir=runs/mysite_at_newsite` (covidlib/cli/site.py).

The local films are split by patient (and near-duplicate image, as covidlib.crossval groups
them) into an adapt part and a hold-out (`holdout_fraction`, default 0.3, seeded), unless the
hold-out is given: `holdout` films, or a labels CSV's `split` column (rows `test` are the
hold-out). A given hold-out that shares a patient with the adapt part is refused. The hold-out
is never looked at until both models are validated on it.

Methods, on the adapt part:
  threshold       re-choose the temperature and the threshold (`threshold_policy`, default
                  youden; covidlib.threshold.choose_decision); the network is the parent's.
  adabn           re-estimate every BatchNorm layer's moving mean and variance on the adapt
                  films, labels unused (AdaBN, Li et al. 2018), layer by layer in network order
                  so each sees the statistics already re-estimated before it; then threshold.
  finetune        train from the parent's weights (covidlib.train, config `init_from`) at a
                  small learning rate (1e-4) for `epochs` (15; an epoch is at least
                  MIN_STEPS_PER_EPOCH batches, the films repeated), keeping the epoch with the best
                  ROC-AUC on an inner validation split of the adapt part (by patient, 25%),
                  then threshold and temperature on that inner validation. When the adapt part
                  is too small for one (fewer than MIN_INNER_PER_CLASS films of a class would
                  land there) it trains on every adapt film for the fixed number of epochs,
                  keeps the last, chooses threshold and temperature on the adapt films
                  themselves (optimistic: the model has seen them) and says so.
  adabn+finetune  adabn, then finetune from those weights.

The new model_dir (never the parent, never over an existing folder: it is built in a hidden
folder beside it and renamed into place when complete) holds model.keras, config.json,
decision.json, a shift score and a reference of the site (covidlib.shift_fit, fitted on the
adapt films, threshold and reference on the inner validation: `check` then compares later
batches with this site, and the per-image flag knows its films), and lineage.json: the parent model_dir (and its model.keras's
sha256), site, method, the number of films and patients, the patients' pseudonyms only
(covidlib_tfds.privacy, the builder's salted hash; raw ids never leave memory), and the figures
of the parent and the adapted model on the same hold-out (covidlib.site.validation_figures),
which the model card and exports repeat as "adapted at SITE on n films; validated on m films".
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import tempfile
from typing import Mapping

import keras
import numpy as np
import tensorflow as tf

import covidlib
from covidlib import crossval
from covidlib import errors
from covidlib import metrics
from covidlib import model_dir as md
from covidlib import shift_fit
from covidlib import site as site_lib
from covidlib import sites
from covidlib import threshold as threshold_lib
from covidlib import train as train_lib
from covidlib.site import Films
from covidlib_tfds import privacy

log = logging.getLogger(__name__)

METHODS = ('threshold', 'finetune', 'adabn', 'adabn+finetune')
ADAPT_JSON, ADAPT_MD = 'adapt.json', 'adapt.md'
DEFAULT_EPOCHS = 15
DEFAULT_LEARNING_RATE = 1e-4
DEFAULT_BATCH_SIZE = 16
INNER_FRACTION = 0.25
MIN_INNER_PER_CLASS = 5
# An epoch of fine-tuning is at least this many batches: 20 films at batch 16 would otherwise
# make 2 steps an epoch, 30 in 15 epochs, too few at a small learning rate to move anything. The
# films are repeated within the epoch (reshuffled, and augmented inside the training model).
MIN_STEPS_PER_EPOCH = 10


# --------------------------------------------------------------------------------------------
# The pieces: split, AdaBN, training on films, the decision.
# --------------------------------------------------------------------------------------------


def patient_groups(films: Films) -> np.ndarray:
  """One group per patient (site + id; without an id, the series of the file name) or set of
  near-duplicate films, as covidlib.crossval groups them."""
  pool = crossval.Pool(films.images, films.labels,
                       {'patient_id': films.metadata['patient_id'],
                        'source': films.metadata['site'], 'filename': films.metadata['filename']})
  return crossval.patient_groups(pool)


def split_films(films: Films, holdout: Films | None, holdout_fraction: float, seed: int,
                salt: str | None = None) -> tuple[Films, Films, str]:
  """(adapt part, hold-out, how the hold-out was chosen).

  Raises:
    UsageError: a given hold-out sharing patients with the adapt part.
  """
  if holdout is None and np.any(films.metadata['split'] == 'test') and \
      not films.pseudonymised:  # A labels CSV with a split column: its test rows.
    is_test = films.metadata['split'] == 'test'
    holdout, films = films.select(is_test), films.select(~is_test)
    how = "the labels CSV's split column (rows 'test')"
  elif holdout is not None:
    how = f'given: {holdout.description}'
  else:
    adapt_idx, held_idx = sites.split_by_patient(films.labels, patient_groups(films),
                                                 holdout_fraction, seed)
    return (films.select(adapt_idx), films.select(held_idx),
            f'by patient, {holdout_fraction:g} of each class\'s patients, seed {seed}')
  if films.pseudonymised == holdout.pseudonymised:
    shared = sites.shared_patients(films.patient_keys(), holdout.patient_keys())
  else:  # A CSV's raw ids against a dataset's pseudonyms: compare pseudonyms.
    salt = privacy.resolve_salt(salt)
    shared = sites.shared_patients(films.hashed_patients(salt), holdout.hashed_patients(salt))
  if shared:
    raise errors.UsageError(f'the hold-out shares {len(shared)} patients with the adapt part '
                            f'({how}): a hold-out must hold other patients only')
  return films, holdout, how


def adabn(model: keras.Model, images: np.ndarray, batch_size: int = 32) -> int:
  """Sets every BatchNormalization layer's moving mean and variance to those of its inputs over
  `images`, in network order. Returns the number of layers re-estimated."""
  layers = [l for l in model.layers if isinstance(l, keras.layers.BatchNormalization)]
  for layer in layers:
    probe = keras.Model(model.input, layer.input)  # Sees the layers re-estimated before it.
    total, squares, count = 0.0, 0.0, 0
    for i in range(0, len(images), batch_size):
      a = np.asarray(probe(images[i:i + batch_size], training=False), np.float64)
      axes = tuple(range(a.ndim - 1))
      total = total + a.sum(axis=axes)
      squares = squares + (a * a).sum(axis=axes)
      count += int(np.prod([a.shape[k] for k in axes]))
    mean = total / count
    layer.moving_mean.assign(mean.astype(np.float32))
    layer.moving_variance.assign(np.maximum(squares / count - mean * mean, 0.0).astype(np.float32))
  return len(layers)


def _dataset(films: Films, batch_size: int, seed: int | None, shuffle: bool,
             min_steps: int = 1) -> tf.data.Dataset:
  """Batches of the films; with `min_steps`, the films repeated (each pass reshuffled) so an
  epoch holds at least that many batches."""
  ds = tf.data.Dataset.from_tensor_slices((films.images, films.labels.astype(np.float32)))
  repeats = max(1, -(-min_steps * batch_size // len(films)))
  if shuffle:
    ds = ds.shuffle(len(films), seed=seed, reshuffle_each_iteration=True)
  return ds.repeat(repeats).batch(batch_size).prefetch(tf.data.AUTOTUNE)


def inner_split(films: Films, seed: int) -> tuple[Films, Films | None, str]:
  """(films to train on, inner validation or None, what was done) for finetune's best epoch."""
  counts = np.bincount(films.labels, minlength=2)
  if min(counts) * INNER_FRACTION < MIN_INNER_PER_CLASS:
    return films, None, (
        f'adapt part too small for an inner validation ({counts[1]} positive, {counts[0]} '
        f'negative films; an inner validation of {INNER_FRACTION:g} needs '
        f'{int(np.ceil(MIN_INNER_PER_CLASS / INNER_FRACTION))} of each class): trained on every '
        'adapt film for the fixed number of epochs and kept the last; threshold and temperature '
        'chosen on the adapt films themselves, which the model has seen (optimistic)')
  train_idx, val_idx = sites.split_by_patient(films.labels, patient_groups(films),
                                              INNER_FRACTION, seed + 1)
  return films.select(train_idx), films.select(val_idx), (
      f'best epoch by ROC-AUC on an inner validation of {len(val_idx)} adapt films (by '
      f'patient); threshold and temperature chosen there')


def train_on_films(config: dict, work_dir: str, train: Films, validation: Films | None, *,
                   init_from: str | None, learning_rate: float, epochs: int, batch_size: int,
                   seed: int, description: str, verbose: int = 0) -> keras.Model:
  """covidlib.train on in-memory films (fresh, or from `init_from`'s weights); the model kept.

  The recipe is the plain one (Adam at a constant rate, no smoothing, mixup or weight average),
  not covidlib-train's default, whatever the parent was trained with: it is what
  benchmarks/sites.py measured, and a moving average of the weights over the few hundred steps
  of a site's films would hold the model near its starting point.
  """
  keys = ('model', 'image_size', 'channels', 'class_names', 'class_weight', 'crop', 'equalize',
          'augment_preset', 'augment', 'mixed_precision', 'jit_compile', 'strategy')
  run_config = train_lib.make_config(
      **{k: config[k] for k in keys if k in config}, dataset=description, data_dir=None,
      init_from=init_from, learning_rate=float(learning_rate), epochs=int(epochs),
      batch_size=int(batch_size), seed=int(seed),
      validation_split='validation' if validation is not None else '',
      keep='best' if validation is not None else 'last', **train_lib.PLAIN_RECIPE)
  train_lib.train(run_config, work_dir,
                  train_data=_dataset(train, batch_size, seed, True, MIN_STEPS_PER_EPOCH),
                  validation_data=None if validation is None else _dataset(validation,
                                                                           batch_size, seed,
                                                                           False),
                  overwrite=True, verbose=verbose)
  return md.load_model(work_dir)


def sha256_file(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# adapt.
# --------------------------------------------------------------------------------------------


def check_new_dir(parent: str, new_dir: str) -> str:
  new_dir = os.fspath(new_dir)
  if os.path.abspath(new_dir) == os.path.abspath(parent):
    raise errors.UsageError('--new_model_dir is the parent model_dir: adapt writes a NEW '
                            'model_dir and never modifies the parent')
  if os.path.exists(new_dir):
    raise errors.UsageError(f'new model_dir {new_dir!r} exists: adapt never writes over a '
                            'folder; choose another --new_model_dir or remove it')
  return new_dir


def adapt(parent_dir: str, new_dir: str, films: Films, *, method: str = 'threshold',
          holdout: Films | None = None, holdout_fraction: float = 0.3, seed: int = 0,
          site_name: str | None = None, epochs: int = DEFAULT_EPOCHS,
          learning_rate: float = DEFAULT_LEARNING_RATE, batch_size: int = DEFAULT_BATCH_SIZE,
          threshold_policy: str = 'youden', targets: Mapping[str, float] | None = None,
          n_bootstrap: int = metrics.DEFAULT_BOOTSTRAP, out: str | None = None,
          salt: str | None = None, verbose: int = 0) -> dict:
  """Adapts the parent model to a site on labelled films; a new model_dir; both validated.

  Args:
    parent_dir: the model_dir to adapt (read only).
    new_dir: the new model_dir; must not exist.
    films: labelled local films (covidlib.site.load_films(..., labelled=True)).
    method: one of METHODS (module docstring).
    holdout: labelled films to validate on instead of a split of `films`.
    holdout_fraction, seed: the patient split (and training's seed).
    salt: for the pseudonyms of a CSV's patient ids (default $COVIDLIB_SALT); a built dataset's
      ids are pseudonyms already.
    out: folder for adapt.json / adapt.md (default: <new_dir>/adapt).

  Returns:
    The report (also in adapt.json): split, method, what was done, the hold-out figures of the
    parent and the adapted model side by side.

  Raises:
    UsageError: a bad method or policy, an existing new_dir, unlabelled films, films with bad
      files, a hold-out sharing patients with the adapt part, no salt for a CSV's patient ids.
    DataError: too few films of a class in the adapt part or the hold-out.
  """
  md.check_model_dir(parent_dir)
  if method not in METHODS:
    raise errors.UsageError(f'--method must be one of {", ".join(METHODS)}, got {method!r}')
  threshold_lib.parse_policy(threshold_policy)
  new_dir = check_new_dir(parent_dir, new_dir)
  config = md.load_config(parent_dir)
  names = md.class_names(config)
  targets = dict(sites.parse_targets(sites.DEFAULT_TARGETS) if targets is None else targets)
  for part in (films, holdout):
    if part is not None and part.labels is None:
      raise errors.UsageError('adapt needs labelled films (a labels CSV or a labelled_xrays '
                              'dataset)')
    if part is not None and part.bad:
      raise errors.DataError(f'{len(part.bad)} of the local films could not be used; adapt '
                             'starts only from a complete set (fix or remove them from the '
                             'list): ' + '; '.join(part.bad[:20]))
  adapt_films, held, how = split_films(films, holdout, holdout_fraction, seed, salt)
  sites.check_classes(held.labels, names, 'the hold-out')
  counts = np.bincount(adapt_films.labels, minlength=2)
  if min(counts) == 0:  # The threshold needs both classes; fine-tuning on one class is no use.
    sites.check_classes(adapt_films.labels, names, 'the adapt part')
  if not adapt_films.pseudonymised and any(adapt_films.metadata['patient_id']):
    salt = privacy.resolve_salt(salt)  # UsageError before any work when there is none.
  site_name = site_lib.site_name_of(adapt_films, site_name)

  parent_model = md.load_model(parent_dir)
  parent_decision = md.load_decision(parent_dir)
  folder = os.path.dirname(os.path.abspath(new_dir))
  os.makedirs(folder, exist_ok=True)
  work = tempfile.mkdtemp(dir=folder, prefix='.' + os.path.basename(new_dir) + '.partial-')
  try:
    train_films, inner, inner_note = inner_split(adapt_films, seed)
    model, notes = _adapt_model(
        method, parent_dir, parent_model, config, work, adapt_films, train_films, inner,
        inner_note, epochs=epochs, learning_rate=learning_rate, batch_size=batch_size,
        seed=seed, site_name=site_name, verbose=verbose)
    # Fine-tuned weights have seen the adapt films: their decision is chosen on the inner
    # validation when there is one. The other methods fitted nothing on labels.
    trained = method.endswith('finetune')
    decision_films = inner if trained and inner is not None else adapt_films
    decision, account = threshold_lib.choose_decision(
        decision_films.labels, site_lib.score_films(model, decision_films).scores,
        threshold_policy, calibrate=True, split=f'adapt ({site_name})')
    md.save_decision(work, decision)
    notes.append(_fit_shift_and_reference(model, work, train_films, inner, adapt_films))
    hold_out = {}
    for role, (m, d) in {'parent': (parent_model, parent_decision),
                         'adapted': (model, decision)}.items():
      hold_out[role] = site_lib.validation_figures(
          held, site_lib.model_scores(m, held, d), d, targets=targets, class_names=names,
          n_bootstrap=n_bootstrap, seed=seed)
    hashed = adapt_films.hashed_patients(salt)
    lineage = {
        'parent': {'model_dir': os.path.abspath(parent_dir),
                   'model_sha256': sha256_file(os.path.join(parent_dir, md.MODEL)),
                   'dataset': config.get('dataset')},
        'site': site_name, 'method': method, 'date': site_lib.now(),
        'covidlib': covidlib.__version__, 'seed': seed, 'split': how,
        'adapt': {'n_films': len(adapt_films), 'n_per_class': counts.tolist(),
                  'n_patients': int(len(set(patient_groups(adapt_films).tolist()))),
                  'patients': sorted(set(hashed.tolist()) - {''}),
                  'films_without_patient_id': int(np.sum(hashed == ''))},
        'hold_out': {'n_films': len(held),
                     'n_per_class': np.bincount(held.labels, minlength=2).tolist(),
                     'targets': targets,
                     'parent': _summary(hold_out['parent']),
                     'adapted': _summary(hold_out['adapted'])},
        'decision': {**dataclasses.asdict(decision), 'account': account},
        'notes': notes,
    }
    md.write_json(os.path.join(work, site_lib.LINEAGE), lineage)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(work, 0o777 & ~umask)  # mkdtemp made it private; a model_dir is not.
    os.rename(work, new_dir)
  except BaseException:
    shutil.rmtree(work, ignore_errors=True)
    if os.path.exists(work + '.adabn_init.keras'):
      os.remove(work + '.adabn_init.keras')
    raise
  report = {'caveat': site_lib.CAVEAT, 'model_dir': parent_dir, 'new_model_dir': new_dir,
            'site': site_name, 'method': method, 'date': lineage['date'],
            'data': {'description': films.description, 'n': len(films) + (
                0 if holdout is None else len(holdout)), 'bad': []},
            'split': how, 'n_adapt': len(adapt_films), 'n_hold_out': len(held),
            'class_names': list(names), 'targets': targets, 'notes': notes,
            'decision': dataclasses.asdict(decision),
            'parent_decision': dataclasses.asdict(parent_decision), 'hold_out': hold_out,
            'verdict': (f'adapted ({method}) at {site_name} on {len(adapt_films)} films; on '
                        f'{len(held)} hold-out films: adapted {hold_out["adapted"]["verdict"]}; '
                        f'parent {hold_out["parent"]["verdict"]}')}
  out = out or os.path.join(new_dir, 'adapt')
  report['written'] = site_lib.write_report(out, ADAPT_JSON, ADAPT_MD, report,
                                      render_adapt(report))
  return report


def _adapt_model(method, parent_dir, parent_model, config, work, films: Films,
                 train_films: Films, inner: Films | None, inner_note: str, *, epochs,
                 learning_rate, batch_size, seed, site_name, verbose):
  """(the adapted model, saved in `work` with config.json; notes on what was done)."""
  notes = []
  if method in ('threshold', 'adabn'):
    model = parent_model
    if method == 'adabn':
      model = md.load_model(parent_dir)  # A copy: the parent's stays as it is for the hold-out.
      n = adabn(model, films.images)
      notes.append(f'AdaBN: {n} BatchNorm layers re-estimated on {len(films)} adapt films '
                   '(labels unused)')
      with md.atomic_path(os.path.join(work, md.MODEL), suffix='.keras') as tmp:
        model.save(tmp)
    else:  # The parent's network as it is: the same file.
      shutil.copyfile(os.path.join(parent_dir, md.MODEL), os.path.join(work, md.MODEL))
    md.write_json(os.path.join(work, md.CONFIG), config)
    notes.append(f'threshold and temperature re-chosen on the {len(films)} adapt films')
    return model, notes
  init_from = parent_dir
  if method == 'adabn+finetune':
    model = md.load_model(parent_dir)
    n = adabn(model, films.images)
    init_from = work + '.adabn_init.keras'  # Beside `work`: training wants it empty.
    model.save(init_from)
    notes.append(f'AdaBN: {n} BatchNorm layers re-estimated on {len(films)} adapt films '
                 '(labels unused), then fine-tuned from those weights')
  notes.append(f'fine-tuned from {parent_dir} at learning rate {learning_rate:g} for {epochs} '
               f'epochs, batch {batch_size}, on {len(train_films)} films; ' + inner_note)
  model = train_on_films(config, work, train_films, inner, init_from=init_from,
                         learning_rate=learning_rate, epochs=epochs, batch_size=batch_size,
                         seed=seed, description=f'{len(films)} adapt films of {site_name}',
                         verbose=verbose)
  if method == 'adabn+finetune':
    os.remove(init_from)
    # config.json names the weights training started from; those were the parent's, with its
    # BatchNorm statistics re-estimated (lineage.json says so). The file is gone.
    md.write_json(os.path.join(work, md.CONFIG), {**md.load_config(work), 'init_from': parent_dir})
  # covidlib-train's own leftovers that an adapted model_dir does not need.
  for name in (md.CHECKPOINTS, md.LOGS):
    shutil.rmtree(os.path.join(work, name), ignore_errors=True)
  return model, notes


def _fit_shift_and_reference(model, work: str, train_films: Films, inner: Films | None,
                             films: Films) -> str:
  """The adapted model's per-image shift score and reference (covidlib.shift_fit), from its
  site's films: fitted on the adapt films, threshold and reference on the inner validation
  (all adapt films when there is none). Returns a note."""
  fit_on = train_films if inner is not None else films
  threshold_on = inner if inner is not None else films
  train_scored = site_lib.score_films(model, fit_on, taps=True)
  val_scored = site_lib.score_films(model, threshold_on, taps=True)
  shift_model, ref = shift_fit.fit_scored(train_scored, val_scored, fit_split='adapt',
                                          threshold_split='adapt inner validation'
                                          if inner is not None else 'adapt')
  shift_fit.save(work, shift_model, ref)
  return (f'shift score fitted on {len(fit_on)} adapt films, its threshold and the reference '
          f'(later `check`s compare with this site) on {len(threshold_on)} '
          + ('inner validation films' if inner is not None else
             'adapt films (the same ones: no inner validation; flags fewer films than it should)'))


def _summary(result: dict) -> dict:
  f = result['figures']
  return {'verdict': result['verdict'], 'result': result['judged']['verdict'],
          **{name: {'value': f[name]['value'], 'ci95': f[name]['ci95']}
             for name in sites.TARGET_FIGURES}}


def render_adapt(report: dict) -> str:
  lines = site_lib.report_header(report, f'Adapted at {report["site"]} ({report["method"]})')
  parent, adapted = report['hold_out']['parent'], report['hold_out']['adapted']
  lines += [f'- New model_dir: `{report["new_model_dir"]}` (lineage.json records where it came '
            'from)', f'- Split: {report["split"]}: {report["n_adapt"]} films to adapt on, '
            f'{report["n_hold_out"]} hold-out films never used to adapt', '']
  lines += [f'- {n}' for n in report['notes']] + ['']
  lines += ['## On the same hold-out', ''] + site_lib.figures_table(
      {'parent (unadapted)': parent['figures'], 'adapted': adapted['figures']})
  lines += ['', '| model | threshold | temperature | targets | verdict |', '|---|---|---|---|---|']
  for name, result, d in (('parent', parent, report['parent_decision']),
                          ('adapted', adapted, report['decision'])):
    lines.append(f'| {name} | {d["threshold"]:.4g} | {d["temperature"]:.4g} | '
                 + ', '.join(f'{k} {v:g}' for k, v in report['targets'].items())
                 + f' | **{result["judged"]["verdict"]}** |')
  lines += ['', 'PASS needs each interval\'s lower bound to clear its target. The hold-out '
            'films were not used to adapt; they come from the same site as the adapt films, so '
            'these figures say nothing about a third site.', '']
  return '\n'.join(lines)
