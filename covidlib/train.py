"""Training: a config and a model_dir in, a trained inference model (and its history) out.

    from covidlib import train
    config = train.make_config(model='compact_resnet', dataset='covid_xray/patient_split',
                               data_dir='/tmp/tfds', epochs=10)
    history = train.train(config, '/work/runs/compact_resnet', verbose=1)

or from the shell: `covidlib-train --model_dir=/work/runs/compact_resnet --data_dir=/tmp/tfds`.

Measures against source shortcuts (issue #9), each a config key, all off by default so a plain
config trains exactly as before:

    config = train.make_config(dataset='covid_xray/adult_pediatric', data_dir='/tmp/tfds',
                               crop=0.1, equalize='histogram',    # inside the model
                               augment_preset='strong', augment={'noise': 0.01},
                               balance='source')                  # in the input pipeline

  crop, equalize   `covidlib.standardize` layers at the front of the inference model, so every
                   export and `predict` runs them too (config.json records them; rebuilding the
                   model from the config, as the float32 save after mixed precision does, keeps
                   them).
  augment_preset   'article' (default) or 'strong' (`covidlib.augment.PRESETS`); `augment` keys
                   override the preset's. config.json holds the complete, resolved dict.
  balance          'source': every (source, label) stratum of the training split drawn equally
                   often (`covidlib.data`), `ceil(split size / batch)` steps per epoch. With
                   class_weight='balanced' the weights follow the strata per class, which is how
                   often each class is drawn. With train_data passed in (cross-validation) it
                   only describes how the caller drew that data.

The recipe (issue 18), each part a config key and a covidlib-train flag. The defaults are the
recipe measured best (BENCHMARKS.md, "Training recipes"): AdamW 0.05, cosine after 2 warm-up
epochs, label smoothing 0.1, EMA 0.99, mixup 0.2, no test-time flipping. The recipe before:

    config = train.make_config(weight_decay=0, lr_schedule='constant', warmup_epochs=0,
                               label_smoothing=0, ema=0, mixup=0, tta='none')

  weight_decay     > 0: AdamW (decoupled decay, w -= lr * weight_decay * w per step) of the
                   kernels only, not biases or batch-norm scales and offsets; 0: Adam.
  lr_schedule      'cosine': the rate falls from learning_rate to 0 along a half cosine, per
  warmup_epochs    step; after a linear per-step warm-up from 0 (`learning_rate_schedule`). The
                   step is the optimizer's, saved with it, so a resumed run goes on at the rate
                   it stopped at; an extension re-plans the schedule over the new epoch count.
  label_smoothing  binary cross-entropy against y (1 - s) + s / 2.
  ema              the optimizer keeps a moving average of the weights (Keras use_ema); the
                   average is what validation judges (so keep='best' chooses by it), what
                   model.keras holds and what the next phase starts from; training moves the raw
                   weights. Both are in every checkpoint (raw weights, averages in the optimizer
                   state), so a resume goes on with both.
  mixup            training batches mixed pairwise (`covidlib.augment.mixup`, seeded by `seed`);
                   validation, the shift score's fit and evaluation see plain images.
  tta              'flip': model.keras averages the logits of each image and its mirror
                   (`covidlib.ensemble.flip_average`), so every export runs it; validation
                   during training does not.

Fine-tuning phases (`freeze_epochs` > 0): epochs 1..freeze_epochs are the 'head' phase, which
trains the Dense 'logit' alone (`models.feature_layer`) with every layer before it frozen
(trainable=False: batch norm then runs in inference mode, with its moving statistics, and does
not update them), at learning_rate; the 'full' phase trains every layer at
finetune_learning_rate, with a fresh optimizer (and schedule, warm-up included) over its own
epochs. A checkpoint's phase follows from its epoch and config.json's freeze_epochs, and its
weights file holds that phase's optimizer state: a run killed in either phase, or at the change,
reloads its checkpoint into the model compiled for that phase and goes on from there (at the
change: the full phase starts from the head phase's last weights, its EMA ones with ema). The
kept epoch may be of either phase, and early stopping may end the run in the head phase.

`train()` reads top to bottom: configuration -> strategy and precision -> model_dir (new,
resumable, or finished) -> seeds -> input pipeline -> model and optimizer -> resume -> fit,
phase by phase -> save. What it writes into model_dir is described in `covidlib.model_dir`.

Resuming. At the end of every epoch the weights and the optimizer state go to
`checkpoints/epoch-NNNN.weights.h5` (temporary file, then rename), and then
`checkpoints/state.json` names that file and holds the history so far (also atomic: it is the
commit point). A run killed at any moment and started again with the same config reloads the
last committed epoch and trains the remaining ones; the returned and saved history is complete.
A config.json written before a key existed reads as what that run did (`_PREDATING`: the recipe
keys as plain Adam at a constant rate, even where today's default differs), so resuming or
extending such a run takes those values on the command line; the refusal names each key.
(Keras' own `BackupAndRestore` writes its weights and metadata in place, so a kill during the
write leaves a checkpoint that cannot be loaded; hence this small callback.) The data order and
augmentation draws of a resumed run differ from an uninterrupted one: resuming is exact in
weights and epoch count, not bit-identical in the result.

The kept epoch (config `keep`). 'best' (default): model.keras holds the weights of the epoch
with the highest validation ROC-AUC (`val_auc`, the AUC metric build_models compiles; a tie goes
to the earlier epoch). Validation AUC swings from epoch to epoch on small data (0.86 at epoch
23, 0.68 at epoch 30 on a 2,503-film set): the last epoch is often far from the best. The best
epoch's checkpoint file is not deleted while later epochs run, and state.json names it
(`best_auc_epoch`, `best_val_auc`, `best_auc_weights`), so a resumed run keeps the right one.
Without validation data, or with no finite val_auc in any epoch, 'best' keeps the last epoch and
says so (logged, and in history.json). 'last': the last epoch's weights.

Early stopping (`early_stopping_patience` > 0) watches val_loss: it stops after that many epochs
without a lower val_loss (its state survives a restart too); the weights kept still follow
`keep`.

history.json holds Keras' per-epoch lists (loss, auc, val_auc, ...) and the record of the kept
epoch: `kept_epoch` (1-based), `kept_by` ('val_auc' or 'last'), `kept_reason` (one phrase) and
`kept_metrics` (that epoch's entry of every list); `extended_from_epochs` (below) when extended.
`train()` returns the same dict.

Extending a finished run. A finished run keeps `checkpoints/`: state.json (marked `finished`),
the last epoch's weights and optimizer state, and the kept epoch's file (a few times the size of
model.keras; the simplest store that makes an extension exactly a resume). The same config with
a larger `epochs` therefore continues from the last epoch like a resume: the extra epochs are
trained, the kept epoch is chosen again among all of them, and history.json's
`extended_from_epochs` is the epoch count the run had finished at before its latest extension
(10 for 10 extended to 15; an int, so every list in history.json is per-epoch). decision.json
is removed (chosen for the old model; logged). While an extension runs, config.json and
history.json describe it already; model.keras is replaced when it ends. Refused (UsageError):
a larger `epochs` with any other key changed (pass overwrite), a run that stopped early (more
epochs would stop again), a smaller or equal `epochs` (finished: nothing to train), and a
finished run of a covidlib that deleted `checkpoints/` (nothing to extend from).

Multi-worker: every worker runs the same call; only the chief writes to model_dir, and every
worker resumes from the chief's checkpoints, so model_dir must be on a filesystem all workers
share.
"""

