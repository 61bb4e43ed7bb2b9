"""Command-line plumbing shared by `covidlib_tfds.build` and `covidlib_tfds.audit`.

Each binary keeps its flags in its own `flags.FlagValues`, not in absl's global FLAGS: their
natural names (--config, --data_dir, --dataset) are ones other binaries define too, and absl
refuses a flag defined twice in one process (a test run imports every binary). The global FLAGS
are only marked as parsed, not parsed: in a process that also imported another binary, parsing
them would run that binary's validators (e.g. its required --model_dir) against our argv.
"""

from __future__ import annotations

import sys

from absl import flags
import tensorflow_datasets as tfds

from covidlib import errors

_HELP = ('-h', '--help', '-?', '--helpshort', '--helpfull')


def parse_flags(argv: list[str], flag_values: flags.FlagValues, binary: str,
                doc: str) -> list[str]:
  """Parses the binary's own flags, then absl's; a bad flag is one line on stderr, exit 2."""
  if any(arg in _HELP for arg in argv[1:]):
    print(f'{doc.strip()}\n\nFlags:\n{flag_values.get_help()}')
    sys.exit(0)
  try:
    rest = flag_values(argv, known_only=True)
    unknown = [arg for arg in rest[1:] if arg.startswith('-')]
    if unknown:
      raise flags.UnrecognizedFlagError(unknown[0].lstrip('-').split('=')[0])
    flags.FLAGS.mark_as_parsed()
    return rest
  except flags.Error as e:
    print(f'{binary}: error: {e}', file=sys.stderr)
    sys.exit(2)


def check_name(name: str) -> str:
  """Returns `name` if TFDS knows its dataset and config; UsageError naming what is unknown.

  `name` is what `tfds.builder` takes: 'dataset/config', optionally with ':version' and
  '/kwarg=value,...' (e.g. 'covid_xray/seed/allow_missing=True').
  """
  try:
    dataset, kwargs = tfds.core.naming.parse_builder_name_kwargs(name)
  except ValueError:
    raise errors.UsageError(f'{name}: not a dataset name (dataset/config)') from None
  try:
    builder_cls = tfds.builder_cls(dataset.name)
  except tfds.core.registered.DatasetNotFoundError:
    raise errors.UsageError(f'{dataset.name}: unknown dataset (did you import covidlib_tfds?)'
                            ) from None
  configs = list(builder_cls.builder_configs)
  config = kwargs.get('config')
  # labelled_xrays takes config names its user chose (it lists only its example's).
  if config and configs and config not in configs and dataset.name != 'labelled_xrays':
    raise errors.UsageError(f'{dataset.name}: unknown config {config!r}; the configs are '
                            f'{", ".join(configs)}')
  return name
