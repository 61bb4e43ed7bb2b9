"""covidlib-train: train a model on a dataset and write a model_dir.

    covidlib-train --model_dir=/work/runs/compact_resnet \
        --dataset=covid_xray/patient_split --data_dir=/tmp/tfds_real \
        --model=compact_resnet --epochs=10

    # The article's recipe: its network on its own split, 3 channels, 10 epochs.
    covidlib-train --model_dir=/work/runs/seed_cnn --dataset=covid_xray/seed \
        --data_dir=/tmp/tfds_real --model=seed_cnn --channels=3 --epochs=10

    # Your own images: ROOT/train/{covid,normal}/* and ROOT/validation/{covid,normal}/*.
    covidlib-train --model_dir=runs/mine --dataset=folder:ROOT

(or `python -m covidlib.cli.train ...`). Killed at any moment, the same command resumes from the
last completed epoch. A finished model_dir is refused unless --overwrite. If the TFDS dataset
is not built in --data_dir, --manual_dir builds it first from the folder holding the article's
archive (add --allow_missing for our offline copy, which lacks one image; see
covidlib_tfds/covid_xray/README.md); without --manual_dir the error says how to build it.

Exit status: 0 trained; 2 usage error (bad flag, unknown model, finished model_dir, a batch
that does not divide by the replicas...); 1 failure (NaN loss, unreadable data...).
"""

from absl import flags

from covidlib import distribute
from covidlib import models
from covidlib import train as train_lib
from covidlib.cli import common

_D = train_lib.DEFAULT_CONFIG
_A = _D['augment']

_MODEL_DIR = flags.DEFINE_string(
    'model_dir', None, 'Where config.json, checkpoints/, logs/, history.json and model.keras go.',
    required=True)
_DATASET = flags.DEFINE_string(
    'dataset', _D['dataset'],
    "A built TFDS dataset 'name/config' (e.g. covid_xray/seed, covid_xray/patient_split), or "
    "'folder:ROOT' for images in ROOT/<split>/{covid,normal}/*.")
_DATA_DIR = flags.DEFINE_string('data_dir', _D['data_dir'], 'TFDS data_dir of --dataset.')
_MANUAL_DIR = flags.DEFINE_string(
    'manual_dir', _D['manual_dir'],
    'If --dataset is not built in --data_dir yet, build it from this folder first.')
_ALLOW_MISSING = flags.DEFINE_boolean(
    'allow_missing', _D['allow_missing'],
    'With --manual_dir: build even if images the manifest lists are absent from the archive '
    '(our offline copy of the article\'s archive lacks one); they are logged and recorded.')
_TRAIN_SPLIT = flags.DEFINE_string('train_split', _D['train_split'], 'Split to train on.')
_VALIDATION_SPLIT = flags.DEFINE_string(
    'validation_split', _D['validation_split'],
    "Split for val_* metrics and early stopping; '' for none.")
# A plain string, not an enum: covidlib-predict's --model (a file) shares the name within one
# test process (see flag_util); train.make_config rejects unknown names, listing the valid ones.
_MODEL = flags.DEFINE_string('model', _D['model'],
                             f'Network to train: {", ".join(sorted(models.MODELS))}.')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', _D['image_size'], 'Input side in pixels.')
_CHANNELS = flags.DEFINE_integer('channels', _D['channels'],
                                 'Input channels, 1 or 3; 3 repeats the gray channel (as the '
                                 'article).')
_BATCH_SIZE = flags.DEFINE_integer(
    'batch_size', _D['batch_size'], 'Global batch size; must divide by the number of replicas.')
_EPOCHS = flags.DEFINE_integer('epochs', _D['epochs'], 'Epochs to train (in all, across restarts).')
_LEARNING_RATE = flags.DEFINE_float('learning_rate', _D['learning_rate'], 'Adam learning rate.')
_CLASS_WEIGHT = flags.DEFINE_enum(
    'class_weight', _D['class_weight'], ['none', 'balanced'],
    'balanced: weigh each class n / (2 n_class) in the loss, for unbalanced splits.')
_EARLY_STOPPING_PATIENCE = flags.DEFINE_integer(
    'early_stopping_patience', _D['early_stopping_patience'],
    'Stop after this many epochs without a lower val_loss and keep the best epoch; 0 = off.')
_STRATEGY = flags.DEFINE_enum(
    'strategy', _D['strategy'], list(distribute.STRATEGIES),
    'auto: mirrored over several GPUs, else default. multi_worker reads TF_CONFIG.')
