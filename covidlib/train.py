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

`train()` reads top to bottom: configuration -> strategy and precision -> model_dir (new,
resumable, or finished) -> seeds -> input pipeline -> model and optimizer -> resume -> fit ->
save. What it writes into model_dir is described in `covidlib.model_dir`.

Resuming. At the end of every epoch the weights and the optimizer state go to
`checkpoints/epoch-NNNN.weights.h5` (temporary file, then rename), and then
`checkpoints/state.json` names that file and holds the history so far (also atomic: it is the
commit point). A run killed at any moment and started again with the same config reloads the
last committed epoch and trains the remaining ones; the returned and saved history is complete.
(Keras' own `BackupAndRestore` writes its weights and metadata in place, so a kill during the
write leaves a checkpoint that cannot be loaded; hence this small callback.) The data order and
augmentation draws of a resumed run differ from an uninterrupted one: resuming is exact in
weights and epoch count, not bit-identical in the result.

Early stopping (`early_stopping_patience` > 0) watches val_loss, keeps the best epoch's weights
in `checkpoints/best.weights.h5` and restores them at the end; its state survives a restart too.

Multi-worker: every worker runs the same call; only the chief writes to model_dir, and every
worker resumes from the chief's checkpoints, so model_dir must be on a filesystem all workers
share.
"""

from __future__ import annotations

import glob
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
from covidlib import errors
from covidlib import model_dir as md
from covidlib import models
from covidlib import shift_fit
from covidlib import standardize
from covidlib_tfds import build as tfds_build

STATE = 'state.json'
BEST_WEIGHTS = 'best.weights.h5'

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
    'batch_size': 32,        # Global batch: split evenly over the strategy's replicas.
    'epochs': 10,
    'learning_rate': 1e-3,   # Adam; the article's optimizer and Keras' default rate.
    'class_weight': 'none',  # 'balanced': weight n / (2 n_class), for unbalanced splits.
    'early_stopping_patience': 0,  # Epochs without a lower val_loss before stopping; 0 = off.
    'seed': 0,               # Shuffling, augmentation, initial weights, dropout.
    'deterministic': False,  # Also make ops deterministic (same weights on every CPU run).
    'strategy': 'auto',
    'mixed_precision': 'auto',
    'jit_compile': 'auto',   # XLA; Keras' 'auto' uses it on GPU/TPU only.
    # Measures against source shortcuts (issue #9); all off by default (= the plain recipe).
    'crop': 0.0,             # Fraction of each side cut off INSIDE the model (covidlib.standardize).
    'equalize': 'none',      # 'histogram' or 'clahe': per-image equalization inside the model.
    'balance': 'none',       # 'source': draw each (source, label) stratum of train equally often.
    'augment_preset': 'article',  # Base of 'augment': covidlib.augment.PRESETS ('strong').
    'augment': dict(augment.PRESETS['article']),  # build_augmentation arguments; keys given
}                                                 # here override the preset's.

_POSITIVE_INTS = ('image_size', 'batch_size', 'epochs')


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

  for key in _POSITIVE_INTS:
    if not is_int(config[key]) or config[key] < 1:
      bad(key, 'a positive integer')
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
  if config['class_weight'] not in ('none', 'balanced'):
    bad('class_weight', "'none' or 'balanced'")
  patience = config['early_stopping_patience']
  if not is_int(patience) or patience < 0:
    bad('early_stopping_patience', 'an integer >= 0')
  if patience and not config['validation_split']:
    raise errors.UsageError('early stopping (early_stopping_patience='
                            f'{patience}) needs a validation split; validation_split is empty')
  if config['seed'] is not None and (not is_int(config['seed']) or config['seed'] < 0):
    bad('seed', 'a non-negative integer or None')
  if not isinstance(config['allow_missing'], bool):
    bad('allow_missing', 'true or false')
  if not isinstance(config['deterministic'], bool):
    bad('deterministic', 'true or false')
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


def _with_defaults(saved: dict) -> dict:
  """A config.json of an older covidlib completed with the defaults of keys it predates (the
  run used them), so a resumed run compares like with like."""
  saved = {**DEFAULT_CONFIG, **saved}
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


def _check_model_dir(model_dir: str, config: dict, overwrite: bool) -> None:
  """Refuses a finished run (unless overwrite) and resuming a run with another config.

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
  elif os.path.exists(os.path.join(model_dir, md.MODEL)):
    raise errors.UsageError(
        f'model_dir {model_dir!r} holds a finished run ({md.MODEL}); pass --overwrite to '
        'train again from scratch, or choose another model_dir')
  elif os.path.exists(os.path.join(model_dir, md.CHECKPOINTS, STATE)):
    saved = _with_defaults(md.read_json(config_path))
    differing = sorted(k for k in set(saved) | set(config) if saved.get(k) != config.get(k))
    if differing:
      details = '; '.join(f'{k}: {saved.get(k)!r} saved, {config.get(k)!r} now'
                          for k in differing)
      raise errors.UsageError(
          f'model_dir {model_dir!r} holds an unfinished run with another configuration '
          f'({details}); rerun with the same settings to resume it, or pass --overwrite to '
          'start over')
  else:  # A run stopped before its first epoch ended: nothing to resume, start afresh.
    _clear_run(model_dir)


