"""Averaged models: test-time flip averaging and ensembles, each exported as ONE Keras model.

    from covidlib import ensemble, model_dir
    model = model_dir.load_model('runs/seed0')
    tta = ensemble.flip_average(model)          # the image and its left-right mirror, averaged
    ens = ensemble.average([model_dir.load_model(d) for d in ('runs/seed0', 'runs/seed1')])
    ensemble.write_ensemble(['runs/seed0', 'runs/seed1', 'runs/seed2'], 'runs/ensemble')

or from the shell: `covidlib-ensemble --members=runs/seed0,runs/seed1,runs/seed2
--out=runs/ensemble` (and `covidlib-train --tta=flip` saves a flip-averaged model.keras).

What is averaged: the LOGITS. The averaged model's output is P = sigmoid(mean_i z_i), z_i the
pre-sigmoid output of member i (for test-time flipping: of the image and of its mirror). The
mean of the logits rather than of the probabilities keeps the covidlib head contract: the output
layer 'probability' is a sigmoid of one logit, so a calibration temperature folds into it
(`exporters.serving`), `covidlib.calibration` recovers exactly the logit it scales, Grad-CAM
differentiates a logit that does not saturate, and every op quantizes to int8 (an average and a
sigmoid). It ranks like the mean of the probabilities when the members agree, and it is the
geometric mean of their odds; one member very sure and the others unsure pulls it further
than a mean of probabilities would.

The averaged model is an ordinary covidlib inference model (float32 'image' (S, S, C) in [0, 1]
-> (B, 1) 'probability'), so evaluation, every export, the edge route and predict run it
unchanged. Its graph:

    image -> member 0's own layers, names unchanged, up to its 'logit' ---+
          -> 'member_1' (member 1, a nested model: image -> its logit) ----+-> Average
          -> ...                                                          |  'ensemble_logit'
                                                                          |  (flip: 'flip_logit')
                                                                          +-> sigmoid 'probability'

The rule for everything that needs ONE network's layers: member 0 stands for the averaged model.
Its layers are the model's top-level layers, with their names, while the other members are
nested models whose output is 2-D, so
  - `models.feature_layer` finds member 0's 'logit': the penultimate features (the shift score,
    the source probe, the exports' shift_score output) are member 0's;
  - `models.feature_taps` / `tap_model` find member 0's feature maps;
  - Grad-CAM (`covidlib.explain`) shows member 0's map (its last 4-D layer and its logit);
  - `covidlib-train --init_from` takes member 0's weights (layers matched by name).
For flip averaging member 0 is the unflipped pass, and the flipped pass ('flipped') holds a copy
of the same weights (the saved model is twice the size of the plain one; the weights never
diverge, as the model is built after training). `write_ensemble` copies member 0's shift score
and reference features (shift.json/.npz, reference.npz/.json), which read exactly those
features; decision.json is not copied (choose the ensemble's operating point with
covidlib-evaluate).
"""

from __future__ import annotations

import os
import shutil
from typing import Sequence

import keras

from covidlib import errors
from covidlib import model_dir as md
from covidlib import reference
from covidlib import shift
from covidlib import standardize

OUTPUT = 'probability'
ENSEMBLE_LOGIT = 'ensemble_logit'
FLIP_LOGIT = 'flip_logit'
# Files of member 0 that stay valid for the averaged model (they read member 0's features).
_MEMBER0_FILES = (shift.SHIFT_JSON, shift.SHIFT_NPZ, reference.REFERENCE_NPZ,
                  reference.REFERENCE_JSON)


def logit_tensor(model: keras.Model):
  """The symbolic pre-sigmoid output of a covidlib model: the input of its 'probability'."""
  try:
    layer = model.get_layer(OUTPUT)
  except ValueError:
    raise errors.UsageError(f'model {model.name!r} has no output layer {OUTPUT!r}: an averaged '
                            'model needs covidlib models (Dense "logit" -> sigmoid '
                            '"probability")') from None
  if getattr(getattr(layer, 'activation', None), '__name__', '') != 'sigmoid' or \
      not isinstance(layer, keras.layers.Activation):
    raise errors.UsageError(f'layer {OUTPUT!r} of model {model.name!r} is not a sigmoid '
                            'Activation: an averaged model needs the covidlib head')
  return layer.input


def is_averaged(model: keras.Model) -> bool:
  """True for a model made here (an ensemble or a flip-averaged model)."""
  names = {layer.name for layer in model.layers}
  return bool(names & {ENSEMBLE_LOGIT, FLIP_LOGIT})


def _input_shape(model: keras.Model) -> tuple:
  return tuple(model.input_shape[1:])


def _average(first: keras.Model, others: list[keras.Model], combine: str,
             name: str) -> keras.Model:
  """P = sigmoid(mean of the logits): `first` flat (its own graph), `others` nested."""
  inputs = first.input
  logits = [logit_tensor(first)]
  for other in others:
    logits.append(other(inputs))
  mean = keras.layers.Average(dtype='float32', name=combine)(logits)
  probability = keras.layers.Activation('sigmoid', dtype='float32', name=OUTPUT)(mean)
  return keras.Model(inputs, probability, name=name)


