"""The networks: the article's `seed_cnn`, a compact residual network for this small data, and
four keras.applications backbones (`BACKBONES`: densenet121, efficientnetv2b0, mobilenetv3small,
resnet50v2) with covidlib's input and head.

    from covidlib import models
    model = models.build_model('compact_resnet', image_size=224, channels=1, seed=0)
    print(models.count_params(model), models.count_flops(model))
    model = models.build_model('densenet121', image_size=224, weights='imagenet')  # Keras' cache

Every builder returns the INFERENCE model: input float32 (S, S, C) in [0, 1] named 'image',
output (B, 1) float32 P(COVID-19) from a sigmoid layer named 'probability'. The layer before it,
'logit', is a Dense(1) without activation, so exporters can apply the temperature of
`decision.json` (P = sigmoid(logit / T)) without rebuilding the model. Both are float32 even
under a mixed-precision policy. No augmentation inside (see `covidlib.augment.training_model`),
no Lambda layers (models load with Keras safe_mode on), and nothing downloaded: a backbone's
ImageNet weights come from Keras' cache or a file the user names (`weights`), else it starts
from random weights like the others. A backbone model carries inside itself the gray-to-RGB
step and the backbone's own input scaling (see "Backbones" below), so every path that runs a
covidlib model (training, evaluation, SavedModel, TFLite, the edge route, predict, Grad-CAM, the
shift features) runs it unchanged.

`crop` and `equalize` (default off) put `covidlib.standardize` layers right after the input
('crop', then 'equalize'), inside the model, so every path that runs it (training, evaluation,
SavedModel, TFLite, predict) standardizes alike. They hold no weights: a model with them has the
same weights, in the same order, as one without.

`seed=None` draws fresh initial weights; an integer seed gives the same weights (and dropout
masks) on every build.

Loading and reading a trained model:

    model = model_dir.load_model('runs/compact_resnet')   # model.keras, Keras safe_mode on
    extractor = models.feature_model(model)                 # images -> [P, penultimate features]

The penultimate features are the input of the 'logit' Dense layer (or, in a model without one,
of a sigmoid Dense 'probability' layer): what the shift score and the source probe read.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import os
import random
import re
from typing import Callable

import h5py  # A dependency of Keras: its weights files are HDF5.
import keras
# keras.src: Keras has no public way to scope its layer-name counters (clear_session resets them
# along with everything else); see _reproducible_build.
from keras.src.backend.common import global_state
import numpy as np

from covidlib import errors
from covidlib import standardize


def _seeded(seed: int | None, offset: int, kind: str = 'glorot_uniform'):
  """A kernel initializer; seeded with `seed + offset` so no two layers share a stream."""
  if seed is None:
    return kind
  cls = {'glorot_uniform': keras.initializers.GlorotUniform,
         'he_normal': keras.initializers.HeNormal}[kind]
  return cls(seed=seed + offset)


def _dropout_seed(seed: int | None, offset: int) -> int | None:
  return None if seed is None else seed + offset


def _head(x, seed: int | None):
  """Dense(1) 'logit' -> sigmoid 'probability', both float32 under any precision policy."""
  logit = keras.layers.Dense(1, kernel_initializer=_seeded(seed, 999), dtype='float32',
                             name='logit')(x)
  return keras.layers.Activation('sigmoid', dtype='float32', name='probability')(logit)


def _input(image_size: int, channels: int, crop: float, equalize: str):
  """The 'image' input and the tensor after the standardization layers (if any)."""
  inputs = keras.Input((image_size, image_size, channels), dtype='float32', name='image')
  x = inputs
  for layer in standardize.build_standardization(crop, equalize):
    x = layer(x)
  return inputs, x


def seed_cnn(image_size: int = 224, channels: int = 1, seed: int | None = None,
             crop: float = 0.0, equalize: str = 'none') -> keras.Model:
  """The network of the article ("Detecting COVID-19 using Deep Learning", D. Trehan, 2020).

  Layer for layer as in its notebook (dakshtrehan/Covid-19-Detection, `Covid-19 Detection.ipynb`),
  whose `model.summary()` prints 5,723,457 parameters at 224x224x3: note that its SECOND
  convolution has 128 filters (32 -> 128 -> 64 -> 128), not 64; the count proves that reading.
  The only change: its `Dense(1, activation='sigmoid')` is split into Dense 'logit' + sigmoid
  'probability' (same parameters, same function). Valid padding, Keras default initializers.
  About 5.8 GFLOPs per 224x224 image, 98% of the parameters in the Dense(64) after Flatten.
  """
  inputs, x = _input(image_size, channels, crop, equalize)
  x = keras.layers.Conv2D(32, 3, activation='relu', kernel_initializer=_seeded(seed, 1),
                          name='conv1')(x)
  x = keras.layers.Conv2D(128, 3, activation='relu', kernel_initializer=_seeded(seed, 2),
                          name='conv2')(x)
  x = keras.layers.MaxPooling2D(2, name='pool2')(x)
  x = keras.layers.Dropout(0.25, seed=_dropout_seed(seed, 102), name='drop2')(x)
  x = keras.layers.Conv2D(64, 3, activation='relu', kernel_initializer=_seeded(seed, 3),
                          name='conv3')(x)
  x = keras.layers.MaxPooling2D(2, name='pool3')(x)
  x = keras.layers.Dropout(0.25, seed=_dropout_seed(seed, 103), name='drop3')(x)
  x = keras.layers.Conv2D(128, 3, activation='relu', kernel_initializer=_seeded(seed, 4),
                          name='conv4')(x)
  x = keras.layers.MaxPooling2D(2, name='pool4')(x)
  x = keras.layers.Dropout(0.25, seed=_dropout_seed(seed, 104), name='drop4')(x)
  x = keras.layers.Flatten(name='flatten')(x)
  x = keras.layers.Dense(64, activation='relu', kernel_initializer=_seeded(seed, 5),
                         name='dense')(x)
  x = keras.layers.Dropout(0.5, seed=_dropout_seed(seed, 105), name='drop_dense')(x)
  return keras.Model(inputs, _head(x, seed), name='seed_cnn')


COMPACT_RESNET_WIDTHS = (16, 32, 64, 128)
# Keras' default momentum 0.99 averages the batch statistics over ~100 steps; an epoch of the
# seed data is 7 steps, so after 10-20 epochs the moving statistics still lag the weights and
# the inference model scores near chance while the training loss is low. 0.9 (~10 steps) fits.
BN_MOMENTUM = 0.9


def _conv_bn_relu(x, filters: int, strides: int, seed: int | None, offset: int, name: str,
                  relu: bool = True):
  x = keras.layers.Conv2D(filters, 3, strides=strides, padding='same', use_bias=False,
                          kernel_initializer=_seeded(seed, offset, 'he_normal'),
                          name=f'{name}_conv')(x)
  x = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name=f'{name}_bn')(x)
  if relu:
    x = keras.layers.ReLU(name=f'{name}_relu')(x)
  return x


def _residual_block(x, filters: int, strides: int, seed: int | None, offset: int, name: str):
  """ResNet basic block: 3x3 conv-BN-ReLU, 3x3 conv-BN, plus shortcut (1x1 conv-BN if reshaped)."""
  shortcut = x
  if strides != 1 or x.shape[-1] != filters:
    shortcut = keras.layers.Conv2D(filters, 1, strides=strides, use_bias=False,
                                   kernel_initializer=_seeded(seed, offset + 2, 'he_normal'),
                                   name=f'{name}_proj_conv')(x)
    shortcut = keras.layers.BatchNormalization(momentum=BN_MOMENTUM,
                                               name=f'{name}_proj_bn')(shortcut)
  x = _conv_bn_relu(x, filters, strides, seed, offset, f'{name}_a')
  x = _conv_bn_relu(x, filters, 1, seed, offset + 1, f'{name}_b', relu=False)
  x = keras.layers.Add(name=f'{name}_add')([x, shortcut])
  return keras.layers.ReLU(name=f'{name}_out')(x)


def compact_resnet(image_size: int = 224, channels: int = 1, seed: int | None = None,
                   crop: float = 0.0, equalize: str = 'none') -> keras.Model:
  """A small ResNet for a few hundred gray X-rays: ~0.3M parameters, ~60x fewer FLOPs.

  Stem: 3x3/2 conv (16) + 2x2 max pool takes 224 -> 56 cheaply; then four stages of one basic
  residual block each (16, 32, 64, 128 channels at 56, 28, 14, 7 px for a 224 input), global
  average pooling, dropout 0.3, Dense 'logit', sigmoid 'probability'. Batch norm with momentum
  0.9 (see BN_MOMENTUM).

  Why this shape for this data: seed_cnn puts 5.5M of its 5.7M weights in one Dense layer on a
  flattened 26x26 map, which lets it memorise where things sit in ~200 training images (and
  the borders and text labels that tell the sources apart). Global pooling removes that
  position-keyed layer; batch norm makes a from-scratch net train in a few epochs on CPU; the
  whole net costs ~0.1 GFLOPs per 224x224 image against seed_cnn's ~5.8.
  """
  inputs, x = _input(image_size, channels, crop, equalize)
  x = _conv_bn_relu(x, COMPACT_RESNET_WIDTHS[0], 2, seed, 1, 'stem')
  x = keras.layers.MaxPooling2D(2, name='stem_pool')(x)
  for stage, filters in enumerate(COMPACT_RESNET_WIDTHS):
    x = _residual_block(x, filters, 1 if stage == 0 else 2, seed, 10 * (stage + 1),
                        f'stage{stage + 1}')
  x = keras.layers.GlobalAveragePooling2D(name='pool')(x)
  x = keras.layers.Dropout(0.3, seed=_dropout_seed(seed, 100), name='dropout')(x)
  return keras.Model(inputs, _head(x, seed), name='compact_resnet')


# --------------------------------------------------------------------------------------------
# Backbones from keras.applications, built flat into a covidlib model.
# --------------------------------------------------------------------------------------------
#
# The model is: 'image' (S, S, 1) float32 in [0, 1] -> crop/equalize (if asked) -> 'gray_to_rgb'
# (the gray channel three times; skipped for channels=3) -> 'preprocess' (the backbone's own
# input scaling, from [0, 1]) -> the keras.applications network without its top -> 'pool' (global
# average) -> 'dropout' 0.2 -> 'logit' -> 'probability'. The backbone is built on our tensor
# (`input_tensor=`), so its layers sit in our model's own layer list (no nested model): Grad-CAM's
# automatic target (the last 4-D layer: the backbone's final activation) and the feature taps
# (covidlib.models.feature_taps) find them, and every path that runs a covidlib model runs it.
#
# The backbone's preprocessing, read in the installed keras sources (keras/src/applications):
#   DenseNet: preprocess_input mode 'torch': x / 255, minus the ImageNet mean, over its std.
#   EfficientNetV2-B0: its include_preprocessing layers for the B variants with 3 channels:
#     Rescaling(1 / 255) then Normalization(ImageNet mean, std**2) on [0, 255] input = 'torch'.
#   ResNetV2: preprocess_input mode 'tf': x / 127.5 - 1.
#   MobileNetV3: its include_preprocessing layer Rescaling(1 / 127.5, offset=-1) on [0, 255] = 'tf'.
# Our input is [0, 255] / 255, so 'torch' is Normalization(mean, variance) on [0, 1] and 'tf' is
# Rescaling(2, offset=-1): one built-in layer each (no Lambda; the keras builders' own
# preprocessing is switched off so it is not applied twice). tests/covidlib/test_backbones.py
# checks both against keras' own preprocessing on the same images.
#
# Batch norm: keras.applications' momenta are 0.99 (DenseNet, ResNetV2), 0.9 (EfficientNetV2)
# and 0.999 (MobileNetV3). On a few hundred films an epoch is ~20-30 steps, and 0.999 averages
# over ~1000 steps: trained from scratch, the inference model would score near chance for dozens
# of epochs (see BN_MOMENTUM). Every backbone batch norm gets BN_MOMENTUM; ImageNet weights do
# not depend on it.

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BACKBONE_DROPOUT = 0.2  # keras.applications' own top dropout for EfficientNet and MobileNetV3.


@dataclasses.dataclass(frozen=True)
class Backbone:
  """A keras.applications network and what covidlib needs to know about it.

  weights_file and weights_md5 are the ImageNet no-top file keras.applications downloads into
  its cache (KERAS_HOME/models, default ~/.keras/models) and its md5, as the installed keras
  sources name them (e.g. keras/src/applications/densenet.py, DENSENET121_WEIGHT_PATH_NO_TOP).
  """
  builder: str       # The keras.applications function.
  preprocess: str    # 'torch' or 'tf' (see above).
  weights_file: str
  weights_md5: str
  options: tuple = ()  # Extra keyword arguments of the builder.

  def build(self, **kwargs):
    return getattr(keras.applications, self.builder)(**kwargs, **dict(self.options))


BACKBONES: dict[str, Backbone] = {
    'densenet121': Backbone(
        'DenseNet121', 'torch', 'densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5',
        '30ee3e1110167f948a6b9946edeeb738'),
    # The file name is the builder's `name` + '_notop.h5': keep its default name.
    'efficientnetv2b0': Backbone(
        'EfficientNetV2B0', 'torch', 'efficientnetv2-b0_notop.h5',
        '893217f2bb855e2983157299931e43ff', (('include_preprocessing', False),)),
    'mobilenetv3small': Backbone(
        'MobileNetV3Small', 'tf', 'weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5',
        'd3e8ec802a04aa4fc771ee12a9a9b836', (('include_preprocessing', False),)),
    'resnet50v2': Backbone(
        'ResNet50V2', 'tf', 'resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5',
        'fac2f116257151a9d068a22e544a4917'),
}


@contextlib.contextmanager
def _reproducible_build(seed: int | None):
  """Layer names and (with a seed) initial weights that do not depend on what was built before.

  keras.applications takes no seed: an unseeded Keras initializer or dropout layer draws its
  seed from Python's `random` when it is created, so seeding that module for the duration of
  the build (and restoring its state after) fixes every initial weight and dropout mask.
  Layers the builders leave unnamed (paddings, activations) take Keras' process-wide counters
  ('zero_padding2d_7'); a fresh counter here gives every build the same names, so a model
  rebuilt in the same process (train.py saves a float32 rebuild of a mixed-precision model)
  has the same layer names, which feature_taps and the reference features record.
  """
  counters = global_state.get_global_attribute('object_name_uids')
  global_state.set_global_attribute('object_name_uids', collections.defaultdict(int))
  state = random.getstate()
  if seed is not None:
    random.seed(seed)
  try:
    yield
  finally:
    random.setstate(state)
    # Continue past the names this build used: an op created later on this model's tensors
    # (tap_model's pooling) must not take a name the model holds already ('add_5' twice).
    merged = collections.defaultdict(int, counters or {})
    for key, count in global_state.get_global_attribute('object_name_uids').items():
      merged[key] = max(merged[key], count)
    global_state.set_global_attribute('object_name_uids', merged)


def _backbone_model(name: str, image_size: int, channels: int, seed: int | None, crop: float,
                    equalize: str) -> tuple[keras.Model, keras.Model]:
  """(the covidlib model, the keras.applications model inside it: same layers, no head)."""
  spec = BACKBONES[name]
  with _reproducible_build(seed):
    inputs, x = _input(image_size, channels, crop, equalize)
    if channels == 1:
      x = keras.layers.Concatenate(name='gray_to_rgb')([x, x, x])
    if spec.preprocess == 'torch':
      x = keras.layers.Normalization(mean=IMAGENET_MEAN, variance=[s * s for s in IMAGENET_STD],
                                     name='preprocess')(x)
    else:
      x = keras.layers.Rescaling(2.0, offset=-1.0, name='preprocess')(x)
    backbone = spec.build(include_top=False, weights=None, input_tensor=x)
    for layer in backbone.layers:
      if isinstance(layer, keras.layers.BatchNormalization):
        layer.momentum = BN_MOMENTUM
    x = keras.layers.GlobalAveragePooling2D(name='pool')(backbone.output)
    x = keras.layers.Dropout(BACKBONE_DROPOUT, seed=_dropout_seed(seed, 100), name='dropout')(x)
    model = keras.Model(inputs, _head(x, seed), name=name)
  return model, backbone


def _backbone_builder(name: str) -> Callable[..., keras.Model]:
  def build(image_size: int = 224, channels: int = 1, seed: int | None = None, crop: float = 0.0,
            equalize: str = 'none') -> keras.Model:
    return _backbone_model(name, image_size, channels, seed, crop, equalize)[0]
  build.__name__ = name
  build.__doc__ = (f'keras.applications.{BACKBONES[name].builder} with covidlib\'s input and '
                   'head (see the Backbones section of covidlib.models).')
  return build


MODELS: dict[str, Callable[..., keras.Model]] = {
    'seed_cnn': seed_cnn,
    'compact_resnet': compact_resnet,
    **{name: _backbone_builder(name) for name in BACKBONES},
}


# seed_cnn's four valid 3x3 convs and three 2x2 pools leave a 1x1 map at 24 px (0 at 23);
# compact_resnet divides by 32, so below 16 px its last stages see a single pixel;
# keras.applications refuse inputs under 32 px.
_MIN_IMAGE_SIZE = {'seed_cnn': 24, 'compact_resnet': 16, **{name: 32 for name in BACKBONES}}


def keras_cache_dir() -> str:
  """The folder keras.applications keeps downloaded weights in: $KERAS_HOME/models, else
  ~/.keras/models (read when called, so KERAS_HOME set later in the process counts)."""
  home = os.environ.get('KERAS_HOME') or os.path.join(os.path.expanduser('~'), '.keras')
  return os.path.join(home, 'models')


def weights_path(name: str, weights: str) -> str | None:
  """The weights file `weights` names for model `name`: None for 'none', else a file that exists.

  Checks only what needs no loading (the file is read by build_model), so it is quick enough
  to run before anything else: a missing ImageNet file fails here, at once, never in a download.

  Raises:
    UsageError: a model without pretrained weights given anything but 'none'; 'imagenet' with
      the file not in Keras' cache (naming the exact file and the folder); a path that is not
      a file.
  """
  if not isinstance(weights, str) or not weights:
    raise errors.UsageError(f"weights must be 'none', 'imagenet' or the path of a weights file, "
                            f'got {weights!r}')
  if weights == 'none':
    return None
  if name not in BACKBONES:
    raise errors.UsageError(
        f"weights={weights!r}: model {name!r} has no pretrained weights (only weights='none'); "
        f"'imagenet' and weights files are for {', '.join(sorted(BACKBONES))}")
  if weights == 'imagenet':
    spec = BACKBONES[name]
    folder = keras_cache_dir()
    path = os.path.join(folder, spec.weights_file)
    if not os.path.isfile(path):
      raise errors.UsageError(
          f'weights=imagenet: {spec.weights_file} (the ImageNet weights of {name}) is not in '
          f"Keras' cache {folder}: this machine cannot download it; copy it into that folder "
          f'from a machine where keras.applications.{spec.builder}(include_top=False) has '
          'downloaded it (~/.keras/models), or pass the file as --weights=PATH')
    return path
  if not os.path.isfile(weights):
    raise errors.UsageError(f'weights {weights!r} is not a file: give none, imagenet or the path '
                            f'of a Keras weights file of {name}')
  return weights


def _md5(path: str) -> str:
  digest = hashlib.md5()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def _text(value) -> str:
  return value.decode('utf8') if isinstance(value, bytes) else str(value)


def read_weights_file(path: str) -> tuple[dict[str, list[np.ndarray]], bool]:
  """({key: weight arrays} for the layers with weights, whether the keys are layer names).

  Reads both layouts of a Keras weights file:
    legacy HDF5 (tf.keras 2 `save_weights('x.h5')`: the files keras.applications downloads; also
      a whole-model .h5 file's 'model_weights'): keys are layer names;
    Keras 3 (`save_weights('x.weights.h5')`, layers/<key>/vars/<i>): keys are the layer CLASS
      in snake case, numbered in the model's layer order ('conv2d', 'conv2d_1', ...), not names.

  Raises:
    UsageError: the file is not HDF5 or holds no layer weights in either layout.
  """
  try:
    f = h5py.File(path, 'r')
  except OSError as e:
    raise errors.UsageError(f'weights file {path!r} is not a Keras HDF5 weights file: '
                            f'{_text(e).splitlines()[0] if str(e) else type(e).__name__}') from None
  with f:
    group = f['model_weights'] if 'layer_names' not in f.attrs and 'model_weights' in f else f
    found = {}
    by_name = 'layer_names' in group.attrs
    if by_name:  # Legacy: each layer's arrays in its saving order (trainable first).
      for layer in map(_text, group.attrs['layer_names']):
        names = [_text(n) for n in group[layer].attrs.get('weight_names', [])]
        if names:
          found[layer] = [np.asarray(group[layer][n]) for n in names]
    elif 'layers' in group:
      for key, item in group['layers'].items():
        variables = item.get('vars')
        if variables is not None and len(variables):
          found[key] = [np.asarray(variables[str(i)]) for i in range(len(variables))]
  if not found:
    raise errors.UsageError(f'weights file {path!r} holds no layer weights (neither a Keras '
                            'save_weights .h5 nor a .weights.h5 file)')
  return found, by_name


def _snake_case(name: str) -> str:
  """Keras' class-name key of the .weights.h5 layout (keras.src.utils.naming.to_snake_case)."""
  name = re.sub(r'(.)([A-Z][a-z]+)', r'\1_\2', re.sub(r'\W+', '', name))
  return re.sub(r'([a-z])([A-Z])', r'\1_\2', name).lower()


def load_backbone_weights(model: keras.Model, name: str, path: str) -> None:
  """Loads a Keras weights file of backbone `name` into `model` (see read_weights_file).

  Every layer of the backbone that has weights must be in the file (by name in the legacy
  layout, by class and order in the Keras 3 one) with arrays of the same shapes; the file may
  hold more (e.g. an ImageNet classifier top, which is ignored). covidlib's head ('logit')
  keeps its initial weights.

  Raises:
    UsageError: one line naming the file and the first layer missing from it or differing in
      shape; the model is then left unchanged.
  """
  found, by_name = read_weights_file(path)
  head = feature_layer(model)
  counts = collections.Counter()
  pending = []
  for layer in model.layers:
    if layer is head or not layer.weights:
      continue
    key = layer.name
    if not by_name:
      kind = _snake_case(type(layer).__name__)
      key = kind if not counts[kind] else f'{kind}_{counts[kind]}'
      counts[kind] += 1
    arrays = found.get(key)
    where = f'{path!r}' + ('' if by_name else f' (Keras 3 layout: {key!r})')
    if arrays is None:
      raise errors.UsageError(
          f'weights file {where} has no layer {layer.name!r} of {name} (its layers include '
          f'{", ".join(sorted(found)[:3])}): it is not a weights file of {name} (ImageNet: '
          f'{BACKBONES[name].weights_file})')
    shapes = [tuple(w.shape) for w in layer.weights]
    file_shapes = [tuple(a.shape) for a in arrays]
    if shapes != file_shapes:
      raise errors.UsageError(
          f'weights file {where}: layer {layer.name!r} has weights of shapes {file_shapes} '
          f'there and {shapes} in {name}: it is not a weights file of {name} (ImageNet: '
          f'{BACKBONES[name].weights_file})')
    pending.append((layer, arrays))
  for layer, arrays in pending:  # All checked first: a bad file leaves no half-loaded model.
    layer.set_weights(arrays)


def build_model(name: str, image_size: int = 224, channels: int = 1,
                seed: int | None = None, crop: float = 0.0,
                equalize: str = 'none', weights: str = 'none') -> keras.Model:
  """Builds the inference model `name` (a key of MODELS).

  Args:
    crop: fraction of each side cut off (then resized back) inside the model; in [0, 0.4).
    equalize: 'none', 'histogram' or 'clahe' (per-image equalization inside the model).
      See `covidlib.standardize` for both.
    weights: initial weights of a backbone (a key of BACKBONES): 'none' (random, from `seed`),
      'imagenet' (the ImageNet file in Keras' cache, never downloaded: see weights_path) or the
      path of a Keras weights file of that network. seed_cnn and compact_resnet: 'none' only.
      The head ('logit') always starts from `seed`.

  Raises:
    UsageError: for an unknown name (the message lists the valid ones), a channel count other
      than 1 or 3, an image size too small for the network, a bad crop or equalize, or weights
      that are missing or do not fit (naming the file and the layer).
  """
  if name not in MODELS:
    raise errors.UsageError(f'unknown model {name!r}; valid models: {", ".join(sorted(MODELS))}')
  if channels not in (1, 3):
    raise errors.UsageError(f'channels must be 1 or 3, got {channels!r}')
  minimum = _MIN_IMAGE_SIZE[name]
  if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < minimum:
    raise errors.UsageError(
        f'image_size must be an integer >= {minimum} for model {name!r}, got {image_size!r}')
  if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
    raise errors.UsageError(f'seed must be a non-negative integer or None, got {seed!r}')
  crop = standardize.check_crop(crop)
  standardize.check_equalize(equalize)
  path = weights_path(name, weights)
  if weights == 'imagenet':  # Keras checks the hash of a cached file too (and would download).
    digest = _md5(path)
    if digest != BACKBONES[name].weights_md5:
      raise errors.UsageError(
          f"weights=imagenet: {path} is not the file Keras downloads (md5 {digest}, expected "
          f'{BACKBONES[name].weights_md5}): a partial or other copy; replace it')
  model = MODELS[name](image_size=image_size, channels=channels, seed=seed, crop=crop,
                       equalize=equalize)
  if path is not None:
    load_backbone_weights(model, name, path)
  return model


def count_params(model: keras.Model) -> int:
  """All weights, trainable or not (batch-norm moving statistics included)."""
  return int(model.count_params())


def count_flops(model: keras.Model) -> int:
  """FLOPs for one image through `model`, counting a multiply-add as 2 FLOPs.

  Counted from the layer shapes: Conv2D (incl. strided and grouped), DepthwiseConv2D,
  SeparableConv2D and Dense, i.e. 2 x (output positions) x (kernel taps x input channels per
  group) x (output channels). Not counted: bias adds, batch norm, activations, pooling, residual
  adds and augmentation (together well under 1% for the networks here; batch norm folds into the
  convolution at export anyway). Nested models (e.g. a training model holding the inference
  model) are counted through.
  """
  total = 0
  for layer in model.layers:
    if isinstance(layer, keras.Model):
      total += count_flops(layer)
      continue
    if isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D,
                          keras.layers.SeparableConv2D, keras.layers.Dense)):
      total += _layer_flops(layer)
  return total


