"""covidlib-site: a model at a new hospital: check the site, validate there, adapt, prove it.

    covidlib-site check --model_dir=runs/mysite --films=newsite/ --out=runs/newsite/check
    covidlib-site validate --model_dir=runs/mysite --films=newsite/labels.csv \\
        --target=sensitivity:0.9,specificity:0.8 --out=runs/newsite/validate
    covidlib-site adapt --model_dir=runs/mysite --films=newsite/labels.csv --method=finetune \\
        --new_model_dir=runs/mysite_at_newsite
    covidlib-site validate --model_dir=runs/mysite_at_newsite --films=newsite/more.csv \\
        --out=runs/newsite/validate_adapted

(or `python -m covidlib.cli.site ...`). `covidlib-site SUBCOMMAND --help` shows one subcommand.
Each writes JSON and markdown into --out and prints one verdict line. Library:
covidlib/site.py, covidlib/site_adapt.py, covidlib/sites.py (the statistics).

Films (--films): a labels CSV as in README "Your own data", or a built dataset
labelled_xrays/NAME[:SPLIT] (with --data_dir); for check also a folder, a .txt list of files, or
files and folders given after the subcommand. Files that do not decode are named; check and
validate report on the rest and exit 1.

Exit status: 0 done (whatever the verdict); 2 bad flags or usage (a model_dir without a
reference, a hold-out sharing patients with the adapt part...); 1 other failures (too few films
of a class, files that do not decode...): one line on stderr, no traceback.
"""

from __future__ import annotations

import os
import sys

from absl import flags

from covidlib.cli import quiet_start  # noqa: F401  First: TensorFlow starts quietly (see there).
from covidlib import errors
from covidlib import model_dir as md
from covidlib import reference
from covidlib import site
from covidlib import site_adapt
from covidlib import sites
from covidlib.cli import common
from covidlib.cli import flag_util

PROG = 'covidlib-site'
_DEFINE = flag_util.define

# Every subcommand.
_MODEL_DIR = _DEFINE(flags.DEFINE_string, 'model_dir', None, 'A finished covidlib-train run.')
_FILMS = _DEFINE(flags.DEFINE_string, 'films', None,
                 'The site\'s films: a labels CSV, labelled_xrays/NAME[:SPLIT]; for check also a '
                 'folder or a .txt list of files.')
_DATA_DIR = _DEFINE(flags.DEFINE_string, 'data_dir', None, 'TFDS data_dir of a dataset.')
_OUT = _DEFINE(flags.DEFINE_string, 'out', None,
               'Report folder (adapt: default <new_model_dir>/adapt).')
_SITE = _DEFINE(flags.DEFINE_string, 'site', None,
                "The site's name in reports; default: the films' site column, else their source.")
_SEED = _DEFINE(flags.DEFINE_integer, 'seed', 0, 'Seed of permutations, bootstrap, split, training.')
_N_BOOTSTRAP = _DEFINE(flags.DEFINE_integer, 'n_bootstrap', 1000,
                       'Bootstrap resamples for the intervals.', lower_bound=0)
# check
_ALPHA = _DEFINE(flags.DEFINE_float, 'alpha', sites.DEFAULT_ALPHA,
                 'check: the site differs when the combined p-value is below this.')
_N_PERMUTATIONS = _DEFINE(flags.DEFINE_integer, 'n_permutations', sites.DEFAULT_PERMUTATIONS,
                          'check: permutations of the MMD test.', lower_bound=99)
# validate and adapt
_TARGET = _DEFINE(flags.DEFINE_string, 'target', sites.DEFAULT_TARGETS,
                  'validate, adapt: FIGURE:VALUE,... (sensitivity, specificity, roc_auc); a '
                  "figure passes when its interval's lower bound clears the value.")
# adapt
_NEW_MODEL_DIR = _DEFINE(flags.DEFINE_string, 'new_model_dir', None,
                         'adapt: the new model_dir (must not exist).')
_METHOD = _DEFINE(flags.DEFINE_string, 'method', 'threshold',
                  'adapt: ' + '|'.join(site_adapt.METHODS) + '.')
_HOLDOUT_FRACTION = _DEFINE(flags.DEFINE_float, 'holdout_fraction', 0.3,
                            "adapt: share of each class's patients held out to validate on.")
