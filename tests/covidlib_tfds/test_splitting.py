"""Tests of the patient splitter: groups never cross splits, determinism, balance."""

import collections

import numpy as np
import pytest

from covidlib import errors
from covidlib_tfds import splitting

_FRACTIONS = {'train': 0.6, 'validation': 0.2, 'test': 0.2}


def _population(seed: int, groups: int = 120):
  """Images of `groups` patients with 1-4 images each and one label per patient."""
  rs = np.random.RandomState(seed)
  group_ids, labels = [], []
  for g in range(groups):
    label = int(rs.rand() < 0.5)
    for _ in range(rs.randint(1, 5)):
      group_ids.append(g)
      labels.append(label)
  order = rs.permutation(len(group_ids))  # Images of a patient are not adjacent.
  return [group_ids[i] for i in order], [labels[i] for i in order]


def test_no_group_on_two_sides():
  groups, labels = _population(0)
  names = splitting.split_groups(groups, labels, _FRACTIONS, seed=7)
  sides = collections.defaultdict(set)
  for g, name in zip(groups, names):
    sides[g].add(name)
  assert all(len(s) == 1 for s in sides.values())
  assert set(names) == set(_FRACTIONS)


def test_deterministic_for_a_seed_and_seed_matters():
  groups, labels = _population(1)
  first = splitting.split_groups(groups, labels, _FRACTIONS, seed=3)
  assert splitting.split_groups(groups, labels, _FRACTIONS, seed=3) == first
  # Other seeds order equally sized groups differently.
  others = [splitting.split_groups(groups, labels, _FRACTIONS, seed=s) for s in range(4, 8)]
  assert any(o != first for o in others)


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_sizes_and_classes_balanced_as_far_as_groups_allow(seed):
  groups, labels = _population(seed)
  names = splitting.split_groups(groups, labels, _FRACTIONS, seed=seed)
  total = collections.Counter(labels)
  per_split = collections.Counter(zip(names, labels))
  for name, share in _FRACTIONS.items():
    for label in (0, 1):
      # Within one largest group (4 images) of the exact target, for each class separately.
      assert abs(per_split[(name, label)] - share * total[label]) <= 4, (name, label)


def test_group_images_unions_patients_and_chains_of_copies():
  # Image 0 and 3 share a patient; 1 ~ 2 ~ 4 are a chain of copies (1 and 4 far apart);
  # 5 is alone; '' means unknown patient, never a shared key.
  run = (1 << 50) - 1  # 50 set bits: hashes built from it are >= 50 bits apart unless noted.
  copy = run ^ 0b111
  hashes = [0, run, copy, run << 100, copy ^ (0b111 << 10), run << 300]
  patients = ['ieee8023:7', '', '', 'ieee8023:7', '', '']
  groups = splitting.group_images(patients, hashes, max_bits=3)
  assert groups == [0, 1, 1, 0, 1, 5]
  assert splitting.group_images(['', ''], [0, 1]) == [0, 0]  # Hash within the default threshold.


def test_groups_follow_through_split():
  patients = ['a', 'a', 'b', 'c', 'c', 'd', 'e', 'f']
  hashes = [1 << (10 * i) for i in range(8)]
  hashes[5] = hashes[6] ^ 1  # d ~ e near-duplicates.
  groups = splitting.group_images(patients, hashes, max_bits=1)
  names = splitting.split_groups(groups, [1, 1, 1, 0, 0, 0, 0, 1], _FRACTIONS, seed=0)
  assert names[0] == names[1] and names[3] == names[4] and names[5] == names[6]


def test_bad_fractions_are_a_usage_error():
  with pytest.raises(errors.UsageError, match='must be positive and sum to 1'):
    splitting.split_groups([0], [0], {'train': 0.7, 'test': 0.2}, seed=0)
  with pytest.raises(ValueError, match='2 group ids but 1 labels'):
    splitting.split_groups([0, 1], [0], _FRACTIONS, seed=0)


def _skewed_population(seed: int, singletons: int, groups: int, max_size: int):
  """Many single-image patients and some of 2..max_size images; big groups mostly covid."""
  rs = np.random.RandomState(seed)
  sizes = [1] * singletons + list(rs.randint(2, max_size + 1, groups))
  sizes[-1] = max_size  # The largest group is there.
  group_ids, labels = [], []
  for g, size in enumerate(sizes):
    label = int(rs.rand() < (0.8 if size > 1 else 0.3))
    group_ids += [g] * size
    labels += [label] * size
  order = rs.permutation(len(group_ids))
  return [group_ids[i] for i in order], [labels[i] for i in order]


@pytest.mark.parametrize('seed, singletons, groups, max_size, fractions', [
    (0, 2300, 100, 3, {'train': 0.7, 'validation': 0.15, 'test': 0.15}),  # The shape.
    (1, 300, 60, 10, {'train': 0.7, 'validation': 0.15, 'test': 0.15}),
    (2, 50, 50, 10, _FRACTIONS),
    (3, 10, 40, 10, {'train': 0.8, 'validation': 0.2}),
    (4, 500, 5, 40, _FRACTIONS),
])
def test_balance_groups_matches_the_shares_in_images_and_in_patients(
    seed, singletons, groups, max_size, fractions):
  group_ids, labels = _skewed_population(seed, singletons, groups, max_size)
  names = splitting.split_groups(group_ids, labels, fractions, seed=seed, balance_groups=True)
  sides = collections.defaultdict(set)
  for g, name in zip(group_ids, names):
    sides[g].add(name)
  assert all(len(s) == 1 for s in sides.values())
  n_images, n_patients = len(group_ids), len(sides)
  patients = collections.Counter(s.pop() for s in sides.values())
  images = collections.Counter(names)
  by_class = collections.Counter(zip(names, labels))
  total = collections.Counter(labels)
  for name, share in fractions.items():
    assert abs(images[name] - share * n_images) <= max_size, (name, images, n_images)
    assert abs(patients[name] - share * n_patients) <= max_size, (name, patients, n_patients)
    for label in (0, 1):
      assert abs(by_class[(name, label)] - share * total[label]) <= max_size, (name, label)


