"""What we know about the two source collections, and the article's selection rule.

    from covidlib_tfds import sources
    rows = sources.read_ieee8023_metadata('covid-chestxray-dataset/metadata.csv')
    chosen = sources.select_covid_pa_xrays(rows)         # the article's "Data Preparation"
    sources.kaggle_patient_id('NORMAL2-IM-1234-0001.jpeg')  # -> 'NORMAL2-IM-1234'

- `ieee8023`: the COVID-19 image data collection (Cohen et al., github
  ieee8023/covid-chestxray-dataset). Its `metadata.csv` has one row per image with `patientid`,
  `age`, `finding`, `view`, `modality`, `folder`, `filename`.
- `kaggle_pediatric`: the Kaggle "Chest X-Ray Images (Pneumonia)" set (Kermany et al. 2018),
  pediatric films from one hospital. No metadata file; the patient is in the file name:
  `IM-0156-0001.jpeg` and `IM-0551-0001-0002.jpeg` are patient `IM-0156` and `IM-0551`,
  `NORMAL2-IM-1234-0001.jpeg` is patient `NORMAL2-IM-1234` (the two number ranges are separate
  series, so the prefix stays part of the id).
"""

from __future__ import annotations

import csv
import io
import re
from typing import Iterable, Sequence

import numpy as np
from etils import epath

from covidlib import errors

IEEE8023 = 'ieee8023'
KAGGLE_PEDIATRIC = 'kaggle_pediatric'

_REQUIRED_COLUMNS = ('patientid', 'age', 'finding', 'view', 'modality', 'filename')
_KAGGLE_PATIENT = re.compile(r'^((?:NORMAL\d*-)?IM-\d+)-\d+')
IMAGE_SUFFIXES = ('.jpeg', '.jpg', '.png')


def read_ieee8023_metadata(path: epath.PathLike) -> list[dict[str, str]]:
  """The rows of an ieee8023 `metadata.csv`, as dicts of stripped strings.

  Raises:
    DataError: naming the file, if it is missing or lacks a required column.
  """
  path = epath.Path(path)
  try:
    text = path.read_text(encoding='utf-8')
  except FileNotFoundError:
    raise errors.DataError(f'{path}: ieee8023 metadata not found') from None
  reader = csv.DictReader(io.StringIO(text))
  absent = [c for c in _REQUIRED_COLUMNS if c not in (reader.fieldnames or ())]
  if absent:
    raise errors.DataError(f'{path}: not an ieee8023 metadata.csv, it lacks column(s) '
                           f'{", ".join(absent)}')
  return [{k: (v or '').strip() for k, v in row.items() if k} for row in reader]


def metadata_by_filename(rows: Iterable[dict[str, str]]) -> dict[str, dict[str, str]]:
  """{filename: row}. A file name listed twice keeps its first row."""
  by_name = {}
  for row in rows:
    by_name.setdefault(row['filename'], row)
  return by_name


def parse_age(text: str) -> int:
  """Age in years from the metadata, -1 when blank or not a number."""
  try:
    age = float(text)
  except ValueError:
    return -1
  return int(age) if 0 <= age < 150 else -1


def select_covid_pa_xrays(rows: Iterable[dict[str, str]]) -> list[dict[str, str]]:
  """The article's rule: COVID-19 in the finding, posteroanterior view, an X-ray (not CT).

  'COVID-19, ARDS' counts (the finding contains COVID-19); 'AP', 'AP Supine' and 'L' views do
  not. Rows come back in their original order.
  """
  return [row for row in rows
          if 'COVID-19' in row['finding'] and row['view'] == 'PA' and row['modality'] == 'X-ray']


def kaggle_patient_id(filename: str) -> str:
  """Patient id from a Kaggle pediatric file name, '' when the name has no id."""
  match = _KAGGLE_PATIENT.match(filename.rsplit('/', 1)[-1])
  return match.group(1) if match else ''


def sample(names: Sequence[str], count: int, seed: int, what: str) -> list[str]:
  """`count` of `names` drawn without replacement with a fixed seed, in sorted order.

  The draw depends only on the sorted set of names and the seed, not on listing order.

  Raises:
    DataError: if there are fewer than `count` names.
  """
  pool = sorted(names)
  if count > len(pool):
    raise errors.DataError(f'need {count} {what} but found only {len(pool)}')
  chosen = np.random.RandomState(seed).choice(len(pool), size=count, replace=False)
  return sorted(pool[i] for i in chosen)
