"""Issue 6's usage errors, for every binary, as real processes: `python -m <binary> ...`.

    .venv/bin/python -m pytest tests/reliability/test_usage_errors.py -q

Each case runs the binary as a user would and checks: the exit status (2 usage, 1 failure), exactly
one line of ours on stderr (`<prog>: error: <message>`), no traceback, nothing on stdout, nothing
written where the binary was told to write, and no other stderr line than TensorFlow's C++
start-up logging (which TF 2.21 prints before absl::InitializeLog whatever TF_CPP_MIN_LOG_LEVEL
says; see RELIABILITY.md). The processes run concurrently (each imports TensorFlow, ~4-8 s).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import shutil

import pytest

from absl.testing import flagsaver

# Runs covidlib-train in a process whose CPU is split into two logical devices, so that
# --strategy=mirrored has two replicas (there is no flag or variable for that).
TWO_CPUS_TRAIN = (
    'import sys, tensorflow as tf; '
    'cpu = tf.config.list_physical_devices("CPU")[0]; '
    'tf.config.set_logical_device_configuration('
    'cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]); '
    'sys.argv[0] = "covidlib-train"; '
    'from covidlib.cli import train; train.run()')

BINARIES = {
    'covidlib-train': ['-m', 'covidlib.cli.train'],
    'covidlib-evaluate': ['-m', 'covidlib.cli.evaluate'],
    'covidlib-crossval': ['-m', 'covidlib.cli.crossval'],
    'covidlib-export': ['-m', 'exporters.cli'],
    'covidlib-predict': ['-m', 'covidlib.cli.predict'],
    'covidlib-predict-edge': ['-m', 'covidlib.cli.predict_edge'],
    'covidlib-fit-shift': ['-m', 'covidlib.cli.fit_shift'],
    'covidlib-site': ['-m', 'covidlib.cli.site'],
    'covidlib-predict-beam': ['-m', 'covidlib.cli.predict_beam'],
    'covidlib-ensemble': ['-m', 'covidlib.cli.ensemble'],
    'covidlib_tfds.build': ['-m', 'covidlib_tfds.build'],
    'covidlib_tfds.audit': ['-m', 'covidlib_tfds.audit'],
}


@dataclasses.dataclass(frozen=True)
class Case:
  prog: str
  args: tuple[str, ...]  # Formatted with the paths of the `workspace` fixture.
  status: int
  message: str  # What follows '<prog>: error: ' (a prefix; formatted like args).
  command: tuple[str, ...] | None = None  # Instead of BINARIES[prog].


NOT_A_MODEL = 'not a model: expected a .keras file, a model_dir, a SavedModel folder or a .tflite file'
REFUSED = 'refused to load: it holds a Lambda layer or other code that would run on load'
NOT_LOADABLE = 'not a loadable Keras model'

# {out} is a path of the case's own that the binary is told to write to, and must not create.
CASES = {
    # covidlib-train. Its missing --model_dir and unknown --model: see
    # tests/covidlib/test_train_cli.py::test_usage_errors_from_the_command_line (subprocesses too).
    'train-unknown_flag': Case('covidlib-train', ('--model_dir={out}', '--learning_rat=0.1'), 2,
                               "Unknown command line flag 'learning_rat'"),
    'train-missing_dataset_folder': Case(
        'covidlib-train', ('--model_dir={out}', '--dataset=folder:{tmp}/nothing'), 2,
        '{tmp}/nothing/train: no such folder'),
    'train-batch_not_divisible_by_replicas': Case(
        'covidlib-train', ('--model_dir={out}', '--strategy=mirrored', '--batch_size=3',
                           '--dataset=folder:{tmp}/nothing'), 2,
        'Batch size (3) must be divisible by the number of replicas (2)',
        command=('-c', TWO_CPUS_TRAIN)),
    # covidlib-evaluate
    'evaluate-unknown_flag': Case('covidlib-evaluate', ('--model_dir={model_dir}', '--splt=test',
                                                        '--out={out}'), 2,
                                  "Unknown command line flag 'splt'"),
    'evaluate-missing_model_dir': Case('covidlib-evaluate', ('--out={out}',), 2,
                                       'flag --model_dir is required'),
    'evaluate-model_dir_does_not_exist': Case(
        'covidlib-evaluate', ('--model_dir={tmp}/nothing', '--out={out}'), 2,
        "model_dir '{tmp}/nothing' does not exist or is not a directory"),
    'evaluate-lambda_model': Case('covidlib-evaluate', ('--model_dir={lambda_dir}',
                                                        '--out={out}'), 1,
                                  '{lambda_dir}/model.keras: ' + REFUSED),
    # covidlib-crossval
    'crossval-unknown_flag': Case('covidlib-crossval', ('--out={out}', '--fold=3'), 2,
                                  "Unknown command line flag 'fold'"),
    'crossval-missing_out': Case('covidlib-crossval', (), 2, 'flag --out is required'),
    'crossval-unknown_model': Case('covidlib-crossval', ('--out={out}', '--model=vgg16'), 2,
                                   "unknown model 'vgg16'; valid models: compact_resnet, "
                                   'densenet121, efficientnetv2b0, mobilenetv3small, '
                                   'resnet50v2, seed_cnn'),
    'crossval-bad_hold_out': Case('covidlib-crossval', ('--out={out}', '--hold_out=site'), 2,
                                  "--hold_out must be 'none' or 'source', got 'site'"),
    # covidlib-export
    'export-unknown_flag': Case('covidlib-export', ('--model_dir={model_dir}', '--out={out}',
                                                    '--format=tflite_fp32'), 2,
                                "Unknown command line flag 'format'"),
    'export-missing_model_dir': Case('covidlib-export', ('--out={out}',), 2,
                                     'flag --model_dir is required'),
    'export-missing_out': Case('covidlib-export', ('--model_dir={garbage_dir}',), 2,
                               'flag --out is required'),
    'export-not_a_model': Case('covidlib-export', ('--model_dir={garbage_dir}', '--out={out}'),
                               1, '{garbage_dir}/model.keras: ' + NOT_LOADABLE),
    # covidlib-predict
    'predict-unknown_flag': Case('covidlib-predict', ('--model={model_dir}', '--treshold=0.3',
                                                      '{image}'), 2,
                                 "Unknown command line flag 'treshold'"),
    'predict-missing_model': Case('covidlib-predict', ('{image}',), 2,
                                  'flag --model is required'),
    'predict-input_does_not_exist': Case('covidlib-predict', ('--model={model_dir}',
                                                              '{tmp}/gone.png'), 2,
                                         "input '{tmp}/gone.png' does not exist"),
    'predict-not_a_model': Case('covidlib-predict', ('--model={text}', '{image}'), 1,
                                '{text}: ' + NOT_A_MODEL),
    'predict-lambda_model': Case('covidlib-predict', ('--model={lambda_dir}/model.keras',
                                                      '{image}'), 1,
                                 '{lambda_dir}/model.keras: ' + REFUSED),
    # covidlib-predict-edge (no TensorFlow: argparse, not absl, with the same one-line errors)
    'edge-unknown_flag': Case('covidlib-predict-edge', ('--model={text}', '--treshold=0.3',
                                                        '{image}'), 2,
                              "Unknown command line flag 'treshold'"),
    'edge-missing_model': Case('covidlib-predict-edge', ('{image}',), 2,
                               'flag --model is required'),
    'edge-input_does_not_exist': Case('covidlib-predict-edge', ('--model={text}',
                                                                '{tmp}/gone.png'), 2,
                                      "input '{tmp}/gone.png' does not exist"),
    'edge-not_a_tflite': Case('covidlib-predict-edge', ('--model={text}', '{image}'), 1,
                              '{text}: not a .tflite file (no TFL3 identifier)'),
    'predict-bad_on_shift': Case('covidlib-predict', ('--model={model_dir}', '--on_shift=ignore',
                                                      '{image}'), 2,
                                 "flag --on_shift=ignore: value should be one of <warn|abstain>"),
    # covidlib-fit-shift
    'shift-unknown_flag': Case('covidlib-fit-shift', ('--model_dir={model_dir}',
                                                          '--polcy=quantile:0.9'), 2,
                                   "Unknown command line flag 'polcy'"),
    'shift-missing_model_dir': Case('covidlib-fit-shift', (), 2,
                                        'flag --model_dir is required'),
    'shift-bad_policy': Case('covidlib-fit-shift', ('--model_dir={model_dir}',
                                                        '--policy=youden'), 2,
                                 "bad shift policy 'youden': unknown policy 'youden'"),
    # covidlib-site
    'site-unknown_flag': Case('covidlib-site', ('check', '--model_dir={model_dir}', '--out={out}',
                                                '--alfa=0.1', '{image}'), 2,
                              "Unknown command line flag 'alfa'"),
    'site-no_subcommand': Case('covidlib-site', ('--model_dir={model_dir}', '--out={out}'), 2,
                               'the first argument is the subcommand: check, validate, adapt '
                               '(none given)'),
    'site-flag_of_another_subcommand': Case(
        'covidlib-site', ('check', '--model_dir={model_dir}', '--out={out}', '--method=finetune',
                          '{image}'), 2, '--method is not a flag of check (it is one of adapt)'),
    'site-no_reference': Case('covidlib-site', ('check', '--model_dir={model_dir}', '--out={out}',
                                                '{image}'), 2,
                              "model_dir '{model_dir}' holds no reference of its training site "
                              '(reference.npz): it was trained by an older covidlib; add it with '
                              'covidlib-fit-shift --model_dir={model_dir}'),
    'site-bad_target': Case('covidlib-site', ('validate', '--model_dir={model_dir}', '--out={out}',
                                              '--films={tmp}/labels.csv',
                                              '--target=sensitivity:0.9,specifity:0.8'), 2,
                            "--target part 'specifity:0.8': unknown figure 'specifity'; "
                            'figures: sensitivity, specificity, roc_auc'),
    'site-adapt_over_the_parent': Case(
        'covidlib-site', ('adapt', '--model_dir={model_dir}', '--films={tmp}/labels.csv',
                          '--new_model_dir={model_dir}'), 2,
        '--new_model_dir is the parent model_dir: adapt writes a NEW model_dir and never '
        'modifies the parent'),
    # covidlib-predict-beam (apache-beam is imported only past the flags: these need none)
    'beam-unknown_flag': Case('covidlib-predict-beam', ('--model={model_dir}', '--output={out}',
                                                        '--shard_sise=10', '{image}'), 2,
                              "Unknown command line flag 'shard_sise'"),
    'beam-missing_output': Case('covidlib-predict-beam', ('--model={model_dir}', '{image}'), 2,
                                'flag --output is required (an output prefix, e.g. '
                                'scores/run1)'),
    'beam-not_a_model': Case('covidlib-predict-beam', ('--model={text}', '--output={out}',
                                                       '{image}'), 1,
                             '{text}: not a model: expected a .keras file'),
    # covidlib-ensemble
    'ensemble-unknown_flag': Case('covidlib-ensemble', ('--members={model_dir},{model_dir}',
                                                        '--out={out}', '--member=x'), 2,
                                  "Unknown command line flag 'member'"),
    'ensemble-one_member': Case('covidlib-ensemble', ('--members={model_dir}', '--out={out}'), 2,
                                'an ensemble needs at least two members, got 1'),
    'ensemble-missing_out': Case('covidlib-ensemble', ('--members={model_dir},{model_dir}',), 2,
                                 'flag --out is required'),
    # covidlib_tfds.build and covidlib_tfds.audit
    'build-unknown_flag': Case('covidlib_tfds.build', ('--config=seed', '--data_dir={out}',
                                                       '--allow-missing'), 2,
                               "Unknown command line flag 'allow-missing'"),
    'build-unknown_config': Case('covidlib_tfds.build', ('--config=sead', '--data_dir={out}'),
                                 2, "covid_xray: unknown config 'sead'"),
    'build-beam_without_labels_csv': Case('covidlib_tfds.build', ('--config=seed', '--beam',
                                                                  '--data_dir={out}'), 2,
                                          '--beam needs --labels_csv'),
    'audit-unknown_flag': Case('covidlib_tfds.audit', ('--config=seed', '--allow_leak'), 2,
                               "Unknown command line flag 'allow_leak'"),
    'audit-not_built': Case('covidlib_tfds.audit', ('--config=seed', '--data_dir={tmp}/empty'), 2,
                            'covid_xray/seed is not built in {tmp}/empty'),
}

# Cases that fail today (none at present), each with its cause and owner. strict: the
# day one is fixed, its xfail fails and the mark must go.
KNOWN_BUGS = {}  # case name -> 'BUG (file, owner): what goes wrong'


@pytest.fixture(scope='module')
def workspace(tmp_path_factory, tiny_model_dir, helpers):
  """Paths the cases refer to: a real model_dir, one whose model.keras is garbage, one whose
  model.keras holds a Lambda layer, a text file, an image, an empty folder."""
  import keras
  import numpy as np
  from PIL import Image

  root = tmp_path_factory.mktemp('usage')
  garbage = root / 'garbage_run'
  shutil.copytree(tiny_model_dir, garbage)
  (garbage / 'model.keras').write_bytes(b'PK\x03\x04 this is not a zip archive')
  inputs = keras.Input((helpers.image_size, helpers.image_size, 1))
  outputs = keras.layers.Lambda(lambda t: t[:, 0, 0, :] * 0 + 0.5)(inputs)
  lambda_dir = helpers.write_model_dir(root / 'lambda_run', keras.Model(inputs, outputs))
  (root / 'notes.txt').write_text('not a model\n')
  Image.fromarray(np.full((20, 20), 80, np.uint8)).save(root / 'image.png')
  (root / 'empty').mkdir()
  return {'tmp': str(root), 'model_dir': tiny_model_dir, 'garbage_dir': str(garbage),
          'lambda_dir': lambda_dir, 'text': str(root / 'notes.txt'),
          'image': str(root / 'image.png')}


@pytest.fixture(scope='module')
def runs(workspace, helpers):
  """Every case's (status, stdout, stderr), run concurrently."""

  def run(name):
    case = CASES[name]
    command = case.command or BINARIES[case.prog]
    args = [a.format(out=os.path.join(workspace['tmp'], name), **workspace) for a in case.args]
    return name, helpers.run_binary([*command, *args], timeout=240)

  with concurrent.futures.ThreadPoolExecutor(max(2, (os.cpu_count() or 1) + 1)) as pool:
    return dict(pool.map(run, CASES))


