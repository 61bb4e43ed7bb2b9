"""Tests of the leakage audit and of the two covidlib_tfds binaries.

The dummy `seed` config has planted leakage (dummy_data_generation.py): patient 186 in Train and
Val, AR-2.jpg in Val a resized, re-encoded copy of AR-1.jpg in Train, and two file-name series
of images without a patient id on both sides (ar: AR-1/AR-2; extubation: -1, -4, -13 in Train,
-8 in Val). The dummy `patient_split` of the same images must come out clean; with the series
rule off (splitting.GROUP_SERIES) it must not, and the audit must name the series.
"""

import json
import shutil

from absl.testing import flagsaver
import pytest
import tensorflow_datasets as tfds

from covidlib import errors
from covidlib_tfds import audit
from covidlib_tfds import build
from covidlib_tfds import cli
from covidlib_tfds import splitting
from covidlib_tfds.covid_xray import dummy_data_generation as dummy_gen

_EXTUBATION = 'series:ieee8023:extubation'
_UPLOAD = 'series:ieee8023:88de9d8c39e946abd495b37cd07d89e5'
_LONE_UPLOAD = 'CovidDataset/Train/Covid/ae6c954c0039de4b5edee53865ffee43-e6c8-0.jpg'


def _run(binary, *args: str) -> int:
  """Runs a binary's main as `python -m covidlib_tfds.<binary> args` would, flags restored after.

  The binaries keep their flags in their own FlagValues (see covidlib_tfds.cli), which absl's
  flagsaver cannot override, so the test parses real command lines instead.
  """
  saved = flagsaver.save_flag_values(binary.FLAGS)
  try:
    argv = cli.parse_flags([binary.__name__, *args], binary.FLAGS, binary.__name__, 'doc')
    return binary.main(argv)
  finally:
    flagsaver.restore_flag_values(saved, binary.FLAGS)


def test_audit_finds_the_planted_patient_and_copy(built_dummy):
  report = audit.audit('covid_xray/seed', data_dir=built_dummy)
  assert report.leakage
  assert report.shared_patients == [audit.SharedPatient(
      'ieee8023', '186', {'train': ['CovidDataset/Train/Covid/4-x-day1.jpg'],
                          'validation': ['CovidDataset/Val/Covid/4-x-day13.jpg']})]
  assert len(report.near_duplicates) == 1
  pair = report.near_duplicates[0]
  assert {(pair.split_a, pair.file_a), (pair.split_b, pair.file_b)} == {
      ('train', 'CovidDataset/Train/Covid/AR-1.jpg'),
      ('validation', 'CovidDataset/Val/Covid/AR-2.jpg')}
  assert 0 <= pair.distance <= report.max_bits
  # Same-patient images on one side (patient 51 in Train) are not leakage.
  assert all(p.patient_id != '51' for p in report.shared_patients)


def test_audit_reports_balance_and_source_mix(built_dummy):
  report = audit.audit(tfds.builder('covid_xray/seed', data_dir=built_dummy))
  assert report.dataset == 'covid_xray/seed:1.2.0'
  assert report.splits == {
      'train': audit.SplitSummary(14, {'covid': 9, 'normal': 5},
                                  {'ieee8023': 9, 'kaggle_pediatric': 5}),
      'validation': audit.SplitSummary(9, {'covid': 6, 'normal': 3},
                                       {'ieee8023': 6, 'kaggle_pediatric': 3}),
  }
  text = report.format()
  assert 'ieee8023 patient 186 -> train: CovidDataset/Train/Covid/4-x-day1.jpg; validation: ' \
         'CovidDataset/Val/Covid/4-x-day13.jpg' in text
  assert 'train: CovidDataset/Train/Covid/AR-1.jpg  <->  validation: ' \
         'CovidDataset/Val/Covid/AR-2.jpg' in text
  assert text.endswith('Leakage: FOUND (1 patient(s), 2 series, 1 near-duplicate pair(s))')


def test_audit_of_the_patient_split_is_clean(built_dummy):
  report = audit.audit('covid_xray/patient_split', data_dir=built_dummy)
  assert not report.leakage
  assert report.shared_patients == [] and report.near_duplicates == []
  assert {n: s.examples for n, s in report.splits.items()} == {
      'train': 14, 'validation': 4, 'test': 5}
  assert report.format().endswith('Leakage: none found')


