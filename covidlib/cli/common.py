"""What every covidlib binary shares: one-line errors and exit statuses, no tracebacks.

    from covidlib.cli import common

    def main(argv):
      common.reject_extra_args(argv)
      ...

    def run():  # The console script's entry point.
      common.run_main(main, prog='covidlib-train')

Exit statuses: 0 success (and --help); 2 usage (a bad, missing or unknown flag,
`errors.UsageError`); 1 any other `errors.CovidlibError` (bad data, a model that does not load,
NaN loss...); 130 interrupted (Ctrl-C). Errors print exactly one line,
`<prog>: error: <message>`, on stderr. Anything else is a bug in covidlib and keeps its
traceback.

`--help` prints the binary module's docstring and the flags that module defines (help text and
default), `--helpfull` the docstring and every flag absl knows; both exit 0. Logging: absl's,
TFDS's and TensorFlow's Python INFO lines stay off stderr unless -v/--verbosity is given
(TensorFlow's C++ lines: see quiet_start.py); a binary's own progress lines are prints, or a
logger it turns on itself.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
from types import ModuleType
from typing import Any, Callable, NoReturn, Sequence

from absl import app
from absl import flags
from absl import logging as absl_logging

from covidlib import errors

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
HELP_FOOTER = ("\n-v 0 (absl's --verbosity) also shows TensorFlow's and TFDS's INFO logging;\n"
               "--helpfull lists every flag, absl's and TensorFlow's included.\n")


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


def module_flags(module: ModuleType) -> list[flags.Flag]:
  """The flags a binary's module defines: those of its module-level FlagHolders (alone or in a
  dict, list or tuple, e.g. train's --augment_* holders), by name.

  By name, not by absl's record of the defining module: in a process that imports two binaries
  a shared flag (`flag_util.define`) is recorded under the first one only.
  """
  holders = []
  for value in vars(module).values():
    if isinstance(value, dict):
      value = list(value.values())
    values = value if isinstance(value, (list, tuple)) else [value]
    holders += [h for h in values if isinstance(h, flags.FlagHolder)]
  return [flags.FLAGS[name] for name in sorted({h.name for h in holders})]


def help_text(module: ModuleType, full: bool = False) -> str:
  """What --help prints: the module's docstring, then its flags with help and default.

  Args:
    module: the binary's module, e.g. covidlib.cli.train.
    full: every flag absl knows, grouped by the module that defined it (--helpfull).
  """
  if full:
    flag_text = flags.FLAGS.get_help()
  else:
    own = flags.FlagValues()  # A registry of the module's flags alone, for absl's rendering.
    for flag in module_flags(module):
      own[flag.name] = flag
    flag_text = own.get_help(prefix='  ', include_special_flags=False)
  doc = (module.__doc__ or '').strip('\n')
  return f'{doc}\n\nflags:\n{flag_text}\n' + ('' if full else HELP_FOOTER)


class _HelpFlag(flags.BooleanFlag):
  """--help, --helpshort or --helpfull: prints `text()` on stdout and exits 0."""

  def __init__(self, name: str, short_name: str | None, help_text_: str,
               text: Callable[[], str]):
    # allow_override: replaces absl's flag of that name (whose help names no covidlib flag,
    # since a console script's __main__ is pip's wrapper, and which exits 1).
    super().__init__(name, False, help_text_, short_name=short_name, allow_override=True,
                     allow_hide_cpp=True)
    self._text = text

  def parse(self, argument: Any) -> None:
    super().parse(argument)
    if self.value:
      sys.stdout.write(self._text())
      sys.stdout.flush()
      sys.exit(0)


def define_help_flags(module: ModuleType, text: Callable[[], str] | None = None) -> None:
  """Replaces absl's --help/-?, --helpshort and --helpfull by ones about `module` (exit 0).

  `text`: what --help prints instead of `help_text(module)` (e.g. one subcommand's help).
  """
  app.define_help_flags()  # absl's first, so that app.run's own call adds nothing over ours.
  own = text or functools.partial(help_text, module)
  flags.DEFINE_flag(_HelpFlag('help', '?', 'Show this help: the usage and the flags of this '
                              'binary.', own))
  flags.DEFINE_flag(_HelpFlag('helpshort', None, 'Same as --help.', own))
  flags.DEFINE_flag(_HelpFlag('helpfull', None, 'Show the usage and every flag.',
                              functools.partial(help_text, module, full=True)))


def quiet_logging() -> None:
  """absl's (hence TFDS's) and TensorFlow's Python logging at WARNING, unless -v was given.

  absl's app.run turns verbosity up to INFO after parsing when -v/--verbosity is absent; a
  binary's stderr is for warnings and its one error line.
  """
  if flags.FLAGS['verbosity'].present:
    return
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger('tensorflow').setLevel(logging.WARNING)


def fit_verbose(value: int | str) -> int:
  """Keras fit's verbose for a --verbose flag: 'auto' is progress bars (1) on a terminal, else
  one line per epoch (2), so a log file holds no carriage-return bar updates."""
  if value == 'auto':
    return 1 if sys.stdout.isatty() else 2
  return int(value)


def run_main(main: Callable[[list[str]], Any], prog: str | None = None,
             help_text_fn: Callable[[], str] | None = None) -> NoReturn:
  """`absl.app.run(main)`, with one-line errors and exit 2 for flag errors (absl exits 1).

  --help lists the flags of `main`'s module (see `help_text`), and logging is quiet by default
  (see `quiet_logging`).

  Args:
    main: the binary's `main(argv)`.
    prog: the name errors start with, e.g. 'covidlib-train'; default: the script's file name.
    help_text_fn: what --help prints instead of the module's help (see `define_help_flags`).
  """
  prog = prog or os.path.basename(sys.argv[0])
  define_help_flags(sys.modules[main.__module__], help_text_fn)

  def parse_flags(argv: list[str]) -> list[str]:
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:  # Unknown flag, bad value, missing required flag.
      print_error(prog, f'{_flag_message(e)} (see --help)')
      sys.exit(EXIT_USAGE)

  def quiet_main(argv: list[str]) -> int:
    quiet_logging()
    return call_main(main, argv, prog)

  app.run(quiet_main, flags_parser=parse_flags)
  raise AssertionError('absl.app.run returned')  # It always exits.