def _load_state(model_dir: str | None) -> dict:
  """The last committed epoch's state (a fresh one for None or when nothing is committed)."""
  path = os.path.join(model_dir, md.CHECKPOINTS, STATE) if model_dir else ''
  if not os.path.exists(path):
    return {'epoch': 0, 'weights': None, 'history': {}, 'best_epoch': None,
            'best_val_loss': None, 'stopped_early': False}
  return md.read_json(path)


# --------------------------------------------------------------------------------------------
# Callbacks: commit each epoch atomically (resume, early stopping); stop on a NaN loss.
# --------------------------------------------------------------------------------------------


def _save_weights_atomic(model: keras.Model, path: str) -> None:
  with md.atomic_path(path, suffix='.weights.h5') as tmp:
    model.save_weights(tmp, overwrite=True)


class EpochCheckpoint(keras.callbacks.Callback):
  """Commits weights, history and early-stopping state at the end of every finite epoch."""

  def __init__(self, model_dir: str, state: dict, patience: int, write: bool):
    super().__init__()
    self.directory = os.path.join(model_dir, md.CHECKPOINTS)
    self.history_path = os.path.join(model_dir, md.HISTORY)
    self.state = state
    self.patience = patience
    self.write = write

  def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
    logs = {k: float(v) for k, v in (logs or {}).items()}
    if not math.isfinite(logs.get('loss', math.nan)):
      return  # NaNGuard reports it; never commit a diverged epoch.
    state = dict(self.state)
    history = {k: list(v) for k, v in state['history'].items()}
    for key, value in logs.items():
      history.setdefault(key, []).append(value)
    state.update(epoch=epoch + 1, history=history)
    improved = False
    if self.patience:
      val_loss = logs.get('val_loss', math.nan)
      best = state['best_val_loss']
      improved = math.isfinite(val_loss) and (best is None or val_loss < best)
      if improved:
        state.update(best_epoch=epoch + 1, best_val_loss=val_loss)
      if epoch + 1 - (state['best_epoch'] or 0) >= self.patience:
        state['stopped_early'] = True
        self.model.stop_training = True
    if self.write:
      name = f'epoch-{epoch + 1:04d}.weights.h5'
      _save_weights_atomic(self.model, os.path.join(self.directory, name))
      if improved:
        _save_weights_atomic(self.model, os.path.join(self.directory, BEST_WEIGHTS))
      state['weights'] = name
      md.write_json(os.path.join(self.directory, STATE), state)  # The commit point.
      md.write_json(self.history_path, history)
      for old in glob.glob(os.path.join(self.directory, 'epoch-*.weights.h5')):
        if os.path.basename(old) != name:
          os.remove(old)
    self.state = state


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


