"""Fitting a model_dir's shift score (covidlib.shift) and its reference (covidlib.reference) on
its own training and validation splits.

    from covidlib import shift_fit
    shift_model = shift_fit.fit_model_dir('runs/compact_resnet', policy='quantile:0.99')

or `covidlib-fit-shift --model_dir=runs/compact_resnet` for a model_dir trained before the
score or the reference existed. covidlib-train calls `fit_after_training` when it saves the model.

Each split is scored once (`covidlib.scoring.score_dataset` with taps=True: the model's answers
and the pooled features at every tap, in one forward pass), and those arrays feed everything:
the score is fitted on the training split, its threshold chosen on the validation split, and the
reference drawn from the validation split (`make_reference`). The fit, the threshold and the
storage are `covidlib.shift`'s and `covidlib.reference`'s, on arrays.
"""

from __future__ import annotations

import logging
import os

import tensorflow as tf

from covidlib import errors
from covidlib import model_dir as md
from covidlib import models
from covidlib import reference as reference_lib
from covidlib import scored as scored_lib
from covidlib import scoring
from covidlib import shift
from covidlib.reference import Reference
from covidlib.scored import Scored
from covidlib.shift import ShiftModel

log = logging.getLogger(__name__)

# The reference is drawn from the validation split: the weights were not fitted on those films,
# so they look to the network as familiar as films of the same site it never saw, which is what
# a new site is compared with. Training films look MORE familiar (tighter, more confident
# features), so a reference of training films makes even the training site's own new films look
# shifted. Only when validation holds fewer than MIN_REFERENCE_FILMS films is the reference
# topped up from the training split, to that minimum and no further: below about 100 films a
# two-sample test against a batch of ~50 new films loses its footing (a domain classifier's
# ROC-AUC has a standard error of about 0.05 with 100 reference films and 50 new ones, 0.07
# with 30; Hanley & McNeil 1982), and the few training films that brings in are the lesser harm.
MIN_REFERENCE_FILMS = 100


def score_split(model, dataset) -> Scored:
  """The one scoring pass over a split: answers, labels and pooled features at every tap."""
  models.feature_layer(model)  # UsageError naming the model when it lacks covidlib's head.
  return scoring.score_dataset(model, dataset, taps=True)


def features_and_labels(model, dataset):
  """Penultimate features (n, d) and labels (n,) of every (image, label[, ...]) batch."""
  models.feature_layer(model)
  scored = scoring.score_dataset(model, dataset)
  return scored.features, scored.labels


def make_reference(validation: Scored, train: Scored | None = None, *,
                   max_films: int = reference_lib.MAX_FILMS,
                   min_films: int = MIN_REFERENCE_FILMS, seed: int = 0) -> Reference:
  """The reference of a model_dir from its scored validation (and training) split.

  Up to `max_films` validation films (drawn per class in proportion, seeded); when validation
  holds fewer than `min_films`, training films (drawn likewise) top it up to `min_films`, and
  `split` says 'validation+train'. See MIN_REFERENCE_FILMS for why.

  Raises:
    UsageError: a part scored without taps.
  """
  for name, part in (('validation', validation), ('train', train)):
    if part is not None and part.taps is None:
      raise errors.UsageError(f'reference: the {name} split was scored without taps')
  parts = [validation.select(reference_lib.choose_films(validation.labels, max_films, seed))]
  split = 'validation'
  short = min(min_films, max_films) - len(validation)
  if short > 0 and train is not None and len(train):
    parts.append(train.select(reference_lib.choose_films(train.labels, short, seed)))
    split = 'validation+train'
  films = scored_lib.concat(parts)
  taps = list(validation.taps)
  return reference_lib.from_arrays(taps, [films.taps[t] for t in taps], films.labels,
                                   films.scores, split=split)


def fit_scored(train: Scored, validation: Scored, *, policy: str = shift.DEFAULT_POLICY,
               shrinkage: float | str = 'ledoit_wolf', fit_split: str = 'train',
               threshold_split: str = 'validation') -> tuple[ShiftModel, Reference]:
  """The shift score (fitted on `train`, threshold on `validation`) and the reference, from the
  two splits' scoring passes (`score_split`)."""
  shift.parse_policy(policy)
  shift_model = shift.fit_shift(train.taps, train.labels, shrinkage=shrinkage,
                                fit_split=fit_split, validation=validation.taps,
                                normalised_on=threshold_split)
  shift_model = shift.choose_threshold(shift_model, shift_model.score(validation.taps), policy,
                                       threshold_split,
                                       tap_scores=shift_model.tap_scores(validation.taps))
  return shift_model, make_reference(validation, train)


def fit_for_model(model, train_data, validation_data, *, policy: str = shift.DEFAULT_POLICY,
                  shrinkage: float | str = 'ledoit_wolf', fit_split: str = 'train',
                  threshold_split: str = 'validation') -> tuple[ShiftModel, Reference]:
  """Scores each split once, fits the score on `train_data`, chooses its threshold on
  `validation_data` and draws the reference from it."""
  shift.parse_policy(policy)  # A bad policy fails before any image is read.
  train = score_split(model, train_data)
  validation = score_split(model, validation_data)
  return fit_scored(train, validation, policy=policy, shrinkage=shrinkage, fit_split=fit_split,
                    threshold_split=threshold_split)


def save(folder: str | os.PathLike, shift_model: ShiftModel, reference: Reference) -> None:
  """Writes the shift score and the reference; on a failure neither stays (no half state)."""
  try:
    reference_lib.save(reference, folder)
    shift.save(shift_model, folder)
  except BaseException:
    remove(folder)
    raise


def remove(folder: str | os.PathLike) -> None:
  """Deletes the shift score and the reference: those of another model must not stay."""
  shift.remove(folder)
  reference_lib.remove(folder)


def fit_model_dir(model_dir: str | os.PathLike, *, policy: str = shift.DEFAULT_POLICY,
                  shrinkage: float | str = 'ledoit_wolf', batch_size: int = 32,
                  model=None, train_data=None, validation_data=None) -> ShiftModel:
  """Fits and stores the shift score and the reference of a finished model_dir (what
  covidlib-fit-shift runs).

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
    train_data, _ = scoring.load_split(config, train_split, batch_size=batch_size, cache=False)
  if validation_data is None:
    validation_data, _ = scoring.load_split(config, validation_split, batch_size=batch_size,
                                            cache=False)
  shift_model, reference = fit_for_model(
      model, train_data, validation_data, policy=policy, shrinkage=shrinkage,
      fit_split=train_split, threshold_split=validation_split or 'validation')
  save(model_dir, shift_model, reference)
  return shift_model


def fit_after_training(model_dir: str, model, config: dict, train_data=None,
                       validation_data=None) -> ShiftModel | None:
  """The end-of-training hook: fits and stores the shift score and the reference; never raises.

  Skipped (None) without a validation split. A failure is logged and nothing is written, so
  the trained model is never lost to it; `covidlib-fit-shift` can fit both later.
  `train_data` (passed to train() by a caller such as cross-validation) is used when finite;
  otherwise the config's training split is reloaded unshuffled.
  """
  if validation_data is None and not config.get('validation_split'):
    log.info('shift score and reference not fitted: no validation split to choose the '
             'threshold on and draw the reference from')
    remove(model_dir)  # A previous run's would describe another model.
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
    log.warning('shift score and reference not fitted for %s (%s: %s); run covidlib-fit-shift '
                '--model_dir=%s to fit them', model_dir, type(e).__name__, e, model_dir)
    remove(model_dir)
    return None