from __future__ import annotations

import glob
import logging
import math
import os
import shutil
from typing import Any, Iterable

import keras
import numpy as np
import tensorflow as tf

from covidlib import augment
from covidlib import data
from covidlib import distribute
from covidlib import ensemble
from covidlib import errors
from covidlib import model_dir as md
from covidlib import models
from covidlib import shift_fit
from covidlib import standardize
from covidlib_tfds import build as tfds_build

STATE = 'state.json'
KEEP_MONITOR = 'val_auc'  # build_models' AUC metric is named 'auc'; Keras logs val_auc.
KEEP = ('best', 'last')

log = logging.getLogger(__name__)

# Every key train() understands, with its default. config.json holds all of them.
DEFAULT_CONFIG: dict[str, Any] = {
    'model': 'compact_resnet',
    'image_size': 224,
    'channels': 1,
    # 'name/config' of a TFDS dataset, or 'folder:ROOT' for ROOT/<split>/{covid,normal}/*.
    'dataset': 'covid_xray/patient_split',
    'data_dir': None,        # TFDS data_dir; None = TFDS' default (~/tensorflow_datasets).
    'manual_dir': None,      # If set and the TFDS dataset is not built yet, build it from here,
    'allow_missing': False,  # even if images its manifest lists are missing (logged, recorded).
    'train_split': 'train',
    'validation_split': 'validation',  # '' = no validation (no val_* metrics, no early stopping).
    # (label 0, label 1) names; None: the dataset's (a labelled_xrays build records its own,
    # e.g. normal / pneumonia), else covidlib's normal / covid. Filled in at the start of train().
    'class_names': None,
    'batch_size': 32,        # Global batch: split evenly over the strategy's replicas.
    'epochs': 10,
    'learning_rate': 1e-3,   # Peak rate (of the head phase with freeze_epochs).
    'class_weight': 'none',  # 'balanced': weight n / (2 n_class), for unbalanced splits.
    'early_stopping_patience': 0,  # Epochs without a lower val_loss before stopping; 0 = off.
    'keep': 'best',          # Weights saved: 'best' val_auc epoch (ties: earlier) or 'last'.
    # A model_dir (or .keras file) whose weights start training instead of a fresh init: another
    # covidlib model of the same network (e.g. a pneumonia model, or a shipped model adapted to
    # a site). Layers are matched by name; every weighted layer must match in shape.
    'init_from': None,
    # Initial weights of a keras.applications backbone (covidlib.models.BACKBONES): 'none'
    # (random), 'imagenet' (Keras' cache only: never downloaded) or a Keras weights file.
    'weights': 'none',
    'seed': 0,               # Shuffling, augmentation, initial weights, dropout.
    'deterministic': False,  # Also make ops deterministic (same weights on every CPU run).
    'strategy': 'auto',
    'mixed_precision': 'auto',
    'jit_compile': 'auto',   # XLA; Keras' 'auto' uses it on GPU/TPU only.
    # Measures against source shortcuts (issue #9); all off by default (= the plain recipe).
    'crop': 0.0,             # Fraction of each side cut off INSIDE the model (standardize).
    'equalize': 'none',      # 'histogram' or 'clahe': per-image equalization inside the model.
    'balance': 'none',       # 'source': draw each (source, label) stratum of train equally often.
    'augment_preset': 'article',  # Base of 'augment': covidlib.augment.PRESETS ('strong').
    'augment': dict(augment.PRESETS['article']),  # build_augmentation arguments; keys given
                                                  # here override the preset's.
    # The recipe (issue 18; see "The recipe" above). Defaults: the best recipe measured on the
    # same-site sets (BENCHMARKS.md, "Training recipes"); tta stays off (no gain, twice the
    # inference). _PREDATING holds the recipe before.
    'weight_decay': 0.05,    # > 0: AdamW with this decoupled decay of the kernels; 0: Adam.
    'lr_schedule': 'cosine',  # Per-step cosine decay to 0 over each phase; or 'constant'.
    'warmup_epochs': 2,      # Linear per-step warm-up from 0 over the first epochs of a phase.
    'label_smoothing': 0.1,  # Targets y (1 - s) + s / 2 in the loss; 0 = off.
    'ema': 0.99,             # Momentum of a moving average of the weights (saved); 0 = off.
    'mixup': 0.2,            # Beta(a, a) mixup of training batches (covidlib.augment); 0 = off.
    'tta': 'none',           # 'flip': model.keras averages the image and its mirror.
    'freeze_epochs': 0,      # Epochs that train the head only, backbone frozen; 0 = none.
    'finetune_learning_rate': 1e-4,  # Peak rate after the freeze_epochs (unused without them).
}

# What a config.json written before a key existed ran with: the behaviour before the key, which
# may differ from its default today (saved_config).
# PLAIN_RECIPE: the recipe keys at the values before issue 18 (Adam at a constant rate), for
# callers that want it whatever the default (covidlib.site_adapt's fine-tuning).
PLAIN_RECIPE: dict[str, Any] = {
    'weight_decay': 0.0, 'lr_schedule': 'constant', 'warmup_epochs': 0, 'label_smoothing': 0.0,
    'ema': 0.0, 'mixup': 0.0, 'tta': 'none',
}
_PREDATING: dict[str, Any] = {**PLAIN_RECIPE, 'freeze_epochs': 0}
TTA = ('none', 'flip')
LR_SCHEDULES = ('constant', 'cosine')

_POSITIVE_INTS = ('image_size', 'batch_size', 'epochs')
_NON_NEGATIVE_INTS = ('warmup_epochs', 'freeze_epochs')


class TrainingError(errors.CovidlibError):
  """Training failed for a reason the user can act on (e.g. the loss became NaN)."""


# --------------------------------------------------------------------------------------------
# Configuration.
# --------------------------------------------------------------------------------------------