def test_balance_groups_gives_every_split_groups_of_every_size():
  # Largest first (the default, covid_xray's) fills train with every multi-image patient here;
  # balance_groups spreads them: each split holds about its share of them.
  group_ids, labels = _skewed_population(5, 1000, 150, 6)
  size = collections.Counter(group_ids)
  for balance, expect_spread in ((False, False), (True, True)):
    names = splitting.split_groups(group_ids, labels, _FRACTIONS, seed=0,
                                   balance_groups=balance)
    split_of = dict(zip(group_ids, names))
    big = collections.Counter(split_of[g] for g in size if size[g] > 1)
    spread = all(abs(big[n] - share * 150) <= 0.25 * share * 150
                 for n, share in _FRACTIONS.items())
    assert spread == expect_spread, (balance, big)


def test_balance_groups_is_deterministic_for_a_seed():
  group_ids, labels = _skewed_population(6, 200, 30, 5)
  first = splitting.split_groups(group_ids, labels, _FRACTIONS, seed=1, balance_groups=True)
  assert splitting.split_groups(group_ids, labels, _FRACTIONS, seed=1,
                                balance_groups=True) == first
  assert splitting.split_groups(group_ids, labels, _FRACTIONS, seed=2,
                                balance_groups=True) != first


# Images without a patient id: file-name series.
_HASH = '88de9d8c39e946abd495b37cd07d89e5'


@pytest.mark.parametrize('path, key', [
    # One case's films over time; one upload's images (the real archive's names).
    ('CovidDataset/Train/Covid/extubation-1.jpg', 'extubation'),
    ('CovidDataset/Val/Covid/extubation-13.jpg', 'extubation'),
    (f'CovidDataset/Val/Covid/{_HASH}-2ee6-0.jpg', _HASH),
    (f'{_HASH}-6531-0.jpg', _HASH),
    ('AR-2.jpg', 'ar'),
    ('scan (2).png', 'scan'),
    ('Scan_3.PNG', 'scan'),
    ('x-ray 7.jpeg', 'x-ray'),
    # A counter after an id keeps the id.
    ('person123_bacteria_45.jpeg', 'person123_bacteria'),
    ('00001234_000.png', '00001234'),
    # No counter: unchanged (lowercased, extension off).
    ('7-fatal-covid19.jpg', '7-fatal-covid19'),  # Glued to a word.
    ('4-x-day13.jpg', '4-x-day13'),
    ('2-chest-filmc.jpg', '2-chest-filmc'),
    ('paving.jpg', 'paving'),
    ('covid-19-pneumonia-14-PA.png', 'covid-19-pneumonia-14-pa'),
    ('IM-0001-0001.jpeg', 'im-0001-0001'),  # 4 digits: an id or instance number.
    ('IMG_1234.JPG', 'img_1234'),
    ('scan-20200315.png', 'scan-20200315'),  # A date.
    ('0001.png', '0001'),  # A bare number.
    ('1-2.png', '1-2'),  # Too little left before the counter.
    ('x_3.png', 'x_3'),
    ('1.2.840.10008.5.1.4.1.1.7', '1.2.840.10008.5.1.4.1.1.7'),  # A DICOM UID: no extension.
    ('file-0123456789abcdef.dcm', 'file-0123456789abcdef'),  # A hashed name.
])
def test_series_key(path, key):
  assert splitting.series_key(path) == key
  assert splitting.series_key(path.replace('/', '\\')) == key


@pytest.mark.parametrize('a, b', [
    ('person123_bacteria_45.jpeg', 'person124_bacteria_46.jpeg'),
    ('person1_bacteria_1.jpeg', 'person1_virus_6.jpeg'),  # One person, named apart: a limit.
    ('00001234_000.png', '00001235_000.png'),
    (f'{_HASH}-2ee6-0.jpg', 'ae6c954c0039de4b5edee53865ffee43-e6c8-0.jpg'),
    ('IM-0001-0001.jpeg', 'IM-0002-0001.jpeg'),
    ('1-2.png', '1-3.png'),
    ('7-fatal-covid19.jpg', '7-fatal-covid20.jpg'),
    ('AR-1.jpg', 'ARDS-1.jpg'),
    ('0001.png', '0002.png'),
])
def test_series_key_keeps_apart(a, b):
  assert splitting.series_key(a) != splitting.series_key(b)


def test_series_key_with_the_folder_kept():
  key = lambda path: splitting.series_key(path, keep_folder=True)  # noqa: E731
  assert key('a/b/scan-1.png') == key('a/b/scan-12.png') == 'a/b/scan'
  assert key('a/scan-1.png') != key('b/scan-2.png')
  assert key('scan-1.png') == 'scan'  # No folder.
  assert splitting.series_key('a/scan-1.png') == splitting.series_key('b/scan-2.png') == 'scan'


def test_a_series_key_never_joins_a_patient_by_name():
  series = splitting.series_group_key('ieee8023', 'ar')
  assert series == 'series:ieee8023:ar'
  far = [1 << (100 * i) for i in range(4)]  # No near-duplicates.
  groups = splitting.group_images(['ieee8023:ar', series, series, 'ar'], far, max_bits=1)
  assert groups == [0, 1, 1, 3]
