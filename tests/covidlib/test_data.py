"""Tests of covidlib.data: TFDS splits, folders and file lists into the same tensors as serving."""

import io
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from covidlib import data
from covidlib import errors
from covidlib import preprocess
from covidlib_tfds.covid_xray import covid_xray_dataset_builder

SIZE = 16


def _png(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array[..., 0]).save(buffer, 'PNG')
  return buffer.getvalue()


def _tiny_examples(split: str):
  """Gray images of varied shapes; covid ones carry a bright square. Deterministic."""
  n = {'train': 6, 'validation': 3}[split]
  rs = np.random.RandomState(0 if split == 'train' else 1)
  for i in range(n):
    label = i % 2
    image = rs.randint(0, 120, (20 + 3 * i, 30 - 2 * i, 1), dtype=np.uint8)
    if label:
      image[4:12, 4:12] = 250
    yield f'{split}_{i}', {
        'image': image, 'label': label, 'image/filename': f'{split}_{i}.png',
        'patient_id': f'p{i // 2}', 'source': ['ieee8023', 'kaggle_pediatric'][1 - label],
        'view': 'PA', 'age': np.int32(30 + i if label else -1),
        'finding': 'COVID-19' if label else 'No Finding',
    }


class CovidlibTestTinyXray(tfds.core.GeneratorBasedBuilder):
  """covid_xray's feature layout with a few generated examples, to test load_tfds fast."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=covid_xray_dataset_builder.features(),  # The real layout, not a copy.
        supervised_keys=('image', 'label'))

  def _split_generators(self, dl_manager):
    return {'train': _tiny_examples('train'), 'validation': _tiny_examples('validation')}

  def _generate_examples(self):  # Unused: the splits above are generators already.
    raise NotImplementedError


NAME = 'covidlib_test_tiny_xray'


@pytest.fixture(scope='module')
def tfds_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  CovidlibTestTinyXray(data_dir=data_dir).download_and_prepare()
  CovidlibTestTinySources(data_dir=data_dir).download_and_prepare()
  return data_dir


# Three (source, label) strata of very different sizes, as in covid_xray/adult_pediatric.
STRATA = {('ieee8023', 1): 6, ('kaggle_pediatric', 0): 10, ('nih', 0): 2}


def _source_examples():
  rs = np.random.RandomState(2)
  i = 0
  for (source, label), count in STRATA.items():
    for _ in range(count):
      yield f'{source}_{i}', {
          'image': rs.randint(0, 255, (12, 12, 1), dtype=np.uint8), 'label': label,
          'image/filename': f'{source}_{i}.png', 'patient_id': f'p{i}', 'source': source,
          'view': 'PA', 'age': np.int32(-1), 'finding': 'COVID-19' if label else 'No Finding'}
      i += 1


class CovidlibTestTinySources(CovidlibTestTinyXray):
  """18 training examples from three sources, for source-balanced sampling."""

  def _split_generators(self, dl_manager):
    return {'train': _source_examples()}


SOURCES = 'covidlib_test_tiny_sources'


def _reference(image: np.ndarray, channels: int = 1) -> np.ndarray:
  """What serving computes for the same PNG: decode_image + preprocess, eagerly."""
  return preprocess.preprocess(preprocess.decode_image(_png(image)), SIZE, channels).numpy()


# ---------------------------------------------------------------------------------------------
# load_tfds

@pytest.mark.parametrize('channels', [1, 3])
def test_load_tfds_gives_the_serving_tensors_in_order(tfds_dir, channels):
  ds = data.load_tfds(NAME, 'train', data_dir=tfds_dir, image_size=SIZE, channels=channels,
                      batch_size=4)
  images, labels = zip(*[(x.numpy(), y.numpy()) for x, y in ds])
  assert [x.shape for x in images] == [(4, SIZE, SIZE, channels), (2, SIZE, SIZE, channels)]
  assert images[0].dtype == np.float32 and labels[0].dtype == np.float32
  expected = {key: ex for key, ex in _tiny_examples('train')}
  got_images = np.concatenate(images)
  got_labels = np.concatenate(labels)
  # TFDS stores examples in its own (hashed) order; match each by content.
  assert sorted(got_labels.tolist()) == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
  for ex in expected.values():
    reference = _reference(ex['image'], channels)
    matches = [i for i in range(6) if np.array_equal(got_images[i], reference)]
    assert len(matches) == 1
    assert got_labels[matches[0]] == ex['label']


def test_load_tfds_metadata(tfds_dir):
  ds = data.load_tfds(NAME, 'validation', data_dir=tfds_dir, image_size=SIZE, batch_size=8,
                      with_metadata=True)
  images, labels, meta = next(iter(ds))
  assert set(meta) == set(data.METADATA_KEYS)
  assert meta['age'].dtype == tf.int32
  rows = sorted(zip(meta['filename'].numpy().tolist(), labels.numpy().tolist(),
                    meta['source'].numpy().tolist(), meta['age'].numpy().tolist(),
                    meta['patient_id'].numpy().tolist(), meta['view'].numpy().tolist()))
  assert rows == [
      (b'validation_0.png', 0.0, b'kaggle_pediatric', -1, b'p0', b'PA'),
      (b'validation_1.png', 1.0, b'ieee8023', 31, b'p0', b'PA'),
      (b'validation_2.png', 0.0, b'kaggle_pediatric', -1, b'p1', b'PA'),
  ]


def _order(ds):
  return [tuple(y.numpy().tolist()) + tuple(np.round(x.numpy().mean(axis=(1, 2, 3)), 6))
          for x, y in ds]


def test_shuffle_is_seeded_and_reshuffles_every_epoch(tfds_dir):
  def load(seed):
    return data.load_tfds(NAME, 'train', data_dir=tfds_dir, image_size=SIZE, batch_size=6,
                          shuffle=True, seed=seed, repeat=3)

  epochs = _order(load(1))
  assert len(epochs) == 3
  assert epochs == _order(load(1))                 # Same seed, same order of every epoch.
  assert len(set(epochs)) > 1                      # Reshuffled between epochs.
  assert epochs != _order(load(2))                 # Another seed, another order.
  plain = _order(data.load_tfds(NAME, 'train', data_dir=tfds_dir, image_size=SIZE,
                                batch_size=6))[0]
  assert sorted(epochs[0]) == sorted(plain)        # The same examples, reordered.


def test_batching_options(tfds_dir):
  def sizes(**kwargs):
    ds = data.load_tfds(NAME, 'train', data_dir=tfds_dir, image_size=SIZE, batch_size=4,
                        **kwargs)
    return [int(x.shape[0]) for x, _ in ds]

  assert sizes() == [4, 2]
  assert sizes(drop_remainder=True) == [4]
  assert sizes(repeat=2) == [4, 4, 4]
  assert sizes(cache=False) == [4, 2]
  forever = data.load_tfds(NAME, 'train', data_dir=tfds_dir, image_size=SIZE, batch_size=4,
                           repeat=True)
  assert len(list(forever.take(5))) == 5
  sliced = data.load_tfds(NAME, 'train[:50%]+validation', data_dir=tfds_dir, image_size=SIZE,
                          batch_size=100)
  assert [int(x.shape[0]) for x, _ in sliced] == [6]


def test_class_counts_and_num_examples(tfds_dir):
  assert data.class_counts(NAME, 'train', tfds_dir) == (3, 3)
  assert data.class_counts(NAME, 'validation', tfds_dir) == (2, 1)
  assert data.num_examples(NAME, 'validation', tfds_dir) == 3


def test_stratum_counts_and_steps_per_epoch(tfds_dir):
  assert data.stratum_counts(SOURCES, 'train', tfds_dir) == dict(sorted(STRATA.items()))
  assert data.steps_per_epoch(18, 4) == 5 and data.steps_per_epoch(16, 4) == 4
  assert data.steps_per_epoch(3, 32) == 1


def _balanced_draws(tfds_dir, seed, batches=100):
  ds = data.load_tfds(SOURCES, 'train', data_dir=tfds_dir, image_size=SIZE, batch_size=6,
                      balance='source', seed=seed, with_metadata=True)
  draws = []
  for images, labels, meta in ds.take(batches):
    assert images.shape == (6, SIZE, SIZE, 1)
    draws += list(zip(meta['source'].numpy().tolist(), labels.numpy().astype(int).tolist(),
                      meta['filename'].numpy().tolist()))
  return draws


def test_balance_source_draws_every_stratum_equally_often(tfds_dir):
  draws = _balanced_draws(tfds_dir, seed=0)
  counts = {}
  for source, label, _ in draws:
    counts[(source.decode(), label)] = counts.get((source.decode(), label), 0) + 1
  assert set(counts) == set(STRATA)
  # 600 draws, p = 1/3 each: standard deviation 11.5; 4 of them either way.
  for key, count in counts.items():
    assert abs(count - 200) <= 46, counts
  # Every example of each stratum appears (each is reshuffled and repeated, none dropped).
  assert len({f for _, _, f in draws}) == sum(STRATA.values())
  # The stratum of 2 images is repeated ~100 times, the one of 10 ~20 times.


def test_balance_source_is_seeded(tfds_dir):
  a, b = _balanced_draws(tfds_dir, 0, 10), _balanced_draws(tfds_dir, 0, 10)
  assert a == b
  assert a != _balanced_draws(tfds_dir, 1, 10)


def test_balance_source_draws_anew_on_every_iteration(tfds_dir):
  ds = data.load_tfds(SOURCES, 'train', data_dir=tfds_dir, image_size=SIZE, batch_size=6,
                      balance='source', seed=0, with_metadata=True).take(3)

  def sources():
    return [m['source'].numpy().tolist() for _, _, m in ds]

  first, second = sources(), sources()
  assert first != second  # A new epoch over .take(n) is not a replay of the last one.


def test_balance_errors_are_named(tfds_dir):
  with pytest.raises(errors.UsageError, match="balance must be one of none, source, got 'x'"):
    data.load_tfds(SOURCES, 'train', data_dir=tfds_dir, balance='x')
  with pytest.raises(errors.UsageError, match="balance='source' repeats forever already"):
    data.load_tfds(SOURCES, 'train', data_dir=tfds_dir, balance='source', repeat=2)


def test_unknown_split_names_the_available_ones(tfds_dir):
  with pytest.raises(errors.UsageError, match=f"dataset '{NAME}' has no split 'test'; its splits "
                     'are: train, validation'):
    data.load_tfds(NAME, 'test', data_dir=tfds_dir)


def test_unknown_dataset_is_a_usage_error(tmp_path):
  with pytest.raises(errors.UsageError, match="unknown dataset 'no_such_xrays'"):
    data.load_tfds('no_such_xrays', 'train', data_dir=str(tmp_path))


def test_dataset_not_built_says_how_to_build_it(tmp_path):
  with pytest.raises(errors.DataError) as e:
    data.load_tfds(NAME, 'train', data_dir=str(tmp_path))
  assert f"dataset '{NAME}' is not built in data_dir '{tmp_path}'" in str(e.value)
  assert f'build it with: tfds build {NAME}' in str(e.value)


def test_covid_xray_not_built_gives_the_full_build_command(tmp_path):
  with pytest.raises(errors.DataError) as e:
    data.class_counts('covid_xray/seed', 'train', str(tmp_path))
  assert 'python -m covidlib_tfds.build --config=seed --manual_dir=' in str(e.value)
  assert f'--data_dir={tmp_path}' in str(e.value)


# ---------------------------------------------------------------------------------------------
# Folders and file lists

@pytest.fixture
def folder(tmp_path, encode):
  """root/{Covid,normal}/ in the article's mix of formats: RGB/RGBA/16-bit PNG, gray JPEG."""
  rs = np.random.RandomState(0)
  root = tmp_path / 'xrays'
  (root / 'Covid').mkdir(parents=True)
  (root / 'normal' / 'more').mkdir(parents=True)
  files = {
      'Covid/a_rgb.png': encode(rs.randint(0, 255, (30, 40, 3), dtype=np.uint8)),
      'Covid/b_rgba.png': encode(rs.randint(0, 255, (25, 25, 4), dtype=np.uint8)),
      'Covid/c_16bit.png': encode(rs.randint(0, 65535, (20, 22), dtype=np.uint16)),
      'normal/a_gray.jpg': encode(rs.randint(0, 255, (40, 30), dtype=np.uint8), fmt='JPEG'),
      'normal/more/b_gray.png': encode(rs.randint(0, 255, (18, 18), dtype=np.uint8)),
  }
  for name, contents in files.items():
    (root / name).write_bytes(contents)
  (root / '.DS_Store').write_bytes(b'\0\0')
  (root / 'normal' / '.hidden.png').write_bytes(b'not an image')
  return root