_MIXED_PRECISION = flags.DEFINE_enum(
    'mixed_precision', _D['mixed_precision'], list(distribute.PRECISIONS),
    'auto: mixed_float16 on GPU, mixed_bfloat16 on TPU or on a CPU with native bfloat16, '
    'else off.')
_JIT_COMPILE = flags.DEFINE_enum('jit_compile', 'auto', ['auto', 'true', 'false'],
                                 'XLA-compile the training step; auto: on GPU/TPU only.')
_SEED = flags.DEFINE_integer('seed', _D['seed'], 'Seed of shuffling, augmentation, init.')
_DETERMINISTIC = flags.DEFINE_boolean(
    'deterministic', _D['deterministic'],
    'Deterministic ops: two CPU runs with the same seed give identical weights (slower).')
_OVERWRITE = flags.DEFINE_boolean(
    'overwrite', False, 'Delete a previous run in --model_dir (finished or not) and start over.')
_VERBOSE = flags.DEFINE_integer('verbose', 1, 'Keras fit verbosity: 0 silent, 1 progress bars, '
                                '2 a line per epoch.', lower_bound=0, upper_bound=2)
_AUGMENT_FLIP = flags.DEFINE_boolean('augment_flip', _A['flip'], 'Random left-right flip.')
_AUGMENT_ZOOM = flags.DEFINE_float('augment_zoom', _A['zoom'],
                                   'Zoom each axis by a factor in [1 - z, 1 + z].')
_AUGMENT_SHEAR = flags.DEFINE_float('augment_shear', _A['shear'],
                                    'Maximum shear angle in DEGREES (the article: 0.2).')
_AUGMENT_ROTATION = flags.DEFINE_float('augment_rotation', _A['rotation'],
                                       'Maximum rotation in degrees.')
_AUGMENT_TRANSLATION = flags.DEFINE_float('augment_translation', _A['translation'],
                                          'Maximum shift, as a fraction of the side.')
_AUGMENT_CONTRAST = flags.DEFINE_float('augment_contrast', _A['contrast'],
                                       'Contrast factor in [1 - c, 1 + c].')
_AUGMENT_BRIGHTNESS = flags.DEFINE_float('augment_brightness', _A['brightness'],
                                         'Add up to +-b to the [0, 1] pixels.')


def config_from_flags() -> dict:
  """The training config the flags describe (validated by train_lib.make_config)."""
  return train_lib.make_config(
      model=_MODEL.value, image_size=_IMAGE_SIZE.value, channels=_CHANNELS.value,
      dataset=_DATASET.value, data_dir=_DATA_DIR.value, manual_dir=_MANUAL_DIR.value,
      allow_missing=_ALLOW_MISSING.value,
      train_split=_TRAIN_SPLIT.value, validation_split=_VALIDATION_SPLIT.value,
      batch_size=_BATCH_SIZE.value, epochs=_EPOCHS.value, learning_rate=_LEARNING_RATE.value,
      class_weight=_CLASS_WEIGHT.value,
      early_stopping_patience=_EARLY_STOPPING_PATIENCE.value, seed=_SEED.value,
      deterministic=_DETERMINISTIC.value, strategy=_STRATEGY.value,
      mixed_precision=_MIXED_PRECISION.value,
      jit_compile={'auto': 'auto', 'true': True, 'false': False}[_JIT_COMPILE.value],
      augment=dict(flip=_AUGMENT_FLIP.value, zoom=_AUGMENT_ZOOM.value,
                   shear=_AUGMENT_SHEAR.value, rotation=_AUGMENT_ROTATION.value,
                   translation=_AUGMENT_TRANSLATION.value, contrast=_AUGMENT_CONTRAST.value,
                   brightness=_AUGMENT_BRIGHTNESS.value))


def main(argv: list[str]) -> int:
  common.reject_extra_args(argv)
  config = config_from_flags()
  history = train_lib.train(config, _MODEL_DIR.value, overwrite=_OVERWRITE.value,
                            verbose=_VERBOSE.value)
  last = {k: v[-1] for k, v in history.items() if v}
  summary = ', '.join(f'{k} {last[k]:.4f}' for k in ('loss', 'val_loss', 'val_accuracy',
                                                     'val_auc') if k in last)
  print(f'Trained {config["model"]} for {len(history.get("loss", []))} epochs ({summary}); '
        f'wrote {_MODEL_DIR.value}/model.keras')
  return 0


def run() -> None:
  common.run_main(main, prog='covidlib-train')


if __name__ == '__main__':
  run()
