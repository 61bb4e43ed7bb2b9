"""Fixtures of the reliability tests: a tiny real model_dir, its SavedModel, a binary runner.

The model is a real covidlib-contract inference model (16 x 16 x 1 in, a sigmoid layer named
'probability' out), small enough that loading and exporting take a second or two.
"""

import os
import re
import subprocess
import sys
import types

import numpy as np
import pytest

IMAGE_SIZE = 16

# Lines TensorFlow's C++ runtime writes at start-up before absl logging is initialised
# ("I0000 00:00:..." = no time known yet), whatever TF_CPP_MIN_LOG_LEVEL says (TF 2.21).
TF_STARTUP_NOISE = re.compile(
    r'^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR'
    r'|[IWE]0000 00:00:\d+\.\d+ +\d+ [\w.]+:\d+\] .*'
    r'|To enable the following instructions: .*)$')
# What libjpeg, inside TensorFlow's decoder, prints for a truncated JPEG.
LIBJPEG_NOISE = re.compile(r'^Improper call to JPEG library in state \d+$')
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tiny_model():
  import keras

  keras.utils.set_random_seed(0)
  inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 1), name='image')
  x = keras.layers.Conv2D(4, 3, strides=2, activation='relu')(inputs)
  x = keras.layers.Flatten()(x)
  x = keras.layers.Dense(1, name='logit')(x)
  outputs = keras.layers.Activation('sigmoid', name='probability')(x)
  return keras.Model(inputs, outputs, name='tiny')


def write_model_dir(path, model) -> str:
  """A finished-run model_dir (config.json, model.keras, decision.json) holding `model`."""
  from covidlib import model_dir as md

  os.makedirs(path, exist_ok=True)
  model.save(os.path.join(path, md.MODEL))
  md.write_json(os.path.join(path, md.CONFIG), {
      'model': 'tiny', 'image_size': IMAGE_SIZE, 'channels': 1, 'dataset': 'covid_xray/seed',
      'data_dir': None, 'batch_size': 4, 'epochs': 1, 'learning_rate': 1e-3, 'seed': 0,
      'strategy': 'default', 'mixed_precision': False, 'augment': {}})
  md.save_decision(path, md.Decision(threshold=0.5, policy='fixed:0.5', temperature=1.0,
                                     split='validation'))
  return str(path)


@pytest.fixture(scope='session')
def tiny_model_dir(tmp_path_factory) -> str:
  return write_model_dir(tmp_path_factory.mktemp('reliability') / 'model_dir', _tiny_model())


@pytest.fixture(scope='session')
def tiny_saved_model(tiny_model_dir, tmp_path_factory) -> str:
  from exporters import saved_model

  return saved_model.export_saved_model(
      tiny_model_dir, tmp_path_factory.mktemp('reliability_export') / 'saved_model')


def start_binary(args, **kwargs) -> subprocess.Popen:
  """`python <args>` from the repository root, TensorFlow's C++ logging off, text pipes."""
  env = {**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '3', 'CUDA_VISIBLE_DEVICES': ''}
  return subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, **kwargs)


def our_lines(stderr: str, *allowed: re.Pattern) -> list[str]:
  """The lines of stderr that are not TensorFlow's start-up logging (nor match `allowed`)."""
  patterns = (TF_STARTUP_NOISE,) + allowed
  return [line for line in stderr.splitlines() if not any(p.match(line) for p in patterns)]


def run_binary(args, timeout=300) -> tuple[int, str, str]:
  """Runs `python <args>` to the end: (exit status, stdout, stderr)."""
  proc = start_binary(args)
  try:
    stdout, stderr = proc.communicate(timeout=timeout)
  finally:
    proc.kill()
  return proc.returncode, stdout, stderr


@pytest.fixture(scope='session')
def helpers():
  """Module-level helpers, for tests (which cannot import conftest)."""
  return types.SimpleNamespace(write_model_dir=write_model_dir, tiny_model=_tiny_model,
                               start_binary=start_binary, run_binary=run_binary,
                               our_lines=our_lines, libjpeg_noise=LIBJPEG_NOISE,
                               image_size=IMAGE_SIZE, repo=REPO)


@pytest.fixture(scope='session')
def xray():
  """A 20 x 30 uint8 gray image with structure (not the conftest one: session-scoped)."""
  rs = np.random.RandomState(0)
  ramp = np.linspace(0, 200, 30)[None, :] + np.linspace(0, 50, 20)[:, None]
  return np.clip(ramp + rs.randint(0, 5, (20, 30)), 0, 255).astype(np.uint8)
