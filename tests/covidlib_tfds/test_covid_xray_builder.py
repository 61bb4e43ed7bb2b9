"""Tests of the covid_xray builder on dummy data in the real layouts.

The DatasetBuilderTestCase classes check, per config: registration, feature shapes and dtypes,
split sizes, that no example sits in two splits, and that keys hold no local paths. They point
the builder at the dummy data's own manifest through the builder's `manifest_path` argument
(the real mechanism a user would use to verify another pinned copy), passed in `_make_builder`,
the TFDS test case's hook for constructing the builder; nothing is monkeypatched.

    pytest tests/covidlib_tfds/test_covid_xray_builder.py -q
"""

import logging
import shutil
from unittest import mock

import numpy as np
import pytest
import tensorflow_datasets as tfds

from covidlib import errors
from covidlib_tfds.covid_xray import covid_xray_dataset_builder as builder_lib
from covidlib_tfds.covid_xray import dummy_data_generation

_DUMMY_MANIFEST = builder_lib._HERE / 'dummy_data' / 'manifest.tsv'


class _DummyManifest:
  """Mixin: build with the dummy data's manifest. (A mixin, so pytest does not collect it.)"""
  DATASET_CLASS = builder_lib.Builder

  def _make_builder(self, config=None):
    return self.dataset_class(data_dir=self.tmp_dir, config=config, version=self.VERSION,
                              manifest_path=_DUMMY_MANIFEST)


class SeedTest(_DummyManifest, tfds.testing.DatasetBuilderTestCase):
  BUILDER_CONFIG_NAMES_TO_TEST = ['seed']
  SPLITS = {'train': 14, 'validation': 9}  # dummy_data: Train 9 + 5, Val 6 + 3.


class PatientSplitTest(_DummyManifest, tfds.testing.DatasetBuilderTestCase):
  BUILDER_CONFIG_NAMES_TO_TEST = ['patient_split']
  # 23 images in 14 groups (patient 51 x2, patient 186 x2, IM-0551 x2, AR-1 ~ AR-2, the
  # series extubation x4 and 88de9d8c... x2), 60/20/20.
  SPLITS = {'train': 14, 'validation': 4, 'test': 5}


class CuratedTest(_DummyManifest, tfds.testing.DatasetBuilderTestCase):
  BUILDER_CONFIG_NAMES_TO_TEST = ['curated']
  # 4 of 8 metadata rows pass the selection; 4 of 7 Kaggle normals are sampled to match.
  SPLITS = {'train': 4, 'validation': 2, 'test': 2}


def _examples(builder, split):
  return list(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)))


def test_seed_examples_carry_metadata_and_gray_images(built_dummy):
  builder = tfds.builder('covid_xray/seed', data_dir=built_dummy)
  examples = {e['image/filename'].decode(): e for e in _examples(builder, 'train')}
  covid = examples['CovidDataset/Train/Covid/4-x-day1.jpg']  # ieee8023 patient 186, 73, PA.
  assert (covid['label'], covid['patient_id'], covid['source'], covid['view'], covid['age']) == (
      1, b'186', b'ieee8023', b'PA', 73)
  unknown = examples['CovidDataset/Train/Covid/AR-1.jpg']  # Not in the metadata.
  assert (unknown['patient_id'], unknown['view'], unknown['age']) == (b'', b'', -1)
  normal = examples['CovidDataset/Train/Normal/IM-0551-0001-0002.jpeg']
  assert (normal['label'], normal['patient_id'], normal['source'], normal['view'],
          normal['age']) == (0, b'IM-0551', b'kaggle_pediatric', b'', -1)
  # The RGBA PNG comes out gray, as the one decode path makes it.
  png = examples['CovidDataset/Train/Covid/23E99E2E-447C-46E5-8EB2-D35D12473C39.png']
  assert png['image'].shape == (40, 32, 1) and png['image'].dtype == np.uint8
  assert builder.info.metadata['missing_files'] == []
  assert builder.info.supervised_keys == ('image', 'label')
  assert builder.info.features['label'].names == ['normal', 'covid']


def test_decode_for_dataset_caps_longest_side_and_keeps_aspect(encode):
  wide = np.tile(np.linspace(0, 255, 1200).astype(np.uint8), (300, 1))
  image = builder_lib.decode_for_dataset(encode(wide), 'wide.png')
  assert image.shape == (256, 1024, 1) and image.dtype == np.uint8
  small = builder_lib.decode_for_dataset(encode(wide[:30, :40]), 'small.png')
  np.testing.assert_array_equal(small[..., 0], wide[:30, :40])  # Untouched below the cap.


def test_changed_image_fails_naming_it(dummy, tmp_path):
  files = dummy.members()
  path = 'CovidDataset/Train/Covid/AR-1.jpg'
  files[path] = files[path][:-20] + b'\0' * 20
  manual = dummy.write_archive(tmp_path / 'manual', files)
  with pytest.raises(errors.DataError, match=f'{path}: differs from the pinned manifest '
                                             r'\(sha256 [0-9a-f]{64}, expected'):
    dummy.build('seed', tmp_path / 'data', manual_dir=manual)


def test_changed_image_checked_by_git_blob_id(dummy, tmp_path):
  files = dummy.members()
  path = 'CovidDataset/Val/Covid/paving.jpg'  # Pinned by its git blob id only.
  files[path] = files['CovidDataset/Train/Covid/AR-1.jpg']
  manual = dummy.write_archive(tmp_path / 'manual', files)
  with pytest.raises(errors.DataError, match=f'{path}: differs .*git blob id'):
    dummy.build('seed', tmp_path / 'data', manual_dir=manual)


