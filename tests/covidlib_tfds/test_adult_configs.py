"""Tests of the adult, adult_pediatric and other_findings configs on dummy data.

The manual dir is `dummy_data/shared/`, laid out as `../shared/data`; its prepared copies were
made from the originals in `dummy_data/github/` by the generator's own Pillow/numpy reference,
so the two-routes test compares two implementations of the preparation.

    pytest tests/covidlib_tfds/test_adult_configs.py -q
"""

import shutil
from unittest import mock
import zipfile

import numpy as np
import pytest
import tensorflow_datasets as tfds

from covidlib import errors
from covidlib_tfds import audit as audit_lib
from covidlib_tfds import originals
from covidlib_tfds.covid_xray import covid_xray_dataset_builder as builder_lib
from covidlib_tfds.covid_xray import dummy_data_generation as dummy_gen

_DUMMY = builder_lib._HERE / 'dummy_data'
_SHARED = _DUMMY / 'shared'
_CHILD = 'ieee8023_more/images/m-covid-child.png: COVID-19 patient 202 aged 15, under 18'
_NIH_URL = f'https://github.com/{dummy_gen.NIH_REPO}/archive/{dummy_gen.NIH_COMMIT}.zip'
_IEEE_URL = f'https://github.com/{dummy_gen.IEEE_REPO}/archive/{dummy_gen.IEEE_COMMIT}.zip'


class _DummyShared:
  """Mixin: build from dummy_data/shared with the dummy manifests (pytest does not collect it)."""
  DATASET_CLASS = builder_lib.Builder
  EXAMPLE_DIR = str(_SHARED)

  def _make_builder(self, config=None):
    return self.dataset_class(
        data_dir=self.tmp_dir, config=config, version=self.VERSION,
        manifest_path=_DUMMY / 'manifest.tsv',
        nih_manifest_path=_SHARED / 'nih_adult_normals' / 'manifest.tsv',
        ieee8023_more_manifest_path=_SHARED / 'ieee8023_more' / 'manifest.tsv')


class AdultTest(_DummyShared, tfds.testing.DatasetBuilderTestCase):
  BUILDER_CONFIG_NAMES_TO_TEST = ['adult']
  # COVID-19: 15 of the archive + 4 of ieee8023_more's 5 (one aged 15); normal: 6 NIH. 25 images.
  SPLITS = {'train': 15, 'validation': 5, 'test': 5}


class AdultPediatricTest(_DummyShared, tfds.testing.DatasetBuilderTestCase):
  BUILDER_CONFIG_NAMES_TO_TEST = ['adult_pediatric']
  SPLITS = {'train': 19, 'validation': 7, 'test': 7}  # adult + the archive's 8 Kaggle normals.


class OtherFindingsTest(_DummyShared, tfds.testing.DatasetBuilderTestCase):
  BUILDER_CONFIG_NAMES_TO_TEST = ['other_findings']
  # 6 other findings, less one shared patient, one shared series and one near-duplicate.
  SPLITS = {'test': 3}


def _examples(builder):
  """{file name: example} over every split, with the split added."""
  found = {}
  for split in builder.info.splits:
    for example in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)):
      found[example['image/filename'].decode()] = {**example, 'split': split}
  return found


def _offline_copy(dummy, tmp_path, *folders):
  """A manual dir holding only `folders` of dummy_data/shared (always covid_xray_seed/)."""
  manual = tmp_path / 'manual'
  for folder in ('covid_xray_seed',) + folders:
    shutil.copytree(dummy.shared / folder, manual / folder)
  return manual


def _download_from(dummy):
  """Patches DownloadManager.download to hand out the dummy GitHub archives by URL."""
  return mock.patch.object(tfds.download.DownloadManager, 'download',
                           side_effect=lambda url: dummy.github[url])


def test_adult_leaves_out_minors_and_lists_them(built_shared):
  builder = built_shared['adult']
  assert builder.info.metadata['excluded'] == [_CHILD]
  assert builder.info.metadata['missing_files'] == []
  assert 'ieee8023_more/images/m-covid-child.png' not in _examples(builder)
  pediatric = built_shared['adult_pediatric']
  assert pediatric.info.metadata['excluded'] == [_CHILD]


