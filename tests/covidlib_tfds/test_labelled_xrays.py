"""Tests of labelled_xrays: a user's labelled DICOM/PNG folder becomes a TFDS dataset.

    .venv/bin/python -m pytest tests/covidlib_tfds/test_labelled_xrays.py -q

The folder (`_write_folder`) mixes DICOM (PatientID, ViewPosition, age and sex in the header;
12-bit MONOCHROME1 and 16-bit MONOCHROME2) and PNG (ids in the CSV) from 3 sites, with repeated
patients, a near-duplicate copy across patients, and one bad file or row of each kind. The
DICOM headers are full of distinctive identifying strings (`PHI`), which no output may hold:
`test_no_identifying_text_in_any_output` runs the binary as a process and searches every byte it
writes and prints. `DummyDataTest` runs TFDS's own builder checks on the shipped dummy_data/.
"""

import io
import json
import os
import re
import shutil
import subprocess
import sys

from absl.testing import flagsaver
import numpy as np
from PIL import Image
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
import pytest
import tensorflow_datasets as tfds

from covidlib import data
from covidlib import errors
from covidlib import evaluate
from covidlib import train
from covidlib_tfds import audit
from covidlib_tfds import build
from covidlib_tfds import cli
from covidlib_tfds import labels
from covidlib_tfds import privacy
from covidlib_tfds import splitting
from covidlib_tfds.labelled_xrays import labelled_xrays_dataset_builder as builder_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SALT = 'test-salt-QWZX-31337'
SIDE = 32
# Header text that must never reach an output (raw patient ids included).
PHI = ['Zebedee', 'Quixotica', '19230417', 'ACCZQ998877', 'Quimby Infirmary', 'Xylophon',
       'Rue Zorglub', 'PIDZQ', 'SQPAT']
# (site, raw patient id, label, number of images) of the DICOM patients; ids come from headers.
DICOM_PATIENTS = [('north', 'PIDZQ0001', 'covid', 2), ('north', 'PIDZQ0002', 'covid', 2),
                  ('north', 'PIDZQ0003', 'normal', 2), ('north', 'PIDZQ0004', 'normal', 2),
                  ('east', 'PIDZQ0005', 'covid', 2), ('east', 'PIDZQ0006', 'normal', 2)]
# PNG patients, ids in the CSV. 'PIDZQ0001' again at another site: another person.
PNG_PATIENTS = [('south', 'SQPAT1001', 'covid', 2), ('south', 'SQPAT1002', 'covid', 2),
                ('south', 'SQPAT1003', 'normal', 2), ('south', 'SQPAT1004', 'normal', 2),
                ('east', 'SQPAT2001', 'covid', 2), ('east', 'PIDZQ0001', 'normal', 2)]
BAD = {  # name -> what the reason says.
    'bad/truncated.png': 'not a decodable image',
    'bad/no_pixels.dcm': 'no pixel data',
    'bad/missing.png': 'no such file',
    'bad/unlabelled.png': 'unlabelled',
    'bad/maybe.png': "label 'perhaps' is not covid, normal, 1 or 0",
    'labels.csv line 33': 'leaves the CSV\'s folder',
}
# An image file in the folder that the CSV does not list: left out, counted (unlisted='skip'),
# or bad (unlisted='fail').
UNLISTED = {'bad/stray.png': 'does not list (unlabelled)'}


class DummyDataTest(tfds.testing.DatasetBuilderTestCase):
  """TFDS's own checks (registration, features, split sizes, no example in two splits, no local
  path in keys) on dummy_data/: 12 images of 6 patients, PNG and DICOM, 2 sites."""
  DATASET_CLASS = builder_lib.Builder
  BUILDER_CONFIG_NAMES_TO_TEST = [builder_lib.make_config('dummy')]
  SPLITS = {'train': 8, 'validation': 2, 'test': 2}  # 70/15/15 of 6 patients x 2 images.

  def _make_builder(self, config=None):
    config = config or self.BUILDER_CONFIG_NAMES_TO_TEST[0]  # There is no default config.
    return self.dataset_class(data_dir=self.tmp_dir, config=config, version=self.VERSION,
                              labels_csv=self.dummy_data / 'labels.csv', salt=SALT)


def _png(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, 'PNG')
  return buffer.getvalue()


def write_dicom(path, gray: np.ndarray | None, patient_id: str, *, mono1: bool = False,
                view: str = 'PA', age: str = '067Y', sex: str = 'F') -> None:
  """A DX file holding `gray` (12-bit MONOCHROME1 or 16-bit MONOCHROME2) and PHI in its header."""
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
  meta.MediaStorageSOPInstanceUID = generate_uid()
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds = Dataset()
  ds.file_meta = meta
  ds.SOPClassUID = SecondaryCaptureImageStorage
  ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
  ds.Modality = 'DX'
  ds.PatientID = patient_id
  ds.PatientName = 'Zebedee^Quixotica'
  ds.PatientBirthDate = '19230417'
  ds.AccessionNumber = 'ACCZQ998877'
  ds.InstitutionName = 'Saint Quimby Infirmary'
  ds.ReferringPhysicianName = 'Xylophon^Doctor'
  ds.PatientAddress = 'Rue Zorglub 7'
  ds.ViewPosition = view
  ds.PatientAge = age
  ds.PatientSex = sex
  if gray is not None:
    g16 = gray.astype(np.uint16)
    if mono1:
      ds.set_pixel_data(4095 - np.round(g16 * 4095.0 / 255).astype(np.uint16), 'MONOCHROME1', 12)
    else:
      ds.set_pixel_data(g16 * 257, 'MONOCHROME2', 16)
  ds.save_as(path, enforce_file_format=True)


