"""Everything `covidlib-export` does, as one function: build all formats, then publish atomically.

    from exporters import export
    export.export_model_dir('runs/seed_cnn', 'exports/seed_cnn',
                            formats=['saved_model', 'tflite_fp32', 'tflite_int8'])

Layout of the output folder:

    saved_model/                 SavedModel (serving_default: image bytes; serving_preprocessed)
    model_fp32.tflite ...        one file per TFLite variant (model_<type>.tflite)
    model_uint8_image.tflite     takes the decoded uint8 gray image of any size (resize inside)
    labels.txt, decision.json    the operating point, also embedded in every model
    shift.json                   the shift score's threshold (issue #10), when the model has one
    config.json                  the training configuration, copied
    lineage.json                 for a model adapted to a site (covidlib-site adapt), copied
    export_report.json / .md     parity of every variant against the Keras model
    MODEL_CARD.md

Atomicity: everything is built in a hidden sibling folder `.<name>.partial-<pid>-<random>` and
renamed into place at the end, so the output folder appears complete or not at all, also when
the process is killed. An export whose variants miss a parity target is not renamed into place
(`parity.ParityMissError`) unless `allow_parity_miss`. An existing output is refused unless `overwrite`, which swaps the two
folders in one `renameat2(RENAME_EXCHANGE)` (Linux; elsewhere two renames, leaving a moment with
no folder, never a half-written one). Leftover partial folders of dead processes are removed by
the next export to the same place.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import glob
import logging
import os
import re
import shutil
import tempfile
from typing import Sequence

import numpy as np
import tensorflow_datasets as tfds

from covidlib import data
from covidlib import errors
from covidlib import evaluate
from covidlib import model_dir as model_dir_lib
from covidlib import preprocess
from covidlib import report as report_lib
from covidlib import scoring
from covidlib import shift as shift_lib
from covidlib.scored import Scored
from exporters import model_card
from exporters import parity
from exporters import saved_model as saved_model_lib
from exporters import serving
from exporters import tflite

FORMATS = ('saved_model', 'tflite_fp32', 'tflite_dynamic', 'tflite_fp16', 'tflite_int8',
           'tflite_uint8_image')
# tflite_uint8_image (exporters.tflite.convert_tflite_uint8_image) takes the decoded gray image
# of any size, uint8 (1, H, W, 1), and resizes in its graph: what a phone app hands over. Its
# weights are dynamic-range quantized (int8 weights, float activations).
UINT8_IMAGE_QUANT_TYPE = 'dynamic'
SAVED_MODEL_DIR = 'saved_model'
LINEAGE = 'lineage.json'  # covidlib.site.LINEAGE, without importing the site tools.
log = logging.getLogger(__name__)


def tflite_filename(fmt: str) -> str:
  return f'model_{fmt[len("tflite_"):]}.tflite'


def check_formats(formats: Sequence[str]) -> list[str]:
  formats = [f.strip() for f in formats if f.strip()]
  unknown = [f for f in formats if f not in FORMATS]
  if unknown:
    raise errors.UsageError(
        f'unknown export format(s) {", ".join(unknown)}; valid: {", ".join(FORMATS)}')
  if not formats:
    raise errors.UsageError(f'no export format given; valid: {", ".join(FORMATS)}')
  return sorted(set(formats), key=FORMATS.index)


# ---------------------------------------------------------------- Atomic publication.

_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2


def _renameat2(src: str, dst: str, flags: int) -> bool:
  """Linux renameat2; False where the C library or file system does not offer it."""
  libc_name = ctypes.util.find_library('c')
  if not libc_name:
    return False
  libc = ctypes.CDLL(libc_name, use_errno=True)
  if not hasattr(libc, 'renameat2'):
    return False
  at_fdcwd = -100
  result = libc.renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), flags)
  if result == 0:
    return True
  code = ctypes.get_errno()
  if code in (errno.ENOSYS, errno.EINVAL):
    return False
  raise OSError(code, os.strerror(code), dst)


def publish(tmp: str, out: str, overwrite: bool) -> None:
  """Moves the finished folder `tmp` to `out` in one step; the old `out` ends up in `tmp`."""
  if os.path.lexists(out):
    if not overwrite:
      raise errors.UsageError(f'output {out!r} already exists (pass --overwrite to replace it)')
    if not _renameat2(tmp, out, _RENAME_EXCHANGE):
      old = tmp + '.old'
      os.rename(out, old)
      os.rename(tmp, out)
      os.rename(old, tmp)
    shutil.rmtree(tmp, ignore_errors=True)
    return
  try:
    if _renameat2(tmp, out, _RENAME_NOREPLACE):
      return
  except FileExistsError:
    raise errors.UsageError(f'output {out!r} appeared while exporting; not replaced') from None
  os.rename(tmp, out)


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def remove_stale_partials(out: str) -> list[str]:
  """Removes `.<name>.partial-<pid>-*` folders next to `out` whose process is gone."""
  parent, name = os.path.split(os.path.abspath(out))
  removed = []
  for path in glob.glob(os.path.join(parent, f'.{glob.escape(name)}.partial-*')):
    match = re.search(r'\.partial-(\d+)-', os.path.basename(path))
    if match and not _pid_alive(int(match.group(1))):
      shutil.rmtree(path, ignore_errors=True)
      removed.append(path)
  return removed


# ---------------------------------------------------------------- Data for calibration/parity.

def load_arrays(config: dict, split: str, *, dataset: str | None, data_dir: str | None,
                limit: int | None = None, seed: int = 0):
  """(images float32 (N, S, S, C), labels (N,), metadata dict, description) of one split.

  With `limit`, a seeded random subset of at most `limit` images, in split order.
  """
  ds, description = scoring.load_split(config, split, dataset=dataset, data_dir=data_dir)
  try:
    images, labels, metadata = scoring.read_dataset(ds)
  except errors.DataError:
    raise errors.DataError(f'{description} holds no images') from None
  if limit is not None and len(labels) > limit:
    keep = np.sort(np.random.RandomState(seed).choice(len(labels), limit, replace=False))
    images, labels = images[keep], labels[keep]
    metadata = {k: v[keep] for k, v in metadata.items()}
  return images, labels, metadata, description


def load_raw_images(config: dict, split: str, *, dataset: str | None, data_dir: str | None
                    ) -> tuple[list[np.ndarray], np.ndarray]:
  """The decoded uint8 (H, W, 1) images of one split at their original sizes, and labels.

  For the parity of variants that take the image as it is (tflite_uint8_image).
  """
  dataset, root = scoring.split_location(config, split, dataset)
  if root is not None:
    paths, labels = data.list_folder(root)
    return [preprocess.load_image(p) for p in paths], np.asarray(labels, np.int64)
  builder = data.builder(dataset, data_dir or config.get('data_dir'))
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          decoders={'image': tfds.decode.SkipDecoding()})
  images, labels = [], []
  for example in ds:
    images.append(preprocess.decode_image(example['image']).numpy())
    labels.append(int(example['label']))
  return images, np.asarray(labels, np.int64)


def _evaluation_on_parity(model, decision, images, labels, metadata, description) -> dict:
  """covidlib.evaluate's report layout, computed on the parity split (model card fallback)."""
  scores = scoring.score_images(model, images, 32)
  text = {k: v for k, v in metadata.items() if v.dtype.kind not in 'iuf'}
  predictions = Scored(labels=labels, scores=scores, metadata=text)
  report = evaluate.evaluate_predictions(predictions, decision,
                                         group_by=evaluate.default_groups(predictions))
  report['data'] = {'description': description, 'n': int(labels.size)}
  return report


