"""Input pipelines: a TFDS split, a folder of images or a list of files -> batched tf.data.

    from covidlib import data
    train = data.load_tfds('covid_xray/patient_split', 'train', data_dir='tfds_data',
                           image_size=224, batch_size=32, shuffle=True, seed=0)
    for images, labels in train.take(1):
      print(images.shape, labels)           # (32, 224, 224, 1) float32 in [0, 1], (32,) float32
    external = data.load_folder('adult_xrays/')   # adult_xrays/{covid,normal}/*.{png,jpg,...}
    n_normal, n_covid = data.class_counts('covid_xray/patient_split', 'train', 'tfds_data')
    strata = data.stratum_counts('covid_xray/adult', 'train', 'tfds_data')
    # {('ieee8023', 1): 140, ('nih', 0): 300}
    balanced = data.load_tfds('covid_xray/adult', 'train', data_dir='tfds_data',
                              batch_size=32, balance='source', seed=0)   # infinite
    steps = data.steps_per_epoch(sum(strata.values()), 32)

Every image goes through `covidlib.preprocess.decode_image` and `covidlib.preprocess.preprocess`,
the same two functions the exported SavedModel and `covidlib.predict` use, so training and
serving see the same tensor for the same file. The resize does NOT keep the aspect ratio: the
whole film is squeezed into a square, as the article's `flow_from_directory(target_size=(224,
224))` did; padding to a square would paint borders whose width depends on the source of the
image (paper figure, scanner, crop), a shortcut this data already suffers from (see
preprocess.py). Label 1 = COVID-19, 0 = normal, as float32 for binary cross-entropy.

Pipeline order: map(decode + preprocess, parallel, deterministic) -> cache -> shuffle (seeded,
reshuffled every epoch) -> repeat -> batch -> prefetch. Caching after preprocessing means each
file is read and decoded once per process, not once per epoch; the cache holds S x S x C float32
per image (224 x 224 x 1 x 4 B = 200 KB, so ~60 MB for the ~300 images of the `seed` config).
For much larger datasets pass `cache='/path/to/file'` (a tf.data file cache) or `cache=False`.

Source-balanced sampling (`balance='source'`, issue #9): each (source, label) stratum of the
split gets its own pipeline (filter on the undecoded record -> decode + preprocess -> cache ->
shuffle -> repeat), and `tf.data.Dataset.sample_from_datasets` draws from them with equal
weights, seeded. The result is infinite: train for `steps_per_epoch(n, batch_size)` steps per
epoch (the split size over the batch size, so an epoch stays comparable with plain training).
Small strata are repeated more often than large ones; every image is still decoded once.

A folder or file list is checked eagerly before any pipeline is built: every file is decoded
once, and unreadable files raise `DataError` naming each of them. Nothing is dropped silently
(`tf.data.experimental.ignore_errors` is never used), and only names starting with '.'
(.DS_Store, .ipynb_checkpoints) are skipped when listing a folder.
"""

from __future__ import annotations

import concurrent.futures
import os
from typing import Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from covidlib import CLASS_NAMES
from covidlib import errors
from covidlib import preprocess as preprocess_lib

AUTOTUNE = tf.data.AUTOTUNE

# A shuffle buffer as large as the split gives a uniform shuffle; past this many examples the
# buffer (which holds decoded images on top of the cache) costs more memory than it is worth.
MAX_SHUFFLE_BUFFER = 10_000

# How to make the dataset when it is not built yet (shown in the error message).
_BUILD_HINT = ('python -m covidlib_tfds.build --config={config} '
               '--manual_dir=<folder holding the source archive, e.g. shared/data/covid_xray_seed> '
               '--data_dir={data_dir} (see covidlib_tfds/covid_xray/README.md)')

METADATA_KEYS = ('filename', 'source', 'view', 'patient_id', 'age', 'sex')
BALANCE = ('none', 'source')


# ---------------------------------------------------------------------------------------------
# Argument checks shared by the loaders.

def _check_pipeline_args(image_size, channels, batch_size) -> None:
  if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 8:
    raise errors.UsageError(f'image_size must be an integer >= 8, got {image_size!r}')
  if channels not in (1, 3) or isinstance(channels, bool):
    raise errors.UsageError(f'channels must be 1 or 3, got {channels!r}')
  if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
    raise errors.UsageError(f'batch_size must be a positive integer, got {batch_size!r}')


