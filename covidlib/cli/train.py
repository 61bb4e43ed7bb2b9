"""covidlib-train: train a model on a dataset and write a model_dir.

    covidlib-train --model_dir=/work/runs/compact_resnet \
        --dataset=covid_xray/patient_split --data_dir=/tmp/tfds_real \
        --model=compact_resnet --epochs=10

    # The article's recipe: its network on its own split, 3 channels, 10 epochs.
    covidlib-train --model_dir=/work/runs/seed_cnn --dataset=covid_xray/seed \
        --data_dir=/tmp/tfds_real --model=seed_cnn --channels=3 --epochs=10

    # Your own images: ROOT/train/{covid,normal}/* and ROOT/validation/{covid,normal}/*.
    covidlib-train --model_dir=runs/mine --dataset=folder:ROOT

    # Measures against source shortcuts (issue #9), each off by default: crop 10% of each side
    # and equalize the histogram inside the model, the strong augmentation preset (one key
    # changed), and source-balanced sampling.
    covidlib-train --model_dir=/work/runs/adult_measures --dataset=covid_xray/adult \
        --data_dir=/tmp/tfds_real --crop=0.1 --equalize=histogram \
        --augment=strong --augment_noise=0.01 --balance=source --seed=0

    # Keep the last epoch's weights instead of the best validation ROC-AUC epoch's (default).
    covidlib-train --model_dir=runs/last --dataset=folder:ROOT --keep=last

    # Start from another model's weights (same network), e.g. a pneumonia model.
    covidlib-train --model_dir=runs/covid_from_pneumonia --dataset=covid_xray/adult \
        --data_dir=/tmp/tfds_real --init_from=runs/same_site/nih_pneumonia --learning_rate=1e-4

    # The recipe. Default: Adam, per-step cosine decay after 2 warm-up epochs, a moving average
    # of the weights (0.99) that validation judges and model.keras holds. The other parts are
    # flags, off by default (they did not help beyond noise: BENCHMARKS.md, "Training recipes");
    # here all of them, and the recipe before issue 18 (Adam at a constant 1e-3) below it.
    covidlib-train --model_dir=runs/all_parts --dataset=folder:ROOT --weight_decay=0.05 \
        --label_smoothing=0.1 --mixup=0.2 --tta=flip
    covidlib-train --model_dir=runs/plain --dataset=folder:ROOT --lr_schedule=constant \
        --warmup_epochs=0 --ema=0

    # A keras.applications backbone from ImageNet weights (in Keras' cache: never downloaded;
    # without the file the error names it and the folder), or from a weights file.
    covidlib-train --model_dir=runs/densenet --dataset=folder:ROOT --model=densenet121 \
        --weights=imagenet

    # Fine-tuning it: 5 epochs of the head alone (backbone and its batch norm frozen), then
    # every layer at --finetune_learning_rate. A kill in either phase resumes.
    covidlib-train --model_dir=runs/densenet_ft --dataset=folder:ROOT --model=densenet121 \
        --weights=imagenet --freeze_epochs=5 --finetune_learning_rate=1e-4

    # A finished 10-epoch run, extended to 15 epochs (same flags, a larger --epochs).
    covidlib-train --model_dir=/work/runs/compact_resnet --data_dir=/tmp/tfds_real --epochs=15

(or `python -m covidlib.cli.train ...`). Killed at any moment, the same command resumes from the
last completed epoch. A finished model_dir is extended by the same flags with a larger
--epochs (from its last epoch's weights and optimizer state, kept in checkpoints/); any other
change, or a smaller or equal --epochs, is refused unless --overwrite. The closing line names
the epoch whose weights model.keras holds and quotes that epoch's figures. If the TFDS dataset
is not built in --data_dir, --manual_dir builds it first from the folder holding the article's
archive (add --allow_missing for our offline copy, which lacks one image; see
covidlib_tfds/covid_xray/README.md); without --manual_dir the error says how to build it.

Exit status: 0 trained; 2 usage error (bad flag, unknown model, a finished model_dir with
nothing to train or another configuration, a batch
that does not divide by the replicas...); 1 failure (NaN loss, unreadable data...).
"""

from absl import flags

from covidlib.cli import quiet_start  # noqa: F401  First: TensorFlow starts quietly (see there).
from covidlib import augment
from covidlib import distribute
from covidlib import errors
from covidlib import standardize
from covidlib import models
from covidlib import report
from covidlib import train as train_lib
from covidlib.cli import common

_D = train_lib.DEFAULT_CONFIG
_ARTICLE = augment.PRESETS['article']

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
_EPOCHS = flags.DEFINE_integer(
    'epochs', _D['epochs'], 'Epochs to train (in all, across restarts); larger than a finished '
    "run's in --model_dir: extend it.")
_LEARNING_RATE = flags.DEFINE_float(
    'learning_rate', _D['learning_rate'],
    'Peak learning rate (Adam, or AdamW with --weight_decay), reached after --warmup_epochs; of '
    'the head with --freeze_epochs.')
