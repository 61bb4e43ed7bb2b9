"""Fitting a model_dir's shift score (covidlib.shift) on its own training and validation splits.

    from covidlib import shift_fit
    shift_model = shift_fit.fit_model_dir('runs/compact_resnet', policy='quantile:0.99')

or `covidlib-fit-shift --model_dir=runs/compact_resnet` for a model_dir trained before the
score existed. covidlib-train calls `fit_after_training` when it saves the model.

The features come from the one scoring pass (`covidlib.scoring`); the fit, the threshold and the
storage are `covidlib.shift`'s, on arrays.
"""

from __future__ import annotations

import logging
import os

import tensorflow as tf

from covidlib import errors
from covidlib import model_dir as md
from covidlib import models
from covidlib import scoring
from covidlib import shift
from covidlib.shift import ShiftModel

log = logging.getLogger(__name__)


def features_and_labels(model, dataset):
  """Penultimate features (n, d) and labels (n,) of every (image, label[, ...]) batch."""
  models.feature_layer(model)  # UsageError naming the model when it lacks covidlib's head.
  scored = scoring.score_dataset(model, dataset)
  return scored.features, scored.labels


def fit_for_model(model, train_data, validation_data, *, policy: str = shift.DEFAULT_POLICY,
                  shrinkage: float | str = 'ledoit_wolf', fit_split: str = 'train',
                  threshold_split: str = 'validation') -> ShiftModel:
  """Fits the score on `train_data` and chooses its threshold on `validation_data`."""
  shift.parse_policy(policy)  # A bad policy fails before any image is read.
  features, labels = features_and_labels(model, train_data)
  shift_model = shift.fit_shift(features, labels, shrinkage=shrinkage, fit_split=fit_split)
  val_features, _ = features_and_labels(model, validation_data)
  return shift.choose_threshold(shift_model, shift_model.score(val_features), policy,
                                threshold_split)


def fit_model_dir(model_dir: str | os.PathLike, *, policy: str = shift.DEFAULT_POLICY,
                  shrinkage: float | str = 'ledoit_wolf', batch_size: int = 32,
                  model=None, train_data=None, validation_data=None) -> ShiftModel:
  """Fits and stores the shift score of a finished model_dir (what covidlib-fit-shift runs).

  The training and validation splits named by config.json are reloaded unshuffled
  (covidlib.scoring.load_split) unless datasets are passed in.

  Raises:
    UsageError: not a finished model_dir, a bad policy, or a config without a validation split.
  """
  model_dir = md.check_model_dir(model_dir)
  shift.parse_policy(policy)
  config = md.load_config(model_dir)
  train_split = config.get('train_split') or 'train'
  validation_split = config.get('validation_split')
  if validation_data is None and not validation_split:
    raise errors.UsageError(f'{model_dir}: config.json names no validation split to choose the '
                            'shift threshold on')
  if model is None:
    model = md.load_model(model_dir)
  if train_data is None:
    train_data, _ = scoring.load_split(config, train_split, batch_size=batch_size)
  if validation_data is None:
    validation_data, _ = scoring.load_split(config, validation_split, batch_size=batch_size)
  shift_model = fit_for_model(model, train_data, validation_data, policy=policy,
                              shrinkage=shrinkage, fit_split=train_split,
                              threshold_split=validation_split or 'validation')
  shift.save(shift_model, model_dir)
  return shift_model


def fit_after_training(model_dir: str, model, config: dict, train_data=None,
                       validation_data=None) -> ShiftModel | None:
  """The end-of-training hook: fits and stores the shift score; never raises.

  Skipped (None) without a validation split. A failure is logged and nothing is written, so
  the trained model is never lost to it; `covidlib-fit-shift` can fit the score later.
  `train_data` (passed to train() by a caller such as cross-validation) is used when finite;
  otherwise the config's training split is reloaded unshuffled.
  """
  if validation_data is None and not config.get('validation_split'):
    log.info('shift score not fitted: no validation split to choose its threshold on')
    shift.remove(model_dir)  # A previous run's score would describe another model.
    return None
  try:
    if train_data is not None and \
        train_data.cardinality().numpy() == tf.data.INFINITE_CARDINALITY:
      train_data = None
    if train_data is None and config.get('dataset', '').find(' fold ') >= 0:
      raise errors.UsageError('no finite training data to fit on')
    if getattr(getattr(model, 'dtype_policy', None), 'name', 'float32') != 'float32':
      model = None  # Mixed precision: score the float32 model.keras that serving will run.
    return fit_model_dir(model_dir, model=model, train_data=train_data,
                         validation_data=validation_data, batch_size=int(config['batch_size']))
  except Exception as e:  # pylint: disable=broad-except  The model is saved; the score is extra.
    log.warning('shift score not fitted for %s (%s: %s); run covidlib-fit-shift --model_dir=%s '
                'to fit it', model_dir, type(e).__name__, e, model_dir)
    shift.remove(model_dir)
    return None