def test_adult_examples_carry_source_finding_age_view(built_shared):
  examples = _examples(built_shared['adult'])
  fields = ('label', 'source', 'patient_id', 'age', 'view', 'finding')
  got = {name: tuple(examples[name][f] for f in fields) for name in (
      'nih_adult_normals/images/00000001_000.png', 'ieee8023_more/images/m-covid-2.png',
      'ieee8023_more/images/m-covid-wide.png', 'CovidDataset/Train/Covid/4-x-day1.jpg',
      'CovidDataset/Train/Covid/AR-1.jpg')}
  assert got == {
      'nih_adult_normals/images/00000001_000.png': (0, b'nih', b'1', 45, b'PA', b'No Finding'),
      'ieee8023_more/images/m-covid-2.png': (1, b'ieee8023', b'201', 54, b'AP',
                                             b'COVID-19, ARDS'),
      'ieee8023_more/images/m-covid-wide.png': (1, b'ieee8023', b'203', -1, b'PA', b'COVID-19'),
      # ieee8023 metadata by file name; AR-1.jpg is not in it: finding COVID-19, age unknown.
      'CovidDataset/Train/Covid/4-x-day1.jpg': (1, b'ieee8023', b'186', 73, b'PA', b'COVID-19'),
      'CovidDataset/Train/Covid/AR-1.jpg': (1, b'ieee8023', b'', -1, b'', b'COVID-19'),
  }
  assert examples['ieee8023_more/images/m-covid-wide.png']['image'].shape == (12, 1024, 1)
  assert examples['nih_adult_normals/images/00000001_000.png']['image'].shape == (24, 20, 1)
  assert {e['source'] for e in examples.values()} == {b'ieee8023', b'nih'}
  pediatric = _examples(built_shared['adult_pediatric'])
  assert {e['source'] for e in pediatric.values()} == {b'ieee8023', b'nih', b'kaggle_pediatric'}
  normal = pediatric['CovidDataset/Train/Normal/IM-0156-0001.jpeg']
  assert (normal['label'], normal['finding']) == (0, b'No Finding')


@pytest.mark.parametrize('config', ['adult', 'adult_pediatric'])
def test_no_patient_or_near_duplicate_in_two_splits(built_shared, config):
  builder = built_shared[config]
  report = audit_lib.audit(builder)
  assert not report.leakage, report.format()
  # Patient 186 has COVID-19 films in the archive's Train and Val and in ieee8023_more: one group.
  examples = _examples(builder)
  splits = {examples[name]['split'] for name in (
      'CovidDataset/Train/Covid/4-x-day1.jpg', 'CovidDataset/Val/Covid/4-x-day13.jpg',
      'ieee8023_more/images/m-covid-186.png')}
  assert len(splits) == 1
  # Each file-name series of images without a patient id sits in one split too.
  assert builder.info.metadata['unknown_patient_series'] == dummy_gen.SERIES
  for key, files in dummy_gen.SERIES.items():
    assert len({examples[name]['split'] for name in files}) == 1, key
  assert sorted(s.key for s in report.series) == sorted(dummy_gen.SERIES)


def test_other_findings_label_0_and_no_overlap_with_adult_covid(built_shared):
  builder = built_shared['other_findings']
  assert list(builder.info.splits) == ['test']
  examples = _examples(builder)
  assert sorted(examples) == ['ieee8023_more/images/m-none.png', 'ieee8023_more/images/m-pcp.png',
                              'ieee8023_more/images/m-sars.png']
  assert {e['label'] for e in examples.values()} == {0}  # 0 = not COVID-19.
  assert {e['finding'] for e in examples.values()} == {b'No Finding', b'Pneumocystis', b'SARS'}
  excluded = builder.info.metadata['excluded']
  assert len(excluded) == 3
  # No patient id: its file-name series holds the archive's extubation COVID-19 films.
  assert excluded[0] == (
      'ieee8023_more/images/extubation-20.png: its series series:ieee8023:extubation (no patient '
      'id) also has COVID-19 image(s) in covid_xray/adult: '
      + ', '.join(dummy_gen.SERIES['series:ieee8023:extubation']))
  assert excluded[1].startswith('ieee8023_more/images/m-ards-186.png: patient 186 also has '
                                'COVID-19 image(s) in covid_xray/adult: ')
  assert excluded[2].startswith('ieee8023_more/images/m-strep-copy.png: near-duplicate (')
  assert excluded[2].endswith('of the COVID-19 image '
                              'CovidDataset/Train/Covid/F4341CE7-73C9-45C6-99C8-8567A5484B63.jpeg')
  adult = _examples(built_shared['adult'])
  covid_patients = {e['patient_id'] for e in adult.values() if e['label'] == 1 and e['patient_id']}
  assert not covid_patients & {e['patient_id'] for e in examples.values()}