# ---------------------------------------------------------------- The export.

def export_model_dir(model_dir: str, out: str, *, formats: Sequence[str] = FORMATS,
                     int8_io: bool = False, dataset: str | None = None,
                     data_dir: str | None = None, calibration_split: str = 'train',
                     calibration_images: int = 200, parity_split: str | None = 'validation',
                     latency_runs: int = 30, eval_report: str | None = None,
                     overwrite: bool = False, allow_parity_miss: bool = False) -> dict:
  """Exports a model_dir to `out` (see the module docstring); returns the parity report.

  Args:
    model_dir: a finished covidlib-train run.
    out: the output folder; must not exist unless `overwrite`.
    formats: a subset of FORMATS.
    int8_io: int8 input/output tensors for tflite_int8.
    dataset, data_dir: where the calibration and parity splits come from (a TFDS name such as
      'covid_xray/patient_split', or 'folder:ROOT' for ROOT/<split>/{covid,normal}); default:
      the training run's, from config.json.
    calibration_split, calibration_images: int8 representative data: a seeded random subset of
      this many images of this split.
    parity_split: split for the parity report and fallback metrics; None skips parity.
    latency_runs: timed single-image runs per model and thread count.
    eval_report: covidlib-evaluate's report.json for the model card; default: the newest one in
      model_dir or a folder below it.
    overwrite: replace an existing `out` (atomically).
    allow_parity_miss: write `out` even when a variant misses a parity target
      (`parity.missed_targets`); the caller reports the miss.

  Raises:
    UsageError, DataError, ModelLoadError: naming what is at fault; `out` is then untouched.
    parity.ParityMissError: a variant misses a parity target (without `allow_parity_miss`),
      naming each miss; nothing is written to `out`.
  """
  formats = check_formats(formats)
  if int8_io and 'tflite_int8' not in formats:
    raise errors.UsageError('--int8_io needs the tflite_int8 format')
  if calibration_images < 1:
    raise errors.UsageError(f'calibration_images must be >= 1, got {calibration_images}')
  if latency_runs < 0:
    raise errors.UsageError(f'latency_runs must be >= 0, got {latency_runs}')
  model_dir = model_dir_lib.check_model_dir(model_dir)
  out = os.path.abspath(out)
  if os.path.lexists(out) and not overwrite:
    raise errors.UsageError(f'output {out!r} already exists (pass --overwrite to replace it)')
  if os.path.commonpath([out, os.path.abspath(model_dir)]) == out:
    raise errors.UsageError(f'output {out!r} would contain or replace the model_dir')
  if eval_report is not None and not os.path.isfile(eval_report):
    raise errors.UsageError(f'evaluation report {eval_report!r} does not exist')
  config = model_dir_lib.load_config(model_dir)
  decision = model_dir_lib.load_decision(model_dir)
  model = model_dir_lib.load_model(model_dir)
  serving.check_geometry(model, config)

  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  for path in remove_stale_partials(out):
    log.info('removed %s, left by an interrupted export', path)
  tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(out)}.partial-{os.getpid()}-', dir=parent)
  try:
    report = _build(tmp, model_dir, model, config, decision, formats=formats, int8_io=int8_io,
                    dataset=dataset, data_dir=data_dir, calibration_split=calibration_split,
                    calibration_images=calibration_images, parity_split=parity_split,
                    latency_runs=latency_runs, eval_report=eval_report)
    missed = [] if report is None or allow_parity_miss else parity.missed_targets(report)
    if missed:
      raise parity.ParityMissError(
          f'parity target missed: {"; ".join(missed)}; nothing written to {out} (pass '
          '--allow_parity_miss to write it anyway)')
    _finalize_tree(tmp)
    publish(tmp, out, overwrite)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  log.info('exported %s to %s', ', '.join(formats), out)
  return report


