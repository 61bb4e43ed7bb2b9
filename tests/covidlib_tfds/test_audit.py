"""Tests of the leakage audit and of the two covidlib_tfds binaries.

The dummy `seed` config has planted leakage (dummy_data_generation.py): patient 186 in Train and
Val, and AR-2.jpg in Val a resized, re-encoded copy of AR-1.jpg in Train. The dummy
`patient_split` of the same images must come out clean.
"""

from absl.testing import flagsaver
import pytest
import tensorflow_datasets as tfds

from covidlib import errors
from covidlib_tfds import audit
from covidlib_tfds import build
from covidlib_tfds import cli


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
  assert report.dataset == 'covid_xray/seed:1.1.0'
  assert report.splits == {
      'train': audit.SplitSummary(10, {'covid': 5, 'normal': 5},
                                  {'ieee8023': 5, 'kaggle_pediatric': 5}),
      'validation': audit.SplitSummary(6, {'covid': 3, 'normal': 3},
                                       {'ieee8023': 3, 'kaggle_pediatric': 3}),
  }
  text = report.format()
  assert 'ieee8023 patient 186 -> train: CovidDataset/Train/Covid/4-x-day1.jpg; validation: ' \
         'CovidDataset/Val/Covid/4-x-day13.jpg' in text
  assert 'train: CovidDataset/Train/Covid/AR-1.jpg  <->  validation: ' \
         'CovidDataset/Val/Covid/AR-2.jpg' in text
  assert text.endswith('Leakage: FOUND (1 patient(s), 1 near-duplicate pair(s))')


def test_audit_of_the_patient_split_is_clean(built_dummy):
  report = audit.audit('covid_xray/patient_split', data_dir=built_dummy)
  assert not report.leakage
  assert report.shared_patients == [] and report.near_duplicates == []
  assert {n: s.examples for n, s in report.splits.items()} == {
      'train': 10, 'validation': 3, 'test': 3}
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
  assert out.startswith(f'Leakage audit of covid_xray/{config}:1.1.0')


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
  assert 'train 9, validation 6' in out
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
  assert out.startswith('Leakage audit of covid_xray/other_findings:1.1.0\nNote: '
                        'covid_xray/other_findings: label 0 ("normal") means NOT COVID-19 here')
  assert '\ntest                3        3  ieee8023 3\n' in out  # Label 0 only.