_WEIGHT_DECAY = flags.DEFINE_float(
    'weight_decay', _D['weight_decay'],
    'AdamW: decoupled weight decay of the kernels (not biases or batch norm); 0 = Adam.')
_LR_SCHEDULE = flags.DEFINE_enum(
    'lr_schedule', _D['lr_schedule'], list(train_lib.LR_SCHEDULES),
    'constant, or cosine: per-step cosine decay to 0 over the run (over each phase with '
    '--freeze_epochs); an extended run re-plans it over the new epoch count.')
_WARMUP_EPOCHS = flags.DEFINE_integer(
    'warmup_epochs', _D['warmup_epochs'],
    'Linear per-step warm-up of the learning rate from 0 over this many epochs (of each phase).')
_LABEL_SMOOTHING = flags.DEFINE_float(
    'label_smoothing', _D['label_smoothing'],
    'Train on targets y (1 - s) + s / 2 instead of 0 and 1; in [0, 0.5).')
_EMA = flags.DEFINE_float(
    'ema', _D['ema'],
    'Momentum of an exponential moving average of the weights, which validation judges and '
    'model.keras holds; 0 = off.')
_MIXUP = flags.DEFINE_float(
    'mixup', _D['mixup'],
    'Mixup of training batches: example pairs mixed with weights ~ Beta(a, a), labels alike; '
    '0 = off (e.g. 0.2). Seeded by --seed; never at validation or evaluation.')
_TTA = flags.DEFINE_enum(
    'tta', _D['tta'], list(train_lib.TTA),
    'flip: model.keras (and every export) averages the logits of the image and its left-right '
    'mirror (covidlib.ensemble).')
_FREEZE_EPOCHS = flags.DEFINE_integer(
    'freeze_epochs', _D['freeze_epochs'],
    'First train only the head (the Dense "logit") for this many epochs, everything before it '
    'frozen (batch norm in inference mode), then every layer at --finetune_learning_rate.')
_FINETUNE_LEARNING_RATE = flags.DEFINE_float(
    'finetune_learning_rate', _D['finetune_learning_rate'],
    'Peak learning rate after --freeze_epochs, when every layer trains.')
_CLASS_WEIGHT = flags.DEFINE_enum(
    'class_weight', _D['class_weight'], ['none', 'balanced'],
    'balanced: weigh each class n / (2 n_class) in the loss, for unbalanced splits.')
_EARLY_STOPPING_PATIENCE = flags.DEFINE_integer(
    'early_stopping_patience', _D['early_stopping_patience'],
    'Stop after this many epochs without a lower val_loss; 0 = off. The weights kept follow '
    '--keep.')
_KEEP = flags.DEFINE_enum(
    'keep', _D['keep'], list(train_lib.KEEP),
    'Weights model.keras keeps: best = the epoch with the highest validation ROC-AUC (val_auc; '
    'ties: the earlier; without validation data, the last); last = the last epoch.')
_INIT_FROM = flags.DEFINE_string(
    'init_from', _D['init_from'],
    'Start from the weights of this model_dir (or .keras file) instead of a fresh init: a model '
    'of the same --model and input (e.g. a pneumonia model as the start of a COVID-19 one).')
_WEIGHTS = flags.DEFINE_string(
    'weights', _D['weights'],
    'Initial weights of a keras.applications backbone (--model='
    f'{",".join(sorted(models.BACKBONES))}): none (random), imagenet (the file in Keras\' cache, '
    '$KERAS_HOME/models or ~/.keras/models; never downloaded: without it the error names the '
    'file) or the path of a Keras weights file of that network. Other models: none only.')
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
_VERBOSE = flags.DEFINE_enum('verbose', 'auto', ['auto', '0', '1', '2'],
                             'Keras fit verbosity: 0 silent, 1 progress bars, 2 a line per epoch; '
                             'auto: 1 on a terminal, else 2.')
_CROP = flags.DEFINE_float(
    'crop', _D['crop'],
    'Fraction of each side cut off (then resized back) as the model\'s first layer, in [0, 0.4): '
    'borders and text markers tell sources apart. Part of the model: every export runs it.')
_EQUALIZE = flags.DEFINE_enum(
    'equalize', _D['equalize'], list(standardize.EQUALIZE),
    'histogram: per-image histogram equalization inside the model (after --crop); clahe: '
    'OpenCV\'s CLAHE (clip limit 2, 8 x 8 tiles), likewise.')
_BALANCE = flags.DEFINE_enum(
    'balance', _D['balance'], ['none', 'source'],
    'source: draw every (source, label) stratum of the training split equally often; an epoch '
    'stays split size / batch size steps. Needs a TFDS dataset with a source feature.')
_AUGMENT = flags.DEFINE_enum(
    'augment', _D['augment_preset'], list(augment.PRESETS),
    'Augmentation preset (covidlib.augment.PRESETS); --augment_* flags override its keys. '
    'article: flip, zoom 0.2, shear 0.2. strong: adds rotation, translation, contrast, '
    'brightness, gamma, blur, noise and downscale.')


def _augment_help(key: str, text: str) -> str:
  return f'{text} Default: the --augment preset\'s (article: {_ARTICLE[key]}).'


