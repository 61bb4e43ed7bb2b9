"""labelled_xrays on Apache Beam: a build's per-file work on a Beam runner (covidlib[beam]).

    COVIDLIB_SALT=... python -m covidlib_tfds.build --labels_csv=exports/labels.csv \
        --name=site_2025 --data_dir=DIR --beam
    ... --beam_pipeline_options=runner=DirectRunner,direct_running_mode=multi_processing,\
direct_num_workers=8

or, through TFDS's own API, `builder.download_and_prepare(download_config=tfds.download.
DownloadConfig(beam_options=covidlib.beam_options.parse(None)))`: a labelled_xrays build runs on
Beam whenever its DownloadConfig names a beam_runner or beam_options (so `tfds build ...
--beam_pipeline_options=...` does too).

A build reads every file twice with one global step between the passes; on Beam each pass is a
pipeline and the global step stays in the launching process, so that the dataset is the streaming
build's, example for example:
1. Inspect (pipeline 1, on the workers): each listed file is read, decoded, hashed and its few
   header fields read by the streaming build's own function (`_inspect`). What comes back per file
   is what the dataset will hold (pseudonym, site, view, age, sex, finding, stored file name), its
   perceptual hash, whether its path shows the patient, and a salted hash of its patient group
   key: a raw patient id read from a DICOM header never leaves the worker that read it (the
   split needs only to know which images share a key, which the hash tells as well).
2. In the launcher, on those records in CSV order, exactly as a streaming build: bad files
   (--skip_bad, the list file, the one-line failure), the check that no stored path shows a
   patient, frontal_only, the split by patient and near-duplicate (`_split_by_patient`, i.e.
   covidlib_tfds.splitting) and the metadata.
3. Examples (the split generators TFDS runs as pipeline 2): each kept file read again and turned
   into the streaming build's example (`example`); TFDS's Beam writer encodes and writes them.

Runner: the one the download config names; for the DirectRunner (or none named), both pipelines
run on its engine, the FnApiRunner, made here (covidlib.beam_options.runner): apache-beam 2.77's
DirectRunner would first download its Prism runner from GitHub.

Work files (JSON lines: pipeline 1's input and output, the example lists) go to a private folder,
deleted when the build ends: a new local temporary folder (mode 0700) unless the options give
--temp_location (a cluster's workers do not see the launcher's /tmp: then a new folder under
it). Pipeline 1's input is the CSV's rows, so it holds what the CSV holds (paths, the CSV's
patient ids); nothing else in it, nor anything a worker writes, holds a raw id. The salt travels
to the workers inside the pipeline, as every pipeline argument does: on a cluster, the job's
staging and temp locations must be as private as the images.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
import uuid
from typing import Iterator, Sequence

from covidlib import beam_options as options_lib  # First: imports apache_beam quietly (see there).
import apache_beam as beam  # noqa: E402
from apache_beam.io.filesystems import FileSystems  # noqa: E402
from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions  # noqa: E402
from etils import epath  # noqa: E402

from covidlib import errors  # noqa: E402
from covidlib_tfds import labels as labels_lib  # noqa: E402
from covidlib_tfds import privacy  # noqa: E402
from covidlib_tfds.labelled_xrays import labelled_xrays_dataset_builder as builder_lib  # noqa: E402

# A covidlib error raised on a worker reaches the launcher as text inside the runner's error.
_WORKER_ERROR = re.compile(r'covidlib\.errors\.(\w+): (.+?)(?: \[while running [^\]]*\])?$',
                           re.MULTILINE)


def covidlib_error(error: BaseException) -> errors.CovidlibError | None:
  """The covidlib error a worker raised, from the text of the runner's error; else None."""
  found = _WORKER_ERROR.findall(str(error))
  if not found:
    return None
  kind, message = found[-1]
  return (errors.UsageError if kind == 'UsageError' else errors.DataError)(
      f'{message.strip()} (on a Beam worker)')


# The runner of the DirectRunner's pipelines (TFDS's included): see covidlib.beam_options.
runner = options_lib.runner