def test_list_folder_is_sorted_case_insensitive_and_recursive(folder):
  paths, labels = data.list_folder(folder)
  assert [os.path.relpath(p, folder) for p in paths] == [
      'normal/a_gray.jpg', 'normal/more/b_gray.png',
      'Covid/a_rgb.png', 'Covid/b_rgba.png', 'Covid/c_16bit.png']
  assert labels == [0, 0, 1, 1, 1]


@pytest.mark.parametrize('channels', [1, 3])
def test_load_folder_equals_eager_serving_preprocessing(folder, channels):
  paths, labels = data.list_folder(folder)
  ds = data.load_folder(folder, image_size=SIZE, channels=channels, batch_size=2)
  images, got_labels = zip(*[(x.numpy(), y.numpy()) for x, y in ds])
  assert [x.shape[0] for x in images] == [2, 2, 1]
  np.testing.assert_array_equal(np.concatenate(got_labels), np.array(labels, np.float32))
  for got, path in zip(np.concatenate(images), paths):
    reference = preprocess.preprocess(preprocess.load_image(path), SIZE, channels).numpy()
    np.testing.assert_array_equal(got, reference)


def test_load_folder_metadata_and_shuffle(folder):
  ds = data.load_folder(folder, image_size=SIZE, batch_size=5, with_metadata=True,
                        shuffle=True, seed=0)
  images, labels, meta = next(iter(ds))
  paths, path_labels = data.list_folder(folder)
  names = [n.decode() for n in meta['filename'].numpy()]
  assert sorted(names) == sorted(paths) and names != paths
  assert [path_labels[paths.index(n)] for n in names] == labels.numpy().tolist()
  assert meta['age'].numpy().tolist() == [-1] * 5
  assert meta['source'].numpy().tolist() == [b''] * 5


