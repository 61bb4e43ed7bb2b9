"""Tests of the source rules, including the article's selection on the real metadata.csv."""

import csv

import pytest

from covidlib import errors
from covidlib_tfds import sources
from covidlib_tfds.covid_xray import covid_xray_dataset_builder as builder_lib

_SHIPPED_METADATA = builder_lib._IEEE8023_METADATA  # metadata.csv as of 2020-04-18, 338 rows.


def test_selection_on_the_shipped_metadata_counts():
  rows = sources.read_ieee8023_metadata(_SHIPPED_METADATA)
  chosen = sources.select_covid_pa_xrays(rows)
  assert len(rows) == 338
  assert len(chosen) == 140
  assert len({r['patientid'] for r in chosen}) == 91
  assert sum(r['finding'] == 'COVID-19, ARDS' for r in chosen) == 11


def test_selection_count_cross_checked_by_column_index():
  """An independent count: the raw csv module, columns by index, no shared code."""
  with open(_SHIPPED_METADATA, newline='', encoding='utf-8') as f:
    table = list(csv.reader(f))
  header, body = table[0], table[1:]
  finding, view, modality = (header.index(c) for c in ('finding', 'view', 'modality'))
  count = 0
  for line in body:
    if 'COVID-19' in line[finding] and line[view] == 'PA' and line[modality] == 'X-ray':
      count += 1
  assert count == len(sources.select_covid_pa_xrays(
      sources.read_ieee8023_metadata(_SHIPPED_METADATA)))


def test_selection_rule_excludes_other_views_modalities_and_findings():
  rows = [
      {'finding': 'COVID-19', 'view': 'PA', 'modality': 'X-ray', 'filename': 'keep1'},
      {'finding': 'COVID-19, ARDS', 'view': 'PA', 'modality': 'X-ray', 'filename': 'keep2'},
      {'finding': 'COVID-19', 'view': 'AP', 'modality': 'X-ray', 'filename': 'ap'},
      {'finding': 'COVID-19', 'view': 'AP Supine', 'modality': 'X-ray', 'filename': 'sup'},
      {'finding': 'COVID-19', 'view': 'PA', 'modality': 'CT', 'filename': 'ct'},
      {'finding': 'SARS', 'view': 'PA', 'modality': 'X-ray', 'filename': 'sars'},
  ]
  assert [r['filename'] for r in sources.select_covid_pa_xrays(rows)] == ['keep1', 'keep2']


@pytest.mark.parametrize('name, patient', [
    ('IM-0156-0001.jpeg', 'IM-0156'),
    ('IM-0551-0001-0002.jpeg', 'IM-0551'),
    ('NORMAL2-IM-1234-0001.jpeg', 'NORMAL2-IM-1234'),
    ('chest_xray/test/NORMAL/NORMAL2-IM-0012-0001.jpeg', 'NORMAL2-IM-0012'),
    ('person1_bacteria_1.jpeg', ''),
    ('IM-0156.jpeg', ''),
])
def test_kaggle_patient_id(name, patient):
  assert sources.kaggle_patient_id(name) == patient


@pytest.mark.parametrize('text, age', [('65', 65), ('', -1), ('?', -1), ('47.0', 47), ('-3', -1)])
def test_parse_age(text, age):
  assert sources.parse_age(text) == age


def test_sample_is_seeded_sorted_and_ignores_listing_order():
  names = [f'n{i:02d}' for i in range(20)]
  first = sources.sample(names, 5, seed=1, what='normals')
  assert first == sorted(first) and len(set(first)) == 5 and set(first) <= set(names)
  assert sources.sample(list(reversed(names)), 5, seed=1, what='normals') == first
  assert sources.sample(names, 5, seed=2, what='normals') != first
  with pytest.raises(errors.DataError, match='need 21 normals but found only 20'):
    sources.sample(names, 21, seed=1, what='normals')


def test_metadata_errors_name_the_file(tmp_path):
  with pytest.raises(errors.DataError, match='nope.csv: ieee8023 metadata not found'):
    sources.read_ieee8023_metadata(tmp_path / 'nope.csv')
  (tmp_path / 'bad.csv').write_text('patientid,filename\n1,a.jpg\n')
  with pytest.raises(errors.DataError, match='bad.csv: not an ieee8023 metadata.csv, it lacks '
                                             'column.* age, finding, view, modality'):
    sources.read_ieee8023_metadata(tmp_path / 'bad.csv')