@pytest.mark.slow
@pytest.mark.parametrize('name', [
    pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[name]))
    if name in KNOWN_BUGS else name for name in CASES])
def test_usage_error(name, runs, workspace, helpers):
  case = CASES[name]
  status, stdout, stderr = runs[name]
  expected = f'{case.prog}: error: {case.message.format(**workspace)}'
  ours = helpers.our_lines(stderr)
  assert 'Traceback' not in stderr, stderr[-3000:]
  assert len(ours) == 1 and ours[0].startswith(expected), (ours, expected)
  assert status == case.status, stderr[-2000:]
  assert stdout == ''
  assert not os.path.exists(os.path.join(workspace['tmp'], name))  # Nothing written.


def test_every_binary_is_in_the_matrix():
  """Each console script of pyproject.toml (and the TFDS binaries) has an unknown-flag case."""
  import tomllib

  from covidlib_tfds import build  # noqa: F401  (the module exists)

  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  with open(os.path.join(root, 'pyproject.toml'), 'rb') as f:
    scripts = tomllib.load(f)['project']['scripts']
  for prog, target in scripts.items():
    assert BINARIES[prog] == ['-m', target.split(':')[0]], prog
  for prog in BINARIES:
    assert CASES[f'{prog.split("-")[-1].split(".")[-1]}-unknown_flag'].prog == prog