def test_both_routes_give_identical_examples(dummy, tmp_path, built_shared):
  """Offline from the prepared copies == downloaded originals prepared by the builder."""
  manual = _offline_copy(dummy, tmp_path)  # The archive only: the rest is downloaded.
  with _download_from(dummy) as download:
    downloaded = {c: dummy.build(c, tmp_path / 'data', manual_dir=manual)
                  for c in ('adult', 'other_findings')}
  assert sorted(call.args[0] for call in download.call_args_list) == sorted(
      [_NIH_URL, _IEEE_URL, _IEEE_URL])
  for config, builder in downloaded.items():
    offline = _examples(built_shared[config])
    online = _examples(builder)
    assert sorted(online) == sorted(offline)
    for name, example in offline.items():
      for field, value in example.items():
        np.testing.assert_array_equal(online[name][field], value, err_msg=f'{name} {field}')
    assert builder.info.metadata['excluded'] == built_shared[config].info.metadata['excluded']


def test_prepared_copies_equal_the_reference_preparation(dummy):
  """originals.prepare_* (TF decoders) against the generator's Pillow/numpy reference."""
  nih, ieee = {}, {}
  for url, data in ((_NIH_URL, nih), (_IEEE_URL, ieee)):
    with zipfile.ZipFile(dummy.github[url]) as archive:
      for member in archive.namelist():
        if member.endswith(('.png', '.jpg', '.jpeg')):
          data[member] = archive.read(member)
    assert data, url
  for member, contents in nih.items():
    np.testing.assert_array_equal(originals.prepare_nih(contents, member)[..., 0],
                                  dummy_gen.prepare_nih(contents), err_msg=member)
  for member, contents in ieee.items():
    np.testing.assert_array_equal(originals.prepare_ieee8023(contents, member)[..., 0],
                                  dummy_gen.prepare_ieee8023(contents), err_msg=member)


def test_halve_rounds_half_up_and_refuses_odd_sides():
  image = np.array([[0, 1, 2, 2], [0, 1, 2, 3]], np.uint8)[..., None]
  np.testing.assert_array_equal(originals.halve(image, 'x.png')[..., 0], [[1, 2]])  # .5, 2.25
  with pytest.raises(errors.DataError, match='odd.png: 3 x 2 cannot be halved'):
    originals.halve(image[:, :3], 'odd.png')


def test_gray_on_black_composites_alpha(encode):
  rgba = np.zeros((2, 2, 4), np.uint8)
  rgba[..., :3] = 200
  rgba[..., 3] = [[255, 128], [0, 1]]
  gray = originals.gray_on_black(encode(rgba, 'PNG', 'RGBA'), 'a.png')[..., 0]
  np.testing.assert_array_equal(gray, [[200, 100], [0, 1]])  # round(200 * a / 255).


def test_changed_prepared_file_fails_naming_it(dummy, tmp_path):
  manual = _offline_copy(dummy, tmp_path, 'nih_adult_normals', 'ieee8023_more')
  path = manual / 'nih_adult_normals' / 'images' / '00000003_000.png'
  path.write_bytes(path.read_bytes() + b'\0')
  with pytest.raises(errors.DataError, match=r'nih_adult_normals/images/00000003_000.png: '
                                             r'differs from manifest.tsv \(sha256 [0-9a-f]{64}'):
    dummy.build('adult', tmp_path / 'data', manual_dir=manual)