def make_config(**overrides: Any) -> dict[str, Any]:
  """DEFAULT_CONFIG with `overrides`, validated; `augment` may override some of its keys.

  config['augment'] is always complete: the preset `augment_preset` names
  (covidlib.augment.PRESETS), with the keys `overrides['augment']` gives on top.

  Raises:
    UsageError: naming the key and the value, for an unknown key or a bad value.
  """
  unknown = sorted(set(overrides) - set(DEFAULT_CONFIG))
  if unknown:
    raise errors.UsageError(
        f'unknown config keys {unknown}; valid keys: {", ".join(sorted(DEFAULT_CONFIG))}')
  config = {**DEFAULT_CONFIG, **overrides}
  if config['augment_preset'] not in augment.PRESETS:
    raise errors.UsageError(f'config augment_preset must be one of '
                            f'{", ".join(augment.PRESETS)}, got {config["augment_preset"]!r}')
  config['augment'] = dict(augment.PRESETS[config['augment_preset']])
  aug = overrides.get('augment') or {}
  if not isinstance(aug, dict):
    raise errors.UsageError(f'config augment must be a dict, got {aug!r}')
  bad_aug = sorted(set(aug) - set(DEFAULT_CONFIG['augment']))
  if bad_aug:
    raise errors.UsageError(f'unknown augment keys {bad_aug}; valid: '
                            f'{", ".join(sorted(DEFAULT_CONFIG["augment"]))}')
  config['augment'].update(aug)
  augment.check_arguments(**config['augment'])  # Raises UsageError naming the key and value.

  def bad(key, expected):
    raise errors.UsageError(f'config {key} must be {expected}, got {config[key]!r}')

  def is_int(v):
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

  def is_number(v):
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) \
        and math.isfinite(v)

  for key in _POSITIVE_INTS:
    if not is_int(config[key]) or config[key] < 1:
      bad(key, 'a positive integer')
    config[key] = int(config[key])
  for key in _NON_NEGATIVE_INTS:
    if not is_int(config[key]) or config[key] < 0:
      bad(key, 'an integer >= 0')
    config[key] = int(config[key])
  if config['model'] not in models.MODELS:
    raise errors.UsageError(
        f'unknown model {config["model"]!r}; valid models: {", ".join(sorted(models.MODELS))}')
  if config['channels'] not in (1, 3):
    bad('channels', '1 or 3')
  if not isinstance(config['dataset'], str) or not config['dataset']:
    bad('dataset', "'name/config' or 'folder:ROOT'")
  for key in ('data_dir', 'manual_dir'):
    if config[key] is not None and not isinstance(config[key], str):
      bad(key, 'a path or None')
  if not isinstance(config['train_split'], str) or not config['train_split']:
    bad('train_split', 'a split name')
  if not isinstance(config['validation_split'], str):
    bad('validation_split', "a split name, or '' for none")
  lr = config['learning_rate']
  if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < math.inf:
    bad('learning_rate', 'a positive number')
  config['learning_rate'] = float(lr)
  if not is_number(config['finetune_learning_rate']) or config['finetune_learning_rate'] <= 0:
    bad('finetune_learning_rate', 'a positive number')
  config['finetune_learning_rate'] = float(config['finetune_learning_rate'])
  if not is_number(config['weight_decay']) or not 0 <= config['weight_decay'] < 1:
    bad('weight_decay', 'a number in [0, 1) (0 = Adam)')
  config['weight_decay'] = float(config['weight_decay'])
  if config['lr_schedule'] not in LR_SCHEDULES:
    bad('lr_schedule', f'one of {", ".join(LR_SCHEDULES)}')
  if not is_number(config['label_smoothing']) or not 0 <= config['label_smoothing'] < 0.5:
    bad('label_smoothing', 'a number in [0, 0.5)')
  config['label_smoothing'] = float(config['label_smoothing'])
  if not is_number(config['ema']) or not 0 <= config['ema'] < 1:
    bad('ema', 'a momentum in [0, 1) (0 = off)')
  config['ema'] = float(config['ema'])
  config['mixup'] = augment.check_mixup(config['mixup'])
  if config['tta'] not in TTA:
    bad('tta', f'one of {", ".join(TTA)}')
  if config['class_weight'] not in ('none', 'balanced'):
    bad('class_weight', "'none' or 'balanced'")
  patience = config['early_stopping_patience']
  if not is_int(patience) or patience < 0:
    bad('early_stopping_patience', 'an integer >= 0')
  if config['keep'] not in KEEP:
    bad('keep', "'best' or 'last'")
  names = config['class_names']
  if names is not None:
    if not isinstance(names, (list, tuple)) or len(names) != 2 or not all(
        isinstance(n, str) and n for n in names) or names[0] == names[1]:
      bad('class_names', 'None or two different names (label 0, label 1)')
    config['class_names'] = list(names)
  if patience and not config['validation_split']:
    raise errors.UsageError('early stopping (early_stopping_patience='
                            f'{patience}) needs a validation split; validation_split is empty')
  if config['seed'] is not None and (not is_int(config['seed']) or config['seed'] < 0):
    bad('seed', 'a non-negative integer or None')
  if not isinstance(config['allow_missing'], bool):
    bad('allow_missing', 'true or false')
  if not isinstance(config['deterministic'], bool):
    bad('deterministic', 'true or false')
  if config['init_from'] is not None:
    if not isinstance(config['init_from'], str) or not config['init_from']:
      bad('init_from', 'None or the path of a model_dir or .keras file')
    if not os.path.exists(config['init_from']):
      raise errors.UsageError(f'init_from {config["init_from"]!r} does not exist: give a '
                              'finished model_dir or a .keras file')
  # Checks that the file is there (for 'imagenet', in Keras' cache): a run fails here, at once.
  models.weights_path(config['model'], config['weights'])
  if config['weights'] != 'none' and config['init_from'] is not None:
    raise errors.UsageError(f'weights={config["weights"]!r} and init_from='
                            f'{config["init_from"]!r}: init_from replaces every weight; give one')
  if config['deterministic'] and config['seed'] is None:
    raise errors.UsageError('deterministic=True needs a seed; seed is None')
  if config['strategy'] not in distribute.STRATEGIES:
    bad('strategy', f'one of {", ".join(distribute.STRATEGIES)}')
  if config['mixed_precision'] not in distribute.PRECISIONS:
    bad('mixed_precision', f'one of {", ".join(distribute.PRECISIONS)}')
  if config['jit_compile'] not in ('auto', True, False):
    bad('jit_compile', "'auto', true or false")
  config['crop'] = standardize.check_crop(config['crop'])
  standardize.check_equalize(config['equalize'])
  if config['balance'] not in ('none', 'source'):
    bad('balance', "'none' or 'source'")
  if config['balance'] != 'none' and config['dataset'].startswith('folder:'):
    raise errors.UsageError(
        f'balance={config["balance"]!r} needs a TFDS dataset with a source feature (e.g. '
        f'covid_xray/adult); {config["dataset"]!r} is a folder')
  return config