# Default None = the preset's value; only flags given on the command line override it.
_AUGMENT_FLAGS = {
    'flip': flags.DEFINE_boolean('augment_flip', None, _augment_help('flip',
                                                                     'Random left-right flip.')),
    'zoom': flags.DEFINE_float('augment_zoom', None, _augment_help(
        'zoom', 'Zoom each axis by a factor in [1 - z, 1 + z].')),
    'shear': flags.DEFINE_float('augment_shear', None, _augment_help(
        'shear', 'Maximum shear angle in DEGREES (the article: 0.2).')),
    'rotation': flags.DEFINE_float('augment_rotation', None, _augment_help(
        'rotation', 'Maximum rotation in degrees.')),
    'translation': flags.DEFINE_float('augment_translation', None, _augment_help(
        'translation', 'Maximum shift, as a fraction of the side.')),
    'contrast': flags.DEFINE_float('augment_contrast', None, _augment_help(
        'contrast', 'Contrast factor in [1 - c, 1 + c].')),
    'brightness': flags.DEFINE_float('augment_brightness', None, _augment_help(
        'brightness', 'Add up to +-b to the [0, 1] pixels.')),
    'gamma': flags.DEFINE_float('augment_gamma', None, _augment_help(
        'gamma', 'x ** gamma, gamma log-uniform in [1 / (1 + g), 1 + g]; in [0, 1].')),
    'blur': flags.DEFINE_float('augment_blur', None, _augment_help(
        'blur', 'Gaussian blur, sigma up to this many pixels, per image; in [0, 3].')),
    'noise': flags.DEFINE_float('augment_noise', None, _augment_help(
        'noise', 'Additive Gaussian noise, std up to this, per image; in [0, 0.2].')),
    'downscale': flags.DEFINE_float('augment_downscale', None, _augment_help(
        'downscale', 'Resample down by a factor in [1 - d, 1] and back up; in [0, 0.9].')),
}


def _augment_overrides() -> dict:
  """The --augment_* flags given, checked one by one so an error names its flag."""
  overrides = {}
  for key, holder in _AUGMENT_FLAGS.items():
    if holder.value is None:
      continue
    try:
      augment.check_arguments(**{key: holder.value})
    except errors.UsageError as e:
      raise errors.UsageError(f'--augment_{key}={holder.value}: {e}') from None
    overrides[key] = holder.value
  return overrides


def config_from_flags() -> dict:
  """The training config the flags describe (validated by train_lib.make_config)."""
  try:
    standardize.check_crop(_CROP.value)
  except errors.UsageError as e:
    raise errors.UsageError(f'--crop={_CROP.value}: {e}') from None
  return train_lib.make_config(
      model=_MODEL.value, image_size=_IMAGE_SIZE.value, channels=_CHANNELS.value,
      dataset=_DATASET.value, data_dir=_DATA_DIR.value, manual_dir=_MANUAL_DIR.value,
      allow_missing=_ALLOW_MISSING.value,
      train_split=_TRAIN_SPLIT.value, validation_split=_VALIDATION_SPLIT.value,
      batch_size=_BATCH_SIZE.value, epochs=_EPOCHS.value, learning_rate=_LEARNING_RATE.value,
      weight_decay=_WEIGHT_DECAY.value, lr_schedule=_LR_SCHEDULE.value,
      warmup_epochs=_WARMUP_EPOCHS.value, label_smoothing=_LABEL_SMOOTHING.value,
      ema=_EMA.value, mixup=_MIXUP.value, tta=_TTA.value, freeze_epochs=_FREEZE_EPOCHS.value,
      finetune_learning_rate=_FINETUNE_LEARNING_RATE.value,
      class_weight=_CLASS_WEIGHT.value,
      early_stopping_patience=_EARLY_STOPPING_PATIENCE.value, keep=_KEEP.value,
      init_from=_INIT_FROM.value, weights=_WEIGHTS.value,
      seed=_SEED.value,
      deterministic=_DETERMINISTIC.value, strategy=_STRATEGY.value,
      mixed_precision=_MIXED_PRECISION.value,
      jit_compile={'auto': 'auto', 'true': True, 'false': False}[_JIT_COMPILE.value],
      crop=_CROP.value, equalize=_EQUALIZE.value, balance=_BALANCE.value,
      augment_preset=_AUGMENT.value, augment=_augment_overrides())


def main(argv: list[str]) -> int:
  common.reject_extra_args(argv)
  config = config_from_flags()
  history = train_lib.train(config, _MODEL_DIR.value, overwrite=_OVERWRITE.value,
                            verbose=common.fit_verbose(_VERBOSE.value))
  extended = history.get('extended_from_epochs')
  print(f'Trained {config["model"]} for {len(history["loss"])} epochs'
        f'{f" (extended from {extended})" if extended else ""}; kept '
        f'{report.kept_epoch_text(history)}; wrote {_MODEL_DIR.value}/model.keras')
  return 0


def run() -> None:
  common.run_main(main, prog='covidlib-train')


if __name__ == '__main__':
  run()
