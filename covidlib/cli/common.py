"""What every covidlib binary shares: one-line errors and exit statuses, no tracebacks.

    from covidlib.cli import common

    def main(argv):
      common.reject_extra_args(argv)
      ...

    def run():  # The console script's entry point.
      common.run_main(main, prog='covidlib-train')

Exit statuses: 0 success; 2 usage (a bad, missing or unknown flag, `errors.UsageError`);
1 any other `errors.CovidlibError` (bad data, a model that does not load, NaN loss...);
130 interrupted (Ctrl-C). Errors print exactly one line, `<prog>: error: <message>`, on stderr.
Anything else is a bug in covidlib and keeps its traceback.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Any, Callable, NoReturn, Sequence

from absl import app
from absl import flags

from covidlib import errors

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def print_error(prog: str, message: Any) -> None:
  """Prints `<prog>: error: <message>` as one line on stderr (newlines folded)."""
  text = ' '.join(str(message).split())
  print(f'{prog}: error: {text}', file=sys.stderr, flush=True)


def exit_status(error: BaseException) -> int:
  """The exit status for an error a binary reports without a traceback."""
  if isinstance(error, (errors.UsageError, flags.Error)):
    return EXIT_USAGE
  return EXIT_FAILURE


def call_main(main: Callable[[list[str]], Any], argv: Sequence[str], prog: str) -> int:
  """Runs `main(argv)` and returns its exit status; covidlib errors become one printed line.

  Flags must already be parsed. `main` returning None or 0 means success.
  """
  try:
    status = main(list(argv))
  except (errors.CovidlibError, flags.Error) as e:
    print_error(prog, e)
    return exit_status(e)
  except KeyboardInterrupt:
    print_error(prog, 'interrupted')
    return EXIT_INTERRUPTED
  return 0 if status is None else int(status)


def reject_extra_args(argv: Sequence[str]) -> None:
  """For binaries that take only flags: positional arguments are a UsageError naming them."""
  if len(argv) > 1:
    raise errors.UsageError(
        f'unexpected positional arguments {list(argv[1:])!r}: this binary takes only --flags')


def _flag_message(error: flags.Error) -> str:
  """absl's flag error, with its wording for a missing required flag made plain."""
  missing = re.search(r'Flag --(\w+) must have a value other than None', str(error))
  if missing:
    return f'flag --{missing.group(1)} is required'
  return str(error)


def run_main(main: Callable[[list[str]], Any], prog: str | None = None) -> NoReturn:
  """`absl.app.run(main)`, with one-line errors and exit 2 for flag errors (absl exits 1).

  Args:
    main: the binary's `main(argv)`.
    prog: the name errors start with, e.g. 'covidlib-train'; default: the script's file name.
  """
  prog = prog or os.path.basename(sys.argv[0])
  # TensorFlow's Python logger says INFO lines such as "Using MirroredStrategy with devices ..."
  # on stderr; binaries keep stderr for warnings and their one error line.
  logging.getLogger('tensorflow').setLevel(logging.WARNING)

  def parse_flags(argv: list[str]) -> list[str]:
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:  # Unknown flag, bad value, missing required flag.
      print_error(prog, f'{_flag_message(e)} (see --helpfull)')
      sys.exit(EXIT_USAGE)

  app.run(lambda argv: call_main(main, argv, prog), flags_parser=parse_flags)
  raise AssertionError('absl.app.run returned')  # It always exits.