def _write_folder(root) -> dict[str, np.ndarray]:
  """Writes the test folder and labels.csv; returns {path: gray pixels} of the good files."""
  rs = np.random.RandomState(0)
  root = str(root)
  good, lines = {}, ['path,label,patient_id,site,view,age,sex']

  def pixels():
    return rs.randint(0, 256, (SIDE, SIDE)).astype(np.uint8)

  for n, (site, patient, label, count) in enumerate(DICOM_PATIENTS):
    for k in range(count):
      path = f'{site}/dicom/img{n}{k}.dcm'
      os.makedirs(os.path.join(root, os.path.dirname(path)), exist_ok=True)
      good[path] = pixels()
      write_dicom(os.path.join(root, path), good[path], patient, mono1=k % 2 == 1)
      lines.append(f'{path},{label},,{site},,,')
  for n, (site, patient, label, count) in enumerate(PNG_PATIENTS):
    for k in range(count):
      path = f'{site}/png/img{n}{k}.png'
      os.makedirs(os.path.join(root, os.path.dirname(path)), exist_ok=True)
      good[path] = pixels()
      with open(os.path.join(root, path), 'wb') as f:
        f.write(_png(good[path]))
      lines.append(f'{path},{"1" if label == "covid" else "0"},{patient},{site},AP,45,M')
  # A copy of a south image, filed under another patient at another site: a near-duplicate.
  good['east/png/copy.png'] = good['south/png/img00.png']
  with open(os.path.join(root, 'east/png/copy.png'), 'wb') as f:
    f.write(_png(good['east/png/copy.png']))
  lines.append('east/png/copy.png,covid,SQPAT2999,east,AP,,')
  # One lateral view (kept unless frontal_only).
  good['north/dicom/lateral.dcm'] = pixels()
  write_dicom(os.path.join(root, 'north/dicom/lateral.dcm'), good['north/dicom/lateral.dcm'],
              'PIDZQ0001', view='LL')
  lines.append('north/dicom/lateral.dcm,covid,,north,,,')
  assert len(lines) == 27
  # The bad ones.
  os.makedirs(os.path.join(root, 'bad'))
  valid = _png(pixels())
  for name, contents in (('truncated.png', valid[:len(valid) // 2]), ('unlabelled.png', valid),
                         ('maybe.png', valid), ('stray.png', valid)):
    with open(os.path.join(root, 'bad', name), 'wb') as f:
      f.write(contents)
  write_dicom(os.path.join(root, 'bad/no_pixels.dcm'), None, 'PIDZQ0009')
  lines += ['bad/truncated.png,covid,SQPAT9001,south,,,',
            'bad/no_pixels.dcm,normal,,north,,,',
            'bad/missing.png,normal,SQPAT9002,south,,,',
            'bad/unlabelled.png,,SQPAT9003,south,,,',
            'bad/maybe.png,perhaps,SQPAT9004,south,,,']
  lines.append('../outside.png,covid,SQPAT9005,south,,,')  # Line 33.
  with open(os.path.join(root, 'labels.csv'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  return good


def _build(csv, data_dir, name='site', **kwargs) -> tfds.core.DatasetBuilder:
  kwargs.setdefault('salt', SALT)
  config = builder_lib.make_config(name, **{k: kwargs.pop(k) for k in list(kwargs)
                                            if k in ('val_fraction', 'test_fraction',
                                                     'frontal_only', 'hash_filenames')})
  builder = builder_lib.Builder(config=config, data_dir=data_dir, labels_csv=csv, **kwargs)
  builder.download_and_prepare()
  return builder


def _examples(builder) -> dict[str, list[dict]]:
  return {split: list(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)))
          for split in builder.info.splits}


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  root = tmp_path_factory.mktemp('export')
  return root, _write_folder(root)


@pytest.fixture(scope='module')
def built(folder, tmp_path_factory):
  root, _ = folder
  data_dir = tmp_path_factory.mktemp('tfds')
  _build(root / 'labels.csv', data_dir, skip_bad=True, val_fraction=0.2, test_fraction=0.2)
  return data_dir


def test_the_bad_line_number_is_right(folder):
  root, _ = folder
  lines = (root / 'labels.csv').read_text().splitlines()
  assert lines[32].startswith('../outside.png')  # 'labels.csv line 33' in BAD.


def _listing(message: str) -> str:
  """The file an error message says lists every bad file."""
  match = re.search(r'All of them are listed in (\S+bad_files\.txt)\.', message)
  assert match, message
  return match.group(1)


def test_build_fails_naming_every_bad_file(folder, tmp_path):
  root, _ = folder
  with pytest.raises(errors.DataError) as error:
    _build(root / 'labels.csv', tmp_path)
  message = str(error.value)
  assert message.startswith(f'{len(BAD)} bad file(s)')
  for name, reason in BAD.items():
    assert f'{name}: ' in message and reason in message, name
  assert 'stray.png' not in message  # Unlisted: left out, not bad (unlisted='skip').
  assert '--skip_bad' in message
  assert not list(tmp_path.rglob('*.tfrecord*'))
  listed = open(_listing(message), encoding='utf-8').read().splitlines()
  assert len(listed) == len(BAD)
  assert all(any(line.startswith(f'{n}: ') and r in line for line in listed)
             for n, r in BAD.items())
  # unlisted='fail' makes the unlisted file bad too (the behaviour before issue 16).
  with pytest.raises(errors.DataError) as error:
    _build(root / 'labels.csv', tmp_path, unlisted='fail')
  message = str(error.value)
  assert message.startswith(f'{len(BAD) + 1} bad file(s)')
  assert all(f'{n}: ' in message and r in message for n, r in {**BAD, **UNLISTED}.items())


def test_splits_hold_every_good_file_once_and_no_patient_twice(folder, built):
  _, good = folder
  builder = tfds.builder('labelled_xrays/site', data_dir=built)  # From disk: no CSV, no salt.
  assert builder.info.metadata['split_from'] == 'by_patient'
  examples = _examples(builder)
  assert set(examples) == {'train', 'validation', 'test'}
  assert all(examples.values())
  names = [e['image/filename'].decode() for split in examples.values() for e in split]
  assert sorted(names) == sorted(good)
  split_of = {}
  for split, items in examples.items():
    for e in items:
      split_of.setdefault((e['source'], e['patient_id']), set()).add(split)
  assert all(len(s) == 1 for s in split_of.values()), split_of
  # 13 patients: PIDZQ0001 at north and at east are two people. The copy's patient is grouped
  # with the patient of its original by the near-duplicate rule, so both sit in one split.
  assert len(split_of) == 13
  where = {e['image/filename'].decode(): s for s, items in examples.items() for e in items}
  assert where['east/png/copy.png'] == where['south/png/img00.png']


def test_examples_carry_pseudonyms_sites_and_dicom_header_fields(folder, built):
  _, good = folder
  examples = {e['image/filename'].decode(): e
              for items in _examples(tfds.builder('labelled_xrays/site', data_dir=built)).values()
              for e in items}
  dcm, mono1 = examples['north/dicom/img00.dcm'], examples['north/dicom/img01.dcm']
  assert dcm['patient_id'] == mono1['patient_id'] == privacy.pseudonym(
      SALT, 'north', 'PIDZQ0001').encode()
  assert len(dcm['patient_id']) == 16
  assert (dcm['label'], dcm['source'], dcm['view'], dcm['age'], dcm['sex'], dcm['finding']) == (
      1, b'north', b'PA', 67, b'F', b'')
  # 12-bit MONOCHROME1 and 16-bit MONOCHROME2 both display as the original 8-bit pixels.
  np.testing.assert_array_equal(dcm['image'][..., 0], good['north/dicom/img00.dcm'])
  np.testing.assert_array_equal(mono1['image'][..., 0], good['north/dicom/img01.dcm'])
  png = examples['south/png/img00.png']
  assert (png['label'], png['source'], png['view'], png['age'], png['sex']) == (
      1, b'south', b'AP', 45, b'M')
  assert png['patient_id'] == privacy.pseudonym(SALT, 'south', 'SQPAT1001').encode()
  same_id_other_site = examples['east/png/img50.png']
  assert same_id_other_site['label'] == 0
  assert same_id_other_site['patient_id'] != dcm['patient_id']
  np.testing.assert_array_equal(png['image'][..., 0], good['south/png/img00.png'])


def test_bad_files_are_recorded_by_name(built):
  builder = tfds.builder('labelled_xrays/site', data_dir=built)
  recorded = builder.info.metadata['bad_files']
  assert len(recorded) == len(BAD)
  for name, reason in BAD.items():
    assert any(r.startswith(f'{name}: ') and reason in r for r in recorded), name
  assert builder.info.metadata['unlisted_files'] == 1
  assert builder.info.metadata['unlisted_first'] == list(UNLISTED)
  assert builder.info.metadata['class_names'] == ['normal', 'covid']
  assert builder.info.metadata['excluded_files'] == []
  assert builder.info.metadata['images_without_patient_id'] == 0


def test_loads_through_covidlib_and_audits_clean(built):
  ds = data.load_tfds('labelled_xrays/site', 'train', data_dir=built, image_size=16,
                      batch_size=4, with_metadata=True)
  images, labels_, metadata = next(iter(ds))
  assert images.shape[1:] == (16, 16, 1) and labels_.shape[0] == images.shape[0]
  assert set(metadata['source'].numpy()) <= {b'north', b'south', b'east'}
  assert sum(data.class_counts('labelled_xrays/site', s, built)[1]
             for s in ('train', 'validation', 'test')) == 14
  report = audit.audit('labelled_xrays/site', data_dir=built)
  assert not report.leakage, report.format()


def test_not_built_says_how_to_build(tmp_path):
  with pytest.raises(errors.DataError, match='not built .* --labels_csv=<your labels CSV> '
                                             '--name=nowhere'):
    data.num_examples('labelled_xrays/nowhere', 'train', tmp_path)
  with pytest.raises(errors.UsageError, match='not built .* --labels_csv=... --name=nowhere'):
    audit.audit('labelled_xrays/nowhere', data_dir=tmp_path)


def test_frontal_only_leaves_out_the_lateral_view_and_lists_it(folder, tmp_path):
  root, _ = folder
  # The TFDS way: builder arguments to tfds.builder.
  builder = tfds.builder('labelled_xrays/frontal', data_dir=tmp_path,
                         labels_csv=root / 'labels.csv', salt=SALT, skip_bad=True,
                         frontal_only=True, val_fraction=0.2, test_fraction=0.2)
  builder.download_and_prepare()
  assert builder.info.metadata['excluded_files'] == ['north/dicom/lateral.dcm: view LL']
  assert sum(s.num_examples for s in builder.info.splits.values()) == len(folder[1]) - 1


@pytest.mark.slow
def test_no_identifying_text_in_any_output(folder, tmp_path):
  """The privacy check: the CLI as a process; every byte it writes or prints is searched."""
  root, _ = folder
  data_dir = tmp_path / 'tfds'
  env = dict(os.environ, COVIDLIB_SALT=SALT, TF_CPP_MIN_LOG_LEVEL='0')
  result = subprocess.run(
      [sys.executable, '-m', 'covidlib_tfds.build', f'--labels_csv={root / "labels.csv"}',
       '--name=private', f'--data_dir={data_dir}', '--skip_bad', '--val_fraction=0.2',
       '--test_fraction=0.2'],
      cwd=REPO, env=env, capture_output=True, timeout=300)
  assert result.returncode == 0, result.stderr.decode()[-3000:]
  assert b'bad files left out (--skip_bad): 6' in result.stdout
  assert b'unlisted image files left out: 1' in result.stdout
  outputs = {'stdout': result.stdout, 'stderr': result.stderr}
  for path in data_dir.rglob('*'):
    if path.is_file():
      outputs[str(path)] = path.read_bytes()
  assert any(p.endswith('.tfrecord-00000-of-00001') for p in outputs)
  assert any(p.endswith('dataset_info.json') for p in outputs)
  secrets = PHI + [SALT] + [p for _, p, _, _ in DICOM_PATIENTS + PNG_PATIENTS]
  for where, contents in outputs.items():
    lowered = contents.lower()
    for secret in secrets:
      assert secret.lower().encode() not in lowered, (secret, where)
  # The search does find what is stored: site names and pseudonyms.
  records = b''.join(c for p, c in outputs.items() if '.tfrecord' in p)
  assert b'north' in records
  assert privacy.pseudonym(SALT, 'north', 'PIDZQ0001').encode() in records


def test_a_path_naming_the_patient_fails_unless_file_names_are_hashed(tmp_path):
  rs = np.random.RandomState(1)
  root = tmp_path / 'export'
  os.makedirs(root / 'PIDZQ0042')
  os.makedirs(root / 'other')
  rows = ['path,label,site,split']
  for k, split in enumerate(['train', 'train', 'validation', 'test']):
    write_dicom(root / 'PIDZQ0042' / f'{k}.dcm', rs.randint(0, 256, (SIDE, SIDE)), 'PIDZQ0042')
    rows.append(f'PIDZQ0042/{k}.dcm,covid,a,{split}')
  # A patient name in the path is caught too (the header's PatientName is Zebedee^Quixotica).
  write_dicom(root / 'other' / 'zebedee.dcm', rs.randint(0, 256, (SIDE, SIDE)), 'PIDZQ0043')
  rows.append('other/zebedee.dcm,normal,a,train')
  (root / 'labels.csv').write_text('\n'.join(rows) + '\n')
  (root / 'PIDZQ0042' / 'stray.png').write_bytes(_png(np.zeros((SIDE, SIDE), np.uint8)))
  with pytest.raises(errors.DataError, match=r'5 file path\(s\) show the patient.s id or name.*'
                                             r'labels.csv line\(s\) 2, 3, 4, 5, 6\. .*'
                                             r'--hash_filenames'):
    _build(root / 'labels.csv', tmp_path / 'a')
  builder = _build(root / 'labels.csv', tmp_path / 'b', hash_filenames=True, skip_bad=True)
  assert builder.info.metadata['split_from'] == 'csv'
  assert builder.info.metadata['bad_files'] == []
  # The unlisted file is named by its hashed name.
  assert builder.info.metadata['unlisted_first'] == [
      privacy.hashed_filename(SALT, 'PIDZQ0042/stray.png')]
  assert {s: i.num_examples for s, i in builder.info.splits.items()} == {
      'train': 3, 'validation': 1, 'test': 1}
  # The CSV's split puts patient PIDZQ0042 on three sides: kept, and counted.
  assert builder.info.metadata['patients_in_two_splits'] == 1
  names = [e['image/filename'].decode() for items in _examples(builder).values() for e in items]
  assert all(n.startswith('file-') and n.endswith('.dcm') and len(n) == 25 for n in names)
  for path in (tmp_path / 'b').rglob('*'):
    if path.is_file():
      assert b'pidzq' not in path.read_bytes().lower() and b'zebedee' not in \
          path.read_bytes().lower(), path


@pytest.mark.parametrize('kwargs, message', [
    ({'salt': ''}, 'a salt is required'),
    ({'salt': 'short'}, 'at least 8 characters'),
    ({'val_fraction': 0.5, 'test_fraction': 0.5}, 'must be below 1'),
    ({'test_fraction': -0.1}, r'test_fraction must be a number in \[0, 1\)'),
    ({'name': 'a/b'}, "dataset name 'a/b'"),
])
def test_usage_errors(folder, tmp_path, monkeypatch, kwargs, message):
  monkeypatch.delenv(privacy.SALT_ENV, raising=False)
  root, _ = folder
  with pytest.raises(errors.UsageError, match=message):
    _build(root / 'labels.csv', tmp_path, **kwargs)


def test_salt_from_the_environment(monkeypatch):
  monkeypatch.setenv(privacy.SALT_ENV, 'from-the-environment')
  assert privacy.resolve_salt(None) == 'from-the-environment'
  assert privacy.resolve_salt('given-on-the-command-line') == 'given-on-the-command-line'


def test_labels_csv_rules(tmp_path):
  csv = tmp_path / 'labels.csv'
  csv.write_text('\ufeffPath,LABEL,Split,Age,notes\n'
                 'a\\b.png,Covid,TRAIN,45.0,x\n'
                 'c.png,0,test,,\n'
                 'd.png,normal,holdout,,\n'
                 'e.png,normal,train,old,\n'
                 'f.png,covid,train,,\n'
                 './f.png,normal,train,,\n'
                 '/abs.png,covid,train,,\n'
                 '\n')
  rows, bad, columns = labels.read_labels(csv)
  assert columns == ['path', 'label', 'age', 'split']
  assert [(r.path, r.label, r.split, r.age, r.line) for r in rows] == [
      ('a/b.png', 'Covid', 'train', 45, 2), ('c.png', '0', 'test', -1, 3)]  # Labels as written.
  classes, rows, other = labels.resolve_classes(rows)
  assert classes == ('normal', 'covid') and other == []
  assert [r.label for r in rows] == ['covid', 'normal']
  assert [str(b) for b in bad] == [
      "d.png: split 'holdout' is not one of train, validation, test (labels.csv line 4)",
      "e.png: age 'old' is not a whole number of years (labels.csv line 5)",
      'f.png: listed twice in labels.csv (lines 6 and 7); neither copy is used',
      "labels.csv line 8: path '/abs.png' is absolute or leaves the CSV's folder; paths must "
      'be relative to it']
  csv.write_text('file,label\na.png,covid\n')
  with pytest.raises(errors.DataError, match='labels.csv: the header must have the columns '
                                             'path and label .* it lacks path'):
    labels.read_labels(csv)
  with pytest.raises(errors.UsageError, match='does not exist'):
    labels.read_labels(tmp_path / 'none.csv')


@pytest.mark.parametrize('path, identifiers, expected', [
    ('PIDZQ0042/1.dcm', ['PIDZQ0042'], True),
    ('scans/x_pidzq0042.png', ['PIDZQ0042'], True),  # Long ids match inside a token.
    ('doe_john/1.dcm', ['', 'DOE', 'JOHN'], True),
    ('doeble/1.dcm', ['DOE'], False),  # Short ids must be a whole token.
    ('img12.png', ['12'], False),
    ('a/b.png', [''], False),
])
def test_reveals(path, identifiers, expected):
  assert privacy.reveals(path, identifiers) == expected


def _run_build(*args: str) -> int:
  """`python -m covidlib_tfds.build args`, in-process, flags restored after (as test_audit)."""
  saved = flagsaver.save_flag_values(build.FLAGS)
  try:
    argv = cli.parse_flags(['covidlib_tfds.build', *args], build.FLAGS, 'covidlib_tfds.build',
                           'doc')
    return build.main(argv)
  finally:
    flagsaver.restore_flag_values(saved, build.FLAGS)


def _error_lines(text: str) -> list[str]:
  return [line for line in text.splitlines() if 'error:' in line]


def test_binary_errors_are_one_line(folder, tmp_path, monkeypatch, capsys):
  root, _ = folder
  csv = f'--labels_csv={root / "labels.csv"}'
  monkeypatch.delenv(privacy.SALT_ENV, raising=False)
  assert _run_build(csv, f'--data_dir={tmp_path}') == 2
  assert _error_lines(capsys.readouterr().err) == [
      'covidlib_tfds.build: error: --labels_csv needs --name (the dataset becomes '
      'labelled_xrays/NAME)']
  assert _run_build('--name=x', f'--data_dir={tmp_path}') == 2  # Not a covid_xray build.
  assert _error_lines(capsys.readouterr().err) == [
      'covidlib_tfds.build: error: --name needs --labels_csv']
  assert _run_build(csv, '--config=seed', '--name=x', f'--data_dir={tmp_path}') == 2
  assert _error_lines(capsys.readouterr().err) == [
      'covidlib_tfds.build: error: --config does not go with --labels_csv']
  assert _run_build(csv, '--name=x', f'--data_dir={tmp_path}') == 2
  assert _error_lines(capsys.readouterr().err)[0].startswith(
      'covidlib_tfds.build: error: a salt is required')
  monkeypatch.setenv(privacy.SALT_ENV, SALT)
  assert _run_build(csv, '--name=x', f'--data_dir={tmp_path}') == 1
  lines = _error_lines(capsys.readouterr().err)
  assert len(lines) == 1 and lines[0].startswith('covidlib_tfds.build: error: 6 bad file(s)')
  assert all(name in lines[0] for name in BAD)
  assert _run_build(csv, '--name=x', f'--data_dir={tmp_path}', '--unlisted=fail') == 1
  lines = _error_lines(capsys.readouterr().err)
  assert len(lines) == 1 and lines[0].startswith('covidlib_tfds.build: error: 7 bad file(s)')
  with pytest.raises(SystemExit) as exit_:  # A bad flag value: absl's one line, exit 2.
    _run_build(csv, '--name=x', f'--data_dir={tmp_path}', '--unlisted=maybe')
  assert exit_.value.code == 2
  assert _error_lines(capsys.readouterr().err)[0].startswith(
      'covidlib_tfds.build: error: flag --unlisted=maybe')


@pytest.mark.slow
def test_train_and_evaluate_by_site(built, tmp_path):
  """covidlib-train's and covidlib-evaluate's library calls on labelled_xrays/NAME."""
  model_dir = str(tmp_path / 'run')
  config = train.make_config(model='seed_cnn', dataset='labelled_xrays/site', data_dir=str(built),
                             image_size=32, batch_size=4, epochs=1, seed=0)
  history = train.train(config, model_dir, verbose=0)
  assert len(history['loss']) == 1 and np.isfinite(history['loss'][0])
  result = evaluate.evaluate_model_dir(model_dir, split='train', n_bootstrap=20, gradcam=False,
                                       batch_size=8)
  by_site = result.report['groups']['source']
  assert set(by_site) == {'north', 'south', 'east'}


def _small_folder(root, labels_=('covid', 'normal'), patients: int = 10, per_patient: int = 1,
                  unlisted: int = 0, truncated: int = 0) -> str:
  """A folder of distinct random PNGs, `labels_` taking turns by patient; returns the CSV path.

  `unlisted` more PNGs are written but not listed; `truncated` listed PNGs are cut in half.
  """
  rs = np.random.RandomState(2)
  os.makedirs(root, exist_ok=True)
  lines = ['path,label,patient_id']
  for p in range(patients):
    for k in range(per_patient):
      name = f'img{p:03d}_{k}.png'  # Not the patient id (the path would show it).
      (root / name).write_bytes(_png(rs.randint(0, 256, (SIDE, SIDE)).astype(np.uint8)))
      lines.append(f'{name},{labels_[p % len(labels_)]},P{p:03d}')
  for n in range(truncated):
    valid = _png(rs.randint(0, 256, (SIDE, SIDE)).astype(np.uint8))
    (root / f'cut{n:02d}.png').write_bytes(valid[:len(valid) // 2])
    lines.append(f'cut{n:02d}.png,{labels_[0]},C{n:02d}')
  for n in range(unlisted):
    (root / f'extra{n:02d}.png').write_bytes(_png(rs.randint(0, 256, (SIDE, SIDE)).astype(
        np.uint8)))
  (root / 'labels.csv').write_text('\n'.join(lines) + '\n')
  return root / 'labels.csv'


def test_unlisted_files_are_left_out_counted_and_the_first_named(tmp_path, caplog):
  csv = _small_folder(tmp_path / 'export', unlisted=12)
  with caplog.at_level('WARNING'):
    builder = _build(csv, tmp_path / 'tfds', val_fraction=0.2, test_fraction=0.2)
  assert sum(s.num_examples for s in builder.info.splits.values()) == 10
  assert builder.info.metadata['unlisted_files'] == 12
  assert builder.info.metadata['unlisted_first'] == [f'extra{n:02d}.png' for n in range(10)]
  assert builder.info.metadata['bad_files'] == []
  [line] = [r.getMessage() for r in caplog.records if 'not listed' in r.getMessage()]
  assert line.startswith('12 image file(s) in the folder of labels.csv are not listed')
  assert 'extra04.png' in line and 'extra05.png' not in line  # The first 5 named.


def test_many_bad_files_give_a_count_the_first_20_and_a_file_with_all(tmp_path):
  csv = _small_folder(tmp_path / 'export', truncated=25, unlisted=3)
  with pytest.raises(errors.DataError) as error:
    _build(csv, tmp_path / 'tfds')
  message = str(error.value)
  assert '\n' not in message
  assert message.startswith('25 bad file(s) (of 35 in labels.csv): cut00.png: not a decodable')
  assert 'cut19.png: ' in message and 'cut20.png' not in message
  assert '(the first 20 shown)' in message and 'extra' not in message
  path = _listing(message)
  assert not os.path.exists(path + '.partial')
  assert oct(os.stat(os.path.dirname(path)).st_mode & 0o777) == '0o700'
  listed = open(path, encoding='utf-8').read().splitlines()
  assert [line.split(':')[0] for line in listed] == [f'cut{n:02d}.png' for n in range(25)]


def test_a_build_is_reused_only_for_the_same_inputs(tmp_path):
  csv = _small_folder(tmp_path / 'export')
  data_dir = tmp_path / 'tfds'
  first = _build(csv, data_dir, val_fraction=0.2, test_fraction=0.2)
  record = first.info.metadata['inputs']
  assert SALT not in str(record) and 'img000' not in str(record)
  assert record['files'] == 10
  tfrecords = sorted(data_dir.rglob('*.tfrecord*'))
  stamps = [p.stat().st_mtime_ns for p in tfrecords]
  # The same inputs: reused, not rebuilt.
  _build(csv, data_dir, val_fraction=0.2, test_fraction=0.2)
  assert [p.stat().st_mtime_ns for p in tfrecords] == stamps

  def refused(match, **kwargs):
    kwargs = {'val_fraction': 0.2, 'test_fraction': 0.2, **kwargs}
    with pytest.raises(errors.UsageError, match=match) as error:
      _build(csv, data_dir, **kwargs)
    message = str(error.value)
    assert '\n' not in message and '--overwrite' in message and 'new --name' in message
    assert message.startswith(f'labelled_xrays/site is already built in {data_dir} from other '
                              'inputs')

  refused(r'changed: the salt\)', salt=SALT + '-other')
  refused(r"changed: val_fraction 0.2 -> 0.3\)", val_fraction=0.3)
  refused(r"changed: unlisted 'skip' -> 'fail'\)", unlisted='fail')
  (csv.parent / 'new.png').write_bytes(_png(np.zeros((SIDE, SIDE), np.uint8)))
  refused(r'changed: the files in its folder\)')
  (csv.parent / 'new.png').unlink()
  _build(csv, data_dir, val_fraction=0.2, test_fraction=0.2)  # As before again: reused.
  csv.write_text(csv.read_text().replace('img000_0.png,covid', 'img000_0.png,normal'))
  refused(r'changed: the labels CSV\)')
  # --overwrite rebuilds and records the new inputs.
  rebuilt = builder_lib.Builder(config=builder_lib.make_config('site', val_fraction=0.2,
                                                               test_fraction=0.2),
                                data_dir=data_dir, labels_csv=csv, salt=SALT)
  rebuilt.download_and_prepare(download_config=tfds.download.DownloadConfig(
      download_mode=tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS))
  new_record = tfds.builder('labelled_xrays/site', data_dir=data_dir).info.metadata['inputs']
  assert new_record['labels_csv_sha256'] != record['labels_csv_sha256']
  assert new_record['files_sha256'] == record['files_sha256']
  _build(csv, data_dir, val_fraction=0.2, test_fraction=0.2)  # Reused.


def test_a_stale_build_fails_in_the_binary_in_one_line(tmp_path, monkeypatch, capsys):
  csv = _small_folder(tmp_path / 'export')
  monkeypatch.setenv(privacy.SALT_ENV, SALT)
  args = (f'--labels_csv={csv}', '--name=mine', f'--data_dir={tmp_path / "tfds"}')
  assert _run_build(*args) == 0
  assert _run_build(*args) == 0  # Reused.
  assert _run_build(*args, '--test_fraction=0.3') == 2
  [line] = _error_lines(capsys.readouterr().err)
  assert line.startswith('covidlib_tfds.build: error: labelled_xrays/mine is already built')
  assert 'test_fraction 0.15 -> 0.3' in line and '--overwrite' in line
  assert _run_build(*args, '--test_fraction=0.3', '--overwrite') == 0


def test_own_class_names_need_positive(tmp_path, capsys, monkeypatch):
  csv = _small_folder(tmp_path / 'export', labels_=('Pneumonia', 'normal'))
  with pytest.raises(errors.UsageError,
                     match=r"labels its rows 'normal' \(5 rows\), 'Pneumonia' \(5 rows\), not "
                           r'covid and normal: .* --positive=NAME'):
    _build(csv, tmp_path / 'a')
  with pytest.raises(errors.UsageError, match=r"--positive=flu: no row of labels.csv has that "
                                              r"label; its labels are 'normal' \(5 rows\), "
                                              r"'Pneumonia'"):
    _build(csv, tmp_path / 'a', positive='flu')
  builder = _build(csv, tmp_path / 'b', positive='pneumonia', val_fraction=0.2,
                   test_fraction=0.2)
  assert builder.info.metadata['class_names'] == ['normal', 'Pneumonia']
  assert data.class_names('labelled_xrays/site', tmp_path / 'b') == ('normal', 'Pneumonia')
  label_of = {e['image/filename'].decode(): e['label']
              for items in _examples(builder).values() for e in items}
  # Patients 0, 2, 4... are Pneumonia: label 1; the others normal: 0.
  assert label_of == {f'img{p:03d}_0.png': int(p % 2 == 0) for p in range(10)}
  # The other class as positive flips the labels.
  flipped = _build(csv, tmp_path / 'c', positive='NORMAL', val_fraction=0.2, test_fraction=0.2)
  assert flipped.info.metadata['class_names'] == ['Pneumonia', 'normal']
  # Through the binary.
  monkeypatch.setenv(privacy.SALT_ENV, SALT)
  assert _run_build(f'--labels_csv={csv}', '--name=pn', f'--data_dir={tmp_path / "d"}',
                    '--positive=pneumonia') == 0
  assert 'classes: normal (label 0), Pneumonia (label 1)' in capsys.readouterr().out


def test_more_than_two_class_names_is_an_error_naming_them(tmp_path):
  csv = _small_folder(tmp_path / 'export', labels_=('pneumonia', 'normal', 'effusion'))
  with pytest.raises(errors.DataError,
                     match=r"labels.csv has 3 label names, 'pneumonia' \(4 rows\), "
                           r"'effusion' \(3 rows\), 'normal' \(3 rows\); labelled_xrays takes two"):
    _build(csv, tmp_path / 'a', positive='pneumonia')
  with pytest.raises(errors.UsageError, match='--positive=NAME .*; labelled_xrays takes two'):
    _build(csv, tmp_path / 'a')



def test_class_names_of_a_dataset_without_them_are_the_default(built, tmp_path):
  assert data.class_names('labelled_xrays/site', built) == ('normal', 'covid')  # Recorded.
  # A build without the record (as before issue 16): the default, CLASS_NAMES.
  shutil.copytree(built, tmp_path / 'old')
  [metadata] = (tmp_path / 'old').rglob('labelled_xrays/site/*/metadata.json')
  record = json.loads(metadata.read_text())
  del record['class_names']
  metadata.write_text(json.dumps(record))
  assert data.class_names('labelled_xrays/site', tmp_path / 'old') == data.CLASS_NAMES


def test_own_class_names_reach_the_model_dir_report_and_predictions(tmp_path):
  """normal / Pneumonia from the CSV: config.json, report.json/md and covidlib.predict use them."""
  from covidlib import model_dir as md
  from covidlib import predict
  from covidlib import report

  csv = _small_folder(tmp_path / 'export', labels_=('Pneumonia', 'normal'), patients=16)
  _build(csv, tmp_path / 'tfds', positive='pneumonia', val_fraction=0.25, test_fraction=0.25)
  model_dir = str(tmp_path / 'run')
  config = train.make_config(model='seed_cnn', dataset='labelled_xrays/site',
                             data_dir=str(tmp_path / 'tfds'), image_size=32, batch_size=4,
                             epochs=1, seed=0)
  train.train(config, model_dir, verbose=0)
  assert md.load_config(model_dir)['class_names'] == ['normal', 'Pneumonia']
  result = evaluate.evaluate_model_dir(model_dir, split='test', n_bootstrap=0, gradcam=False,
                                       batch_size=4)
  assert result.report['class_names'] == ['normal', 'Pneumonia']
  report.write_report(str(tmp_path / 'eval'), result, plots=False)
  text = (tmp_path / 'eval' / 'report.md').read_text()
  assert 'Sensitivity (Pneumonia recall)' in text and 'Sensitivity (COVID-19' not in text
  image = str(tmp_path / 'export' / 'img000_0.png')
  (got,) = predict.Predictor(model_dir).predict_files([image])
  assert got.class_name == ('normal', 'Pneumonia')[got.label]
  with pytest.raises(errors.UsageError, match='class_names'):
    train.make_config(class_names=['same', 'same'])


# Images without a patient id (none in the CSV, PNGs so none in a header), named as in the
# article's archive: file-name series (splitting.series_key, the folder kept).
_HASH = '88de9d8c39e946abd495b37cd07d89e5'
SERIES = {
    'series:north:scans/extubation': ['scans/extubation-1.png', 'scans/extubation-13.png',
                                      'scans/extubation-4.png', 'scans/extubation-8.png'],
    f'series:north:uploads/{_HASH}': [f'uploads/{_HASH}-2ee6-0.png', f'uploads/{_HASH}-6531-0.png'],
}
# Also without a patient id, each alone in its series: another upload, and a name of the
# extubation series in another folder.
ALONE = ['uploads/ae6c954c0039de4b5edee53865ffee43-e6c8-0.png', 'other/extubation-2.png']


def _series_folder(root, split_column: bool = False) -> str:
  """SERIES and ALONE, covid, plus 16 one-image patients with ids (normal and covid); CSV path.

  With split_column, the CSV gives the split and puts extubation-8 in test, the rest of the
  series in train.
  """
  rs = np.random.RandomState(3)
  os.makedirs(root, exist_ok=True)
  lines = ['path,label,patient_id,site' + (',split' if split_column else '')]
  splits = ['train'] * 10 + ['validation'] * 3 + ['test'] * 3

  def add(path, label, patient, split):
    os.makedirs(os.path.dirname(root / path), exist_ok=True)
    (root / path).write_bytes(_png(rs.randint(0, 256, (SIDE, SIDE)).astype(np.uint8)))
    lines.append(f'{path},{label},{patient},north' + (f',{split}' if split_column else ''))

  for path in sorted(p for files in SERIES.values() for p in files) + ALONE:
    add(path, 'covid', '', 'test' if path.endswith('extubation-8.png') else 'train')
  for p in range(16):
    add(f'patients/img{p:02d}.png', ('normal', 'covid')[p % 3 == 0], f'P{p:02d}', splits[p])
  (root / 'labels.csv').write_text('\n'.join(lines) + '\n')
  return root / 'labels.csv'


def _split_of(builder) -> dict[str, str]:
  return {e['image/filename'].decode(): split
          for split, items in _examples(builder).items() for e in items}


def test_a_series_without_patient_id_is_split_as_one_group(tmp_path):
  csv = _series_folder(tmp_path / 'export')
  builder = _build(csv, tmp_path / 'tfds', val_fraction=0.25, test_fraction=0.25)
  assert builder.info.metadata['images_without_patient_id'] == 8
  assert builder.info.metadata['unknown_patient_series'] == SERIES
  split_of = _split_of(builder)
  for key, files in SERIES.items():
    assert len({split_of[f] for f in files}) == 1, (key, {f: split_of[f] for f in files})
  report = audit.audit('labelled_xrays/site', data_dir=tmp_path / 'tfds')
  assert {s.key: sorted(f for fs in s.files.values() for f in fs) for s in report.series} == SERIES
  assert sorted(report.alone) == sorted(ALONE)
  assert not report.leakage, report.format()


def test_without_the_series_rule_the_audit_names_the_series_on_two_sides(tmp_path, monkeypatch):
  monkeypatch.setattr(splitting, 'GROUP_SERIES', False)
  csv = _series_folder(tmp_path / 'export')
  builder = _build(csv, tmp_path / 'tfds', val_fraction=0.25, test_fraction=0.25)
  assert builder.info.metadata['unknown_patient_series'] == SERIES  # Recorded all the same.
  report = audit.audit('labelled_xrays/site', data_dir=tmp_path / 'tfds')
  assert [s.key for s in report.split_series] == sorted(SERIES)
  assert report.leakage and not report.shared_patients and not report.near_duplicates
  assert 'Series in more than one split: 2\n  series:north:scans/extubation -> ' in \
      report.format()


def test_series_of_hashed_file_names_are_hashed_and_still_audited(tmp_path):
  csv = _series_folder(tmp_path / 'export')
  builder = _build(csv, tmp_path / 'tfds', val_fraction=0.25, test_fraction=0.25,
                   hash_filenames=True)
  record = builder.info.metadata['unknown_patient_series']
  hashed = {f'series:north:{privacy.hashed_series(SALT, "north", key.split(":", 2)[2])}':
            sorted(privacy.hashed_filename(SALT, f) for f in files)
            for key, files in SERIES.items()}
  assert record == hashed
  assert 'extubation' not in json.dumps(record) and _HASH not in json.dumps(record)
  report = audit.audit('labelled_xrays/site', data_dir=tmp_path / 'tfds')
  assert sorted(s.key for s in report.series) == sorted(hashed)
  assert report.split_series == [] and not report.leakage


def test_a_csv_split_that_puts_a_series_on_two_sides_is_counted_and_audited(tmp_path):
  csv = _series_folder(tmp_path / 'export', split_column=True)
  builder = _build(csv, tmp_path / 'tfds')
  assert builder.info.metadata['split_from'] == 'csv'
  assert builder.info.metadata['series_in_two_splits'] == 1
  assert builder.info.metadata['patients_in_two_splits'] == 0
  report = audit.audit('labelled_xrays/site', data_dir=tmp_path / 'tfds')
  assert {s.key: s.files for s in report.split_series} == {'series:north:scans/extubation': {
      'train': SERIES['series:north:scans/extubation'][:3], 'test': ['scans/extubation-8.png']}}
