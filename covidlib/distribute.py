"""Distribution strategies and mixed precision, chosen by name.

    strategy = get_strategy('auto')            # mirrored over several GPUs, else default
    check_batch_size(32, strategy)             # the global batch must split evenly
    policy = set_precision('auto')             # 'mixed_float16' on GPU, bfloat16 or float32 on CPU
    with strategy.scope():
      model = covidlib.models.build_model('seed_cnn')

Names: `default` (TensorFlow's default strategy: one device, no wrapping), `one_device`
(the first GPU, else the CPU), `mirrored` (synchronous data parallelism over the GPUs of one
machine, or over `devices`), `multi_worker` (MultiWorkerMirroredStrategy; every worker runs the
same command with its own `TF_CONFIG`), `tpu` (a Cloud TPU found by TPUClusterResolver) and
`auto` (`mirrored` when several GPUs are visible, else `default`).

Create the strategy before any other TensorFlow op runs: MultiWorkerMirroredStrategy configures
the collective runtime at start-up, and logical devices cannot change after TF initialises them.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import keras
import tensorflow as tf

from covidlib import errors

STRATEGIES = ('default', 'one_device', 'mirrored', 'multi_worker', 'tpu', 'auto')
PRECISIONS = ('off', 'auto', 'mixed_float16', 'mixed_bfloat16')


def _gpus() -> list:
  return tf.config.list_logical_devices('GPU')


def _check_tf_config() -> dict:
  """Validates TF_CONFIG for MultiWorkerMirroredStrategy; UsageError saying what is wrong."""
  raw = os.environ.get('TF_CONFIG')
  example = ('e.g. TF_CONFIG=\'{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
             '"task": {"type": "worker", "index": 0}}\'')
  if not raw:
    raise errors.UsageError(
        'strategy multi_worker needs the environment variable TF_CONFIG, which is not set; '
        f'{example}')
  try:
    config = json.loads(raw)
  except json.JSONDecodeError as e:
    raise errors.UsageError(f'TF_CONFIG is not valid JSON ({e.msg} at column {e.colno}); {example}')
  if not isinstance(config, dict):
    raise errors.UsageError(f'TF_CONFIG must be a JSON object, got {raw!r}; {example}')
  workers = (config.get('cluster') or {}).get('worker')
  task = config.get('task') or {}
  if not isinstance(workers, list) or not workers:
    raise errors.UsageError(f'TF_CONFIG has no cluster.worker list of "host:port"; {example}')
  if task.get('type') not in ('worker', 'chief'):
    raise errors.UsageError(
        f'TF_CONFIG task.type must be "worker" or "chief", got {task.get("type")!r}; {example}')
  index = task.get('index')
  size = len(config['cluster'].get(task['type'], []))
  if not isinstance(index, int) or not 0 <= index < size:
    raise errors.UsageError(
        f'TF_CONFIG task.index must be an integer in [0, {size}), got {index!r}; {example}')
  return config


def get_strategy(name: str, devices: Sequence[str] | None = None) -> tf.distribute.Strategy:
  """A tf.distribute.Strategy from its name (see the module docstring).

  Args:
    name: one of STRATEGIES.
    devices: for `mirrored` only: the devices to mirror over; default: every GPU, or every
      logical CPU when there is no GPU (one, unless logical CPUs were configured).

  Raises:
    UsageError: an unknown name, `devices` with another strategy, a missing or invalid
      TF_CONFIG for `multi_worker`, no TPU for `tpu`.
  """
  if name not in STRATEGIES:
    raise errors.UsageError(f'unknown strategy {name!r}; choose one of {", ".join(STRATEGIES)}')
  if devices is not None and name != 'mirrored':
    raise errors.UsageError(
        f'devices={list(devices)!r} is only for strategy mirrored, not {name!r}')
  if name == 'auto':
    name = 'mirrored' if len(_gpus()) > 1 else 'default'
  key = (name, tuple(devices) if devices else None)
  if key not in _STRATEGIES:
    _STRATEGIES[key] = _make_strategy(name, devices)
  return _STRATEGIES[key]


# One strategy object per kind and process: two MirroredStrategy objects over the same devices
# reuse collective instance keys and abort each other's all-reduce ("Shape mismatch in the
# collective instance"), and the multi-worker runtime can be configured only once. So repeated
# calls (e.g. one train() per cross-validation fold) share the first one.
_STRATEGIES: dict[tuple, tf.distribute.Strategy] = {}


def _make_strategy(name: str, devices: Sequence[str] | None) -> tf.distribute.Strategy:
  if name == 'default':
    return tf.distribute.get_strategy()
  if name == 'one_device':
    return tf.distribute.OneDeviceStrategy('/gpu:0' if _gpus() else '/cpu:0')
  if name == 'mirrored':
    if not devices and not _gpus():
      # Without GPUs, TensorFlow mirrors over CPU:0 only. Several logical CPUs exist only when
      # someone configured them (tf.config.set_logical_device_configuration), so use them all.
      devices = [d.name for d in tf.config.list_logical_devices('CPU')]
    return tf.distribute.MirroredStrategy(devices=list(devices) if devices else None)
  if name == 'multi_worker':
    _check_tf_config()
    return tf.distribute.MultiWorkerMirroredStrategy()
  # name == 'tpu'
  try:
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
  except (ValueError, tf.errors.OpError) as e:
    raise errors.UsageError(
        f'strategy tpu: no TPU found ({e}); run on a Cloud TPU VM or choose --strategy=auto'
    ) from None
  return tf.distribute.TPUStrategy(resolver)


def check_batch_size(global_batch_size: int, strategy: tf.distribute.Strategy) -> int:
  """Returns the per-replica batch size; UsageError when the global batch does not split evenly."""
  replicas = strategy.num_replicas_in_sync
  if global_batch_size < 1:
    raise errors.UsageError(f'Batch size ({global_batch_size}) must be at least 1')
  if global_batch_size % replicas:
    raise errors.UsageError(
        f'Batch size ({global_batch_size}) must be divisible by the number of replicas '
        f'({replicas})')
  return global_batch_size // replicas


def cpu_has_bfloat16() -> bool:
  """True when the CPU computes bfloat16 natively (x86 AVX512_BF16 or AMX; Linux only)."""
  try:
    with open('/proc/cpuinfo') as f:
      flags = f.read()
  except OSError:
    return False
  return 'avx512_bf16' in flags or 'amx_bf16' in flags


def resolve_precision(mode: str) -> str:
  """The Keras dtype policy name a precision mode means on this machine.

  `auto` is `mixed_float16` on a GPU (tensor cores; Keras adds dynamic loss scaling),
  `mixed_bfloat16` on a TPU (its native type, no loss scaling needed) and on a CPU with native
  bfloat16 (AVX512_BF16 or AMX), else `float32`. Measured on this project's 2-core AMD EPYC
  (AVX512_BF16): seed_cnn trains at ~30 images/s in mixed_bfloat16 against ~15 in float32
  (benchmarks/results/train_throughput.md); without native support bfloat16 is emulated and
  slower than float32. Known TensorFlow 2.21 bug: the oneDNN bfloat16 filter gradient of a
  stride-2 'same' convolution over a 1x1 map returns garbage for the padding taps, so tiny
  inputs (compact_resnet below 32 px) must train in float32 (`off`).
  """
  if mode not in PRECISIONS:
    raise errors.UsageError(
        f'unknown mixed precision mode {mode!r}; choose one of {", ".join(PRECISIONS)}')
  if mode == 'off':
    return 'float32'
  if mode != 'auto':
    return mode
  if _gpus():
    return 'mixed_float16'
  if tf.config.list_logical_devices('TPU') or cpu_has_bfloat16():
    return 'mixed_bfloat16'
  return 'float32'


def set_precision(mode: str) -> str:
  """Sets Keras' global dtype policy for models built afterwards; returns the policy name.

  Models must keep their output layer in float32 (covidlib.models does): a float16 sigmoid
  saturates and its loss underflows.
  """
  policy = resolve_precision(mode)
  keras.mixed_precision.set_global_policy(policy)
  return policy


def is_multi_worker(strategy: tf.distribute.Strategy) -> bool:
  """True for a MultiWorkerMirroredStrategy that spans more than one worker."""
  return (isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
          and strategy.extended._in_multi_worker_mode())  # pylint: disable=protected-access


def patch_multi_worker_fit(model, strategy: tf.distribute.Strategy) -> None:
  """Makes `model.fit`/`evaluate` work under a multi-worker strategy (Keras 3 bug workaround).

  Keras 3.15's TensorFlow trainer fails under MultiWorkerMirroredStrategy across workers
  (keras-team/keras#20585, tensorflow/tensorflow#72388), in two places:
  1. before the first step it reduces a PerReplica *tuple* of data to build the metrics
     symbolically, which CollectiveAllReduce cannot convert ("Attempt to convert a value
     (PerReplica...)"). We build from this worker's local batch instead: only shapes matter.
  2. after each step it reduces every logged value with `reduce('MEAN', v, axis=0)`, which
     fails for the scalar loss and metrics ("Invalid reduction dimension 0 for input with 0
     dimensions"). We log them as shape-(1,) tensors: the mean over workers of values that are
     already identical everywhere (Keras metric variables are all-reduced) is the value itself.
  Does nothing for any other strategy. Call after `model.compile`.
  """
  if not is_multi_worker(strategy):
    return

  def maybe_symbolic_build(iterator=None, data_batch=None):
    if iterator is not None:
      for _, _, batches in iterator:
        data_batch = tf.nest.map_structure(
            lambda v: strategy.experimental_local_results(v)[0], next(batches))
        break
    with strategy.scope():
      model._symbolic_build(data_batch=data_batch)  # pylint: disable=protected-access

  def as_vectors(step):
    def step_with_vector_logs(data):
      return {k: tf.reshape(v, [1]) for k, v in step(data).items()}
    return step_with_vector_logs

  model._maybe_symbolic_build = maybe_symbolic_build  # pylint: disable=protected-access
  model.train_step = as_vectors(model.train_step)
  model.test_step = as_vectors(model.test_step)