def build_models(config: dict) -> tuple[keras.Model, keras.Model]:
  """(inference model, compiled training model = augmentation + inference model).

  Adam at config['learning_rate'], binary cross-entropy, accuracy and ROC-AUC, as the article
  (plus AUC). Call under `strategy.scope()` to place the variables on the strategy's devices.
  """
  config = make_config(**config)
  inference_model = models.build_model(config['model'], config['image_size'], config['channels'],
                                       seed=config['seed'], crop=config['crop'],
                                       equalize=config['equalize'])
  augmentation = augment.build_augmentation(**config['augment'], seed=config['seed'])
  training_model = augment.training_model(inference_model, augmentation)
  training_model.compile(
      optimizer=keras.optimizers.Adam(config['learning_rate']),
      loss=keras.losses.BinaryCrossentropy(),
      metrics=[keras.metrics.BinaryAccuracy(name='accuracy'), keras.metrics.AUC(name='auc')],
      jit_compile=config['jit_compile'])
  return inference_model, training_model


def _is_chief(strategy: tf.distribute.Strategy) -> bool:
  resolver = getattr(strategy, 'cluster_resolver', None)
  if resolver is None or not resolver.task_type:
    return True
  if resolver.task_type == 'chief':
    return True
  has_chief = 'chief' in resolver.cluster_spec().as_dict()
  return resolver.task_type == 'worker' and resolver.task_id == 0 and not has_chief


def _save_inference_model(model: keras.Model, config: dict, path: str) -> None:
  """Saves the inference model atomically, as float32 whatever policy it was trained under.

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
      A finished run there is refused unless `overwrite`; an unfinished one with the same
      config is resumed.
    train_data, validation_data: batched datasets of (image, label); when given, they replace
      the datasets named by config (e.g. cross-validation folds); config['dataset'] and
      config['balance'] then only describe them (the caller balances its own data, as
      covidlib.crossval.training_dataset does).
    overwrite: delete a previous run's files in model_dir and start from scratch.
    strategy: an existing tf.distribute strategy instead of config['strategy'].
    callbacks: extra Keras callbacks for fit.
    verbose: Keras fit verbosity (0 silent, 1 progress bars, 2 one line per epoch).

  Returns:
    Keras History.history of all epochs, those before a restart included.

  Raises:
    UsageError: a bad config, a finished or mismatched model_dir, an uneven batch split.
    TrainingError: the loss became NaN or infinite.
  """
  # ---------------------------------------------------------------------- Configuration.
  config = make_config(**config)
  model_dir = os.fspath(model_dir)

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
    if config['early_stopping_patience'] and validation_data is None:
      raise errors.UsageError('early stopping (early_stopping_patience='
                              f'{config["early_stopping_patience"]}) needs validation data')

    # ------------------------------------------------------------ Model and optimizer.
    with strategy.scope():
      inference_model, training_model = build_models(config)
      distribute.patch_multi_worker_fit(training_model, strategy)

    # ------------------------------------------------------------------------ Resume.
    checkpoints = os.path.join(model_dir, md.CHECKPOINTS)
    if state['weights']:
      training_model.optimizer.build(training_model.trainable_variables)
      training_model.load_weights(os.path.join(checkpoints, state['weights']))
      if verbose:
        print(f'Resuming {model_dir} after epoch {state["epoch"]} of {config["epochs"]}.')

    # --------------------------------------------------------------------------- Fit.
    if chief:
      md.write_json(os.path.join(model_dir, md.CONFIG), config)
      os.makedirs(checkpoints, exist_ok=True)
    checkpoint = EpochCheckpoint(model_dir, state, config['early_stopping_patience'], chief)
    nan_guard = NaNGuard()
    fit_callbacks = [nan_guard, checkpoint, *callbacks]
    if chief:
      fit_callbacks.append(keras.callbacks.TensorBoard(os.path.join(model_dir, md.LOGS)))
    if state['epoch'] < config['epochs'] and not state['stopped_early']:
      training_model.fit(train_data, validation_data=validation_data, epochs=config['epochs'],
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
    if state['best_epoch'] and state['best_epoch'] != state['epoch']:
      training_model.load_weights(os.path.join(checkpoints, BEST_WEIGHTS))
    if chief:
      md.write_json(os.path.join(model_dir, md.HISTORY), state['history'])
      _save_inference_model(inference_model, config, os.path.join(model_dir, md.MODEL))
      shutil.rmtree(checkpoints, ignore_errors=True)
      # The shift score (issue #10): logged, never raised; needs a validation split.
      shift_fit.fit_after_training(model_dir, inference_model, config, train_data, validation_data)
    return state['history']
  finally:
    keras.config.set_dtype_policy(previous_policy)