class BeamBuild:
  """One labelled_xrays build's Beam side: its runner, options and private work folder."""

  def __init__(self, runner, options: PipelineOptions | None, name: str):
    self.options = options if options is not None else options_lib.parse(None)
    # The DirectRunner as covidlib runs it (never its Prism download: see beam_options.runner).
    self.runner = runner if runner is not None else options_lib.runner(self.options)
    temp = self.options.view_as(GoogleCloudOptions).temp_location
    if temp:
      self.work = FileSystems.join(temp, f'labelled_xrays-{name}-{uuid.uuid4().hex[:12]}')
      FileSystems.mkdirs(self.work)
    else:
      self.work = tempfile.mkdtemp(prefix=f'labelled_xrays-{name}-beam-')  # Mode 0700.

  def close(self) -> None:
    """Deletes the work folder."""
    if FileSystems.exists(self.work):
      FileSystems.delete([self.work])

  def _write_lines(self, name: str, lines: Sequence[str]) -> str:
    path = FileSystems.join(self.work, name)
    with FileSystems.create(path) as f:
      f.write(''.join(f'{line}\n' for line in lines).encode('utf-8'))
    return path

  def _read_lines(self, pattern: str) -> Iterator[str]:
    """The lines of the files matching `pattern`, one file in memory at a time."""
    for match in FileSystems.match([pattern])[0].metadata_list:
      with FileSystems.open(match.path) as f:
        yield from f.read().decode('utf-8').splitlines()

  def inspect(self, rows: Sequence[labels_lib.Row], root: epath.Path, salt: str,
              hash_filenames: bool, class_names: Sequence[str]
              ) -> list[builder_lib._Image | labels_lib.BadFile]:
    """The first pass over `rows` on Beam: one _Image or BadFile per row, in row order."""
    source = self._write_lines('rows.jsonl', [
        json.dumps({'index': k, **dataclasses.asdict(row)}) for k, row in enumerate(rows)])
    out = FileSystems.join(self.work, 'inspected')
    with beam.Pipeline(runner=self.runner, options=self.options) as pipeline:
      _ = (pipeline
           | 'ReadRows' >> beam.io.ReadFromText(source)
           | 'Spread' >> beam.Reshuffle()  # One file is read by one worker: spread its rows.
           | 'Inspect' >> beam.Map(_inspect_line, root=os.fspath(root), salt=salt,
                                   hash_filenames=hash_filenames, class_names=list(class_names))
           | 'WriteRecords' >> beam.io.WriteToText(out, file_name_suffix='.jsonl'))
    results = [None] * len(rows)
    for line in self._read_lines(f'{out}*.jsonl'):
      record = json.loads(line)
      path = rows[record['index']].path
      results[record['index']] = (
          labels_lib.BadFile(path, record['reason']) if 'reason' in record
          else builder_lib._Image(**{**record['image'], 'path': path}))
    for row, result in zip(rows, results):
      if result is None:  # Nothing is lost silently, a runner's fault included.
        raise errors.DataError(f'{row.path}: the Beam inspect pass returned no record for it')
    return results

  def examples(self, split: str, root: epath.Path, images: Sequence[builder_lib._Image]
               ) -> beam.PTransform:
    """The split generator of `split`: a PTransform yielding (key, example) on the workers."""
    source = self._write_lines(f'examples-{split}.jsonl', [
        json.dumps(dataclasses.asdict(dataclasses.replace(i, group_key=''))) for i in images])
    return _Examples(source, os.fspath(root))


def _inspect_line(line: str, root: str, salt: str, hash_filenames: bool,
                  class_names: list[str]) -> str:
  """Worker side of the first pass: a row of rows.jsonl -> its record (a JSON line)."""
  item = json.loads(line)
  index = item.pop('index')
  row = labels_lib.Row(**item)
  result = builder_lib._inspect(epath.Path(root), row, salt, hash_filenames, tuple(class_names))
  if isinstance(result, labels_lib.BadFile):
    return json.dumps({'index': index, 'reason': result.reason})
  # The split compares group keys for equality only: a salted hash of the key (a raw patient
  # id, perhaps from the header) tells it as well, and keeps the id here. '' stays ''.
  image = dataclasses.replace(result, path='',
                              group_key=privacy.pseudonym(salt, 'group', result.group_key))
  return json.dumps({'index': index, 'image': dataclasses.asdict(image)})


def _example_of_line(line: str, root: str):
  """Worker side of the second pass: a line of examples-<split>.jsonl -> (key, example)."""
  image = builder_lib._Image(**json.loads(line))
  pixels = builder_lib.read_image(epath.Path(root), image.path)[0]
  return image.filename, builder_lib.example(image, pixels)


class _Examples(beam.PTransform):
  """Reads an example list, spreads it over the workers, and reads and makes each example."""

  def __init__(self, source: str, root: str):
    super().__init__()
    self._source = source
    self._root = root

  def expand(self, pipeline):
    return (pipeline
            | 'ReadList' >> beam.io.ReadFromText(self._source)
            | 'Spread' >> beam.Reshuffle()
            | 'ReadImages' >> beam.Map(_example_of_line, root=self._root))
