"""Scoring an archive on Apache Beam: covidlib-predict's CSV rows, sharded (covidlib[beam]).

    from covidlib import beam_scoring
    summary = beam_scoring.score_files('runs/compact_resnet', paths, 'scores/run1')
    print(summary.rows, summary.errors, summary.shard_pattern)

(`covidlib-predict-beam` wraps this.) The files go through Beam's RunInference with a
ModelHandler over `covidlib.predict.Predictor` (.keras / model_dir, SavedModel folder or .tflite,
loaded once per worker process), in batches Beam sizes between 1 and what the model prefers
(`preferred_batch_size`). Each file's row is covidlib-predict's CSV row for it, made by the
same function (`covidlib.results.format_results`): path, probability, label, class_name,
threshold, error, shift_score, in_distribution, decision.

Output: `<output>-SSSSS-of-NNNNN.csv`, shard k holding the rows of input files k x shard_size
to (k + 1) x shard_size - 1 in input order, each shard with the CSV header (so the shards read
in order are covidlib-predict's CSV, one header per shard), plus `<output>-manifest.json`
(the model, the number of inputs, a digest of their list, the shard size, on_shift). A shard is
written to a temporary name and renamed, so a shard file that exists is complete.
- A file that cannot be read, or that fails in any other way, becomes a row with its error and
  no probability: it never fails the pipeline.
- Run again with the same output and inputs, only the shards missing are scored (after a crash
  or a preempted job); with other inputs, model or options it is a UsageError, not a mix.
- After the pipeline the shards are read back and counted: every input has exactly one row
  (rows with a probability + error rows = inputs), or the run fails naming the count.

Paths must be readable where the workers run: local files for the DirectRunner, a filesystem
every worker mounts (NFS, a FUSE-mounted bucket) on a cluster. The output may be any path Beam
writes (a local folder, gs://...). Research software, not a diagnostic device.
"""

from __future__ import annotations

import csv
import dataclasses
import glob as glob_lib
import hashlib
import io
import json
import math
import os
import uuid
from typing import Iterable, Sequence

from covidlib import beam_options as options_lib  # First: imports apache_beam quietly (see there).
import apache_beam as beam  # noqa: E402
from apache_beam.io.filesystems import FileSystems  # noqa: E402
from apache_beam.ml.inference import base as inference  # noqa: E402
from apache_beam.options.pipeline_options import PipelineOptions  # noqa: E402

from covidlib import errors  # noqa: E402
from covidlib import predict  # noqa: E402
from covidlib import results  # noqa: E402

SHARD_SIZE = 1000  # Files per output shard: the unit that a re-run skips or redoes.
_SHOWN = 20  # Failed files named in a message.


@dataclasses.dataclass(frozen=True)
class Summary:
  """What a run wrote. rows + errors == files (checked), however many shards were skipped."""
  files: int
  rows: int  # Rows with a probability.
  errors: int  # Error rows: no probability, the reason in column error.
  out_of_distribution: int  # Rows whose in_distribution is false.
  shards: int
  skipped_shards: int  # Complete before this run (a re-run).
  shard_pattern: str
  failed: tuple[str, ...]  # 'path: reason' of the first _SHOWN error rows.


def preferred_batch_size(model: str) -> int:
  """The largest batch handed to the model: Keras and SavedModel run a batch in one call (32),
  a .tflite interpreter one image per invoke, so batches only share Beam's per-call cost (8)."""
  return 8 if predict.detect_format(model) == predict.TFLITE else 32


class PredictorHandler(inference.ModelHandler):
  """RunInference's ModelHandler over covidlib's Predictor: file paths in, Predictions out."""

  def __init__(self, model: str, on_shift: str = 'warn', batch_size: int | None = None):
    if on_shift not in predict.ON_SHIFT:
      raise errors.UsageError(f'on_shift must be one of {", ".join(predict.ON_SHIFT)}, got '
                              f'{on_shift!r}')
    batch_size = batch_size or preferred_batch_size(model)
    if batch_size < 1:
      raise errors.UsageError(f'batch_size must be >= 1, got {batch_size}')
    super().__init__(min_batch_size=1, max_batch_size=batch_size)
    self._model = model
    self._on_shift = on_shift

  def load_model(self) -> predict.Predictor:
    return predict.Predictor(self._model, on_shift=self._on_shift)

  def run_inference(self, batch: Sequence[str], model: predict.Predictor,
                    inference_args=None) -> list[results.Prediction]:
    del inference_args
    # Decoding in this thread: Beam's parallelism is its worker processes.
    try:
      return model.predict_files(batch, batch_size=len(batch), workers=0)
    except Exception:  # Something other than an unreadable file: find which file, alone.
      return [_predict_one(model, path) for path in batch]

  def get_metrics_namespace(self) -> str:
    return 'covidlib'


