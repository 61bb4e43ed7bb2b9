"""A fresh process for the distribution tests of test_distribute.py (not a test itself).

Logical devices and the multi-worker runtime must be set up before TensorFlow initialises, which
an already running pytest process has done, hence a subprocess:

    python tests/covidlib/multiworker_worker.py mirrored OUT.json MODEL_DIR
    TF_CONFIG='{"cluster": {"worker": ["127.0.0.1:P0", "127.0.0.1:P1"]},
                "task": {"type": "worker", "index": I}}' \
        python tests/covidlib/multiworker_worker.py multi_worker OUT.npz MODEL_DIR

`mirrored` splits the CPU into two logical devices and writes what it measured to OUT.json;
`multi_worker` trains through covidlib.train.train with every worker on DIFFERENT data (seeded
by its index) and writes the final weights to OUT.npz.
"""

import contextlib
import io
import json
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ['CUDA_VISIBLE_DEVICES'] = ''

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

IMAGE_SIZE = 24  # The smallest input seed_cnn takes: fast, and no batch norm to diverge.


def tiny_data(seed: int, n: int = 16, batch: int = 4) -> tf.data.Dataset:
  """n gray images; label 1 = a bright square in the top-left corner."""
  rs = np.random.RandomState(seed)
  x = rs.uniform(0, 0.5, (n, IMAGE_SIZE, IMAGE_SIZE, 1)).astype(np.float32)
  y = (np.arange(n) % 2).astype(np.float32)
  x[y == 1, :8, :8] = 1.0
  return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)


def config(**overrides):
  from covidlib import train
  return train.make_config(model='seed_cnn', image_size=IMAGE_SIZE, batch_size=4, epochs=2,
                           dataset='in-memory test data', mixed_precision='off', seed=0,
                           **overrides)


def one_sgd_step(strategy, x, y) -> list[np.ndarray]:
  """Weights of a tiny dense model after one SGD step on (x, y) under `strategy`."""
  import keras
  with strategy.scope():
    inputs = keras.Input((4,))
    initializer = keras.initializers.GlorotUniform(seed=3)
    outputs = keras.layers.Dense(1, activation='sigmoid', kernel_initializer=initializer)(inputs)
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.SGD(0.5), 'binary_crossentropy')
  model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(len(x)), epochs=1, verbose=0)
  return [w.tolist() for w in model.get_weights()]


def run_mirrored(out_path: str, model_dir: str) -> None:
  cpu = tf.config.list_physical_devices('CPU')[0]
  tf.config.set_logical_device_configuration(
      cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])

  from covidlib import distribute, errors, train
  result = {}
  strategy = distribute.get_strategy('mirrored')
  result['replicas'] = strategy.num_replicas_in_sync
  result['per_replica_batch'] = distribute.check_batch_size(4, strategy)
  try:
    distribute.check_batch_size(3, strategy)
  except errors.UsageError as e:
    result['batch_error'] = str(e)

  # A step under two replicas = a step on the whole batch under the default strategy.
  rs = np.random.RandomState(0)
  x = rs.normal(size=(8, 4)).astype(np.float32)
  y = (rs.uniform(size=8) > 0.5).astype(np.float32)
  result['mirrored_step'] = one_sgd_step(strategy, x, y)
  result['default_step'] = one_sgd_step(distribute.get_strategy('default'), x, y)

  # covidlib.train under the strategy, end to end.
  history = train.train(config(strategy='mirrored'), model_dir, train_data=tiny_data(0),
                        validation_data=tiny_data(1))
  result['history'] = history

  # The binary: a global batch of 3 over 2 replicas is a one-line usage error, exit 2.
  from absl import flags

  from covidlib.cli import common
  from covidlib.cli import train as cli_train
  flags.FLAGS(['covidlib-train', f'--model_dir={model_dir}-cli', '--strategy=mirrored',
               '--batch_size=3', '--dataset=folder:/nonexistent'])
  stderr = io.StringIO()
  with contextlib.redirect_stderr(stderr):
    result['cli_status'] = common.call_main(cli_train.main, ['covidlib-train'], 'covidlib-train')
  result['cli_stderr'] = stderr.getvalue()
  with open(out_path, 'w') as f:
    json.dump(result, f)


def run_multi_worker(out_path: str, model_dir: str) -> None:
  import keras

  from covidlib import distribute, train
  strategy = distribute.get_strategy('multi_worker')  # Before any other TensorFlow op.
  index = json.loads(os.environ['TF_CONFIG'])['task']['index']

  class SaveWeights(keras.callbacks.Callback):
    def on_train_end(self, logs=None):
      np.savez(out_path, *self.model.get_weights())

  # keep='last': model.keras then holds the weights SaveWeights records at the end.
  train.train(config(strategy='multi_worker', keep='last'), model_dir,
              train_data=tiny_data(10 + index),
              validation_data=tiny_data(20 + index), strategy=strategy,
              callbacks=[SaveWeights()])


if __name__ == '__main__':
  mode, out, model_dir_arg = sys.argv[1:4]
  {'mirrored': run_mirrored, 'multi_worker': run_multi_worker}[mode](out, model_dir_arg)