_HOLDOUT_FILMS = _DEFINE(flags.DEFINE_string, 'holdout_films', None,
                         'adapt: labelled films to validate on instead of a split of --films '
                         '(must share no patient with them).')
_EPOCHS = _DEFINE(flags.DEFINE_integer, 'epochs', None,
                  f'adapt (finetune): epochs; default {site_adapt.DEFAULT_EPOCHS}.')
_LEARNING_RATE = _DEFINE(flags.DEFINE_float, 'learning_rate', None,
                         f'adapt (finetune): Adam learning rate; default '
                         f'{site_adapt.DEFAULT_LEARNING_RATE:g}.')
_BATCH_SIZE = _DEFINE(flags.DEFINE_integer, 'batch_size', None,
                      f'adapt (finetune): batch size; default {site_adapt.DEFAULT_BATCH_SIZE}.')
_THRESHOLD_POLICY = _DEFINE(flags.DEFINE_string, 'threshold_policy', None,
                            'adapt: how the threshold is re-chosen: youden (default), '
                            'sensitivity:X, specificity:X, fixed:T.')
_VERBOSE = _DEFINE(flags.DEFINE_integer, 'verbose', 0, 'adapt: Keras fit verbosity (0, 1, 2).')

_COMMON = [_MODEL_DIR, _FILMS, _DATA_DIR, _OUT, _SITE, _SEED]
SUBCOMMANDS = {
    'check': ('Does a batch of unlabelled films of a site differ from the training site? A '
              'two-sample test (kernel MMD with a permutation p-value, and a domain classifier\'s '
              'ROC-AUC) at several depths of the network against the reference the model_dir '
              'holds; one verdict line.\n\n'
              '    covidlib-site check --model_dir=runs/mysite --films=newsite/ '
              '--out=runs/newsite/check\n'
              '    covidlib-site check --model_dir=runs/mysite --out=runs/x/check a.png b.dcm',
              _COMMON + [_ALPHA, _N_PERMUTATIONS]),
    'validate': ('How good is the model at this site? ROC-AUC, sensitivity and specificity at '
                 "the model's threshold, with patient-level 95% intervals, per site, view, sex "
                 'and age band; PASS/FAIL against --target; films needed for +-0.05.\n\n'
                 '    covidlib-site validate --model_dir=runs/mysite '
                 '--films=newsite/labels.csv --target=sensitivity:0.9,specificity:0.8 '
                 '--out=runs/newsite/validate',
                 _COMMON + [_TARGET, _N_BOOTSTRAP]),
    'adapt': ('A NEW model_dir adapted on labelled local films, split by patient into adapt '
              'and hold-out; the parent and the adapted model validated side by side on the '
              'hold-out. Methods: threshold (threshold and temperature), finetune (from the '
              'parent\'s weights, lr 1e-4, best epoch on an inner validation), adabn '
              '(BatchNorm statistics of the local films), adabn+finetune.\n\n'
              '    covidlib-site adapt --model_dir=runs/mysite --films=newsite/labels.csv '
              '--method=finetune --new_model_dir=runs/mysite_at_newsite',
              _COMMON + [_TARGET, _N_BOOTSTRAP, _NEW_MODEL_DIR, _METHOD, _HOLDOUT_FRACTION, _HOLDOUT_FILMS,
                         _EPOCHS, _LEARNING_RATE, _BATCH_SIZE, _THRESHOLD_POLICY, _VERBOSE]),
}


def _subcommand_in(argv) -> str | None:
  for arg in argv[1:]:
    if not arg.startswith('-'):
      return arg if arg in SUBCOMMANDS else None
  return None


def help_text() -> str:
  """--help: the subcommand's usage and flags after `covidlib-site SUBCOMMAND`, else all."""
  name = _subcommand_in(sys.argv)
  if name is None:
    return common.help_text(sys.modules[__name__])
  usage, holders = SUBCOMMANDS[name]
  own = flags.FlagValues()
  for holder in holders:
    own[holder.name] = flags.FLAGS[holder.name]
  return (f'{PROG} {name}: {usage}\n\nflags:\n'
          f'{own.get_help(prefix="  ", include_special_flags=False)}\n')


def _required(holder, what: str) -> str:
  if not holder.value:
    raise errors.UsageError(f'flag --{holder.name} is required ({what})')
  return holder.value