@pytest.mark.parametrize('config', ['seed', 'patient_split'])
def test_missing_image_fails_naming_it_and_how_to_allow(dummy, tmp_path, config):
  files = dummy.members()
  del files['CovidDataset/Val/Covid/4-x-day13.jpg']
  manual = dummy.write_archive(tmp_path / 'manual', files)
  with pytest.raises(errors.DataError) as error:
    dummy.build(config, tmp_path / 'data', manual_dir=manual)
  message = str(error.value)
  assert 'lacks 1 image(s) the manifest lists: CovidDataset/Val/Covid/4-x-day13.jpg' in message
  assert 'allow_missing=True' in message and '--allow_missing' in message


def test_missing_image_allowed_from_the_name_is_counted_and_recorded(dummy, tmp_path, caplog):
  files = dummy.members()
  missing = 'CovidDataset/Val/Covid/4-x-day13.jpg'
  del files[missing]
  manual = dummy.write_archive(tmp_path / 'manual', files)
  # The `tfds build covid_xray/seed/allow_missing=True` form: kwargs in the dataset name.
  with caplog.at_level(logging.WARNING):
    builder = dummy.build('seed', tmp_path / 'data', manual_dir=manual,
                          name='covid_xray/seed/allow_missing=True')
  assert missing in caplog.text
  assert builder.info.metadata['missing_files'] == [missing]
  assert builder.info.splits['validation'].num_examples == 8
  reloaded = tfds.builder('covid_xray/seed', data_dir=tmp_path / 'data')  # Read back from disk.
  assert reloaded.info.metadata['missing_files'] == [missing]


def test_unexpected_image_fails_naming_it(dummy, tmp_path):
  files = dummy.members()
  files['CovidDataset/Train/Normal/extra.jpeg'] = files['CovidDataset/Train/Covid/AR-1.jpg']
  manual = dummy.write_archive(tmp_path / 'manual', files)
  with pytest.raises(errors.DataError, match='holds 1 image.* the manifest does not list: '
                                             'CovidDataset/Train/Normal/extra.jpeg'):
    dummy.build('seed', tmp_path / 'data', manual_dir=manual)


def test_corrupt_image_fails_the_build_naming_it(dummy, tmp_path):
  path = 'CovidDataset/Train/Normal/IM-0156-0001.jpeg'
  files = dummy.members()
  files[path] = files[path][:200]  # Truncated JPEG.
  manual = dummy.write_archive(tmp_path / 'manual', files)
  (tmp_path / 'manifest.tsv').write_text(dummy_data_generation.manifest_text(files))
  with pytest.raises(errors.InvalidImageError, match=path):
    dummy.build('seed', tmp_path / 'data', manual_dir=manual,
                manifest_path=tmp_path / 'manifest.tsv')


def test_without_manual_archive_it_downloads_the_pinned_commit(dummy, tmp_path):
  empty_manual = tmp_path / 'manual'
  empty_manual.mkdir()
  with mock.patch.object(tfds.download.DownloadManager, 'download',
                         return_value=dummy.archive) as download:
    builder = dummy.build('seed', tmp_path / 'data', manual_dir=empty_manual)
  download.assert_called_once_with(
      'https://github.com/dakshtrehan/Covid-19-Detection/archive/'
      'a70eb2394d4b75ef6765aa79394e765ee6f9faf2.zip')
  assert builder.info.splits['train'].num_examples == 14


def test_bad_allow_missing_value_is_a_usage_error(tmp_path):
  with pytest.raises(errors.UsageError, match="allow_missing must be True or False, got 'yes'"):
    tfds.builder('covid_xray/seed/allow_missing=yes', data_dir=tmp_path)


def test_curated_missing_selected_image_fails_unless_allowed(dummy, tmp_path):
  manual = tmp_path / 'manual'
  shutil.copytree(dummy.dir, manual, ignore=shutil.ignore_patterns('*.zip', 'manifest.tsv'))
  (manual / 'covid-chestxray-dataset/images/c103.jpg').unlink()
  with pytest.raises(errors.DataError,
                     match='1 selected image.* missing .*covid-chestxray-dataset/images/c103.jpg'):
    dummy.build('curated', tmp_path / 'data', manual_dir=manual)
  builder = dummy.build('curated', tmp_path / 'data', manual_dir=manual, allow_missing=True)
  assert builder.info.metadata['missing_files'] == ['covid-chestxray-dataset/images/c103.jpg']
  labels = [e['label'] for s in builder.info.splits for e in _examples(builder, s)]
  assert sorted(labels) == [0, 0, 0, 1, 1, 1]  # 3 COVID-19 left, so 3 normals sampled.


def test_curated_without_raw_collections_names_the_layout(dummy, tmp_path):
  manual = dummy.write_archive(tmp_path / 'manual', dummy.members())  # Not the raw layout.
  with pytest.raises(errors.DataError, match='needs covid-chestxray-dataset/metadata.csv'):
    dummy.build('curated', tmp_path / 'data', manual_dir=manual)


def test_stored_image_is_the_one_decode_path_output(dummy, built_dummy):
  """What the dataset holds is exactly decode_for_dataset(source file): PNG is lossless."""
  builder = tfds.builder('covid_xray/seed', data_dir=built_dummy)
  files = dummy.members()
  for example in _examples(builder, 'validation'):
    name = example['image/filename'].decode()
    np.testing.assert_array_equal(example['image'],
                                  builder_lib.decode_for_dataset(files[name], name), err_msg=name)