def saved_config(saved: dict) -> dict:
  """A config.json of an older covidlib completed with what the run used for the keys it
  predates (their defaults then: `_PREDATING`, else DEFAULT_CONFIG), so a resumed run compares
  like with like and a recipe read back (covidlib-crossval --recipe) is the one that ran."""
  saved = {**DEFAULT_CONFIG, **_PREDATING, **saved}
  saved['augment'] = {**DEFAULT_CONFIG['augment'], **(saved.get('augment') or {})}
  return saved


# --------------------------------------------------------------------------------------------
# The model_dir: new, resumable or finished.
# --------------------------------------------------------------------------------------------


def _clear_run(model_dir: str) -> None:
  """Removes what a training run wrote (and decision.json, stale for a new model)."""
  for name in (md.MODEL, md.HISTORY, md.DECISION, md.CONFIG):
    path = os.path.join(model_dir, name)
    if os.path.exists(path):
      os.remove(path)
  for name in (md.CHECKPOINTS, md.LOGS):
    shutil.rmtree(os.path.join(model_dir, name), ignore_errors=True)


def _config_differences(saved: dict, config: dict, ignore: tuple[str, ...] = ()) -> str:
  """'key: saved saved, now now; ...' for every key that differs ('' when none)."""
  differing = sorted(k for k in set(saved) | set(config)
                     if k not in ignore and saved.get(k) != config.get(k))
  return '; '.join(f'{k}: {saved.get(k)!r} saved, {config.get(k)!r} now' for k in differing)


def _check_extension(model_dir: str, saved: dict, config: dict, state: dict) -> None:
  """Passes for a finished run that `config` extends (same keys, more epochs); else raises."""
  details = _config_differences(saved, config, ignore=('epochs',))
  if details:
    raise errors.UsageError(
        f'model_dir {model_dir!r} holds a finished run ({md.MODEL}) with another configuration '
        f'({details}); pass --overwrite to train again from scratch, or choose another '
        'model_dir (only a larger --epochs extends a finished run)')
  if state['stopped_early']:
    raise errors.UsageError(
        f'model_dir {model_dir!r} holds a finished run ({md.MODEL}) that stopped early at epoch '
        f'{state["epoch"]} (early_stopping_patience {saved["early_stopping_patience"]}); more '
        'epochs would stop again: pass --overwrite to train again from scratch, or choose '
        'another model_dir')
  if config['epochs'] <= state['epoch']:
    raise errors.UsageError(
        f'model_dir {model_dir!r} holds a finished run of {state["epoch"]} '
        f'epoch{"s" if state["epoch"] != 1 else ""} ({md.MODEL}); '
        f'nothing to train for epochs={config["epochs"]}: pass a larger --epochs to extend it, '
        '--overwrite to train again from scratch, or choose another model_dir')


def _check_model_dir(model_dir: str, config: dict, overwrite: bool) -> None:
  """Refuses a finished run (unless overwrite, or extended) and resuming with another config.

  Writes nothing (except clearing a previous run for `overwrite`): config.json is written only
  once the data and the model are ready, so a run that fails before (a typo in a flag, data not
  built) leaves no run behind to conflict with the corrected command.
  """
  if os.path.exists(model_dir) and not os.path.isdir(model_dir):
    raise errors.UsageError(f'model_dir {model_dir!r} exists and is not a directory')
  if not os.path.isdir(model_dir) or not os.listdir(model_dir):
    return
  config_path = os.path.join(model_dir, md.CONFIG)
  if not os.path.exists(config_path):
    raise errors.UsageError(
        f'model_dir {model_dir!r} is not empty and holds no {md.CONFIG}: it is not a '
        'covidlib-train run; choose a new or empty folder')
  if overwrite:
    _clear_run(model_dir)
    return
  has_model = os.path.exists(os.path.join(model_dir, md.MODEL))
  if not os.path.exists(os.path.join(model_dir, md.CHECKPOINTS, STATE)):
    if has_model:  # Finished by a covidlib that deleted checkpoints/ at the end.
      raise errors.UsageError(
          f'model_dir {model_dir!r} holds a finished run ({md.MODEL}) without '
          f'{md.CHECKPOINTS}/{STATE} to extend it from; pass --overwrite to train again from '
          'scratch, or choose another model_dir')
    _clear_run(model_dir)  # Stopped before its first epoch ended: nothing to resume.
    return
  saved = saved_config(md.read_json(config_path))
  state = _load_state(model_dir)
  if has_model and state['finished']:
    _check_extension(model_dir, saved, config, state)
    return
  details = _config_differences(saved, config)
  if details:
    raise errors.UsageError(
        f'model_dir {model_dir!r} holds an unfinished run with another configuration '
        f'({details}); rerun with the same settings to resume it, or pass --overwrite to '
        'start over')


_FRESH_STATE = {
    'epoch': 0, 'weights': None, 'history': {},
    'best_epoch': None, 'best_val_loss': None, 'stopped_early': False,  # Early stopping.
    'best_auc_epoch': None, 'best_val_auc': None, 'best_auc_weights': None,  # keep='best'.
    'finished': False, 'extended_from_epochs': None,
}


def _load_state(model_dir: str | None) -> dict:
  """The last committed epoch's state (a fresh one for None or when nothing is committed).

  A state.json of an older covidlib lacks the later keys: they take their fresh values.
  """
  path = os.path.join(model_dir, md.CHECKPOINTS, STATE) if model_dir else ''
  if not os.path.exists(path):
    return dict(_FRESH_STATE)
  return {**_FRESH_STATE, **md.read_json(path)}


# --------------------------------------------------------------------------------------------
# Callbacks: commit each epoch atomically (resume, early stopping); stop on a NaN loss.
# --------------------------------------------------------------------------------------------


def _save_weights_atomic(model: keras.Model, path: str) -> None:
  with md.atomic_path(path, suffix='.weights.h5') as tmp:
    model.save_weights(tmp, overwrite=True)


def _epoch_file(epoch: int) -> str:
  return f'epoch-{epoch:04d}.weights.h5'


