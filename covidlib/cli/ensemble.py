"""covidlib-ensemble: average finished models (seeds or folds) into ONE model_dir.

    covidlib-ensemble --members=runs/seed0,runs/seed1,runs/seed2 --out=runs/ensemble
    covidlib-evaluate --model_dir=runs/ensemble --split=test --threshold_policy=youden --calibrate
    covidlib-export --model_dir=runs/ensemble --out=exports/ensemble ...

(or `python -m covidlib.cli.ensemble ...`). --out gets model.keras, one Keras model whose
P(positive) is sigmoid of the mean of the members' logits (covidlib/ensemble.py says why the
logits and what member 0, the first listed, stands for: the shift score's features, the feature
taps, Grad-CAM), and config.json (the first member's, plus "ensemble": the member folders).
The first member's shift score and reference features are copied; decision.json is not: choose
the ensemble's operating point with covidlib-evaluate. Members must share image_size, channels
and class names. Running the command again on the same --out replaces the ensemble there.

Exit status: 0 written; 2 usage error (fewer than two members, a member that is not a finished
model_dir, members of different input or classes, --out holding something else); 1 failure (a
model file that does not load).
"""

from __future__ import annotations

from absl import flags

from covidlib.cli import quiet_start  # noqa: F401  First: TensorFlow starts quietly (see there).
from covidlib import ensemble
from covidlib import errors
from covidlib import models
from covidlib.cli import common
from covidlib.cli import flag_util

PROG = 'covidlib-ensemble'
_DEFINE = flag_util.define

_MEMBERS = _DEFINE(flags.DEFINE_list, 'members', None,
                   'Finished model_dirs, comma-separated; the first one is member 0.')
_OUT = _DEFINE(flags.DEFINE_string, 'out', None, 'The model_dir to write the ensemble into.')


def main(argv):
  common.reject_extra_args(argv)
  if not _MEMBERS.value:
    raise errors.UsageError('flag --members is required')
  if not _OUT.value:
    raise errors.UsageError('flag --out is required')
  model = ensemble.write_ensemble(_MEMBERS.value, _OUT.value)
  print(f'Ensemble of {len(_MEMBERS.value)} models ({models.count_params(model):,} parameters); '
        f'wrote {_OUT.value}/model.keras and config.json')
  return 0


def run():
  common.run_main(main, prog=PROG)


if __name__ == '__main__':
  run()