def _build(tmp, model_dir, model, config, decision, *, formats, int8_io, dataset, data_dir,
           calibration_split, calibration_images, parity_split, latency_runs, eval_report):
  variants: dict[str, str] = {}
  class_names = model_dir_lib.class_names(config)  # Label 0, label 1: the dataset's names.
  if 'saved_model' in formats:
    log.info('writing the SavedModel')
    variants['saved_model'] = saved_model_lib.export_saved_model(
        model_dir, os.path.join(tmp, SAVED_MODEL_DIR), model=model)
  representative = None
  if 'tflite_int8' in formats:
    representative, _, _, description = load_arrays(
        config, calibration_split, dataset=dataset, data_dir=data_dir, limit=calibration_images)
    log.info('int8 calibration: %d images of %s', len(representative), description)
  for fmt in formats:
    if not fmt.startswith('tflite_'):
      continue
    quant_type = fmt[len('tflite_'):]
    log.info('converting %s', fmt)
    if fmt == 'tflite_uint8_image':
      data = tflite.convert_tflite_uint8_image(model, UINT8_IMAGE_QUANT_TYPE, decision,
                                               shift_model=_shift_model(model_dir),
                                               class_names=class_names)
      path = os.path.join(tmp, tflite_filename(fmt))
      model_dir_lib.write_bytes_atomic(path, data)
      variants[fmt] = path
      continue
    data = tflite.convert_tflite(model, quant_type,
                                 representative if quant_type == 'int8' else None,
                                 int8_io=int8_io and quant_type == 'int8', decision=decision,
                                 shift_model=_shift_model(model_dir), class_names=class_names)
    path = os.path.join(tmp, tflite_filename(fmt))
    model_dir_lib.write_bytes_atomic(path, data)
    variants[fmt] = path
  model_dir_lib.write_bytes_atomic(os.path.join(tmp, saved_model_lib.LABELS_FILE),
                                   saved_model_lib.labels_text(class_names).encode())
  model_dir_lib.write_bytes_atomic(os.path.join(tmp, model_dir_lib.DECISION),
                                   tflite.decision_json(decision).encode())
  model_dir_lib.write_json(os.path.join(tmp, model_dir_lib.CONFIG), config)
  if _lineage(model_dir):  # A model adapted to a site (covidlib-site adapt): where it came from.
    model_dir_lib.write_json(os.path.join(tmp, LINEAGE), _lineage(model_dir))
  if _shift_model(model_dir) is not None:  # The shift threshold, beside decision.json.
    model_dir_lib.write_bytes_atomic(os.path.join(tmp, shift_lib.SHIFT_JSON),
                                     shift_lib.info_json(_shift_model(model_dir)).encode())

  report, evaluation, source = None, None, 'none'
  if parity_split:
    images, labels, metadata, description = load_arrays(
        config, parity_split, dataset=dataset, data_dir=data_dir)
    log.info('parity on %d images of %s', len(labels), description)
    raw = None
    if 'tflite_uint8_image' in variants:
      raw = load_raw_images(config, parity_split, dataset=dataset, data_dir=data_dir)
    report = parity.parity_report(model_dir, variants, images, labels, split=description,
                                  latency_runs=latency_runs, raw=raw)
    if int8_io:
      report['models']['tflite_int8']['int8_io'] = True
    parity.write_report(tmp, report)
  eval_report = eval_report or model_card.find_evaluation_report(model_dir)
  if eval_report:
    evaluation = model_card.load_evaluation_report(eval_report)
    source = (f'covidlib-evaluate report `{os.path.relpath(eval_report, model_dir)}` of the '
              'model_dir')
  elif parity_split:
    evaluation = _evaluation_on_parity(model, decision, images, labels, metadata, description)
    source = ('computed at export on the parity split (no covidlib-evaluate report in the '
              'model_dir)')
  files = sorted(os.listdir(tmp)) + [model_card.FILENAME]
  fitted = _shift_model(model_dir)
  card = model_card.render_model_card(config, decision, evaluation=evaluation,
                                      evaluation_source=source, parity=report, files=files,
                                      params=int(model.count_params()),
                                      shift_info=None if fitted is None else fitted.info(),
                                      training_strata=training_strata(config),
                                      history=report_lib.load_history(model_dir),
                                      lineage=_lineage(model_dir))
  model_dir_lib.write_bytes_atomic(os.path.join(tmp, model_card.FILENAME), card.encode())
  return report


