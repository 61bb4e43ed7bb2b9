"""Tests of covidlib.distribute: strategies by name, batch checks, precision, multi-device runs.

    .venv/bin/python -m pytest tests/covidlib/test_distribute.py -q

The two-replica and two-worker tests run tests/covidlib/multiworker_worker.py in fresh
processes: logical devices and collective ops must be configured before TensorFlow starts.
"""

import json
import os
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from covidlib import distribute
from covidlib import errors
from covidlib import models

WORKER = os.path.join(os.path.dirname(__file__), 'multiworker_worker.py')


class FakeStrategy:
  def __init__(self, replicas):
    self.num_replicas_in_sync = replicas


@pytest.fixture
def restore_policy():
  previous = keras.config.dtype_policy()
  yield
  keras.config.set_dtype_policy(previous)


def test_unknown_strategy_lists_the_names():
  with pytest.raises(errors.UsageError) as e:
    distribute.get_strategy('horovod')
  assert str(e.value) == ("unknown strategy 'horovod'; choose one of default, one_device, "
                          "mirrored, multi_worker, tpu, auto")


@pytest.mark.parametrize('name', ['default', 'auto', 'one_device'])
def test_single_device_strategies_on_cpu(name):
  strategy = distribute.get_strategy(name)
  assert strategy.num_replicas_in_sync == 1
  if name in ('default', 'auto'):  # auto without several GPUs is the default strategy.
    assert strategy is tf.distribute.get_strategy()
  else:
    assert isinstance(strategy, tf.distribute.OneDeviceStrategy)


def test_one_strategy_object_per_kind():
  # A second MirroredStrategy over the same devices would abort the first one's all-reduce.
  assert distribute.get_strategy('mirrored') is distribute.get_strategy('mirrored')
  assert distribute.get_strategy('one_device') is distribute.get_strategy('one_device')


def test_devices_only_for_mirrored():
  with pytest.raises(errors.UsageError, match="only for strategy mirrored, not 'default'"):
    distribute.get_strategy('default', devices=['/cpu:0'])


@pytest.mark.parametrize('tf_config, message', [
    (None, 'needs the environment variable TF_CONFIG, which is not set'),
    ('{"cluster": ', 'TF_CONFIG is not valid JSON'),
    ('[1, 2]', 'TF_CONFIG must be a JSON object'),
    ('{"task": {"type": "worker", "index": 0}}', 'TF_CONFIG has no cluster.worker list'),
    ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "ps", "index": 0}}',
     'task.type must be "worker" or "chief", got \'ps\''),
    ('{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 2}}',
     r'task.index must be an integer in \[0, 2\), got 2'),
])
def test_multi_worker_needs_a_valid_tf_config(monkeypatch, tf_config, message):
  if tf_config is None:
    monkeypatch.delenv('TF_CONFIG', raising=False)
  else:
    monkeypatch.setenv('TF_CONFIG', tf_config)
  with pytest.raises(errors.UsageError, match=message):
    distribute.get_strategy('multi_worker')


def test_tpu_without_a_tpu_is_a_clear_error():
  with pytest.raises(errors.UsageError, match='strategy tpu: no TPU found'):
    distribute.get_strategy('tpu')


def test_batch_size_must_divide_by_replicas():
  with pytest.raises(errors.UsageError) as e:
    distribute.check_batch_size(30, FakeStrategy(4))
  assert str(e.value) == 'Batch size (30) must be divisible by the number of replicas (4)'
  assert distribute.check_batch_size(32, FakeStrategy(4)) == 8
  assert distribute.check_batch_size(5, distribute.get_strategy('default')) == 5
  with pytest.raises(errors.UsageError, match=r'Batch size \(0\) must be at least 1'):
    distribute.check_batch_size(0, FakeStrategy(1))


def test_resolve_precision(monkeypatch):
  assert distribute.resolve_precision('off') == 'float32'
  assert distribute.resolve_precision('mixed_float16') == 'mixed_float16'
  assert distribute.resolve_precision('mixed_bfloat16') == 'mixed_bfloat16'
  # No GPU here: auto follows the CPU's native bfloat16 support.
  monkeypatch.setattr(distribute, 'cpu_has_bfloat16', lambda: True)
  assert distribute.resolve_precision('auto') == 'mixed_bfloat16'
  monkeypatch.setattr(distribute, 'cpu_has_bfloat16', lambda: False)
  assert distribute.resolve_precision('auto') == 'float32'
  with pytest.raises(errors.UsageError, match="unknown mixed precision mode 'fp8'; choose one"):
    distribute.resolve_precision('fp8')