def test_changed_original_fails_naming_it(dummy, tmp_path):
  files = {}
  with zipfile.ZipFile(dummy.github[_IEEE_URL]) as archive:
    for member in archive.namelist():
      if not member.endswith('/'):
        files[member.split('/', 1)[1]] = archive.read(member)
  files['images/m-sars.jpeg'] = files['images/m-sars.jpeg'][:-2] + b'\0\0'
  changed = tmp_path / dummy_gen.IEEE_ZIP
  root = f'covid-chestxray-dataset-{dummy_gen.IEEE_COMMIT}/'
  changed.write_bytes(dummy_gen.zip_bytes(files, root))
  manual = _offline_copy(dummy, tmp_path, 'nih_adult_normals')
  with mock.patch.object(tfds.download.DownloadManager, 'download', return_value=changed):
    with pytest.raises(errors.DataError, match='raiprabh/covid-chestxray-dataset:images/'
                                               'm-sars.jpeg: differs from manifest.tsv'):
      dummy.build('other_findings', tmp_path / 'data', manual_dir=manual)


def test_missing_prepared_file_fails_unless_allowed(dummy, tmp_path):
  manual = _offline_copy(dummy, tmp_path, 'nih_adult_normals', 'ieee8023_more')
  (manual / 'ieee8023_more' / 'images' / 'm-covid-1.png').unlink()
  with pytest.raises(errors.DataError, match='ieee8023_more/ lacks 1 image.* the manifest lists: '
                                             'ieee8023_more/images/m-covid-1.png'):
    dummy.build('adult', tmp_path / 'data', manual_dir=manual)
  builder = dummy.build('adult', tmp_path / 'data', manual_dir=manual, allow_missing=True)
  assert builder.info.metadata['missing_files'] == ['ieee8023_more/images/m-covid-1.png']
  assert sum(s.num_examples for s in builder.info.splits.values()) == 24


def test_failed_collection_download_says_how_to_work_offline(dummy, tmp_path):
  manual = _offline_copy(dummy, tmp_path, 'ieee8023_more')  # No nih_adult_normals/.
  with mock.patch.object(tfds.download.DownloadManager, 'download',
                         side_effect=ConnectionError('no network')):
    with pytest.raises(errors.DataError) as error:
      dummy.build('adult', tmp_path / 'data', manual_dir=manual)
  message = str(error.value)
  assert '\n' not in message
  assert message.startswith(f'cannot download {_NIH_URL} (ConnectionError: no network); '
                            'offline, pass as --manual_dir a folder holding nih_adult_normals/')


def test_seed_builds_from_the_folder_holding_every_source(dummy, tmp_path):
  """One --manual_dir for every config: seed finds its zip in covid_xray_seed/."""
  builder = dummy.build('seed', tmp_path / 'data', manual_dir=dummy.shared)
  assert {s: i.num_examples for s, i in builder.info.splits.items()} == {
      'train': 14, 'validation': 9}
  examples = _examples(builder)
  assert examples['CovidDataset/Train/Covid/4-x-day1.jpg']['finding'] == b'COVID-19'
  assert examples['CovidDataset/Train/Normal/IM-0156-0001.jpeg']['finding'] == b'No Finding'
  assert builder.info.metadata['excluded'] == []


def test_download_route_checks_the_prepared_size_against_the_manifest(dummy, tmp_path):
  lines = dummy.ieee8023_more_manifest.read_text().splitlines()
  header = lines[0].split('\t')
  width = header.index('width')
  for n, line in enumerate(lines):
    if line.startswith('images/m-sars.png\t'):
      cells = line.split('\t')
      cells[width] = '33'
      lines[n] = '\t'.join(cells)
  manifest = tmp_path / 'ieee8023_more.tsv'
  manifest.write_text('\n'.join(lines) + '\n')
  manual = _offline_copy(dummy, tmp_path)
  with _download_from(dummy):
    with pytest.raises(errors.DataError, match=(
        'raiprabh/covid-chestxray-dataset:images/m-sars.jpeg: prepared to 32 x 40, but '
        'ieee8023_more/images/m-sars.png is 33 x 40 in ieee8023_more.tsv')):
      dummy.build('other_findings', tmp_path / 'data', manual_dir=manual,
                  ieee8023_more_manifest_path=manifest)