@pytest.mark.slow
def test_stderr_holds_only_our_line(tmp_path):
  """The console script as a user runs it, TF_CPP_MIN_LOG_LEVEL unset, the GPU not hidden:
  stderr is exactly the one error line, no TensorFlow start-up logging (cuInit, cudart_stub,
  cpu_feature_guard, 'All log messages before absl::InitializeLog()')."""
  import subprocess
  import sys

  script = os.path.join(os.path.dirname(sys.executable), 'covidlib-fit-shift')
  env = {k: v for k, v in os.environ.items()
         if k not in ('TF_CPP_MIN_LOG_LEVEL', 'CUDA_VISIBLE_DEVICES')}
  missing = tmp_path / 'nonexistent'
  done = subprocess.run([script, f'--model_dir={missing}'], capture_output=True, text=True,
                        env=env, timeout=240)
  assert (done.returncode, done.stdout) == (2, '')
  assert done.stderr == (f"covidlib-fit-shift: error: model_dir '{missing}' does not exist or is "
                         'not a directory\n')
  assert not missing.exists()


# ---------------------------------------------------------------------------------------------
# covidlib_tfds.build with a --manual_dir that does not exist, offline. Run in-process with the
# download made to fail at once (the real binary retries for ~3.5 minutes without a network).

def _build_main(args: list[str]) -> int:
  from covidlib_tfds import build
  from covidlib_tfds import cli

  saved = flagsaver.save_flag_values(build.FLAGS)
  try:
    argv = cli.parse_flags(['covidlib_tfds.build', *args], build.FLAGS, 'covidlib_tfds.build',
                           'doc')
    return build.main(argv)
  finally:
    flagsaver.restore_flag_values(saved, build.FLAGS)


@pytest.fixture
def offline(monkeypatch):
  import requests
  import tensorflow_datasets as tfds

  def fail(self, url):
    raise requests.exceptions.ConnectionError(f'Failed to resolve host of {url} (offline)')

  monkeypatch.setattr(tfds.download.DownloadManager, 'download', fail)


@pytest.mark.parametrize('manual, status, fragments', [
    ('nothing', 2, ('{manual}', 'does not exist')),  # A usage error: the folder is named.
    ('empty', 1, ('github.com/dakshtrehan/Covid-19-Detection', '--manual_dir')),  # How to fix.
])
def test_build_with_missing_manual_dir_is_one_line(offline, tmp_path, capsys, manual, status,
                                                   fragments):
  (tmp_path / 'empty').mkdir()
  path = tmp_path / manual
  code = _build_main(['--config=seed', f'--manual_dir={path}', f'--data_dir={tmp_path / "d"}'])
  err = capsys.readouterr().err
  assert code == status
  assert err.startswith('covidlib_tfds.build: error: ') and err.count('\n') == 1, err
  for fragment in fragments:
    assert fragment.format(manual=path) in err, (fragment, err)