def _finish(ds: tf.data.Dataset, num_examples: int, *, batch_size: int, shuffle: bool,
            seed: int | None, repeat: bool | int, drop_remainder: bool,
            cache: bool | str) -> tf.data.Dataset:
  """cache -> shuffle -> repeat -> batch -> prefetch, after the per-example map."""
  if cache:
    ds = ds.cache() if cache is True else ds.cache(os.fspath(cache))
  if shuffle:
    ds = ds.shuffle(max(1, min(num_examples, MAX_SHUFFLE_BUFFER)), seed=seed,
                    reshuffle_each_iteration=True)
  if repeat is True:
    ds = ds.repeat()
  elif repeat:
    ds = ds.repeat(int(repeat))
  ds = ds.batch(batch_size, drop_remainder=drop_remainder, num_parallel_calls=AUTOTUNE,
                deterministic=True)
  return ds.prefetch(AUTOTUNE)


# ---------------------------------------------------------------------------------------------
# TFDS.

# The datasets of covidlib_tfds. labelled_xrays/NAME (a user's own data, NAME chosen when it was
# built) is read back from data_dir by TFDS, since NAME is in no builder's list of configs.
_COVIDLIB_TFDS_DATASETS = ('covid_xray', 'labelled_xrays')
_LABELLED_BUILD_HINT = ('python -m covidlib_tfds.build --labels_csv=<your labels CSV> '
                        '--name={config} --data_dir={data_dir} (see README.md, "Your own data")')


def _register_builders(dataset: str) -> None:
  """Registers covidlib_tfds' builders (when it is installed) before TFDS looks them up.

  A built dataset also loads without its builder code (TFDS reads the metadata in data_dir), so
  a missing covidlib_tfds is not an error; other datasets never import it.
  """
  if dataset.split('/')[0].split(':')[0] in _COVIDLIB_TFDS_DATASETS:
    try:
      import covidlib_tfds  # noqa: F401  Optional package: importing it registers the builders.
    except ImportError:
      pass


def builder(dataset: str, data_dir: str | os.PathLike | None):
  """The TFDS builder of a built dataset.

  Raises:
    UsageError: unknown dataset or config. DataError: not built in data_dir (says how to).
  """
  if not isinstance(dataset, str) or not dataset:
    raise errors.UsageError(f'dataset must be a name such as "covid_xray/seed", got {dataset!r}')
  _register_builders(dataset)
  data_dir = None if data_dir is None else os.fspath(data_dir)
  where = f'data_dir {data_dir!r}' if data_dir else 'the default TFDS data_dir'
  try:
    builder = tfds.builder(dataset, data_dir=data_dir)
  except tfds.core.DatasetNotFoundError:
    raise errors.UsageError(
        f'unknown dataset {dataset!r}: no builder of that name is registered and none is '
        f'built in {where}') from None
  except (ValueError, AssertionError) as e:  # An unknown config or version.
    raise errors.UsageError(f'dataset {dataset!r}: {str(e).splitlines()[0][:300]}') from None
  if not builder.is_prepared():
    name, _, config = dataset.partition('/')
    hint = (_BUILD_HINT.format(config=config or 'seed', data_dir=data_dir or '<data_dir>')
            if name == 'covid_xray' else f'tfds build {name}')
    if name == 'labelled_xrays':
      hint = _LABELLED_BUILD_HINT.format(config=config.split('/')[0] or '<name>',
                                         data_dir=data_dir or '<data_dir>')
    raise errors.DataError(
        f'dataset {dataset!r} is not built in {where} (looked in {builder.data_dir}); '
        f'build it with: {hint}')
  return builder


def _split_info(builder, dataset: str, split: str):
  """The SplitInfo of `split` (slices like 'train[:80%]' or 'train+validation' allowed)."""
  available = sorted(builder.info.splits.keys())
  if not isinstance(split, str) or not split:
    raise errors.UsageError(f'split must be a name such as "train", got {split!r}')
  for part in split.split('+'):
    base = part.split('[')[0].strip()
    if base not in available:
      raise errors.UsageError(
          f'dataset {dataset!r} has no split {base!r}; its splits are: {", ".join(available)}')
  try:
    return builder.info.splits[split]
  except (ValueError, KeyError, AssertionError) as e:
    raise errors.UsageError(f'split {split!r} of dataset {dataset!r}: {e}') from None