def test_audit_errors_are_usage_errors(built_dummy, tmp_path):
  with pytest.raises(errors.UsageError, match="covid_xray: unknown config 'nope'; the configs "
                                             "are seed, patient_split, curated"):
    audit.audit('covid_xray/nope', data_dir=built_dummy)
  with pytest.raises(errors.UsageError, match='covid_xray/curated is not built in'):
    audit.audit('covid_xray/curated', data_dir=tmp_path)


@pytest.mark.parametrize('config, allow, code', [
    ('seed', False, 1), ('seed', True, 0), ('patient_split', False, 0)])
def test_audit_binary_exit_codes(built_dummy, capsys, config, allow, code):
  args = [f'--config={config}', f'--data_dir={built_dummy}'] + (['--allow_leakage'] * allow)
  assert _run(audit, *args) == code
  out = capsys.readouterr().out
  assert out.startswith(f'Leakage audit of covid_xray/{config}:1.2.0')


@pytest.mark.parametrize('config, data_dir, message', [
    ('nope', None, "covid_xray: unknown config 'nope'"),
    ('curated', 'EMPTY', 'covid_xray/curated is not built in'),
])
def test_audit_binary_usage_errors_are_one_line_exit_2(tmp_path, capsys, config, data_dir,
                                                       message):
  args = [f'--config={config}'] + ([f'--data_dir={tmp_path}'] if data_dir else [])
  assert _run(audit, *args) == 2
  err = capsys.readouterr().err
  assert err.startswith(f'covidlib_tfds.audit: error: {message}')
  assert err.count('\n') == 1 and 'Traceback' not in err


def test_bad_flag_is_one_line_exit_2(capsys):
  with pytest.raises(SystemExit) as exit_:
    _run(audit, '--allow_leakge')
  assert exit_.value.code == 2
  err = capsys.readouterr().err
  assert err == "covidlib_tfds.audit: error: Unknown command line flag 'allow_leakge'\n"


def test_build_binary_missing_image_needs_allow_missing(dummy, tmp_path, capsys):
  files = dummy.members()
  del files['CovidDataset/Train/Normal/IM-0172-0001.jpeg']
  manual = dummy.write_archive(tmp_path / 'manual', files)
  # The binary verifies against the shipped (real) manifest; give the dummy one as a builder
  # kwarg in the dataset name, the way `tfds build` takes kwargs.
  args = [f'--config=seed/manifest_path={dummy.manifest}', f'--manual_dir={manual}',
          f'--data_dir={tmp_path / "data"}']
  assert _run(build, *args) == 1
  err = capsys.readouterr().err
  assert err.startswith('covidlib_tfds.build: error: Covid-19-Detection-')
  assert 'CovidDataset/Train/Normal/IM-0172-0001.jpeg' in err and err.count('\n') == 1
  assert _run(build, *args, '--allow_missing') == 0
  out = capsys.readouterr().out
  assert 'train 13, validation 9' in out
  assert 'missing images (allowed): 1\n  CovidDataset/Train/Normal/IM-0172-0001.jpeg' in out


def test_build_binary_unknown_config_exit_2(capsys):
  assert _run(build, '--config=nope') == 2
  assert capsys.readouterr().err.startswith("covidlib_tfds.build: error: covid_xray: unknown "
                                            "config 'nope'")


def test_audit_of_adult_is_clean_and_other_findings_says_what_label_0_means(built_shared, capsys):
  data_dir = built_shared['adult'].data_dir_root
  assert _run(audit, '--config=adult', f'--data_dir={data_dir}') == 0
  assert 'Leakage: none found' in capsys.readouterr().out
  assert _run(audit, '--config=other_findings', f'--data_dir={data_dir}') == 0
  out = capsys.readouterr().out
  assert out.startswith('Leakage audit of covid_xray/other_findings:1.2.0\nNote: '
                        'covid_xray/other_findings: label 0 ("normal") means NOT COVID-19 here')
  assert '\ntest                3        3  ieee8023 3\n' in out  # Label 0 only.


