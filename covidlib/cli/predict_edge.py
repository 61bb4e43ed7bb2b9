"""covidlib-predict-edge: P(COVID-19) from a .tflite file with LiteRT, numpy and Pillow alone.

    covidlib-predict-edge --model=export/model_uint8_image.tflite xray.png scans/ [--format=csv]
    python -m covidlib.cli.predict_edge --model=export/model_int8.tflite chest.dcm

The edge route of covidlib-predict: same inputs, same rows, same exit statuses, but it never
imports TensorFlow (nor Keras, absl or `exporters`), so it starts in a fraction of a second and
installs as `pip install ai-edge-litert numpy pillow [pydicom]` plus `pip install --no-deps
covidlib` (README, "On a device"). The labels, threshold and temperature are read from the
.tflite file's metadata (`covidlib.tflite_metadata`), else from a decision.json beside it.
Files are decoded by a thread pool (--workers) while the interpreter runs, and printed in input
order: --format=table (default), json or csv. A file that cannot be read gets a row with its
error and no probability; the others are still predicted, and the exit status is 1. A missing
model or input path, or a bad flag: one line on stderr, exit 2. Research software, not a
diagnostic device.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn, Sequence

from covidlib import edge
from covidlib import errors
from covidlib import results

PROG = 'covidlib-predict-edge'
FORMATS = ('table', 'json', 'csv')
EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


def print_error(message) -> None:
  """`covidlib-predict-edge: error: <message>` as one line on stderr (as covidlib.cli.common)."""
  print(f'{PROG}: error: {" ".join(str(message).split())}', file=sys.stderr, flush=True)


class _Parser(argparse.ArgumentParser):
  """argparse with covidlib's one-line usage errors (absl's wording for unknown flags)."""

  def error(self, message: str) -> NoReturn:
    raise errors.UsageError(message)


def _parser() -> argparse.ArgumentParser:
  parser = _Parser(prog=PROG, description=__doc__.split('\n')[0].split(': ', 1)[1],
                   allow_abbrev=False)
  parser.add_argument('--model', help='A covidlib .tflite file (any variant).')
  parser.add_argument('--format', default='table', choices=FORMATS,
                      help='Output format on stdout.')
  parser.add_argument('--num_threads', type=int, default=None,
                      help='Interpreter threads (default: LiteRT chooses).')
  parser.add_argument('--workers', type=int, default=None,
                      help='Threads decoding files ahead of inference (default: the CPU count; '
                           '0: none).')
  parser.add_argument('inputs', nargs='*', help='Image or DICOM files, or folders of them.')
  return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  """Parses argv[1:]; UsageError for an unknown flag or a bad value."""
  args, unknown = _parser().parse_known_intermixed_args(list(argv[1:]))
  flags = [a for a in unknown if a.startswith('-')]
  if flags:
    name = flags[0].lstrip('-').split('=')[0]
    raise errors.UsageError(f"Unknown command line flag '{name}'")
  if unknown:
    raise errors.UsageError(f'unexpected arguments {unknown!r}')
  if args.workers is not None and args.workers < 0:
    raise errors.UsageError(f'--workers must be >= 0, got {args.workers}')
  if args.num_threads is not None and args.num_threads < 1:
    raise errors.UsageError(f'--num_threads must be >= 1, got {args.num_threads}')
  return args


def main(argv: Sequence[str]) -> int:
  """Runs the binary on argv (argv[0] is the program name); returns the exit status.

  Raises:
    CovidlibError: UsageError for bad flags or inputs, ModelLoadError for a bad model.
  """
  args = parse_args(argv)
  if not args.model:
    raise errors.UsageError('flag --model is required')
  paths = results.expand_inputs(args.inputs)
  predictor = edge.EdgePredictor(args.model, num_threads=args.num_threads)
  predictions = predictor.predict_files(paths, workers=args.workers)
  sys.stdout.write(results.format_results(predictions, args.format, args.model))
  sys.stdout.flush()
  failure = results.failure_message(predictions)
  if failure:
    print_error(failure)
    return EXIT_FAILURE
  return 0


def call_main(argv: Sequence[str]) -> int:
  """`main(argv)` with covidlib errors as one printed line and an exit status, no traceback."""
  try:
    return main(argv)
  except errors.UsageError as e:
    print_error(e)
    return EXIT_USAGE
  except errors.CovidlibError as e:
    print_error(e)
    return EXIT_FAILURE
  except KeyboardInterrupt:
    print_error('interrupted')
    return EXIT_INTERRUPTED


def run() -> NoReturn:
  """The console script's entry point."""
  sys.exit(call_main(sys.argv))


if __name__ == '__main__':
  run()