def is_built(dataset: str, data_dir: str | os.PathLike | None) -> bool:
  """True when `dataset` is built in data_dir (builder() would succeed)."""
  try:
    builder(dataset, data_dir)
  except errors.CovidlibError:
    return False
  return True


def column(dataset: str, split: str, key: str,
           data_dir: str | os.PathLike | None) -> np.ndarray:
  """One text feature of every example of a split, without decoding images ('' if absent)."""
  b = builder(dataset, data_dir)
  values = []
  for name in split.split('+'):
    if name not in b.info.splits:
      raise errors.UsageError(f'dataset {dataset!r} has no split {name!r}')
    if key not in b.info.features:
      values.extend([''] * b.info.splits[name].num_examples)
      continue
    ds = b.as_dataset(split=name, decoders={'image': tfds.decode.SkipDecoding()},
                      shuffle_files=False)
    for example in ds.map(lambda ex: ex[key]).batch(4096):
      values.extend(v.decode('utf-8', 'replace') for v in example.numpy())
  return np.asarray(values, dtype=object)


def training_sources(config: dict) -> set[str] | None:
  """The sources of the training split a model_dir config names; None when unknown."""
  dataset = config.get('dataset') or ''
  if dataset.startswith('folder:') or ' fold ' in dataset or not is_built(
      dataset, config.get('data_dir')):
    return None
  return set(column(dataset, config.get('train_split', 'train'), 'source',
                    config.get('data_dir')))


def class_names(dataset: str, data_dir: str | os.PathLike | None = None) -> tuple[str, str]:
  """(negative, positive) class names of a built dataset: index = label.

  A labelled_xrays build records its own (e.g. ('normal', 'pneumonia')) in
  `info.metadata['class_names']`; datasets without them get CLASS_NAMES, ('normal', 'covid').
  """
  metadata = builder(dataset, data_dir).info.metadata or {}
  names = metadata.get('class_names')
  if (isinstance(names, (list, tuple)) and len(names) == 2
      and all(isinstance(n, str) and n for n in names)):
    return names[0], names[1]
  return CLASS_NAMES[0], CLASS_NAMES[1]


def num_examples(dataset: str, split: str, data_dir: str | os.PathLike | None = None) -> int:
  """Number of examples in a split of a built TFDS dataset, from its metadata."""
  b = builder(dataset, data_dir)
  return int(_split_info(b, dataset, split).num_examples)


def class_counts(dataset: str, split: str,
                 data_dir: str | os.PathLike | None = None) -> tuple[int, int]:
  """(n_normal, n_covid) of a split, e.g. for class weights.

  Reads only the label column (images are not decoded): exact, and a second or two for the
  datasets here.
  """
  b = builder(dataset, data_dir)
  _split_info(b, dataset, split)
  ds = b.as_dataset(split=split, decoders={'image': tfds.decode.SkipDecoding()})
  counts = np.zeros(len(CLASS_NAMES), np.int64)
  for labels in ds.map(lambda ex: ex['label'], num_parallel_calls=AUTOTUNE).batch(4096):
    counts += np.bincount(labels.numpy(), minlength=len(CLASS_NAMES))[:len(CLASS_NAMES)]
  return int(counts[0]), int(counts[1])