def flip_average(model: keras.Model) -> keras.Model:
  """`model` averaged over each image and its left-right mirror (logits averaged, see above).

  The unflipped pass is `model`'s own graph (its layers, shared); the flipped pass is a nested
  model 'flipped' (FlipLeftRight, then a copy of `model` up to its logit).

  Raises:
    UsageError: `model` lacks the covidlib head, or is averaged already.
  """
  logit_tensor(model)
  if is_averaged(model):
    raise errors.UsageError(f'model {model.name!r} is averaged already (an ensemble or a '
                            'flip-averaged model)')
  copy = keras.models.clone_model(model)
  copy.set_weights(model.get_weights())
  inputs = keras.Input(_input_shape(model), dtype='float32', name='image')
  mirrored = standardize.FlipLeftRight(name='flip')(inputs)
  body = keras.Model(copy.input, logit_tensor(copy), name='body')
  flipped = keras.Model(inputs, body(mirrored), name='flipped')
  return _average(model, [flipped], FLIP_LOGIT, f'{model.name}_flip')


def average(members: Sequence[keras.Model]) -> keras.Model:
  """One model whose P is sigmoid(mean of the members' logits); member 0 flat, the rest nested
  as 'member_1', 'member_2', ... (see the module docstring for what member 0 stands for).

  Members may be flip-averaged models; they must take the same input.

  Raises:
    UsageError: fewer than two members, different input shapes, a member without the covidlib
      head, or a member that is an ensemble itself.
  """
  members = list(members)
  if len(members) < 2:
    raise errors.UsageError(f'an ensemble needs at least two members, got {len(members)}')
  shape = _input_shape(members[0])
  for i, member in enumerate(members):
    logit_tensor(member)
    if ENSEMBLE_LOGIT in {layer.name for layer in member.layers}:
      raise errors.UsageError(f'member {i} ({member.name!r}) is an ensemble itself: list its '
                              'members instead')
    if _input_shape(member) != shape:
      raise errors.UsageError(f'member {i} ({member.name!r}) takes input {_input_shape(member)}, '
                              f'member 0 takes {shape}: members must share image_size and '
                              'channels')
  others = [keras.Model(m.input, logit_tensor(m), name=f'member_{i}')
            for i, m in enumerate(members[1:], start=1)]
  return _average(members[0], others, ENSEMBLE_LOGIT, f'ensemble_of_{len(members)}')


def write_ensemble(member_dirs: Sequence[str], out_dir: str) -> keras.Model:
  """Writes out_dir: model.keras (`average` of the members' model.keras) and config.json.

  config.json is member 0's (so evaluate, export and predict find the dataset, the input and
  the class names) plus 'ensemble': the member model_dirs. Member 0's shift score and reference
  features are copied (they read member 0's features, as the averaged model's do).

  Raises:
    UsageError: a member that is no finished model_dir, members of different input or class
      names, an out_dir that holds another run, fewer than two members.
  """
  member_dirs = [os.fspath(d) for d in member_dirs]
  if len(member_dirs) < 2:
    raise errors.UsageError(f'an ensemble needs at least two members, got {len(member_dirs)}')
  out_dir = os.fspath(out_dir)
  if os.path.abspath(out_dir) in {os.path.abspath(d) for d in member_dirs}:
    raise errors.UsageError(f'out {out_dir!r} is one of the members')
  if os.path.isdir(out_dir) and os.listdir(out_dir) and \
      'ensemble' not in (_read_config(out_dir) or {}):
    raise errors.UsageError(f'out {out_dir!r} is not empty and holds no ensemble: choose a new '
                            'or empty folder')
  configs = [md.load_config(d) for d in member_dirs]  # UsageError: not a finished model_dir.
  first = configs[0]
  for d, config in zip(member_dirs[1:], configs[1:]):
    for key in ('image_size', 'channels'):
      if config.get(key) != first.get(key):
        raise errors.UsageError(f'member {d!r} has {key}={config.get(key)!r}, member '
                                f'{member_dirs[0]!r} has {first.get(key)!r}: members must '
                                'share the input')
    if md.class_names(config) != md.class_names(first):
      raise errors.UsageError(f'member {d!r} names its classes {list(md.class_names(config))}, '
                              f'member {member_dirs[0]!r} {list(md.class_names(first))}')
  model = average([md.load_model(d) for d in member_dirs])
  os.makedirs(out_dir, exist_ok=True)
  for name in (md.DECISION, *_MEMBER0_FILES):  # A previous ensemble's, stale now.
    if os.path.exists(os.path.join(out_dir, name)):
      os.remove(os.path.join(out_dir, name))
  with md.atomic_path(os.path.join(out_dir, md.MODEL), suffix='.keras') as tmp:
    model.save(tmp, overwrite=True)
  for name in _MEMBER0_FILES:
    source = os.path.join(member_dirs[0], name)
    if os.path.exists(source):
      with md.atomic_path(os.path.join(out_dir, name), suffix=os.path.splitext(name)[1]) as tmp:
        shutil.copyfile(source, tmp)
  md.write_json(os.path.join(out_dir, md.CONFIG),
                {**first, 'ensemble': [os.path.abspath(d) for d in member_dirs]})
  return model


def _read_config(model_dir: str) -> dict | None:
  path = os.path.join(model_dir, md.CONFIG)
  return md.read_json(path) if os.path.exists(path) else None