def test_unreadable_files_are_all_named(folder):
  (folder / 'normal' / 'empty.png').write_bytes(b'')
  jpeg = (folder / 'normal' / 'a_gray.jpg').read_bytes()
  (folder / 'Covid' / 'truncated.jpg').write_bytes(jpeg[:len(jpeg) // 3])
  with pytest.raises(errors.DataError) as e:
    data.load_folder(folder, image_size=SIZE)
  message = str(e.value)
  assert message.startswith('2 of 7 files are not readable images: ')
  assert f"{folder / 'normal' / 'empty.png'}: empty file (0 bytes)" in message
  assert f"{folder / 'Covid' / 'truncated.jpg'}: not a decodable image" in message
  assert sorted(err.path for err in e.value.invalid_images) == sorted(
      [str(folder / 'Covid' / 'truncated.jpg'), str(folder / 'normal' / 'empty.png')])
  assert len(data.check_images(data.list_folder(folder)[0])) == 2


@pytest.mark.parametrize('make, message', [
    (lambda root: (root / 'pneumonia').mkdir(), 'pneumonia: unexpected folder'),
    (lambda root: (root / 'notes.txt').write_text('x'), 'notes.txt: a file directly in the root'),
    (lambda root: (root / 'COVID').mkdir(), "two folders for class 'covid': 'COVID' and 'Covid'"),
])
def test_folder_layout_errors_name_the_culprit(folder, make, message):
  make(folder)
  with pytest.raises(errors.UsageError, match=message):
    data.list_folder(folder)


def test_folder_without_classes_or_files(tmp_path):
  with pytest.raises(errors.UsageError, match='no such folder'):
    data.list_folder(tmp_path / 'missing')
  with pytest.raises(errors.UsageError, match='holds neither a covid/ nor a normal/ folder'):
    data.list_folder(tmp_path)
  (tmp_path / 'normal').mkdir()
  with pytest.raises(errors.DataError, match='no files in normal'):
    data.list_folder(tmp_path)


def test_one_class_folder_is_enough(tmp_path, encode, gray_image):
  (tmp_path / 'NORMAL').mkdir()
  (tmp_path / 'NORMAL' / 'x.png').write_bytes(encode(gray_image))
  assert data.list_folder(tmp_path) == ([str(tmp_path / 'NORMAL' / 'x.png')], [0])


def test_load_files_without_labels_yields_images(folder):
  paths, _ = data.list_folder(folder)
  ds = data.load_files(paths[:3], image_size=SIZE, batch_size=3)
  assert ds.element_spec.shape.as_list() == [None, SIZE, SIZE, 1]
  images = next(iter(ds)).numpy()
  assert images.shape == (3, SIZE, SIZE, 1)
  with_meta = data.load_files(paths[:3], image_size=SIZE, batch_size=3, with_metadata=True)
  images2, meta = next(iter(with_meta))
  np.testing.assert_array_equal(images2.numpy(), images)
  assert [n.decode() for n in meta['filename'].numpy()] == paths[:3]


@pytest.mark.parametrize('call, message', [
    (lambda p: data.load_files([], image_size=SIZE), 'no image files given'),
    (lambda p: data.load_files(p[0], image_size=SIZE), 'paths must be a list of files'),
    (lambda p: data.load_files(p[:2], [0], image_size=SIZE), '1 labels for 2 files'),
    (lambda p: data.load_files(p[:1], [2], image_size=SIZE),
     'label must be 0 \\(normal\\) or 1 \\(COVID-19\\), got 2'),
    (lambda p: data.load_files(p[:1], image_size=4), 'image_size must be an integer >= 8, got 4'),
    (lambda p: data.load_files(p[:1], channels=2), 'channels must be 1 or 3, got 2'),
    (lambda p: data.load_files(p[:1], batch_size=0),
     'batch_size must be a positive integer, got 0'),
])
def test_bad_arguments_are_named(folder, call, message):
  paths, _ = data.list_folder(folder)
  with pytest.raises(errors.UsageError, match=message):
    call(paths)