def _where(report) -> dict[str, dict[str, list[str]]]:
  return {s.key: s.files for s in report.series}


def test_audit_reports_images_without_patient_id_and_their_series(built_dummy):
  report = audit.audit('covid_xray/seed', data_dir=built_dummy)
  assert sorted(_where(report)) == sorted(dummy_gen.SERIES)
  assert _where(report)[_UPLOAD] == {'validation': dummy_gen.SERIES[_UPLOAD]}
  # The published split puts two series on both sides: leakage, named.
  assert {s.key: s.files for s in report.split_series} == {
      'series:ieee8023:ar': {'train': ['CovidDataset/Train/Covid/AR-1.jpg'],
                             'validation': ['CovidDataset/Val/Covid/AR-2.jpg']},
      _EXTUBATION: {'train': dummy_gen.SERIES[_EXTUBATION][:3],
                    'validation': dummy_gen.SERIES[_EXTUBATION][3:]}}
  assert report.alone == {_LONE_UPLOAD: 'train', 'CovidDataset/Val/Covid/paving.jpg': 'validation'}
  text = report.format()
  assert 'Images without a patient id: 10 (8 in 3 file-name series of 2 or more, 2 alone)' in text
  assert ('Series in more than one split: 2\n  series:ieee8023:ar -> train: '
          'CovidDataset/Train/Covid/AR-1.jpg; validation: CovidDataset/Val/Covid/AR-2.jpg\n'
          '  series:ieee8023:extubation -> train: CovidDataset/Train/Covid/extubation-1.jpg, '
          'CovidDataset/Train/Covid/extubation-13.jpg, CovidDataset/Train/Covid/extubation-4.jpg; '
          'validation: CovidDataset/Val/Covid/extubation-8.jpg\n') in text


def test_patient_split_keeps_each_series_in_one_split(built_dummy):
  builder = tfds.builder('covid_xray/patient_split', data_dir=built_dummy)
  assert builder.info.metadata['unknown_patient_series'] == dummy_gen.SERIES
  report = audit.audit(builder)
  assert sorted(_where(report)) == sorted(dummy_gen.SERIES)
  assert all(len(files) == 1 for files in _where(report).values()), _where(report)
  assert report.split_series == []
  # The other upload is its own series: it went alone.
  assert _LONE_UPLOAD in report.alone


def test_audit_of_a_build_without_the_series_record_reads_the_file_names(built_dummy, tmp_path):
  """A build made before the series rule has no record: the audit derives the series itself."""
  shutil.copytree(built_dummy, tmp_path / 'old')
  [metadata] = (tmp_path / 'old').rglob('covid_xray/seed/*/metadata.json')
  record = json.loads(metadata.read_text())
  del record['unknown_patient_series']
  metadata.write_text(json.dumps(record))
  old = audit.audit('covid_xray/seed', data_dir=tmp_path / 'old')
  new = audit.audit('covid_xray/seed', data_dir=built_dummy)
  assert old.series == new.series and old.alone == new.alone
  assert len(old.split_series) == 2


def test_without_the_series_rule_the_audit_names_the_series_on_two_sides(dummy, tmp_path,
                                                                        monkeypatch, capsys):
  """The issue: images without a patient id, split one by one, land on both sides."""
  monkeypatch.setattr(splitting, 'GROUP_SERIES', False)
  for config, manual in (('patient_split', dummy.dir), ('adult', dummy.shared)):
    builder = dummy.build(config, tmp_path, manual_dir=manual)
    # The record does not depend on the rule: it is what the audit checks.
    assert builder.info.metadata['unknown_patient_series'] == dummy_gen.SERIES
  report = audit.audit('covid_xray/adult', data_dir=tmp_path)
  assert sorted(s.key for s in report.split_series) == [_UPLOAD, _EXTUBATION]
  assert report.leakage and not report.shared_patients and not report.near_duplicates
  assert _run(audit, '--config=patient_split', f'--data_dir={tmp_path}') == 1
  out = capsys.readouterr().out
  assert f'Series in more than one split: 1\n  {_EXTUBATION} -> train: ' in out
  assert out.endswith('Leakage: FOUND (0 patient(s), 1 series, 0 near-duplicate pair(s))\n')
