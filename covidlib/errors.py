"""Typed errors that user input can cause. Each message names the thing at fault.

Binaries catch `CovidlibError` (and its subclasses) and print one line instead of a traceback:
`UsageError` exits with status 2, every other `CovidlibError` with status 1.
"""


class CovidlibError(Exception):
  """Base class of every error covidlib raises on purpose."""


class UsageError(CovidlibError, ValueError):
  """A bad argument or flag value: the user asked for something that cannot be done."""


class InvalidImageError(CovidlibError, ValueError):
  """A file that is not a decodable image (empty, truncated, wrong format, too large...)."""

  def __init__(self, path: str, reason: str):
    self.path = str(path)
    self.reason = reason
    super().__init__(f'{self.path}: {reason}')


class DataError(CovidlibError):
  """A dataset that fails verification: a changed, missing or unexpected file."""


class ModelLoadError(CovidlibError):
  """A model file that cannot be loaded (not a model, unsafe content, wrong format)."""
