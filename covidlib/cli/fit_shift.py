"""covidlib-fit-shift: fit the shift score (issue #10) and the reference of an existing model_dir.

    covidlib-fit-shift --model_dir=runs/compact_resnet [--policy=quantile:0.99]

(or `python -m covidlib.cli.fit_shift ...`). covidlib-train fits the score at the end of
training when the run has a validation split; this command fits it for a model_dir trained
before that (or with the penultimate-only score of issue #10: it is refitted at several
depths), or again with another policy. It scores the training split (to fit the density of the
pooled features at several depths of the network) and the validation split (to standardise
each depth, choose the threshold and draw the reference of the training site from) that
config.json names, once each, and writes shift.npz and shift.json (covidlib/shift.py) and
reference.npz and reference.json (covidlib/reference.py) beside decision.json.

Exit status: 0 fitted; 2 usage error (bad flag or policy, not a finished model_dir, no
validation split); 1 failure (data that cannot be read).
"""

from __future__ import annotations

import os

from absl import flags

from covidlib.cli import quiet_start  # noqa: F401  First: TensorFlow starts quietly (see there).
from covidlib import errors
from covidlib import reference
from covidlib import shift
from covidlib import shift_fit
from covidlib.cli import common
from covidlib.cli import flag_util

PROG = 'covidlib-fit-shift'
_DEFINE = flag_util.define

_MODEL_DIR = _DEFINE(flags.DEFINE_string, 'model_dir', None, 'A finished covidlib-train run.')
_POLICY = _DEFINE(flags.DEFINE_string, 'policy', shift.DEFAULT_POLICY,
                  'How the threshold is chosen on the validation split: quantile:Q.')
_SHRINKAGE = _DEFINE(flags.DEFINE_string, 'shrinkage', 'ledoit_wolf',
                     "Covariance shrinkage toward a scaled identity: 'ledoit_wolf' or a number "
                     'in [0, 1].')


def main(argv):
  common.reject_extra_args(argv)
  if not _MODEL_DIR.value:
    raise errors.UsageError('flag --model_dir is required')
  shrinkage = _SHRINKAGE.value
  if shrinkage != 'ledoit_wolf':
    try:
      shrinkage = float(shrinkage)
    except ValueError:
      raise errors.UsageError(
          f"--shrinkage must be 'ledoit_wolf' or a number in [0, 1], got {shrinkage!r}") from None
  fitted = shift_fit.fit_model_dir(_MODEL_DIR.value, policy=_POLICY.value, shrinkage=shrinkage)
  depths = ', '.join(f'{t.name} ({t.feature_dim})' for t in fitted.taps)
  print(f'shift score fitted: threshold {fitted.threshold:.6g} ({fitted.policy} of split '
        f'{fitted.split!r}), {len(fitted.taps)} depths: {depths}; images per class '
        f'{list(fitted.n_per_class)}; wrote '
        f'{os.path.join(_MODEL_DIR.value, shift.SHIFT_NPZ)}, {shift.SHIFT_JSON}, '
        f'{reference.REFERENCE_NPZ} and {reference.REFERENCE_JSON}')
  return 0


def run():
  common.run_main(main, prog=PROG)


if __name__ == '__main__':
  run()
