"""labelled_xrays on Apache Beam: the same dataset as the streaming build, example for example.

    .venv/bin/python -m pytest tests/covidlib_tfds/test_labelled_xrays_beam.py -q

The folder mixes DICOM (patient ids in the header only), PNG with ids in the CSV, images with no
patient id at all (one file-name series: anon/extubation-1.png, -2, -13), a near-duplicate, bad
files and an unlisted one. Each Beam build runs on the DirectRunner in this process (in_memory:
fast, and what runs on the workers is the same code as with multi_processing). Examples are compared by
the sha256 of each record parsed and serialized deterministically: the bytes of a TFRecord
written in another process differ only in the order of the Example's feature map.
Skipped, with the reason in pytest's summary, where apache-beam is not installed
(pip install 'covidlib[beam]'; `.[test]` installs it).
"""

import glob
import hashlib
import io
import os
import sys

from absl.testing import flagsaver
import numpy as np
from PIL import Image
import pytest

beam = pytest.importorskip('apache_beam', reason="apache-beam is not installed: pip install "
                           "'covidlib[beam]' (CI installs it through .[test])")

import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

import covidlib  # noqa: E402

from covidlib import beam_options  # noqa: E402
from covidlib import errors  # noqa: E402
from covidlib_tfds import build  # noqa: E402
from covidlib_tfds import cli  # noqa: E402
from covidlib_tfds import privacy  # noqa: E402
from covidlib_tfds.labelled_xrays import beam_build  # noqa: E402
from covidlib_tfds.labelled_xrays import labelled_xrays_dataset_builder as builder_lib  # noqa

SALT = 'beam-test-salt-QWZX'
SIDE = 32
HEADER_IDS = ['HDRZQ0001', 'HDRZQ0002', 'HDRZQ0003']  # Only in DICOM headers.
CSV_IDS = ['CSVZQ1001', 'CSVZQ1002', 'CSVZQ1003', 'CSVZQ1004']
IN_PROCESS = 'runner=DirectRunner,direct_running_mode=in_memory,direct_num_workers=1'