def _layer_flops(layer) -> int:
  in_shape = tuple(layer.input.shape)
  out_shape = tuple(layer.output.shape)
  positions = 1
  for d in out_shape[1:-1]:
    positions *= int(d)
  c_in, c_out = int(in_shape[-1]), int(out_shape[-1])
  if isinstance(layer, keras.layers.Dense):
    return 2 * positions * c_in * c_out
  taps = 1
  for k in layer.kernel_size:
    taps *= int(k)
  if isinstance(layer, keras.layers.SeparableConv2D):
    depthwise = positions * taps * c_in * layer.depth_multiplier
    pointwise = positions * c_in * layer.depth_multiplier * c_out
    return 2 * (depthwise + pointwise)
  if isinstance(layer, keras.layers.DepthwiseConv2D):
    return 2 * positions * taps * c_out  # c_out = c_in x depth_multiplier, one tap set each.
  groups = getattr(layer, 'groups', 1)
  return 2 * positions * taps * (c_in // groups) * c_out


# --------------------------------------------------------------------------------------------
# The penultimate features of a trained model.
# --------------------------------------------------------------------------------------------


def feature_layer(model: keras.Model):
  """The layer whose input is the penultimate features: Dense 'logit', else 'probability'."""
  for name in ('logit', 'probability'):
    try:
      return model.get_layer(name)
    except ValueError:
      continue
  raise errors.UsageError(f'model {model.name!r} has no layer named "logit" or "probability": '
                          'the shift score needs the covidlib model head')


def has_feature_layer(model) -> bool:
  """True when `model` is a Keras model with covidlib's head (feature_layer finds it)."""
  if not isinstance(model, keras.Model):
    return False
  try:
    feature_layer(model)
  except errors.UsageError:
    return False
  return True


def feature_model(model: keras.Model) -> keras.Model:
  """A Keras model: images -> [the model's output, penultimate features (n, d)].

  Shares `model`'s layers (no copy); works on a temperature-folded serving model too, whose
  graph holds the same layers.
  """
  return keras.Model(model.input, [model.output, feature_layer(model).input],
                     name=f'{model.name}_features')


# --------------------------------------------------------------------------------------------
# Features at several depths (the shift score and the site check).
# --------------------------------------------------------------------------------------------
#
# Early layers carry acquisition style (scanner, film digitisation, processing), the penultimate
# layer what the network learned about the finding; a shift between two sites can show at any
# depth. The taps are chosen by a rule that needs no per-network list, so every network
# (keras.applications backbones built flat into the model included) gets them:
#   among the layers from the first one with weights on (after the input and the weightless
#   standardization layers) whose output is 4-D (batch, h, w, c), group by floor(log2(h)) (one
#   group per resolution stage; seed_cnn's valid convolutions shave pixels within a stage); the
#   LAST layer of each group is a tap, shallow to deep; the penultimate features (the input of
#   'logit') are the last tap. ZeroPadding2D layers are passed over: a padded copy of the
#   previous map, not a feature map (keras.applications pad before strided convolutions, and a
#   tap there would mix a border of zeros into the moments); so are maps smaller than the last
#   4-D layer's (the 1 x 1 squeeze-and-excitation branches of EfficientNet and MobileNetV3).
# Each 4-D tap is pooled to 2c numbers: the mean and the standard deviation over h x w of each
# channel (the first two moments: brightness and contrast of each learned pattern).

PENULTIMATE_TAP = 'penultimate'


def feature_taps(model: keras.Model) -> list[str]:
  """Names of the tap layers of `model`, shallow to deep, PENULTIMATE_TAP last (see above).

  Raises:
    UsageError: the model has no covidlib head (feature_layer).
  """
  head = feature_layer(model)
  groups: dict[int, str] = {}
  seen_weights = False
  last = 0  # The group of the last 4-D layer before the head.
  for layer in model.layers:
    if layer is head:
      break
    seen_weights = seen_weights or bool(layer.weights)
    if not seen_weights or isinstance(layer, (keras.layers.InputLayer, keras.Model,
                                              keras.layers.ZeroPadding2D)):
      continue
    try:
      shape = layer.output.shape
    except (AttributeError, ValueError):  # A layer used twice has no single output.
      continue
    if len(shape) == 4 and shape[1]:
      last = int(shape[1]).bit_length()
      groups[last] = layer.name  # Later layers of a stage replace earlier ones.
  # Maps smaller than the last one are squeeze-and-excitation branches (global pooling kept 4-D,
  # 1 x 1, inside EfficientNet and MobileNetV3 blocks), not a resolution stage.
  return [groups[k] for k in sorted(groups, reverse=True) if k >= last] + [PENULTIMATE_TAP]


def _moments(x):
  """(n, h, w, c) -> (n, 2c): per-channel mean and standard deviation over h x w.

  The variance in two passes, mean((x - mean)^2), not E[x^2] - E[x]^2: the latter cancels
  catastrophically for channels that are nearly constant over the image (common after a ReLU),
  where float32 rounding, a TFLite kernel's order of summation or int8 quantization then give a
  different "standard deviation" of pure noise, which the shift score's whitening amplifies.
  The product rather than a square keeps to ops with int8 kernels in every TFLite build.
  """
  x = keras.ops.cast(x, 'float32')
  mean = keras.ops.mean(x, axis=(1, 2), keepdims=True)
  centred = x - mean
  var = keras.ops.mean(centred * centred, axis=(1, 2))
  return keras.ops.concatenate([keras.ops.squeeze(mean, axis=(1, 2)),
                                keras.ops.sqrt(var + 1e-12)], axis=-1)


def tap_model(model: keras.Model, taps: list[str] | tuple[str, ...] | None = None,
              dims: list[int] | tuple[int, ...] | None = None) -> keras.Model:
  """A Keras model: images -> [the model's output, pooled tap 0, ..., penultimate features].

  Tap i (feature_taps(model)[i]) is (n, 2c) for a 4-D layer (mean and std per channel), and
  (n, d) for the penultimate features. With `taps`, only those (names of feature_taps, in the
  order given): what a fitted shift score reads; with `dims`, their feature counts are checked.
  Shares `model`'s layers (no copy); built anew per call.

  Raises:
    UsageError: a name in `taps` that is not a tap of the model, or a tap whose feature count
      is not the one in `dims`.
  """
  names = feature_taps(model)
  if taps is not None:
    unknown = [t for t in taps if t not in names]
    if unknown:
      raise errors.UsageError(f'model {model.name!r} has no taps {unknown}; its taps are '
                              f'{names}')
    names = list(taps)
  outputs = [model.output]
  for name in names:
    if name == PENULTIMATE_TAP:
      f = feature_layer(model).input
      outputs.append(keras.ops.reshape(keras.ops.cast(f, 'float32'), (-1, int(f.shape[-1]))))
    else:
      outputs.append(_moments(model.get_layer(name).output))
  for name, output, want in zip(names, outputs[1:], dims or ()):
    if int(output.shape[-1]) != int(want):
      raise errors.UsageError(f'tap {name!r} of model {model.name!r} has '
                              f'{int(output.shape[-1])} features, not {int(want)}')
  return keras.Model(model.input, outputs, name=f'{model.name}_taps')
