"""Apache Beam pipeline options for covidlib's Beam steps (covidlib[beam]).

    from covidlib import beam_options
    options = beam_options.parse(None)   # the embedded default: DirectRunner, a process per core
    options = beam_options.parse('runner=FlinkRunner,flink_master=HOST:8081,'
                                 'environment_type=LOOPBACK')

One syntax for both Beam steps (`python -m covidlib_tfds.build --beam_pipeline_options=...`,
`covidlib-predict-beam --beam_pipeline_options=...`): `tfds build`'s, comma-separated
name=value items without the leading dashes (they are accepted too). Import this module before
apache_beam (the Beam modules of covidlib do): it imports apache_beam without the warning
apache-beam 2.77 logs when its GCP extras are absent.
"""

from __future__ import annotations

import logging
import os
import re


class _NoApitoolsWarning(logging.Filter):
  """apache-beam 2.77 warns on its first import that apitools (its BigQuery client, in the
  apache-beam[gcp] extra) is missing: covidlib does not use it, and a usage error's one line on
  stderr must stay one line. Dataflow users install apache-beam[gcp], which has it."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith('apitools not found')


_quiet = _NoApitoolsWarning()
logging.getLogger().addFilter(_quiet)
try:
  from apache_beam.options import pipeline_options  # noqa: E402  Imports apache_beam itself.
  from apache_beam.portability.api import beam_provision_api_pb2  # noqa: E402  (the same)
  from apache_beam.runners.portability import portable_runner  # noqa: E402  (the same)
  from apache_beam.runners.portability.fn_api_runner import fn_runner  # noqa: E402  (the same)
finally:
  logging.getLogger().removeFilter(_quiet)

from covidlib import errors  # noqa: E402

_ITEM = re.compile(r'(--)?[A-Za-z_][A-Za-z0-9_]*(=.*)?')


def default_flags() -> list[str]:
  """The embedded default: the DirectRunner, one worker process per core, the workers' logging
  at ERROR (a worker's error still fails the pipeline, with its message; at INFO each worker
  logs its gRPC set-up, and without torch Beam 2.77 warns twice per model load that it cannot
  measure memory)."""
  return ['--runner=DirectRunner', '--direct_running_mode=multi_processing',
          f'--direct_num_workers={os.cpu_count() or 1}', '--default_sdk_harness_log_level=ERROR']


def runner(options: pipeline_options.PipelineOptions):
  """The runner to run `options` with: for the DirectRunner (named, or no runner named), its
  own engine, Beam's FnApiRunner, handed the options its workers read; None for any other runner
  (Beam then makes the one `options` names).

  Not the DirectRunner itself: apache-beam 2.77's DirectRunner first tries its Prism runner,
  which it downloads from GitHub at run time (covidlib downloads nothing at run time, a hospital
  network may forbid it, and Prism does not run direct_running_mode's worker processes); where
  the download fails it falls back to this same FnApiRunner.
  """
  name = (options.view_as(pipeline_options.StandardOptions).runner or 'DirectRunner')
  if not isinstance(name, str) or name.lower() not in ('directrunner', 'direct'):
    return None
  encoded = portable_runner.JobServiceHandle.encode_pipeline_options(options.get_all_options())
  return fn_runner.FnApiRunner(provision_info=fn_runner.ExtendedProvisionInfo(
      beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded)))


def parse(text: str | None) -> pipeline_options.PipelineOptions:
  """PipelineOptions from 'name=value,name=value'; None or '' gives `default_flags()`.

  Raises:
    UsageError: an item that is not name=value (or a bare name, for a boolean option).
  """
  if not text:
    return pipeline_options.PipelineOptions(default_flags())
  items = []
  for item in (i.strip() for i in text.split(',')):
    if not _ITEM.fullmatch(item):
      raise errors.UsageError(f'--beam_pipeline_options: {item!r} is not name=value (e.g. '
                              'runner=DirectRunner,direct_num_workers=2)')
    items.append(item if item.startswith('--') else f'--{item}')
  return pipeline_options.PipelineOptions(items)