@pytest.mark.parametrize('mode, compute', [('mixed_bfloat16', 'bfloat16'),
                                           ('mixed_float16', 'float16')])
@pytest.mark.parametrize('name', sorted(set(models.MODELS) - set(models.BACKBONES)))
def test_mixed_precision_keeps_the_output_float32(restore_policy, mode, compute, name):
  assert distribute.set_precision(mode) == mode
  model = models.build_model(name, image_size=32, channels=1, seed=0)
  assert model.get_layer('conv1' if name == 'seed_cnn' else 'stem_conv').compute_dtype == compute
  for layer in ('logit', 'probability'):
    assert model.get_layer(layer).compute_dtype == 'float32'
  output = model(np.random.RandomState(0).rand(2, 32, 32, 1).astype(np.float32))
  assert output.dtype == tf.float32
  assert all(w.dtype == 'float32' for w in model.weights)  # Variables stay float32.


def _run_worker(args, env=None, timeout=120):
  return subprocess.run([sys.executable, WORKER, *args], env={**os.environ, **(env or {})},
                        capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_mirrored_over_two_logical_cpus(tmp_path):
  out = tmp_path / 'result.json'
  proc = _run_worker(['mirrored', str(out), str(tmp_path / 'model_dir')])
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert result['replicas'] == 2
  assert result['per_replica_batch'] == 2
  assert result['batch_error'] == 'Batch size (3) must be divisible by the number of replicas (2)'
  # Gradients of the two half batches, all-reduced, equal the gradient of the whole batch.
  for mirrored, default in zip(result['mirrored_step'], result['default_step']):
    np.testing.assert_allclose(mirrored, default, rtol=1e-5, atol=1e-6)
  assert len(result['history']['loss']) == 2
  assert np.isfinite(result['history']['val_auc']).all()
  assert (tmp_path / 'model_dir' / 'model.keras').is_file()
  assert result['cli_status'] == 2
  assert result['cli_stderr'] == ('covidlib-train: error: Batch size (3) must be divisible by '
                                  'the number of replicas (2)\n')


def _free_ports(n):
  sockets = [socket.socket() for _ in range(n)]
  for s in sockets:
    s.bind(('127.0.0.1', 0))
  ports = [s.getsockname()[1] for s in sockets]
  for s in sockets:
    s.close()
  return ports


@pytest.mark.slow
def test_two_workers_end_with_identical_weights(tmp_path):
  workers = [f'127.0.0.1:{port}' for port in _free_ports(2)]
  model_dir = tmp_path / 'model_dir'  # Shared by both workers; only the chief writes.
  procs = []
  for index in range(2):
    tf_config = json.dumps({'cluster': {'worker': workers},
                            'task': {'type': 'worker', 'index': index}})
    procs.append(subprocess.Popen(
        [sys.executable, WORKER, 'multi_worker', str(tmp_path / f'weights{index}.npz'),
         str(model_dir)], env={**os.environ, 'TF_CONFIG': tf_config},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  outputs = []
  try:
    for proc in procs:
      outputs.append(proc.communicate(timeout=120)[0])
  finally:
    for proc in procs:
      proc.kill()
  for proc, output in zip(procs, outputs):
    assert proc.returncode == 0, output[-3000:]

  weights = [np.load(tmp_path / f'weights{i}.npz') for i in range(2)]
  assert len(weights[0].files) == len(weights[1].files) > 0
  for key in weights[0].files:  # Different data on each worker, yet the same weights.
    np.testing.assert_array_equal(weights[0][key], weights[1][key])
  initial = models.build_model('seed_cnn', image_size=24, channels=1, seed=0).get_weights()
  assert not np.array_equal(initial[0], weights[0]['arr_0'])  # Training changed them.
  # Only the chief (worker 0) wrote the model_dir, and its model.keras holds those weights.
  saved = keras.saving.load_model(model_dir / 'model.keras', compile=False, safe_mode=True)
  for got, want in zip(saved.get_weights(), [weights[0][k] for k in weights[0].files]):
    np.testing.assert_array_equal(got, want)
  history = json.loads((model_dir / 'history.json').read_text())
  assert len(history['loss']) == 2
