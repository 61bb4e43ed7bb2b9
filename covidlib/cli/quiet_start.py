"""TensorFlow started without its C++ start-up lines on stderr: the first import of each binary.

    from covidlib.cli import quiet_start  # noqa: F401  First: TensorFlow starts quietly (see there).

Importing this module sets `TF_CPP_MIN_LOG_LEVEL` (unless the environment already does) and then
imports TensorFlow, so it must come before any other covidlib import of an absl binary: the
library modules import TensorFlow at their top, and TensorFlow reads the variable once, when its
C++ runtime loads. Level 3 (fatal only) by default keeps out the cpu_feature_guard and oneDNN
INFO lines and the `failed call to cuInit` ERROR of a machine without a GPU; `-v`/`--verbosity`
on the command line, read here from sys.argv before absl parses it, lowers the level: 0 (INFO)
or more shows everything, -1 warnings and errors, -2 errors.

TF 2.21 prints a few lines while its shared libraries load, before absl logging is initialised,
whatever the variable says (`WARNING: All log messages before absl::InitializeLog() ...`,
`I0000 00:00:... cudart_stub.cc:31] Could not find cuda drivers ...`; abseil-cpp#1957). For
those, stderr (file descriptor 2) is sent to a temporary file during the import, and every line
is written back except absl-format log lines below the level (and that WARNING line when the
level hides warnings): a Python warning or error printed during the import still shows.

covidlib-predict-edge never imports this module (it never imports TensorFlow).
"""

from __future__ import annotations

import importlib
import os
import re
import sys
import tempfile
from typing import Sequence

ENV = 'TF_CPP_MIN_LOG_LEVEL'
DEFAULT_LEVEL = 3
_SEVERITY = {'I': 0, 'W': 1, 'E': 2, 'F': 3}  # absl's letter -> TF_CPP_MIN_LOG_LEVEL.
# "I0000 00:00:1796310036.013756    7010 cudart_stub.cc:31] ..." (absl C++ log format).
_ABSL_LINE = re.compile(r'^([IWEF])\d{4} \d\d:\d\d:[\d.]+ +\d+ [\w.\-/]+:\d+\] ')
_BEFORE_INIT = 'WARNING: All log messages before absl::InitializeLog() is called are written'
_CONTINUATION = 'To enable the following instructions:'  # cpu_feature_guard's second line.


def verbosity_from_argv(argv: Sequence[str]) -> int | None:
  """The value of -v/--verbosity (absl's syntaxes) in argv, or None where it is not given."""
  value = None
  args = list(argv[1:])
  for i, arg in enumerate(args):
    if arg == '--':
      break
    match = re.fullmatch(r'--?(?:v|verbosity)(?:=(.*))?', arg)
    if not match:
      continue
    text = match.group(1) if match.group(1) is not None else (
        args[i + 1] if i + 1 < len(args) else '')
    try:
      value = int(text)
    except ValueError:
      continue  # Not ours to judge: absl reports a bad value when it parses the flags.
  return value


def level_for(verbosity: int | None) -> int:
  """TF_CPP_MIN_LOG_LEVEL for an absl verbosity: None -> 3, >= 0 -> 0, -1 -> 1, -2 -> 2."""
  if verbosity is None:
    return DEFAULT_LEVEL
  return min(DEFAULT_LEVEL, max(0, -verbosity))


def is_noise(line: str, level: int) -> bool:
  """Whether a stderr line of TensorFlow's start-up is one that `level` would have hidden."""
  match = _ABSL_LINE.match(line)
  if match:
    return _SEVERITY[match.group(1)] < level
  if line.startswith(_BEFORE_INIT) or line.startswith(_CONTINUATION):
    return level >= 1
  return False


def current_level() -> int:
  """TF_CPP_MIN_LOG_LEVEL as TensorFlow will read it (0 for a value it does not understand)."""
  try:
    return int(os.environ.get(ENV, DEFAULT_LEVEL))
  except ValueError:
    return 0


def import_quietly(name: str, level: int) -> None:
  """Imports module `name` with its stderr lines below `level` left out (see the docstring).

  A module already imported is left alone; without a usable stderr, a plain import.
  """
  if name in sys.modules:
    return
  try:
    sys.stderr.flush()
    saved = os.dup(2)
  except (AttributeError, OSError, ValueError):  # No usable stderr: nothing to keep clean.
    importlib.import_module(name)
    return
  with tempfile.TemporaryFile() as capture:
    os.dup2(capture.fileno(), 2)
    try:
      # importlib, not an import statement: the try/finally must restore stderr even when the
      # import fails, so that its traceback shows.
      importlib.import_module(name)
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      capture.seek(0)
      lines = capture.read().decode('utf-8', 'replace').splitlines(keepends=True)
      kept = ''.join(line for line in lines if not is_noise(line, level))
      if kept:
        sys.stderr.write(kept)
        sys.stderr.flush()


os.environ.setdefault(ENV, str(level_for(verbosity_from_argv(sys.argv))))
import_quietly('tensorflow', current_level())