def _predict_one(model: predict.Predictor, path: str) -> results.Prediction:
  try:
    return model.predict_files([path], batch_size=1, workers=0)[0]
  except Exception as e:  # Never a failed pipeline: the row says what went wrong.
    reason = f'{type(e).__name__}: {" ".join(str(e).split())}'[:300]
    return results.Prediction(path, None, None, float(model.decision.threshold), reason)


def csv_header() -> str:
  """covidlib-predict's CSV header line (no newline)."""
  return results.format_results([], 'csv', '').splitlines()[0]


def csv_row(prediction: results.Prediction) -> str:
  """covidlib-predict's CSV row of one prediction (no newline)."""
  return results.format_results([prediction], 'csv', '').splitlines()[1]


def expected_rows(files: int, shard_size: int, shard: int) -> int:
  return max(0, min(shard_size, files - shard * shard_size))


def shard_path(output: str, shard: int, shards: int) -> str:
  return f'{output}-{shard:05d}-of-{shards:05d}.csv'


def _model_fingerprint(model: str) -> str:
  """sha256 of the model's files' relative paths, sizes and mtimes: a retrained or re-exported
  model is another model."""
  entries = []
  if os.path.isdir(model):
    for folder, _, names in sorted(os.walk(model)):
      for name in sorted(names):
        stat = os.stat(os.path.join(folder, name))
        entries.append(f'{os.path.relpath(os.path.join(folder, name), model)}\0{stat.st_size}'
                       f'\0{stat.st_mtime_ns}')
  else:
    stat = os.stat(model)
    entries.append(f'{stat.st_size}\0{stat.st_mtime_ns}')
  return hashlib.sha256('\n'.join(entries).encode('utf-8')).hexdigest()


def _write_atomic(path: str, text: str) -> None:
  """Writes `text` to `path` through a temporary name and a rename (any Beam filesystem)."""
  partial = f'{path}.partial-{uuid.uuid4().hex[:8]}'
  with FileSystems.create(partial) as f:
    f.write(text.encode('utf-8'))
  FileSystems.rename([partial], [path])


def _read_text(path: str) -> str:
  with FileSystems.open(path) as f:
    return f.read().decode('utf-8')


def _check_manifest(output: str, manifest: dict) -> None:
  """Writes <output>-manifest.json, or checks that the one there is this run's.

  Raises:
    UsageError: the output holds shards of another run (other inputs, model or options).
  """
  path = f'{output}-manifest.json'
  if not FileSystems.exists(path):
    _write_atomic(path, json.dumps(manifest, indent=2) + '\n')
    return
  try:
    stored = json.loads(_read_text(path))
  except ValueError:
    stored = {}
  changed = [k for k in manifest if stored.get(k) != manifest[k]]
  if changed:
    raise errors.UsageError(
        f'--output {output} holds the shards of another run (changed: {", ".join(changed)}; see '
        f'{path}): give another --output, or delete {output}-* to start again')


def _key_by_shard(item: tuple[int, results.Prediction], shard_size: int):
  index, prediction = item
  return index // shard_size, (index, csv_row(prediction))


def _write_shard(item, output: str, shards: int, files: int, shard_size: int) -> int:
  shard, rows = item
  rows = sorted(rows)
  if len(rows) != expected_rows(files, shard_size, shard):  # Nothing is lost silently.
    raise errors.DataError(f'shard {shard} of {output}: {len(rows)} rows for '
                           f'{expected_rows(files, shard_size, shard)} inputs')
  _write_atomic(shard_path(output, shard, shards),
                csv_header() + '\n' + ''.join(f'{row}\n' for _, row in rows))
  return shard


def _read_input(line: str) -> tuple[int, str]:
  item = json.loads(line)
  return item['i'], item['path']


