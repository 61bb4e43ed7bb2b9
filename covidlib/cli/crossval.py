"""covidlib-crossval: patient-grouped k-fold cross-validation of one model configuration.

    covidlib-crossval --out=runs/cv_compact_resnet --model=compact_resnet \\
        --dataset=covid_xray/patient_split --data_dir=tfds_data --splits=train,validation \\
        --folds=5 --epochs=10

    covidlib-crossval --hold_out=source --out=runs/holdout --dataset=covid_xray/adult_pediatric \\
        --data_dir=tfds_data --recipe=runs/default/compact_resnet --threshold_policy=youden

(or `python -m covidlib.cli.crossval ...`). With --hold_out=source it does not make folds: it
trains once per normal source with every image of that source left out (train split without it),
chooses the threshold on the validation split without it, and reports the specificity on that
source's normals (every split) and the sensitivity on the test split's COVID-19 images of other
sources: <out>/holdout_<source>/ model_dirs, <out>/hold_out.json and hold_out.md, which
`covidlib-evaluate --held_out_report=<out>` puts in its `shortcuts` section. --recipe takes
every training setting from an existing model_dir's config.json (flags given still override).
Without --hold_out: Trains one model per fold into <out>/fold_<k>/ (each a
normal model_dir) and writes <out>/crossval.json and <out>/crossval.md: per-fold figures, mean
and 95% t-interval per figure, pooled out-of-fold metrics. Rerunning the same command reuses
finished folds (--overwrite retrains them). Keep the test split out of --splits so it stays
untouched for the final evaluation. Training settings not given as flags take covidlib.train's
defaults (DEFAULT_CONFIG), e.g. the article's augmentation.

Exit status: 0 done; 2 bad flags or usage; 1 other failures (one line on stderr, no traceback).
"""

from __future__ import annotations

from absl import flags

from covidlib.cli import quiet_start  # noqa: F401  First: TensorFlow starts quietly (see there).
from covidlib import crossval
from covidlib import errors
from covidlib import hold_out
from covidlib import model_dir as md
from covidlib import threshold
from covidlib import train
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
_HOLD_OUT = _DEFINE(flags.DEFINE_string, 'hold_out', 'none',
                    "'none' (k folds) or 'source': leave each normal source out once.")
_SOURCES = _DEFINE(flags.DEFINE_list, 'sources', None,
                   'With --hold_out=source: the sources to leave out (default: every source '
                   'holding normal images).')
_THRESHOLD_POLICY = _DEFINE(flags.DEFINE_string, 'threshold_policy', 'youden',
                            'With --hold_out=source: how the threshold is chosen on validation.')
_RECIPE = _DEFINE(flags.DEFINE_string, 'recipe', None,
                  'A model_dir whose config.json gives the training settings.')
_VERBOSE = _DEFINE(flags.DEFINE_integer, 'verbose', 0, 'Keras fit verbosity (0, 1, 2).')

_TRAIN_FLAGS = {'model': _MODEL, 'image_size': _IMAGE_SIZE, 'channels': _CHANNELS,
                'epochs': _EPOCHS, 'batch_size': _BATCH_SIZE, 'learning_rate': _LEARNING_RATE,
                'seed': _SEED, 'class_weight': _CLASS_WEIGHT}


def main(argv: list[str]) -> None:
  common.reject_extra_args(argv)
  if not _OUT.value:
    raise errors.UsageError('flag --out is required')
  overrides = {key: holder.value for key, holder in _TRAIN_FLAGS.items()
               if holder.value is not None}
  recipe = {}
  if _RECIPE.value:
    recipe = train.saved_config(md.load_config(md.check_model_dir(_RECIPE.value)))
  dataset = _DATASET.value or recipe.get('dataset') or train.DEFAULT_CONFIG['dataset']
  data_dir = _DATA_DIR.value or recipe.get('data_dir')
  config = train.make_config(**{**recipe, 'dataset': dataset, 'data_dir': data_dir,
                                **overrides})
  if _HOLD_OUT.value not in ('none', 'source'):
    raise errors.UsageError(f"--hold_out must be 'none' or 'source', got {_HOLD_OUT.value!r}")
  if _HOLD_OUT.value == 'source':
    threshold.parse_policy(_THRESHOLD_POLICY.value)
    pools = {split: crossval.load_pool(dataset, [split], data_dir=data_dir,
                                       image_size=config['image_size'],
                                       channels=config['channels'])
             for split in ('train', 'validation', 'test')}
    result = crossval.hold_out_sources(
        config, _OUT.value, pools, sources=_SOURCES.value,
        threshold_policy=_THRESHOLD_POLICY.value, n_bootstrap=_N_BOOTSTRAP.value,
        overwrite=_OVERWRITE.value, verbose=common.fit_verbose(_VERBOSE.value))
    for e in result['held_out']:
      if 'skipped' in e:
        print(f'{e["source"]}: skipped: {e["skipped"]}')
        continue
      spec, sens = e['specificity']['value'], e['sensitivity']['value']
      print(f'{e["source"]} left out: specificity {spec:.3f} on {e["n_normal"]} normals, '
            f'sensitivity ' + ('n/a' if sens is None else f'{sens:.3f}')
            + f' on {e["n_covid"]} COVID-19 at threshold {e["threshold"]:.4f}')
    print(f'report: {_OUT.value}/{hold_out.HOLD_OUT_MD}')
    return
  pool = crossval.load_pool(dataset, _SPLITS.value, data_dir=data_dir,
                            image_size=config['image_size'], channels=config['channels'])
  result = crossval.cross_validate(
      config, _OUT.value, pool, n_folds=_FOLDS.value, fold_seed=_FOLD_SEED.value,
      threshold=_THRESHOLD.value, near_duplicates=_NEAR_DUPLICATES.value,
      n_bootstrap=_N_BOOTSTRAP.value, overwrite=_OVERWRITE.value,
      verbose=common.fit_verbose(_VERBOSE.value))
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