class EpochCheckpoint(keras.callbacks.Callback):
  """Commits weights, history, early-stopping and best-epoch state at every finite epoch end.

  Keeps two weight files at most: the last epoch's (to resume or extend from) and, for
  keep='best', the best val_auc epoch's (to save at the end).
  """

  def __init__(self, model_dir: str, state: dict, patience: int, keep: str, write: bool):
    super().__init__()
    self.directory = os.path.join(model_dir, md.CHECKPOINTS)
    self.history_path = os.path.join(model_dir, md.HISTORY)
    self.state = state
    self.patience = patience
    self.keep = keep
    self.write = write

  def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
    logs = {k: float(v) for k, v in (logs or {}).items()}
    if not math.isfinite(logs.get('loss', math.nan)):
      return  # NaNGuard reports it; never commit a diverged epoch.
    state = dict(self.state)
    history = {k: list(v) for k, v in state['history'].items()}
    for key, value in logs.items():
      history.setdefault(key, []).append(value)
    name = _epoch_file(epoch + 1)
    state.update(epoch=epoch + 1, history=history, weights=name)
    if self.keep == 'best':
      auc = logs.get(KEEP_MONITOR, math.nan)
      best = state['best_val_auc']
      if math.isfinite(auc) and (best is None or auc > best):  # Strict: ties keep the earlier.
        state.update(best_auc_epoch=epoch + 1, best_val_auc=auc, best_auc_weights=name)
    if self.patience:
      val_loss = logs.get('val_loss', math.nan)
      best = state['best_val_loss']
      if math.isfinite(val_loss) and (best is None or val_loss < best):
        state.update(best_epoch=epoch + 1, best_val_loss=val_loss)
      if epoch + 1 - (state['best_epoch'] or 0) >= self.patience:
        state['stopped_early'] = True
        self.model.stop_training = True
    if self.write:
      _save_weights_atomic(self.model, os.path.join(self.directory, name))
      md.write_json(os.path.join(self.directory, STATE), state)  # The commit point.
      md.write_json(self.history_path, history)
      _remove_other_weights(self.directory, state)
    self.state = state


def _remove_other_weights(directory: str, state: dict) -> None:
  """Deletes every weights file in checkpoints/ that the committed state does not name."""
  needed = {state['weights'], state['best_auc_weights']}
  for old in glob.glob(os.path.join(directory, '*.weights.h5')):  # Not the .tmp dotfiles.
    if os.path.basename(old) not in needed:
      os.remove(old)


class AverageForValidation(keras.callbacks.Callback):
  """Validates with the EMA weights (those model.keras will hold) and trains on the raw ones.

  With ema > 0 the optimizer keeps a moving average of the weights; val_auc, and so the epoch
  keep='best' chooses, must judge the average, not the raw weights that training moves. Keras
  calls on_test_begin/on_test_end around the validation pass inside fit: the averages go in
  before it and the raw weights come back after, before EpochCheckpoint saves both (the raw
  weights and, in the optimizer state, the averages).
  """

  def __init__(self):
    super().__init__()
    self.raw = None

  def on_test_begin(self, logs: dict | None = None) -> None:
    optimizer = self.model.optimizer
    if optimizer is None or not optimizer.use_ema or not optimizer.built:
      return
    self.raw = [v.numpy() for v in self.model.trainable_variables]
    use_average_weights(self.model)

  def on_test_end(self, logs: dict | None = None) -> None:
    if self.raw is not None:
      for variable, value in zip(self.model.trainable_variables, self.raw):
        variable.assign(value)
      self.raw = None


class NaNGuard(keras.callbacks.Callback):
  """Stops training at the first batch whose loss is NaN or infinite, and remembers where."""

  def __init__(self):
    super().__init__()
    self.epoch = 0
    self.failure: tuple[int, int] | None = None

  def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
    self.epoch = epoch

  def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
    loss = (logs or {}).get('loss')
    if loss is not None and not math.isfinite(float(loss)):
      self.failure = (self.epoch + 1, batch + 1)
      self.model.stop_training = True


# --------------------------------------------------------------------------------------------
# Input pipeline.
# --------------------------------------------------------------------------------------------


def _build_tfds_if_needed(config: dict) -> None:
  """Builds config['dataset'] from config['manual_dir'] unless it is built in data_dir."""
  tfds_build.build(config['dataset'], manual_dir=config['manual_dir'],
                   data_dir=config['data_dir'], allow_missing=config['allow_missing'])


def load_datasets(config: dict) -> tuple[tf.data.Dataset, tf.data.Dataset | None]:
  """The (train, validation) datasets a config names; validation is None without a split.

  With config['balance'] == 'source' the training dataset is infinite (source-balanced, see
  covidlib.data); train for `balanced_steps(config)` steps per epoch.
  """
  common = dict(image_size=config['image_size'], channels=config['channels'],
                batch_size=config['batch_size'])
  splits = [config['train_split'], config['validation_split']]
  dataset = config['dataset']
  if dataset.startswith('folder:'):
    root = dataset[len('folder:'):]

    def load(split, shuffle):
      return data.load_folder(os.path.join(root, split), shuffle=shuffle, seed=config['seed'],
                              **common)
  else:
    if config['manual_dir']:
      _build_tfds_if_needed(config)

    def load(split, shuffle):
      balance = config['balance'] if shuffle else 'none'  # Only the training split.
      return data.load_tfds(dataset, split, data_dir=config['data_dir'], shuffle=shuffle,
                            seed=config['seed'], balance=balance, **common)
  train_data = load(splits[0], True)
  validation_data = load(splits[1], False) if splits[1] else None
  return train_data, validation_data


def input_for_training(dataset: tf.data.Dataset | None) -> tf.data.Dataset | None:
  """`dataset` with tf.data's autotuner off when no GPU or TPU is visible.

  On a CPU-only host the input pipeline and the model share the cores, and the autotuner then
  costs training a quarter of its speed: seed_cnn on this project's 2-core CPU ran at 10.7-10.9
  images/s in most epochs with it on, 14.5-16.0 with it off (benchmarks/results/
  train_throughput.md). Our pipelines are cached after the first epoch, so its tuning buys
  nothing there. With an accelerator the CPU only feeds it, and autotuning stays on.
  """
  if dataset is None or tf.config.list_logical_devices('GPU') or \
      tf.config.list_logical_devices('TPU'):
    return dataset
  options = tf.data.Options()
  options.autotune.enabled = False
  return dataset.with_options(options)


def _config_class_counts(config: dict) -> tuple[int, int]:
  """(normal, covid) in the training split a config names, without decoding images."""
  dataset, split = config['dataset'], config['train_split']
  if dataset.startswith('folder:'):
    _, labels = data.list_folder(os.path.join(dataset[len('folder:'):], split))
    return labels.count(0), labels.count(1)
  if config['manual_dir']:
    _build_tfds_if_needed(config)
  return data.class_counts(dataset, split, config['data_dir'])


def balanced_steps(config: dict) -> int:
  """Steps per epoch of a source-balanced training set: the split's size over the batch."""
  n = data.num_examples(config['dataset'], config['train_split'], config['data_dir'])
  return data.steps_per_epoch(n, config['batch_size'])


def count_steps(train_data: tf.data.Dataset, steps_per_epoch: int | None) -> int:
  """Steps in one epoch: `steps_per_epoch` if given, else the dataset's batches (counted by
  iterating it once when tf.data does not know them)."""
  if steps_per_epoch:
    return int(steps_per_epoch)
  n = int(train_data.cardinality())
  if n > 0:
    return n
  if n == tf.data.INFINITE_CARDINALITY:
    raise errors.UsageError('the training dataset is infinite: a learning-rate schedule needs '
                            'a finite epoch (take() a number of batches)')
  return sum(1 for _ in train_data)