def stratum_counts(dataset: str, split: str,
                   data_dir: str | os.PathLike | None = None) -> dict[tuple[str, int], int]:
  """{(source, label): examples} of a split, sorted; reads only those two columns.

  Raises:
    UsageError: the dataset has no 'source' feature (and the errors of `load_tfds`).
  """
  b = builder(dataset, data_dir)
  _split_info(b, dataset, split)
  if 'source' not in b.info.features:
    raise errors.UsageError(
        f'dataset {dataset!r} has no \'source\' feature: source-balanced sampling needs one '
        '(covid_xray/adult and covid_xray/adult_pediatric have it)')
  ds = b.as_dataset(split=split, decoders={'image': tfds.decode.SkipDecoding()})
  counts: dict[tuple[str, int], int] = {}
  for sources, labels in ds.map(lambda ex: (ex['source'], ex['label']),
                                num_parallel_calls=AUTOTUNE).batch(4096):
    for source, label in zip(sources.numpy().tolist(), labels.numpy().tolist()):
      key = (source.decode(), int(label))
      counts[key] = counts.get(key, 0) + 1
  return dict(sorted(counts.items()))


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Batches in one pass over `num_examples`: ceil(num_examples / batch_size), at least 1."""
  return max(1, -(-int(num_examples) // int(batch_size)))


def load_tfds(dataset: str, split: str, *, data_dir: str | os.PathLike | None = None,
              image_size: int = 224, channels: int = 1, batch_size: int = 32,
              shuffle: bool = False, seed: int | None = None, repeat: bool | int = False,
              with_metadata: bool = False, drop_remainder: bool = False,
              cache: bool | str = True, balance: str = 'none') -> tf.data.Dataset:
  """A split of a built TFDS dataset as batches for training or evaluation.

  Args:
    dataset: 'covid_xray/<config>' (or any TFDS name with 'image' and 'label' features).
    split: 'train', 'validation', 'test', or a TFDS slice such as 'train[:80%]'.
    data_dir: where the dataset was built (`tfds build ... --data_dir`); None = TFDS default.
    image_size, channels: model input (S, S, C); channels 3 repeats the gray channel.
    batch_size: examples per batch (the GLOBAL batch under a distribution strategy).
    shuffle, seed: shuffle examples, reshuffled every epoch; a seed fixes every epoch's order.
    repeat: True repeats forever, an integer that many times.
    with_metadata: also yield a dict of 'filename', 'source', 'view', 'patient_id', 'sex'
      (strings; '' when the dataset lacks the feature) and 'age' (int32, -1 unknown).
    drop_remainder: drop a last partial batch (static batch shape, e.g. for TPUs).
    cache: True caches preprocessed images in memory, a path caches them to that file, False
      does not cache.
    balance: 'none', or 'source': draw each (source, label) stratum of the split equally often
      (see the module docstring). The dataset is then shuffled and INFINITE whatever `shuffle`
      and `repeat` say (`repeat` must be left False); iterate it `steps_per_epoch(...)` batches
      per epoch. Needs a 'source' feature.

  Returns:
    tf.data.Dataset of (image float32 (B, S, S, C) in [0, 1], label float32 (B,)), or
    (image, label, metadata) with with_metadata=True.

  Raises:
    UsageError: unknown dataset, config or split, or a bad argument.
    DataError: the dataset is not built in data_dir (the message says how to build it).
  """
  _check_pipeline_args(image_size, channels, batch_size)
  if balance not in BALANCE:
    raise errors.UsageError(f'balance must be one of {", ".join(BALANCE)}, got {balance!r}')
  if balance != 'none' and repeat is not False:
    raise errors.UsageError(f'balance={balance!r} repeats forever already; leave repeat False, '
                            f'got repeat={repeat!r}')
  b = builder(dataset, data_dir)
  info = _split_info(b, dataset, split)
  features = b.info.features
  for key in ('image', 'label'):
    if key not in features:
      raise errors.UsageError(f'dataset {dataset!r} has no {key!r} feature')
  # Skip TFDS's own PNG decoding: decode_image is the one decoder serving uses as well.
  ds = b.as_dataset(split=split, shuffle_files=False,
                          decoders={'image': tfds.decode.SkipDecoding()})
  present = set(features.keys())

  def to_example(example):
    image = preprocess_lib.preprocess(preprocess_lib.decode_image(example['image']),
                                      image_size, channels)
    label = tf.cast(example['label'], tf.float32)
    if not with_metadata:
      return image, label

    def text(key):
      return (tf.cast(example[key], tf.string) if key in present
              else tf.constant('', tf.string))

    metadata = {
        'filename': text('image/filename'),
        'source': text('source'),
        'view': text('view'),
        'patient_id': text('patient_id'),
        'age': (tf.cast(example['age'], tf.int32) if 'age' in present
                else tf.constant(-1, tf.int32)),
        'sex': text('sex'),
    }
    return image, label, metadata

  if balance == 'source':
    return _balanced(ds, stratum_counts(dataset, split, data_dir), to_example,
                     batch_size=batch_size, seed=seed, drop_remainder=drop_remainder,
                     cache=cache)
  ds = ds.map(to_example, num_parallel_calls=AUTOTUNE, deterministic=True)
  return _finish(ds, int(info.num_examples), batch_size=batch_size, shuffle=shuffle, seed=seed,
                 repeat=repeat, drop_remainder=drop_remainder, cache=cache)


def _balanced(records: tf.data.Dataset, strata: dict[tuple[str, int], int], to_example, *,
              batch_size: int, seed: int | None, drop_remainder: bool,
              cache: bool | str) -> tf.data.Dataset:
  """Equal-weight sampling over per-stratum pipelines of undecoded TFDS records."""
  per_stratum = []
  for index, ((source, label), count) in enumerate(strata.items()):
    def matches(example, source=source, label=label):
      return tf.logical_and(tf.equal(example['source'], source),
                            tf.equal(tf.cast(example['label'], tf.int64), label))

    ds = records.filter(matches).map(to_example, num_parallel_calls=AUTOTUNE,
                                      deterministic=True)
    if cache:  # One cache per stratum: a file cache gets a suffix per stratum.
      ds = ds.cache() if cache is True else ds.cache(f'{os.fspath(cache)}.stratum{index}')
    ds = ds.shuffle(max(1, min(count, MAX_SHUFFLE_BUFFER)),
                    seed=None if seed is None else seed + index + 1,
                    reshuffle_each_iteration=True)
    per_stratum.append(ds.repeat())
  if not per_stratum:
    raise errors.DataError('the split holds no examples to balance')
  # rerandomize_each_iteration: a caller that iterates it anew every epoch (e.g. with .take)
  # still gets new draws each time, the same ones for the same seed.
  ds = tf.data.Dataset.sample_from_datasets(
      per_stratum, weights=[1.0 / len(per_stratum)] * len(per_stratum), seed=seed,
      rerandomize_each_iteration=True)
  ds = ds.batch(batch_size, drop_remainder=drop_remainder, num_parallel_calls=AUTOTUNE,
                deterministic=True)
  return ds.prefetch(AUTOTUNE)


# ---------------------------------------------------------------------------------------------
# Folders and file lists.

def list_folder(root: str | os.PathLike) -> tuple[list[str], list[int]]:
  """Paths and labels of `root/{covid,normal}/**` (class folder names in any case).

  Files are listed recursively in sorted order (normal first, then covid). Only names starting
  with '.' are skipped. One class folder may be missing (e.g. an external set of normals only).

  Raises:
    UsageError: `root` is not a folder, holds no class folder, holds a class folder twice (e.g.
      'Covid' and 'covid'), or holds anything else (files or other folders), named.
    DataError: the class folders hold no files.
  """
  root = os.fspath(root)
  if not os.path.isdir(root):
    raise errors.UsageError(f'{root}: no such folder (expected {root}/covid/ and {root}/normal/)')
  folders: dict[int, str] = {}
  for name in sorted(os.listdir(root)):
    if name.startswith('.'):
      continue
    path = os.path.join(root, name)
    if not os.path.isdir(path):
      raise errors.UsageError(
          f'{path}: a file directly in the root folder; images go in {root}/covid/ or '
          f'{root}/normal/')
    if name.lower() not in CLASS_NAMES:
      raise errors.UsageError(
          f'{path}: unexpected folder; {root} may only hold the class folders '
          f'{" and ".join(CLASS_NAMES)} (any case)')
    label = CLASS_NAMES.index(name.lower())
    if label in folders:
      raise errors.UsageError(
          f'{root}: two folders for class {CLASS_NAMES[label]!r}: '
          f'{os.path.basename(folders[label])!r} and {name!r}')
    folders[label] = path
  if not folders:
    raise errors.UsageError(f'{root}: holds neither a covid/ nor a normal/ folder')
  paths, labels = [], []
  for label in sorted(folders):
    for directory, subdirs, files in os.walk(folders[label], followlinks=True):
      subdirs[:] = sorted(d for d in subdirs if not d.startswith('.'))
      for name in sorted(files):
        if not name.startswith('.'):
          paths.append(os.path.join(directory, name))
          labels.append(label)
  if not paths:
    raise errors.DataError(
        f'{root}: no files in {", ".join(os.path.basename(f) for f in folders.values())}')
  return paths, labels


def check_images(paths: Sequence[str | os.PathLike]) -> list[errors.InvalidImageError]:
  """Decodes every file (in parallel threads); returns one InvalidImageError per bad file.

  Does not raise: batch tools can report every bad file and go on with the good ones.
  """
  def check(path):
    try:
      preprocess_lib.load_image(path)
      return None
    except errors.InvalidImageError as e:
      return e

  workers = min(len(paths), os.cpu_count() or 1) or 1
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    return [e for e in pool.map(check, paths) if e is not None]


def _raise_if_invalid(paths: Sequence[str]) -> None:
  bad = check_images(paths)
  if not bad:
    return
  shown = '; '.join(str(e) for e in bad[:20])
  more = f'; and {len(bad) - 20} more' if len(bad) > 20 else ''
  error = errors.DataError(
      f'{len(bad)} of {len(paths)} files are not readable images: {shown}{more}')
  error.invalid_images = bad
  raise error


def load_files(paths: Sequence[str | os.PathLike], labels: Sequence[int] | None = None, *,
               image_size: int = 224, channels: int = 1, batch_size: int = 32,
               shuffle: bool = False, seed: int | None = None, repeat: bool | int = False,
               with_metadata: bool = False, drop_remainder: bool = False,
               cache: bool | str = True, validate: bool = True) -> tf.data.Dataset:
  """Image files (PNG, JPEG, BMP, GIF; any bit depth or colour mode) as batches.

  Args:
    paths: the files, in the order batches will keep (unless shuffle).
    labels: 0 (normal) or 1 (COVID-19) per file, or None for unlabelled files.
    validate: decode every file once up front and raise DataError naming each unreadable one
      (default). Only turn off for files already checked with `check_images`.
    Others: as in `load_tfds`; the metadata of a file is its path as 'filename', '' for
      'source', 'view', 'patient_id' and 'sex', and -1 for 'age'.

  Returns:
    tf.data.Dataset of (image, label) batches, or (image, label, metadata); when labels is None,
    of image batches, or (image, metadata).

  Raises:
    UsageError: no paths, labels of the wrong length or value, or a bad argument.
    DataError: unreadable files (all of them named; `.invalid_images` holds the errors).
  """
  _check_pipeline_args(image_size, channels, batch_size)
  if isinstance(paths, (str, bytes, os.PathLike)):
    raise errors.UsageError(f'paths must be a list of files, got the single path {paths!r}')
  paths = [os.fspath(p) for p in paths]
  if not paths:
    raise errors.UsageError('no image files given')
  if labels is not None:
    labels = list(labels)
    if len(labels) != len(paths):
      raise errors.UsageError(f'{len(labels)} labels for {len(paths)} files')
    for path, label in zip(paths, labels):
      if isinstance(label, bool) or label not in (0, 1):
        raise errors.UsageError(f'{path}: label must be 0 (normal) or 1 (COVID-19), got {label!r}')
  if validate:
    _raise_if_invalid(paths)

  def to_example(path, *label):
    image = preprocess_lib.preprocess(preprocess_lib.decode_image(tf.io.read_file(path)),
                                      image_size, channels)
    outputs = (image,) + tuple(tf.cast(l, tf.float32) for l in label)
    if with_metadata:
      outputs += ({'filename': path, 'source': tf.constant(''), 'view': tf.constant(''),
                   'patient_id': tf.constant(''), 'age': tf.constant(-1, tf.int32),
                   'sex': tf.constant('')},)
    return outputs if len(outputs) > 1 else image

  columns = (tf.constant(paths, tf.string),)
  if labels is not None:
    columns += (tf.constant([int(l) for l in labels], tf.int32),)
  ds = tf.data.Dataset.from_tensor_slices(columns)
  ds = ds.map(to_example, num_parallel_calls=AUTOTUNE, deterministic=True)
  return _finish(ds, len(paths), batch_size=batch_size, shuffle=shuffle, seed=seed,
                 repeat=repeat, drop_remainder=drop_remainder, cache=cache)


def load_folder(root: str | os.PathLike, *, image_size: int = 224, channels: int = 1,
                batch_size: int = 32, shuffle: bool = False, seed: int | None = None,
                repeat: bool | int = False, with_metadata: bool = False,
                drop_remainder: bool = False, cache: bool | str = True) -> tf.data.Dataset:
  """`root/{covid,normal}/**` as (image, label) batches; see `list_folder` and `load_files`."""
  paths, labels = list_folder(root)
  return load_files(paths, labels, image_size=image_size, channels=channels,
                    batch_size=batch_size, shuffle=shuffle, seed=seed, repeat=repeat,
                    with_metadata=with_metadata, drop_remainder=drop_remainder, cache=cache)