def score_files(model: str, paths: Sequence[str], output: str, *,
                shard_size: int = SHARD_SIZE, batch_size: int | None = None,
                on_shift: str = 'warn', options: PipelineOptions | None = None,
                runner=None) -> Summary:
  """Scores `paths` with `model` on Beam into sharded CSV at `output`; returns the summary.

  Args:
    model: a .keras file, a model_dir, a SavedModel folder or a .tflite file.
    paths: the image files, in the order the rows keep.
    output: the output prefix (a local path or any filesystem Beam writes).
    shard_size: input files per shard.
    batch_size: the largest batch RunInference hands the model (default: preferred_batch_size).
    on_shift: as covidlib-predict's --on_shift: 'warn' or 'abstain'.
    options: Beam PipelineOptions (default: `covidlib.beam_options.parse(None)`, the
      DirectRunner with one worker process per core).
    runner: a Beam runner object, if not the one the options name (default:
      `covidlib.beam_options.runner(options)`).

  Raises:
    UsageError: no paths, a bad argument, or an output holding another run's shards.
    ModelLoadError: the model does not load (checked here, before any worker starts).
    DataError: a shard lacks rows after the run (a runner's fault: nothing is lost silently).
  """
  paths = [os.fspath(p) for p in paths]
  if not paths:
    raise errors.UsageError('no input files to score')
  if not isinstance(shard_size, int) or shard_size < 1:
    raise errors.UsageError(f'shard_size must be a whole number >= 1, got {shard_size!r}')
  if not output or output.endswith(('/', os.sep)):
    raise errors.UsageError(f'--output must be a file prefix (e.g. scores/run1), got {output!r}')
  handler = PredictorHandler(model, on_shift, batch_size)
  predict.Predictor(model, on_shift=on_shift)  # A model that does not load fails here, once.
  files, shards = len(paths), math.ceil(len(paths) / shard_size)
  if FileSystems.get_scheme(output) in (None, 'file') and os.path.dirname(output):
    os.makedirs(os.path.dirname(output), exist_ok=True)
  listing = '\n'.join(paths).encode('utf-8')
  _check_manifest(output, {
      'model': model, 'model_fingerprint': _model_fingerprint(model), 'on_shift': on_shift,
      'files': files, 'inputs_sha256': hashlib.sha256(listing).hexdigest(),
      'shard_size': shard_size, 'shards': shards})
  done = {k for k in range(shards) if FileSystems.exists(shard_path(output, k, shards))}
  pending = sorted(set(range(shards)) - done)
  if pending:
    inputs = f'{output}-inputs-{uuid.uuid4().hex[:8]}.jsonl'  # Read by the workers.
    first, last = pending[0] * shard_size, (pending[-1] + 1) * shard_size
    with FileSystems.create(inputs) as f:
      f.write(''.join(json.dumps({'i': i, 'path': p}) + '\n' for i, p in enumerate(paths)
                      if first <= i < last and i // shard_size not in done).encode('utf-8'))
    try:
      options = options if options is not None else options_lib.parse(None)
      runner = runner if runner is not None else options_lib.runner(options)
      with beam.Pipeline(runner=runner, options=options) as pipeline:
        _ = (pipeline
             | 'ReadInputs' >> beam.io.ReadFromText(inputs)
             | 'Parse' >> beam.Map(_read_input)
             | 'Spread' >> beam.Reshuffle()  # One file is read by one worker: spread the paths.
             | 'Predict' >> inference.RunInference(inference.KeyedModelHandler(handler))
             | 'KeyByShard' >> beam.Map(_key_by_shard, shard_size=shard_size)
             | 'GroupShards' >> beam.GroupByKey()
             | 'WriteShards' >> beam.Map(_write_shard, output=output, shards=shards,
                                         files=files, shard_size=shard_size))
    finally:
      FileSystems.delete([inputs])
  return summarize(output, files, shard_size, skipped=len(done))


def summarize(output: str, files: int, shard_size: int, skipped: int = 0) -> Summary:
  """Reads every shard back and counts its rows; DataError when an input has no row."""
  shards = math.ceil(files / shard_size)
  rows = failures = outside = 0
  failed = []
  for shard in range(shards):
    path = shard_path(output, shard, shards)
    if not FileSystems.exists(path):
      raise errors.DataError(f'{path} is missing after the run: its '
                             f'{expected_rows(files, shard_size, shard)} inputs have no row')
    records = list(csv.DictReader(io.StringIO(_read_text(path))))
    if len(records) != expected_rows(files, shard_size, shard):
      raise errors.DataError(f'{path} holds {len(records)} rows for '
                             f'{expected_rows(files, shard_size, shard)} inputs')
    for record in records:
      if record['error']:
        failures += 1
        if len(failed) < _SHOWN:
          failed.append(f'{record["path"]}: {record["error"]}')
      else:
        rows += 1
      outside += record['in_distribution'] == 'false'
  assert rows + failures == files
  return Summary(files=files, rows=rows, errors=failures, out_of_distribution=outside,
                 shards=shards, skipped_shards=skipped,
                 shard_pattern=f'{output}-*-of-{shards:05d}.csv', failed=tuple(failed))


def expand(inputs: Iterable[str], file_list: str | None = None) -> list[str]:
  """The files to score: `file_list`'s lines (one path a line), then `inputs`, each a file, a
  folder (recursive, as covidlib-predict) or a glob pattern ('scans/**/*.dcm').

  Raises:
    UsageError: nothing to score, a missing file list, or a pattern matching nothing.
  """
  paths = []
  if file_list:
    try:
      with open(file_list, encoding='utf-8') as f:
        paths += [line.rstrip('\n') for line in f if line.strip()]
    except OSError as e:
      raise errors.UsageError(f'--file_list {file_list}: cannot read it ({e.strerror})') \
          from None
  plain = []
  for item in inputs:
    if glob_lib.has_magic(item):
      matched = sorted(glob_lib.glob(item, recursive=True))
      if not matched:
        raise errors.UsageError(f'input pattern {item!r} matches no file')
      plain += [m for m in matched if not os.path.isdir(m)]
    else:
      plain.append(item)
  if plain:
    paths += results.expand_inputs(plain)
  if not paths:
    raise errors.UsageError('no input: give image files, folders or patterns after the flags, '
                            'or --file_list')
  return paths
