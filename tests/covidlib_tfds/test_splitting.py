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