def _balanced_class_counts(config: dict) -> tuple[int, int]:
  """(normal, covid) strata of the training split: under balance='source' each stratum is
  drawn equally often, so the classes appear in the ratio of their strata counts."""
  if config['manual_dir']:
    _build_tfds_if_needed(config)
  strata = data.stratum_counts(config['dataset'], config['train_split'], config['data_dir'])
  labels = [label for _, label in strata]
  return labels.count(0), labels.count(1)


def count_labels(dataset: tf.data.Dataset) -> tuple[int, int]:
  """(normal, covid) counts of a dataset of (image, label[, ...]) batches (iterates it once)."""
  counts = np.zeros(2, np.int64)
  for element in dataset:
    labels = np.asarray(element[1]).reshape(-1).astype(np.int64)
    counts += np.bincount(labels, minlength=2)[:2]
  return int(counts[0]), int(counts[1])


def balanced_class_weight(n_normal: int, n_covid: int) -> dict[int, float]:
  """{label: n / (2 n_label)}: both classes weigh the same in the loss."""
  if not n_normal or not n_covid:
    raise errors.DataError(
        f'class_weight balanced needs both classes in the training split, got {n_normal} '
        f'normal and {n_covid} covid examples')
  n = n_normal + n_covid
  return {0: n / (2 * n_normal), 1: n / (2 * n_covid)}


# --------------------------------------------------------------------------------------------
# Training.
# --------------------------------------------------------------------------------------------


PHASES = ('head', 'full')


def phase_of_epoch(config: dict, epoch: int) -> str:
  """The phase that trains `epoch` (1-based): 'head' for the first freeze_epochs, else 'full'.

  A checkpoint's phase follows from its epoch and config.json's freeze_epochs (which a resume or
  an extension cannot change); it says which optimizer's state the weights file holds.
  """
  return 'head' if epoch <= config['freeze_epochs'] else 'full'


def phase_epochs(config: dict, phase: str) -> tuple[int, int]:
  """(epochs done before the phase, epochs done at its end) of 'head' or 'full'."""
  freeze = min(config['freeze_epochs'], config['epochs'])
  return (0, freeze) if phase == 'head' else (freeze, config['epochs'])


def learning_rate_schedule(config: dict, learning_rate: float, steps: int, warmup_steps: int):
  """The learning rate of one phase of `steps` steps: a float (constant, no warm-up) or a
  Keras schedule of the optimizer's step t (steps done in the phase, restored on resume):

    t < w:  learning_rate * t / w                                     (linear warm-up from 0)
    else:   learning_rate * (1 + cos(pi * min(t - w, d) / d)) / 2     (cosine, d = steps - w)
            learning_rate                                             (constant)

  with w = min(warmup_steps, steps) (keras.optimizers.schedules.CosineDecay; constant is its
  alpha=1).
  """
  warmup_steps = min(int(warmup_steps), int(steps))
  if config['lr_schedule'] == 'constant' and not warmup_steps:
    return learning_rate
  return keras.optimizers.schedules.CosineDecay(
      0.0, decay_steps=max(int(steps) - warmup_steps, 1),
      alpha=1.0 if config['lr_schedule'] == 'constant' else 0.0,
      warmup_target=learning_rate, warmup_steps=warmup_steps)


def _optimizer(config: dict, phase: str, steps_per_epoch: int | None):
  """A fresh Adam (or AdamW) for `phase`, its schedule over the phase's steps."""
  rate = (config['finetune_learning_rate'] if phase == 'full' and config['freeze_epochs']
          else config['learning_rate'])
  if config['lr_schedule'] != 'constant' or config['warmup_epochs']:
    if not steps_per_epoch:
      raise errors.UsageError(f'lr_schedule={config["lr_schedule"]!r} with warmup_epochs='
                              f'{config["warmup_epochs"]} needs the number of steps per epoch')
    first, last = phase_epochs(config, phase)
    rate = learning_rate_schedule(config, rate, (last - first) * steps_per_epoch,
                                  config['warmup_epochs'] * steps_per_epoch)
  common = dict(learning_rate=rate, use_ema=bool(config['ema']),
                ema_momentum=config['ema'] or 0.99)
  if not config['weight_decay']:
    return keras.optimizers.Adam(**common)
  optimizer = keras.optimizers.AdamW(weight_decay=config['weight_decay'], **common)
  # Decay the kernels only: shrinking biases and batch-norm scales and offsets toward 0 does not
  # regularise the function the network computes, it only distorts it.
  optimizer.exclude_from_weight_decay(var_names=['bias', 'gamma', 'beta'])
  return optimizer


def compile_phase(training_model: keras.Model, inference_model: keras.Model, config: dict,
                  phase: str = 'full', steps_per_epoch: int | None = None) -> None:
  """Freezes for `phase` and compiles `training_model` with a fresh optimizer for it.

  With freeze_epochs, 'head' makes every layer of the inference model before its head
  (`models.feature_layer`: the Dense 'logit') non-trainable, so the optimizer sees the head's
  weights only and frozen BatchNormalization layers run in inference mode (Keras 3: a BN layer
  with trainable=False normalises with its moving statistics and does not update them); 'full'
  makes every layer trainable again. Without freeze_epochs, trainability is left as built.
  Loss: binary cross-entropy with config['label_smoothing']; metrics accuracy and ROC-AUC.
  Call under `strategy.scope()`.
  """
  if config['freeze_epochs']:
    head = models.feature_layer(inference_model)
    for layer in inference_model.layers:
      layer.trainable = phase == 'full' or layer is head
  training_model.compile(
      optimizer=_optimizer(config, phase, steps_per_epoch),
      loss=keras.losses.BinaryCrossentropy(label_smoothing=config['label_smoothing']),
      metrics=[keras.metrics.BinaryAccuracy(name='accuracy'), keras.metrics.AUC(name='auc')],
      jit_compile=config['jit_compile'])


def build_models(config: dict, steps_per_epoch: int | None = None,
                 phase: str = 'full') -> tuple[keras.Model, keras.Model]:
  """(inference model, compiled training model = augmentation + inference model).

  Compiled by `compile_phase` for `phase` (the article's Adam at config['learning_rate'] and
  binary cross-entropy under the default config). `steps_per_epoch` is needed by a learning
  rate schedule or warm-up. Call under `strategy.scope()` to place the variables on the
  strategy's devices.
  """
  config = make_config(**config)
  inference_model = models.build_model(config['model'], config['image_size'], config['channels'],
                                       seed=config['seed'], crop=config['crop'],
                                       equalize=config['equalize'], weights=config['weights'])
  augmentation = augment.build_augmentation(**config['augment'], seed=config['seed'])
  training_model = augment.training_model(inference_model, augmentation)
  compile_phase(training_model, inference_model, config, phase, steps_per_epoch)
  return inference_model, training_model