def _check_flags(name: str) -> None:
  """A flag given that the subcommand does not use is a UsageError naming it."""
  used = {h.name for h in SUBCOMMANDS[name][1]}
  every = {h.name for _, hs in SUBCOMMANDS.values() for h in hs}
  for flag in sorted(every - used):
    if flags.FLAGS[flag].present:
      owners = [n for n, (_, hs) in SUBCOMMANDS.items() if flag in {h.name for h in hs}]
      raise errors.UsageError(f'--{flag} is not a flag of {name} (it is one of '
                              f'{" and ".join(owners)})')


def main(argv: list[str]) -> int:
  if len(argv) < 2 or argv[1] not in SUBCOMMANDS:
    given = f'got {argv[1]!r}' if len(argv) > 1 else 'none given'
    raise errors.UsageError(f'the first argument is the subcommand: {", ".join(SUBCOMMANDS)} '
                            f'({given}); see --help')
  name, rest = argv[1], argv[2:]
  _check_flags(name)
  model_dir = md.check_model_dir(_required(_MODEL_DIR, 'the model to check, validate or adapt'))
  config = md.load_config(model_dir)
  if rest and name != 'check':
    raise errors.UsageError(f'unexpected arguments {rest!r}: {name} takes its films from '
                            '--films')
  spec = rest + ([_FILMS.value] if _FILMS.value else []) if name == 'check' else _FILMS.value
  if not spec:
    raise errors.UsageError('flag --films is required (or, for check, files after the '
                            'subcommand)')
  if name == 'check':
    out = _required(_OUT, 'the report folder')
    reference.load(model_dir)  # A model_dir without a reference: refused first.
    films = site.load_films(spec, config, data_dir=_DATA_DIR.value)
    report = site.check(model_dir, films, out=out, site=_SITE.value, alpha=_ALPHA.value,
                        n_permutations=_N_PERMUTATIONS.value, seed=_SEED.value)
  elif name == 'validate':
    out = _required(_OUT, 'the report folder')
    targets = sites.parse_targets(_TARGET.value)
    films = site.load_films(spec, config, labelled=True, data_dir=_DATA_DIR.value)
    report = site.validate(model_dir, films, out=out, targets=targets, site=_SITE.value,
                           n_bootstrap=_N_BOOTSTRAP.value, seed=_SEED.value)
  else:
    new_dir = _required(_NEW_MODEL_DIR, 'where the adapted model goes')
    targets = sites.parse_targets(_TARGET.value)
    site_adapt.check_new_dir(model_dir, new_dir)
    if _METHOD.value not in site_adapt.METHODS:
      raise errors.UsageError(f'--method must be one of {", ".join(site_adapt.METHODS)}, got '
                              f'{_METHOD.value!r}')
    films = site.load_films(spec, config, labelled=True, data_dir=_DATA_DIR.value)
    holdout = (site.load_films(_HOLDOUT_FILMS.value, config, labelled=True,
                               data_dir=_DATA_DIR.value) if _HOLDOUT_FILMS.value else None)
    report = site_adapt.adapt(
        model_dir, new_dir, films, method=_METHOD.value, holdout=holdout,
        holdout_fraction=_HOLDOUT_FRACTION.value, seed=_SEED.value, site_name=_SITE.value,
        epochs=_EPOCHS.value or site_adapt.DEFAULT_EPOCHS,
        learning_rate=_LEARNING_RATE.value or site_adapt.DEFAULT_LEARNING_RATE,
        batch_size=_BATCH_SIZE.value or site_adapt.DEFAULT_BATCH_SIZE,
        threshold_policy=_THRESHOLD_POLICY.value or 'youden', targets=targets,
        n_bootstrap=_N_BOOTSTRAP.value, out=_OUT.value, verbose=common.fit_verbose(_VERBOSE.value))
  print(report['verdict'])
  print(f'report: {report["written"]["markdown"]}')
  bad = report['data']['bad']
  if bad:
    shown = '; '.join(bad[:20]) + (f'; and {len(bad) - 20} more' if len(bad) > 20 else '')
    raise errors.DataError(f'{len(bad)} files could not be used (the other '
                           f'{report["data"]["n"]} were): {shown}')
  return 0


def run() -> None:
  common.run_main(main, prog=PROG, help_text_fn=help_text)


if __name__ == '__main__':
  run()
