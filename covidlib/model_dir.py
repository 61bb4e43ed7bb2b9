"""The model directory: what training writes and what evaluation, export and predict read.

    model_dir/
      config.json       the training configuration (model, image_size, channels, dataset, ...)
      model.keras       the inference model: float32 (S, S, C) in [0, 1] -> P(COVID-19), no
                        augmentation inside
      history.json      per-epoch loss, metrics, val_* and the epoch kept (see covidlib.train)
      decision.json     operating point chosen on validation: {"threshold", "policy",
                        "temperature", "split"}; absent means threshold 0.5, temperature 1.0
      shift.npz         the out-of-distribution score fitted at the end of training (plain arrays,
      shift.json        no pickle) and its threshold; see covidlib.shift. Absent: no score.
      checkpoints/      training state for resuming and extending (kept after training)
      logs/             TensorBoard

Every JSON write here is atomic: a temporary file in the same folder, then `os.replace`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
from typing import Any, Iterator

from covidlib import CLASS_NAMES
from covidlib import errors

CONFIG = 'config.json'
MODEL = 'model.keras'
HISTORY = 'history.json'
DECISION = 'decision.json'
CHECKPOINTS = 'checkpoints'
LOGS = 'logs'


@dataclasses.dataclass(frozen=True)
class Decision:
  """How a probability becomes a label: label = sigmoid(logit / temperature) >= threshold."""
  threshold: float = 0.5
  policy: str = 'fixed:0.5'
  temperature: float = 1.0
  split: str = ''


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = '.tmp') -> Iterator[str]:
  """Yields a temporary path beside `path`; on success renames it onto `path`, else removes it.

      with atomic_path('model.keras', suffix='.keras') as tmp:
        model.save(tmp)   # Readers of model.keras see the old file or the new one, never half.

  `suffix` matters to writers that pick a format by extension (Keras: .keras, .weights.h5).
  """
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix='.' + os.path.basename(path) + '.', suffix=suffix)
  os.close(fd)
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
  """Writes `data` to `path` so readers see the old file or the new one, never half."""
  with atomic_path(path) as tmp:
    with open(tmp, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())


def write_json(path: str | os.PathLike, obj: Any) -> None:
  """Atomically writes `obj` as indented, key-sorted JSON."""
  write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + '\n').encode())


def read_json(path: str | os.PathLike) -> Any:
  """Reads a JSON file; a missing or malformed file is a DataError naming it."""
  path = os.fspath(path)
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise errors.DataError(f'{path}: no such file') from None
  except json.JSONDecodeError as e:
    raise errors.DataError(f'{path}: not valid JSON ({e.msg} at line {e.lineno})') from None


def check_model_dir(model_dir: str | os.PathLike) -> str:
  """Returns `model_dir` as a string if it holds a trained model; UsageError otherwise."""
  model_dir = os.fspath(model_dir)
  if not os.path.isdir(model_dir):
    raise errors.UsageError(f'model_dir {model_dir!r} does not exist or is not a directory')
  for name in (CONFIG, MODEL):
    if not os.path.isfile(os.path.join(model_dir, name)):
      raise errors.UsageError(
          f'model_dir {model_dir!r} holds no {name}: is it a finished covidlib-train run?')
  return model_dir


def load_config(model_dir: str | os.PathLike) -> dict:
  return read_json(os.path.join(check_model_dir(model_dir), CONFIG))


def class_names(config: dict | None) -> tuple[str, str]:
  """(name of label 0, name of label 1) of a model_dir's config.json: the names its dataset
  gave (a user's own, e.g. ('normal', 'pneumonia')), else covidlib's ('normal', 'covid')."""
  names = (config or {}).get('class_names') or CLASS_NAMES
  if len(names) != 2 or not all(isinstance(n, str) and n for n in names):
    raise errors.DataError(f'config.json: class_names must be two names, got {names!r}')
  return tuple(names)


def trained_on_public_data(config: dict | None) -> bool:
  """True for a model trained on covidlib's covid_xray dataset (public COVID-19 data): its
  sources, licences and confounds are known, and its automatic extra datasets (other findings,
  unseen normal sources) apply. False for a user's own data (labelled_xrays, a folder)."""
  return str((config or {}).get('dataset') or '').startswith('covid_xray')


def display_name(name: str) -> str:
  """How reports write a class: 'covid' is COVID-19; a user's own names stay as given."""
  return 'COVID-19' if name == 'covid' else name


def load_decision(model_dir: str | os.PathLike) -> Decision:
  """The stored operating point, or the default (threshold 0.5) when none was chosen."""
  path = os.path.join(os.fspath(model_dir), DECISION)
  if not os.path.exists(path):
    return Decision()
  data = read_json(path)
  try:
    return Decision(threshold=float(data['threshold']), policy=str(data['policy']),
                    temperature=float(data.get('temperature', 1.0)),
                    split=str(data.get('split', '')))
  except (KeyError, TypeError, ValueError) as e:
    raise errors.DataError(f'{path}: malformed decision file ({e})') from None


def save_decision(model_dir: str | os.PathLike, decision: Decision) -> None:
  write_json(os.path.join(os.fspath(model_dir), DECISION), dataclasses.asdict(decision))


def load_model(path: str | os.PathLike):
  """Loads a `.keras` file (or the model.keras of a model_dir) with Keras safe_mode on.

  Raises:
    ModelLoadError: naming the file, for a file that is not a Keras model or holds unsafe
      content (e.g. a Lambda layer, which would run arbitrary Python on load).
  """
  import keras  # Optional here: readers of model_dir JSON (the edge route) need no TensorFlow.

  from covidlib import standardize  # noqa: F401  Registers its layers; TensorFlow, as above.

  path = os.fspath(path)
  if os.path.isdir(path):
    path = os.path.join(check_model_dir(path), MODEL)
  if not os.path.isfile(path):
    raise errors.ModelLoadError(f'{path}: no such model file')
  if not path.endswith('.keras'):
    raise errors.ModelLoadError(f'{path}: not a .keras file')
  try:
    return keras.saving.load_model(path, compile=False, safe_mode=True)
  except ValueError as e:
    message = str(e)
    if 'safe_mode' in message or 'Lambda' in message:
      raise errors.ModelLoadError(
          f'{path}: refused to load: it holds a Lambda layer or other code that would run on '
          'load (Keras safe_mode)') from None
    raise errors.ModelLoadError(f'{path}: not a loadable Keras model ({message[:200]})') from None
  except Exception as e:  # zipfile.BadZipFile, OSError, KeyError from a corrupt archive.
    raise errors.ModelLoadError(
        f'{path}: not a loadable Keras model ({type(e).__name__}: {str(e)[:200]})') from None