def _png(gray: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(gray).save(buffer, 'PNG')
  return buffer.getvalue()


def _dicom(gray: np.ndarray, patient_id: str, view: str) -> bytes:
  from pydicom.dataset import Dataset, FileMetaDataset
  from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
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
  ds.ViewPosition = view
  ds.PatientAge = '095Y'  # Stored as 90.
  ds.PatientSex = 'F'
  ds.set_pixel_data(4095 - np.round(gray * (4095.0 / 255)).astype(np.uint16), 'MONOCHROME1', 12)
  buffer = io.BytesIO()
  ds.save_as(buffer, enforce_file_format=True)
  return buffer.getvalue()


def _write_folder(root) -> str:
  """The test folder; returns its labels.csv. 23 listed rows, 3 of them bad, 1 unlisted file."""
  rs = np.random.RandomState(7)

  def pixels():
    blocks = np.kron(rs.randint(0, 200, (4, 4)), np.ones((SIDE // 4, SIDE // 4)))
    return (blocks + rs.randint(0, 56, (SIDE, SIDE))).astype(np.uint8)

  files, lines = {}, ['path,label,patient_id,site,view,age']
  for n, patient in enumerate(HEADER_IDS):
    for k in range(2):
      path = f'north/d{n}{k}.dcm'
      files[path] = _dicom(pixels(), patient, 'LL' if (n, k) == (0, 1) else 'PA')
      lines.append(f'{path},{"covid" if n % 2 else "normal"},,north,,')
  for n, patient in enumerate(CSV_IDS):
    for k in range(2):
      path = f'south/p{n}{k}.png'
      files[path] = _png(pixels())
      lines.append(f'{path},{n % 2},{patient},south,AP,{40 + n}')
  files['south/copy.png'] = files['south/p00.png']  # A near-duplicate under another patient.
  lines.append('south/copy.png,normal,CSVZQ1999,south,AP,')
  # No patient id anywhere: split by file-name series (anon/extubation: 3 images).
  for name, label in (('extubation-1', 'covid'), ('extubation-2', 'covid'),
                      ('extubation-13', 'covid'), ('person7_bacteria_30', 'normal'),
                      ('person7_virus_31', 'normal')):
    files[f'anon/{name}.png'] = _png(pixels())
    lines.append(f'anon/{name}.png,{label},,east,,')
  good = _png(pixels())
  files['bad/cut.png'] = good[:len(good) // 2]
  files['bad/unlabelled.png'] = good
  files['stray.png'] = good  # Not listed.
  lines += ['bad/cut.png,covid,CSVZQ2001,south,,', 'bad/missing.png,normal,CSVZQ2002,south,,',
            'bad/unlabelled.png,,CSVZQ2003,south,,']
  for path, contents in files.items():
    os.makedirs(os.path.dirname(os.path.join(root, path)), exist_ok=True)
    with open(os.path.join(root, path), 'wb') as f:
      f.write(contents)
  with open(os.path.join(root, 'labels.csv'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  return os.path.join(root, 'labels.csv')


@pytest.fixture(scope='module')
def labels_csv(tmp_path_factory):
  return _write_folder(tmp_path_factory.mktemp('export'))


def _build(csv, data_dir, beam_options=None, **kwargs):
  return build.build_labelled(csv, 'site', data_dir=str(data_dir), salt=SALT,
                              beam_options=beam_options, **kwargs)


def _digests(builder) -> dict[str, list[str]]:
  """{split: sorted sha256 of each example}, each record parsed and serialized canonically."""
  out = {}
  for split in builder.info.splits:
    files = sorted(glob.glob(os.path.join(builder.data_dir, f'*-{split}.tfrecord*')))
    out[split] = sorted(
        hashlib.sha256(tf.train.Example.FromString(r.numpy()).SerializeToString(
            deterministic=True)).hexdigest() for r in tf.data.TFRecordDataset(files))
  return out


@pytest.mark.slow
@pytest.mark.parametrize('kwargs', [
    {'skip_bad': True, 'val_fraction': 0.25, 'test_fraction': 0.25},
    {'skip_bad': True, 'hash_filenames': True, 'frontal_only': True, 'val_fraction': 0.3,
     'test_fraction': 0},
])
def test_beam_builds_the_streaming_dataset(labels_csv, tmp_path, kwargs):
  streamed = _build(labels_csv, tmp_path / 'streaming', **kwargs)
  on_beam = _build(labels_csv, tmp_path / 'beam', beam_options.parse(IN_PROCESS),
                   **kwargs)
  expected = _digests(streamed)
  assert _digests(on_beam) == expected
  assert sum(map(len, expected.values())) == 20 - kwargs.get('frontal_only', False)
  # The split, the bad and unlisted files, the privacy rules' records, the inputs: the same.
  assert dict(on_beam.info.metadata) == dict(streamed.info.metadata)
  assert len(on_beam.info.metadata['bad_files']) == 3
  assert on_beam.info.metadata['images_without_patient_id'] == 5
  [series] = on_beam.info.metadata['unknown_patient_series'].values()  # The same rule.
  assert len(series) == 3
  assert {s: i.num_examples for s, i in on_beam.info.splits.items()} == {
      s: i.num_examples for s, i in streamed.info.splits.items()}


def test_bad_files_fail_the_beam_build_as_the_streaming_one(labels_csv, tmp_path):
  messages = []
  for options in (None, beam_options.parse(IN_PROCESS)):
    with pytest.raises(errors.DataError) as error:
      _build(labels_csv, tmp_path / str(len(messages)), options)
    messages.append(str(error.value).split('. All of them are listed in')[0])
  assert messages[0] == messages[1]
  assert messages[0].startswith('3 bad file(s) (of 23 in labels.csv): bad/unlabelled.png: ')
  assert 'bad/cut.png: not a decodable image' in messages[0]


def test_work_files_hold_no_header_id_and_are_deleted(labels_csv, tmp_path, monkeypatch):
  """What the workers write (inspect records, example lists) holds no raw patient id; the
  launcher's row list holds the CSV's ids (as the CSV does), never a header's."""
  seen = {}
  close = beam_build.BeamBuild.close

  def snapshot(self):
    for path in glob.glob(os.path.join(self.work, '**', '*'), recursive=True):
      if os.path.isfile(path):
        seen[os.path.relpath(path, self.work)] = open(path, 'rb').read()
    close(self)
    seen['deleted'] = not os.path.exists(self.work)
  monkeypatch.setattr(beam_build.BeamBuild, 'close', snapshot)
  _build(labels_csv, tmp_path, beam_options.parse(IN_PROCESS), skip_bad=True,
         val_fraction=0.25, test_fraction=0.25)
  assert seen.pop('deleted')
  assert {'rows.jsonl', 'examples-train.jsonl'} <= set(seen)
  assert any(name.startswith('inspected') for name in seen)
  for name, contents in seen.items():
    for secret in HEADER_IDS + ['Zebedee', 'Quixotica', SALT]:
      assert secret.encode() not in contents, (secret, name)
    if name != 'rows.jsonl':
      assert not any(i.encode() in contents for i in CSV_IDS), name
  # The records carry pseudonyms, which the dataset stores too.
  records = b''.join(c for n, c in seen.items() if n.startswith('inspected'))
  assert privacy.pseudonym(SALT, 'north', 'HDRZQ0001').encode() in records


def test_a_file_that_fails_on_the_second_pass_is_one_line(labels_csv, tmp_path, monkeypatch):
  """A file changed between the passes fails the build naming it, as a streaming build does."""
  read_image, calls = builder_lib.read_image, {}

  def changing(root, path):
    calls[path] = calls.get(path, 0) + 1
    if path == 'south/p10.png' and calls[path] == 2:
      raise errors.InvalidImageError(path, 'not a decodable image')
    return read_image(root, path)
  monkeypatch.setattr(builder_lib, 'read_image', changing)
  with pytest.raises(errors.DataError) as error:
    _build(labels_csv, tmp_path, beam_options.parse(IN_PROCESS), skip_bad=True)
  assert str(error.value) == 'south/p10.png: not a decodable image (on a Beam worker)'


def _run_build(*args: str) -> int:
  saved = flagsaver.save_flag_values(build.FLAGS)
  try:
    argv = cli.parse_flags(['covidlib_tfds.build', *args], build.FLAGS, 'covidlib_tfds.build',
                           'doc')
    return build.main(argv)
  finally:
    flagsaver.restore_flag_values(saved, build.FLAGS)


def _error_lines(text: str) -> list[str]:
  return [line for line in text.splitlines() if 'error:' in line]


def test_the_binary_builds_on_beam_and_its_errors_are_one_line(labels_csv, tmp_path,
                                                                 monkeypatch, capsys):
  monkeypatch.setenv(privacy.SALT_ENV, SALT)
  csv, data_dir = f'--labels_csv={labels_csv}', f'--data_dir={tmp_path}'
  assert _run_build(csv, '--name=x', data_dir, '--skip_bad',
                    f'--beam_pipeline_options={IN_PROCESS}') == 0
  out = capsys.readouterr().out
  assert f'labelled_xrays/x:{builder_lib.Builder.VERSION} in' in out
  assert 'bad files left out (--skip_bad): 3' in out
  assert _run_build('--config=seed', '--beam') == 2
  assert _error_lines(capsys.readouterr().err) == [
      'covidlib_tfds.build: error: --beam needs --labels_csv']
  assert _run_build(csv, '--name=x', data_dir, '--beam_pipeline_options=runner DirectRunner') == 2
  assert _error_lines(capsys.readouterr().err) == [
      "covidlib_tfds.build: error: --beam_pipeline_options: 'runner DirectRunner' is not "
      "name=value (e.g. runner=DirectRunner,direct_num_workers=2)"]
  for name in [m for m in sys.modules if m.split('.')[0] == 'apache_beam']:
    monkeypatch.setitem(sys.modules, name, None)  # As if not installed.
  monkeypatch.delitem(sys.modules, 'covidlib.beam_options')  # It imports apache_beam.
  monkeypatch.delattr(covidlib, 'beam_options')
  assert _run_build(csv, '--name=y', data_dir, '--beam') == 2
  assert _error_lines(capsys.readouterr().err) == [
      "covidlib_tfds.build: error: --beam needs Apache Beam, which is not installed: pip "
      "install 'covidlib[beam]'"]


def test_the_default_options_are_the_multiprocess_direct_runner():
  options = beam_options.parse(None).get_all_options()
  assert (options['runner'], options['direct_running_mode'], options['direct_num_workers']) == (
      'DirectRunner', 'multi_processing', os.cpu_count())


@pytest.mark.slow
def test_tfds_build_builds_a_named_config_from_the_manual_dir(labels_csv, tmp_path,
                                                               monkeypatch):
  """`tfds build labelled_xrays/NAME/kwargs --imports=covidlib_tfds --manual_dir=FOLDER` (TFDS's
  own CLI code, less its main module, which imports mlcroissant), on Beam."""
  from tensorflow_datasets.scripts.cli import build as tfds_build
  simple_parsing = pytest.importorskip('simple_parsing')
  monkeypatch.setenv(privacy.SALT_ENV, SALT)
  args = simple_parsing.parse(tfds_build.Args, args=[
      'labelled_xrays/mine/skip_bad=True', '--imports=covidlib_tfds',
      f'--manual_dir={os.path.dirname(labels_csv)}', f'--data_dir={tmp_path}',
      f'--beam_pipeline_options={IN_PROCESS}'])
  args.execute()
  builder = tfds.builder('labelled_xrays/mine', data_dir=tmp_path)
  assert sum(s.num_examples for s in builder.info.splits.values()) == 20
  assert len(builder.info.metadata['bad_files']) == 3


def test_the_listed_example_config_takes_only_its_own_options():
  """labelled_xrays lists one config (so that `tfds build` takes config names): building that
  name with other options is refused in one line; any other name is the user's."""
  listed = builder_lib.Builder.builder_configs[builder_lib.EXAMPLE_CONFIG]
  assert builder_lib.make_config('dummy') is listed
  with pytest.raises(errors.UsageError, match="dataset name 'dummy' is the shipped example's"):
    builder_lib.make_config('dummy', val_fraction=0.2)
  assert builder_lib.make_config('site_2025').name == 'site_2025'
  assert cli.check_name('labelled_xrays/site_2025') == 'labelled_xrays/site_2025'
