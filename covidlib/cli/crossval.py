"""covidlib-crossval: patient-grouped k-fold cross-validation of one model configuration.

    covidlib-crossval --out=runs/cv_compact_resnet --model=compact_resnet \\
        --dataset=covid_xray/patient_split --data_dir=tfds_data --splits=train,validation \\
        --folds=5 --epochs=10

(or `python -m covidlib.cli.crossval ...`). Trains one model per fold into <out>/fold_<k>/ (each a
normal model_dir) and writes <out>/crossval.json and <out>/crossval.md: per-fold figures, mean
and 95% t-interval per figure, pooled out-of-fold metrics. Rerunning the same command reuses
finished folds (--overwrite retrains them). Keep the test split out of --splits so it stays
untouched for the final evaluation. Training settings not given as flags take covidlib.train's
defaults (DEFAULT_CONFIG), e.g. the article's augmentation.

Exit status: 0 done; 2 bad flags or usage; 1 other failures (one line on stderr, no traceback).
"""

from __future__ import annotations

from absl import flags

from covidlib.cli import common
from covidlib.cli import flag_util

_DEFINE = flag_util.define
_OUT = _DEFINE(flags.DEFINE_string, 'out', None, 'Folder for the fold model_dirs and reports.')
_DATASET = _DEFINE(flags.DEFINE_string, 'dataset', None,
                   "TFDS 'name/config' or 'folder:ROOT'; default covid_xray/patient_split.")
_DATA_DIR = _DEFINE(flags.DEFINE_string, 'data_dir', None, 'TFDS data_dir.')
_SPLITS = _DEFINE(flags.DEFINE_list, 'splits', ['train', 'validation'],
                  'Splits pooled for cross-validation (keep test out).')
_FOLDS = _DEFINE(flags.DEFINE_integer, 'folds', 5, 'Number of folds.', lower_bound=2)
_FOLD_SEED = _DEFINE(flags.DEFINE_integer, 'fold_seed', 0, 'Seed of the fold assignment.')
_NEAR_DUPLICATES = _DEFINE(flags.DEFINE_boolean, 'near_duplicates', True,
                           'Group near-duplicate images as well as patients.')
_THRESHOLD = _DEFINE(flags.DEFINE_float, 'threshold', 0.5,
                     'Label = P >= threshold for the threshold-dependent figures.',
                     lower_bound=0.0, upper_bound=1.0)
_N_BOOTSTRAP = _DEFINE(flags.DEFINE_integer, 'n_bootstrap', 1000,
                       'Bootstrap resamples for the pooled out-of-fold intervals.',
                       lower_bound=0)
_OVERWRITE = _DEFINE(flags.DEFINE_boolean, 'overwrite', False, 'Retrain finished folds.')
# Training settings; None = covidlib.train.DEFAULT_CONFIG's value.
_MODEL = _DEFINE(flags.DEFINE_string, 'model', None, 'Network (covidlib.models.MODELS).')
_IMAGE_SIZE = _DEFINE(flags.DEFINE_integer, 'image_size', None, 'Input side in pixels.')
_CHANNELS = _DEFINE(flags.DEFINE_integer, 'channels', None, '1, or 3 (gray repeated).')
_EPOCHS = _DEFINE(flags.DEFINE_integer, 'epochs', None, 'Epochs per fold.')
_BATCH_SIZE = _DEFINE(flags.DEFINE_integer, 'batch_size', None, 'Global batch size.')
_LEARNING_RATE = _DEFINE(flags.DEFINE_float, 'learning_rate', None, 'Adam learning rate.')
_SEED = _DEFINE(flags.DEFINE_integer, 'seed', None, 'Training seed (init, shuffle, augment).')
_CLASS_WEIGHT = _DEFINE(flags.DEFINE_string, 'class_weight', None, "'none' or 'balanced'.")
_VERBOSE = _DEFINE(flags.DEFINE_integer, 'verbose', 0, 'Keras fit verbosity (0, 1, 2).')

_TRAIN_FLAGS = {'model': _MODEL, 'image_size': _IMAGE_SIZE, 'channels': _CHANNELS,
                'epochs': _EPOCHS, 'batch_size': _BATCH_SIZE, 'learning_rate': _LEARNING_RATE,
                'seed': _SEED, 'class_weight': _CLASS_WEIGHT}


def main(argv: list[str]) -> None:
  common.reject_extra_args(argv)
  from covidlib import crossval
  from covidlib import errors
  from covidlib import train

  if not _OUT.value:
    raise errors.UsageError('flag --out is required')
  overrides = {key: holder.value for key, holder in _TRAIN_FLAGS.items()
               if holder.value is not None}
  dataset = _DATASET.value or train.DEFAULT_CONFIG['dataset']
  config = train.make_config(dataset=dataset, data_dir=_DATA_DIR.value, **overrides)
  pool = crossval.load_pool(dataset, _SPLITS.value, data_dir=_DATA_DIR.value,
                            image_size=config['image_size'], channels=config['channels'])
  result = crossval.cross_validate(
      config, _OUT.value, pool, n_folds=_FOLDS.value, fold_seed=_FOLD_SEED.value,
      threshold=_THRESHOLD.value, near_duplicates=_NEAR_DUPLICATES.value,
      n_bootstrap=_N_BOOTSTRAP.value, overwrite=_OVERWRITE.value, verbose=_VERBOSE.value)
  for name in ('accuracy', 'sensitivity', 'specificity', 'roc_auc'):
    s = result['summary'][name]
    if s['mean'] is None:
      print(f'{name}: undefined')
      continue
    low, high = s['ci95']
    print(f'{name}: {s["mean"]:.3f}' + ('' if low is None else f' [{low:.3f}, {high:.3f}]')
          + f' over {s["n_folds"]} folds')
  print(f'report: {_OUT.value}/{crossval.CROSSVAL_MD}')


def run() -> None:
  common.run_main(main, prog='covidlib-crossval')


if __name__ == '__main__':
  run()
