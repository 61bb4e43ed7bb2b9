"""Splitting images by patient: no patient and no near-duplicate cluster on two sides.

    from covidlib_tfds import splitting
    groups = splitting.group_images(patient_keys, hashes)     # one group id per image
    names = splitting.split_groups(groups, labels, {'train': .6, 'validation': .2, 'test': .2},
                                   seed=2020)                 # one split name per image
    names = splitting.split_groups(groups, labels, fractions, seed=2020,
                                   balance_groups=True)       # patients per split balanced too
    splitting.series_key('CovidDataset/Train/Covid/extubation-13.jpg')   # -> 'extubation'
    key = splitting.series_group_key('ieee8023', 'extubation')  # 'series:ieee8023:extubation'

Two images share a group when they belong to the same patient (same non-empty patient key) or
their perceptual hashes are near-duplicates; groups that share an image are merged (union-find),
so a chain of copies A~B~C ends up in one group even when A and C are far apart.

The splitter assigns whole groups: largest first (ties in an order shuffled with `seed`), each to
the split where it most reduces the squared distance between the split's class counts and size
and their targets (fraction x class total, fraction x all images). Classes and split sizes
therefore stay balanced as far as the group sizes allow. Largest first favours no class, but it
does favour group sizes: the big groups fill the largest split (train) before the others get
any, so the smaller splits end up with single-image patients only.

With `balance_groups=True` (labelled_xrays) the number of groups (patients) per split is a
target too, and groups are placed in a seeded random order, each where it most reduces the
squared distance to the targets of the groups placed so far (share x running totals). Every
split then gets groups of every size, and its images, its groups and each class's images stay
within about one largest group of share x total at every step, hence at the end. covid_xray
keeps the largest-first order, so that its published splits do not move.
The same inputs and seed always give the same split.

Images without a patient id are grouped by the *series* their file name names (`series_key`):
`extubation-1.jpg` ... `extubation-13.jpg` are one case's films over time, and
`88de9d8c39e946abd495b37cd07d89e5-2ee6-0.jpg` and `...-6531-0.jpg` one upload, so each series is
split as one group. Its key, `series_group_key`, starts with 'series:', which no patient key does
(covid_xray's are '<source>:<id>' for its fixed sources, labelled_xrays' 'patient<NUL>...'), so
a series never merges with a patient by name, only through a near-duplicate image. Images with a
patient id never go by their series. `GROUP_SERIES = False` turns the rule off (tests do, to
show that the audit then names the series on two sides).
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

import numpy as np

from covidlib import errors
from covidlib_tfds import perceptual_hash


# Images without a patient id are split by file-name series (`series_key`). Always on in builds;
# tests turn it off to show what the audit finds without it.
GROUP_SERIES = True

_EXTENSION = re.compile(r'\.[a-z][a-z0-9]{0,4}$')  # '.png', '.jpeg', '.dcm'; not '.1'.
# An upload of the ieee8023 collection: <32 hex digits>-<4 hex digits>-<counter>.
_UPLOAD = re.compile(r'([0-9a-f]{32})-[0-9a-f]{4}-[0-9]{1,3}')
# A trailing counter after a separator ('extubation-13', 'person12_bacteria_45', '00001234_000'),
# or a copy's '(2)' ('scan (2)'). At most 3 digits: longer numbers are more often ids, dates or
# instance numbers ('IM-0001-0001') than a film's place in a series.
_COUNTER = re.compile(r'(.+?)(?:[-_ ]+[0-9]{1,3}| ?\([0-9]{1,3}\))')
_MIN_PREFIX = 2  # Letters and digits a prefix keeps, or the counter stays: '1-2' is no series.


def series_key(path: str, keep_folder: bool = False) -> str:
  """The series a file name names, for grouping images that have no patient id.

  The base name, lowercased, without its extension (a dot and 1-5 letters or digits starting with
  a letter) and without ONE trailing counter or upload suffix:

    extubation-13.jpg -> extubation            AR-2.jpg -> ar
    88de9d8c39e946abd495b37cd07d89e5-2ee6-0.jpg -> 88de9d8c39e946abd495b37cd07d89e5
    person123_bacteria_45.jpeg -> person123_bacteria   (person 123: not every person*_bacteria)
    00001234_000.png -> 00001234                        (the NIH patient, follow-up dropped)
    scan (2).png -> scan

  A counter is 1-3 digits after '-', '_' or ' ' (or in parentheses); the prefix left must hold
  at least two letters or digits. Unchanged, hence alone in their series: names whose number is
  glued to a word (7-fatal-covid19, 4-x-day13: 'covid19' is no counter), 4 or more digits
  (IM-0001-0001, dates, accession numbers, DICOM UIDs), a bare number (0001.png, 1-2.png).

  Limits. It only reads names: generic names with a counter merge whatever they hold
  ('image-1' and 'image-2' of two patients become one series; over-merging costs split balance,
  never leakage), and one patient's films named apart ('day1' and 'day13', or 'person1_virus_6'
  and 'person1_bacteria_1') stay apart. Give patient ids where they are known: then this rule is
  not used.

  Args:
    path: a file's path; '/' or '\\' separators.
    keep_folder: prefix the key with the path's folder ('a/b/scan-1.png' -> 'a/b/scan'), so that
      equal names in two folders are two series (labelled_xrays, where a folder is often one
      patient or one export). covid_xray's folders are the archive's Train/Val and class folders,
      which say nothing of the patient, so it uses the base name alone.
  """
  folder, _, name = path.replace('\\', '/').rpartition('/')
  stem = _EXTENSION.sub('', name.lower()) or name.lower()
  upload = _UPLOAD.fullmatch(stem)
  counter = _COUNTER.fullmatch(stem)
  if upload:
    stem = upload.group(1)
  elif counter and sum(c.isalnum() for c in counter.group(1)) >= _MIN_PREFIX:
    stem = counter.group(1)
  return f'{folder}/{stem}' if keep_folder and folder else stem


def series_group_key(source: str, series: str) -> str:
  """The group key of an image without a patient id: 'series:<source>:<series>'."""
  return f'series:{source}:{series}'


class _UnionFind:

  def __init__(self, size: int):
    self._parent = list(range(size))

  def find(self, i: int) -> int:
    while self._parent[i] != i:
      self._parent[i] = self._parent[self._parent[i]]  # Path halving.
      i = self._parent[i]
    return i

  def union(self, i: int, j: int) -> None:
    a, b = self.find(i), self.find(j)
    if a != b:
      self._parent[max(a, b)] = min(a, b)  # The smaller index is the root: deterministic.


def group_images(patient_keys: Sequence[str], hashes: Sequence[int],
                 max_bits: int = perceptual_hash.NEAR_DUPLICATE_BITS) -> list[int]:
  """Group id for each image: images of one patient or near-duplicates share a group.

  Args:
    patient_keys: one per image; '' when unknown. Keys must already be unique across sources
      (e.g. 'ieee8023:12'), since the same number can mean different people in two collections.
    hashes: `perceptual_hash.image_hash` of each image.
    max_bits: near-duplicate threshold.

  Returns:
    For each image, the index of the first image of its group (so ids are stable).
  """
  if len(patient_keys) != len(hashes):
    raise ValueError(f'{len(patient_keys)} patient keys but {len(hashes)} hashes')
  sets = _UnionFind(len(hashes))
  first_of_patient = {}
  for i, key in enumerate(patient_keys):
    if key:
      sets.union(first_of_patient.setdefault(key, i), i)
  for i, j, _ in perceptual_hash.near_duplicate_pairs(list(hashes), max_bits):
    sets.union(i, j)
  return [sets.find(i) for i in range(len(hashes))]


# Weight of the group-count column in the squared error of balance_groups=True: a split one
# group off its target counts as much as one 2 images off (measured: images, groups and classes
# within one largest group of their targets over skewed group sizes, tests/.../test_splitting).
_GROUP_WEIGHT = 4.0


def split_groups(groups: Sequence[int], labels: Sequence[int], fractions: Mapping[str, float],
                 seed: int, balance_groups: bool = False) -> list[str]:
  """Assigns whole groups to splits; returns the split name of each image.

  Args:
    groups: group id per image (from `group_images`).
    labels: class index per image (0 normal, 1 covid; any small ints work).
    fractions: split name -> share of the images, e.g. {'train': .6, 'validation': .2,
      'test': .2}. Must be positive and sum to 1. Ties go to the split listed first.
    seed: fixes the order of equally sized groups (with balance_groups, of all groups).
    balance_groups: also give each split its share of the groups (patients), and place groups
      in a random order instead of largest first, so that no group size is favoured.
  """
  if len(groups) != len(labels):
    raise ValueError(f'{len(groups)} group ids but {len(labels)} labels')
  names = list(fractions)
  shares = np.array([fractions[n] for n in names], np.float64)
  if not names or np.any(shares <= 0) or abs(shares.sum() - 1.0) > 1e-6:
    raise errors.UsageError(f'split fractions must be positive and sum to 1, got {dict(fractions)}')
  if not groups:
    return []
  classes = sorted(set(labels))
  column = {c: k for k, c in enumerate(classes)}
  members: dict[int, list[int]] = {}
  for i, g in enumerate(groups):
    members.setdefault(g, []).append(i)
  group_ids = sorted(members)
  counts = np.zeros((len(group_ids), len(classes)))
  for row, g in enumerate(group_ids):
    for i in members[g]:
      counts[row, column[labels[i]]] += 1
  # One more column, the group's size: the error then also counts split sizes, not only each
  # class on its own (which would let a split stay empty while its classes are 'balanced').
  counts = np.concatenate([counts, counts.sum(axis=1, keepdims=True)], axis=1)
  targets = shares[:, None] * counts.sum(axis=0)[None, :]  # (splits, classes + 1)

  if balance_groups:
    return _place_in_random_order(counts, group_ids, groups, names, shares, seed)

  # Largest groups first: they are the hardest to place. Equal sizes in a seeded random order.
  order = np.random.RandomState(seed).permutation(len(group_ids))
  order = sorted(order, key=lambda row: -counts[row, -1])
  filled = np.zeros_like(targets)
  assignment = {}
  for row in order:
    # Change of the squared error sum_c (filled - target)^2 if the group went to each split.
    gain = (counts[row] * (2 * (filled - targets) + counts[row])).sum(axis=1)
    best = int(np.argmin(gain))
    filled[best] += counts[row]
    assignment[group_ids[row]] = names[best]
  return [assignment[g] for g in groups]


def _place_in_random_order(counts: np.ndarray, group_ids: list[int], groups: Sequence[int],
                           names: list[str], shares: np.ndarray, seed: int) -> list[str]:
  """balance_groups=True: groups in a seeded random order, against running targets.

  `counts` holds one row per group: its images of each class, then its size. A last column of
  ones counts groups. Each group goes where it most lowers the weighted squared error
  sum_c w_c (filled - share x placed)^2, `placed` including the group itself.
  """
  counts = np.concatenate([counts, np.ones((len(counts), 1))], axis=1)
  weights = np.ones(counts.shape[1])
  weights[-1] = _GROUP_WEIGHT
  order = np.random.RandomState(seed).permutation(len(group_ids))
  filled = np.zeros((len(names), counts.shape[1]))
  placed = np.zeros(counts.shape[1])
  assignment = {}
  for row in order:
    placed += counts[row]
    targets = shares[:, None] * placed[None, :]
    gain = (weights * counts[row] * (2 * (filled - targets) + counts[row])).sum(axis=1)
    best = int(np.argmin(gain))
    filled[best] += counts[row]
    assignment[group_ids[row]] = names[best]
  return [assignment[g] for g in groups]