def use_average_weights(model: keras.Model) -> None:
  """With an EMA optimizer, puts the moving averages into the trainable weights (no-op else)."""
  if model.optimizer is not None and model.optimizer.built:
    model.optimizer.finalize_variable_values(model.trainable_variables)


def _load_checkpoint(training_model: keras.Model, path: str) -> None:
  """Loads weights and optimizer state (the optimizer compiled for the file's phase)."""
  training_model.optimizer.build(training_model.trainable_variables)
  training_model.load_weights(path)


def init_weights_from(model: keras.Model, source: str) -> None:
  """Copies the weights of `source` (a model_dir or .keras file) into `model`, layer by name.

  Every layer of `model` that holds weights must exist in the source model under the same name
  with weights of the same shapes (the same network; the input size may differ where the
  weights do not depend on it). Layers without weights (crop, equalize) are not compared.

  Raises:
    UsageError: naming the source and the first layer that is missing or differs in shape.
    ModelLoadError: the source is not a loadable covidlib model.
  """
  source_model = md.load_model(source)
  source_layers = {layer.name: layer for layer in source_model.layers}
  for layer in model.layers:
    weights = layer.get_weights()
    if not weights:
      continue
    other = source_layers.get(layer.name)
    if other is None:
      raise errors.UsageError(
          f'init_from {source!r}: its model ({source_model.name}) has no layer {layer.name!r} '
          f'of {model.name}: init_from needs a model of the same network')
    other_weights = other.get_weights()
    shapes = [w.shape for w in weights]
    other_shapes = [w.shape for w in other_weights]
    if shapes != other_shapes:
      raise errors.UsageError(
          f'init_from {source!r}: layer {layer.name!r} has weights of shapes {other_shapes} '
          f'there and {shapes} here: init_from needs a model of the same network and input')
    layer.set_weights(other_weights)


def _kept_epoch(state: dict, keep: str, has_validation: bool) -> tuple[int, str, str, str]:
  """(epoch, kept_by, reason, weights file) of the epoch whose weights the model keeps.

  kept_by is 'val_auc' (the best epoch) or 'last'; reason is one phrase for people.
  """
  last = (state['epoch'], 'last', state['weights'])
  if keep == 'last':
    return last[0], last[1], 'the last epoch, keep=last', last[2]
  if state['best_auc_epoch']:
    return (state['best_auc_epoch'], KEEP_MONITOR, f'highest {KEEP_MONITOR}',
            state['best_auc_weights'])
  why = ('no validation data' if not has_validation else
         f'no epoch had a finite {KEEP_MONITOR}')
  return last[0], last[1], f'the last epoch: keep=best found {why}', last[2]


def _history_record(state: dict, kept: tuple[int, str, str, str]) -> dict:
  """history.json: the per-epoch lists and the record of the kept epoch (and extensions)."""
  epoch, by, reason, _ = kept
  history = {k: list(v) for k, v in state['history'].items()}
  record = {**history, 'kept_epoch': epoch, 'kept_by': by, 'kept_reason': reason,
            'kept_metrics': {k: v[epoch - 1] for k, v in history.items() if len(v) >= epoch}}
  if state['extended_from_epochs']:
    record['extended_from_epochs'] = state['extended_from_epochs']
  return record


def _is_chief(strategy: tf.distribute.Strategy) -> bool:
  resolver = getattr(strategy, 'cluster_resolver', None)
  if resolver is None or not resolver.task_type:
    return True
  if resolver.task_type == 'chief':
    return True
  has_chief = 'chief' in resolver.cluster_spec().as_dict()
  return resolver.task_type == 'worker' and resolver.task_id == 0 and not has_chief


def _save_inference_model(model: keras.Model, config: dict, path: str) -> None:
  """Saves the inference model atomically, as float32 whatever policy it was trained under,
  flip-averaged for tta='flip' (`covidlib.ensemble.flip_average`).

  A mixed-precision model computes in float16/bfloat16; saved that way it would run slowly (or
  not at all) on CPUs and in exporters. Weights are float32 variables under every policy, so a
  float32 rebuild with the same weights is the same model at full precision.
  """
  if model.dtype_policy.name != 'float32':
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy('float32')
    try:
      plain = models.build_model(config['model'], config['image_size'], config['channels'],
                                 crop=config['crop'], equalize=config['equalize'])
    finally:
      keras.config.set_dtype_policy(previous)
    plain.set_weights(model.get_weights())
    model = plain
  if config['tta'] == 'flip':
    model = ensemble.flip_average(model)
  with md.atomic_path(path, suffix='.keras') as tmp:
    model.save(tmp, overwrite=True)