def _lineage(model_dir: str) -> dict | None:
  path = os.path.join(model_dir, LINEAGE)
  return model_dir_lib.read_json(path) if os.path.isfile(path) else None


def training_strata(config: dict) -> dict | None:
  """{(source, label): images} of the training split a config names, for the model card; None
  when the dataset is a folder, is not built here or has no `source` feature."""
  dataset = str(config.get('dataset') or '')
  if not dataset or dataset.startswith('folder:') or ' fold ' in dataset or ' without ' in dataset:
    return None
  try:
    return data.stratum_counts(dataset, config.get('train_split') or 'train',
                               config.get('data_dir'))
  except errors.CovidlibError:
    return None


def _shift_model(model_dir: str):
  """The model_dir's shift score with a threshold (issue #10), or None."""
  fitted = shift_lib.load(model_dir)
  return fitted if fitted is not None and fitted.threshold is not None else None


def _finalize_tree(root: str) -> None:
  """Usual permissions (temporary files are private) and every file flushed before publishing."""
  umask = os.umask(0)
  os.umask(umask)
  for folder, _, names in os.walk(root):
    os.chmod(folder, 0o777 & ~umask)
    for name in names:
      path = os.path.join(folder, name)
      os.chmod(path, 0o666 & ~umask)
      fd = os.open(path, os.O_RDONLY)
      try:
        os.fsync(fd)
      finally:
        os.close(fd)