def train(config: dict, model_dir: str, *, train_data: tf.data.Dataset | None = None,
          validation_data: tf.data.Dataset | None = None, overwrite: bool = False,
          strategy: tf.distribute.Strategy | None = None,
          callbacks: Iterable[keras.callbacks.Callback] = (), verbose: int = 0) -> dict:
  """Trains the model a config describes; writes model_dir; returns the complete history.

  Args:
    config: keys of DEFAULT_CONFIG (missing ones take the default).
    model_dir: where config.json, checkpoints/, logs/, history.json and model.keras go.
      An unfinished run there with the same config is resumed; a finished one is extended
      when only `epochs` is larger, else refused unless `overwrite`.
    train_data, validation_data: batched datasets of (image, label); when given, they replace
      the datasets named by config (e.g. cross-validation folds); config['dataset'] and
      config['balance'] then only describe them (the caller balances its own data, as
      covidlib.crossval.training_dataset does).
    overwrite: delete a previous run's files in model_dir and start from scratch.
    strategy: an existing tf.distribute strategy instead of config['strategy'].
    callbacks: extra Keras callbacks for fit.
    verbose: Keras fit verbosity (0 silent, 1 progress bars, 2 one line per epoch).

  Returns:
    What history.json holds: Keras History.history of all epochs (those before a restart or
    an extension included) and the kept-epoch record (kept_epoch, kept_by, kept_reason,
    kept_metrics; extended_from_epochs if extended).

  Raises:
    UsageError: a bad config, a mismatched model_dir or a finished one with nothing to
      train, an uneven batch split.
    TrainingError: the loss became NaN or infinite.
  """
  # ---------------------------------------------------------------------- Configuration.
  config = make_config(**config)
  model_dir = os.fspath(model_dir)
  if config['class_names'] is None and str(config['dataset']).startswith('labelled_xrays/'):
    try:  # A dataset that is not built fails below, with the message that says how to build it.
      config['class_names'] = list(data.class_names(config['dataset'], config['data_dir']))
    except errors.CovidlibError:
      pass

  # ------------------------------------------ Strategy and precision (before other TF ops).
  strategy = strategy or distribute.get_strategy(config['strategy'])
  distribute.check_batch_size(config['batch_size'], strategy)
  previous_policy = keras.config.dtype_policy()
  distribute.set_precision(config['mixed_precision'])
  try:
    chief = _is_chief(strategy)

    # ------------------------------------------------- model_dir: new, resume or refuse.
    if chief:
      _check_model_dir(model_dir, config, overwrite)
    # Other workers resume from the chief's checkpoints (model_dir on a shared filesystem).
    state = _load_state(None if overwrite and not chief else model_dir)

    # ------------------------------------------------------------------------ Seeds.
    if config['seed'] is not None:
      keras.utils.set_random_seed(config['seed'])
    if config['deterministic']:
      tf.config.experimental.enable_op_determinism()  # For the whole process, irreversibly.

    # ---------------------------------------------------------------- Input pipeline.
    class_weight = None
    if config['class_weight'] == 'balanced':
      if train_data is not None:
        counts = count_labels(train_data)
      elif config['balance'] == 'source':
        counts = _balanced_class_counts(config)
      else:
        counts = _config_class_counts(config)
      class_weight = balanced_class_weight(*counts)
    steps_per_epoch = None
    if train_data is None:
      train_data, validation_data = load_datasets(config)
      if config['balance'] == 'source':
        steps_per_epoch = balanced_steps(config)
    train_data = input_for_training(train_data)
    validation_data = input_for_training(validation_data)
    fit_data = train_data  # Mixed for fit only: validation, and the shift score's fit, never.
    if config['mixup']:
      fit_data = augment.mixup(train_data, config['mixup'], config['seed'])
    if config['early_stopping_patience'] and validation_data is None:
      raise errors.UsageError('early stopping (early_stopping_patience='
                              f'{config["early_stopping_patience"]}) needs validation data')
    schedule_steps = None  # A schedule or warm-up counts steps; a constant rate needs none.
    if config['lr_schedule'] != 'constant' or config['warmup_epochs']:
      schedule_steps = count_steps(train_data, steps_per_epoch)

    # ------------------------------------------------------------ Model and optimizer.
    # Compiled for the phase of the checkpoint to resume from (its optimizer state must fit).
    phase = phase_of_epoch(config, max(state['epoch'], 1))
    with strategy.scope():
      inference_model, training_model = build_models(config, schedule_steps, phase)
      distribute.patch_multi_worker_fit(training_model, strategy)

    # ------------------------------------------------------------ Resume or extend.
    checkpoints = os.path.join(model_dir, md.CHECKPOINTS)
    if config['init_from'] and not state['weights']:
      init_weights_from(inference_model, config['init_from'])
    if state['weights']:
      _load_checkpoint(training_model, os.path.join(checkpoints, state['weights']))
    if state['finished'] and state['epoch'] < config['epochs']:  # _check_model_dir allowed it.
      state = {**state, 'finished': False, 'extended_from_epochs': state['epoch']}
      decision = os.path.join(model_dir, md.DECISION)
      if chief and os.path.exists(decision):
        os.remove(decision)
        log.warning('removed %s: it was chosen for the model of %d epochs; choose it again '
                    'for the extended one', decision, state['epoch'])
      if verbose:
        print(f'Extending {model_dir} from {state["epoch"]} to {config["epochs"]} epochs.')
    elif state['weights'] and verbose:
      print(f'Resuming {model_dir} after epoch {state["epoch"]} of {config["epochs"]}.')

    # ------------------------------------------------------- Fit, phase by phase.
    if chief:
      md.write_json(os.path.join(model_dir, md.CONFIG), config)
      os.makedirs(checkpoints, exist_ok=True)
    checkpoint = EpochCheckpoint(model_dir, state, config['early_stopping_patience'],
                                 config['keep'], chief)
    nan_guard = NaNGuard()
    fit_callbacks = [nan_guard, AverageForValidation(), checkpoint, *callbacks]
    if chief:
      fit_callbacks.append(keras.callbacks.TensorBoard(os.path.join(model_dir, md.LOGS)))
    for next_phase in PHASES:
      done, end = phase_epochs(config, next_phase)
      state = checkpoint.state
      if state['epoch'] >= end or state['stopped_early'] or nan_guard.failure:
        continue
      if next_phase != phase:
        # The head phase is over (in this process, or before a restart): the full phase starts
        # from its weights as they would be saved (the moving average, with ema), with a fresh
        # optimizer for all the weights at finetune_learning_rate.
        use_average_weights(training_model)
        with strategy.scope():
          compile_phase(training_model, inference_model, config, next_phase, schedule_steps)
        phase = next_phase
        if verbose:
          print(f'Unfreezing after epoch {done}: training every layer at '
                f'{config["finetune_learning_rate"]:g}.')
      training_model.fit(fit_data, validation_data=validation_data, epochs=end,
                         initial_epoch=state['epoch'], class_weight=class_weight,
                         steps_per_epoch=steps_per_epoch,
                         callbacks=fit_callbacks, verbose=verbose,
                         shuffle=False)  # tf.data shuffles (seeded); Keras cannot.
    if nan_guard.failure:
      epoch, batch = nan_guard.failure
      kept = (f'; epochs 1-{epoch - 1} are kept in {checkpoints}' if epoch > 1 and chief
              else '')
      raise TrainingError(
          f'loss became NaN at epoch {epoch}, batch {batch} (learning_rate '
          f'{config["learning_rate"]:g}); lower --learning_rate (or check the data for '
          f'broken images) and train again with --overwrite{kept}')
    state = checkpoint.state

    # --------------------------------------------------------------------------- Save.
    kept = _kept_epoch(state, config['keep'], validation_data is not None)
    if kept[1] == 'last' and config['keep'] == 'best':
      log.warning('%s: kept epoch %d, %s', model_dir, kept[0], kept[2])
    record = _history_record(state, kept)
    if chief:
      # The kept epoch's weights (and with ema its averages, which replace them), loaded into
      # the model compiled for that epoch's phase.
      if phase_of_epoch(config, kept[0]) != phase:
        phase = phase_of_epoch(config, kept[0])
        with strategy.scope():
          compile_phase(training_model, inference_model, config, phase, schedule_steps)
      _load_checkpoint(training_model, os.path.join(checkpoints, kept[3]))
      use_average_weights(training_model)
      md.write_json(os.path.join(model_dir, md.HISTORY), record)
      _save_inference_model(inference_model, config, os.path.join(model_dir, md.MODEL))
      # The commit point of a finished run; checkpoints/ stays, to extend it from.
      md.write_json(os.path.join(checkpoints, STATE), {**state, 'finished': True})
      # The shift score (issue #10): logged, never raised; needs a validation split.
      shift_fit.fit_after_training(model_dir, inference_model, config, train_data, validation_data)
    return record
  finally:
    keras.config.set_dtype_policy(previous_policy)
