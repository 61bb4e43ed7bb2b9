"""covid_xray: COVID-19 vs normal chest X-rays, from the article's data to adult-only sets.

Build offline from our copies. One manual dir serves every config: the folder holding
`covid_xray_seed/` (the article's archive), `nih_adult_normals/` and `ieee8023_more/`. Our copy of
the archive lacks one image, so allow that:

    python -m covidlib_tfds.build --config=adult --manual_dir=../shared/data \
        --data_dir=$HOME/tensorflow_datasets --allow_missing
    python -m covidlib_tfds.build --config=seed --manual_dir=../shared/data \
        --data_dir=$HOME/tensorflow_datasets --allow_missing

(likewise `adult_pediatric`, `other_findings`, `patient_split`; for `seed` and `patient_split`
the folder holding the zip itself, `../shared/data/covid_xray_seed`, works too).
Where apache-beam is installed (the `tfds` command of tensorflow-datasets 4.9.10 imports it at
start-up), the same is `tfds build covid_xray/adult/allow_missing=True --imports=covidlib_tfds
--manual_dir=... --data_dir=...`. Whatever the manual dir lacks is downloaded from GitHub at a
pinned commit: the article's archive, and for `nih_adult_normals/` and `ieee8023_more/` the
archives of the repositories they were prepared from, whose originals are verified by sha256 and
prepared exactly as our copies were (`covidlib_tfds.originals`). Then:

    import covidlib_tfds, tensorflow_datasets as tfds
    ds = tfds.load('covid_xray/adult', split='train', data_dir=...)

Builder arguments (also as `covid_xray/<config>/name=value` in a dataset name):
  allow_missing: build even when images a manifest lists are absent. They are logged by name and
    listed in `info.metadata['missing_files']`. Never silent.
  manifest_path: verify the article's archive against another manifest than the shipped
    `manifest.tsv` (the tests point it at `dummy_data/manifest.tsv`).
  nih_manifest_path, ieee8023_more_manifest_path: likewise for `nih_adult_normals/` and
    `ieee8023_more/` (shipped: `nih_adult_normals.tsv`, `ieee8023_more.tsv`).
Images a config leaves out on purpose (COVID-19 patients under 18; other findings that share a
patient, a series or a near-duplicate with a COVID-19 image) are logged and listed with the reason
in `info.metadata['excluded']`.

Images without a patient id (13 COVID-19 images of the archive match no ieee8023 metadata row) are
split by the series their file name names (`splitting.series_key` of the base name:
`extubation-1.jpg` ... `extubation-13.jpg` are one series, `<hash>-<4 hex>-<n>.jpg` uploads of one
hash another), each series as one group, so a series never spans two splits of the configs split
by patient. The seed config keeps the published split. Every config lists its series of two or
more such images in `info.metadata['unknown_patient_series']` ({'series:<source>:<series>':
[file, ...]}), which `covidlib_tfds.audit` checks.
"""

import collections
import dataclasses
from typing import Callable
import zipfile

from absl import logging
from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from covidlib import errors
from covidlib import preprocess
from covidlib_tfds import manifest as manifest_lib
from covidlib_tfds import originals
from covidlib_tfds import perceptual_hash
from covidlib_tfds import sources
from covidlib_tfds import splitting

_HERE = epath.Path(__file__).parent
_MANIFEST = _HERE / 'manifest.tsv'
_IEEE8023_METADATA = _HERE / 'ieee8023_metadata.csv'  # As of 2020-04-18, see README.md.

_COMMIT = 'a70eb2394d4b75ef6765aa79394e765ee6f9faf2'
_ARCHIVE_NAME = f'Covid-19-Detection-{_COMMIT}.zip'
_ARCHIVE_URL = f'https://github.com/dakshtrehan/Covid-19-Detection/archive/{_COMMIT}.zip'
_ARCHIVE_ROOT = f'Covid-19-Detection-{_COMMIT}/'
_ARCHIVE_IMAGES = 'CovidDataset/'  # The manifest's paths start here.
_SEED_FOLDER = 'covid_xray_seed'  # The archive's folder in a manual dir holding all sources.
_SEED_SPLITS = {'Train': 'train', 'Val': 'validation'}
_FOLDER_LABELS = {'Covid': 'covid', 'Normal': 'normal'}

# Layout of the raw collections the `curated` config reads from its manual dir.
_RAW_METADATA = 'covid-chestxray-dataset/metadata.csv'
_RAW_IMAGES = 'covid-chestxray-dataset/images'
_KAGGLE_NORMAL_DIRS = ('chest_xray/train/NORMAL', 'chest_xray/val/NORMAL', 'chest_xray/test/NORMAL')
_NO_FINDING = 'No Finding'  # The finding of a normal film, as ieee8023 and NIH write it.

# The largest source image is 4280 x 3520 and models use at most 512 x 512: storing images with
# their longest side capped at 1024 keeps the prepared dataset small and decoding fast, and still
# leaves headroom for higher-resolution models. Aspect ratio is kept; smaller images are untouched.
MAX_SIDE = 1024

_SPLIT_SEED = 2020  # Fixes the patient-level splits (and the curated config's normal sample).
_SPLIT_FRACTIONS = {'train': 0.6, 'validation': 0.2, 'test': 0.2}
_ADULT_AGE = 18  # The adult configs keep COVID-19 patients this old or older, or of unknown age.
OTHER_FINDINGS_LABEL_NOTE = (
    'covid_xray/other_findings: label 0 ("normal") means NOT COVID-19 here, films with other '
    'findings (SARS, Pneumocystis, Streptococcus, ARDS, ...), not healthy ones; for evaluation '
    'only: does a model see COVID-19, or any opacity?')


@dataclasses.dataclass(frozen=True)
class _Collection:
  """A prepared collection: its folder in the manual dir, and the repository it came from."""
  folder: str
  manifest: epath.Path  # The shipped copy of the folder's manifest.tsv.
  repo: str  # GitHub owner/name of the originals.
  commit: str
  prepare: Callable[[bytes, str], np.ndarray]  # Original file -> the prepared copy's pixels.

  @property
  def url(self) -> str:
    return f'https://github.com/{self.repo}/archive/{self.commit}.zip'

  @property
  def root(self) -> str:
    """The root folder of GitHub's archive of the commit."""
    return f'{self.repo.split("/")[1]}-{self.commit}/'


_NIH = _Collection(
    folder='nih_adult_normals', manifest=_HERE / 'nih_adult_normals.tsv',
    repo='muhammedtalo/COVID-19', commit='ee3e2cffc0824711bed675275506b26f19be7198',
    prepare=originals.prepare_nih)
_IEEE8023_MORE = _Collection(
    folder='ieee8023_more', manifest=_HERE / 'ieee8023_more.tsv',
    repo='raiprabh/covid-chestxray-dataset', commit='0e8f80adc2e951778cda8da0e8f0ee7beb00ca00',
    prepare=originals.prepare_ieee8023)

_MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
seed, patient_split: put {_ARCHIVE_NAME} (the GitHub archive of dakshtrehan/Covid-19-Detection at
commit {_COMMIT}, {_ARCHIVE_URL}) in the manual dir or in its {_SEED_FOLDER}/ folder, or give no
manual dir to download it.
adult, adult_pediatric, other_findings: the manual dir holds {_SEED_FOLDER}/{_ARCHIVE_NAME},
{_NIH.folder}/ and {_IEEE8023_MORE.folder}/ (images/ and manifest.tsv each); what it lacks is
downloaded: {_ARCHIVE_URL}, {_NIH.url}, {_IEEE8023_MORE.url}.
curated: the manual dir holds the raw collections:
  covid-chestxray-dataset/metadata.csv and covid-chestxray-dataset/images/ (github
    ieee8023/covid-chestxray-dataset)
  chest_xray/{{train,val,test}}/{{NORMAL,PNEUMONIA}}/ (Kaggle "Chest X-Ray Images (Pneumonia)")
"""


@dataclasses.dataclass(frozen=True)
class _Image:
  """One image to write, and where it came from (`key` is relative, never a local path)."""
  key: str
  label: str
  split: str = ''  # The split the source assigns, if any.
  patient_id: str = ''
  source: str = ''
  view: str = ''
  age: int = -1
  finding: str = ''


@dataclasses.dataclass
class CovidXrayConfig(tfds.core.BuilderConfig):
  """A config: where the images come from and how they are split.

  source: 'article_archive' (the article's zip, verified against the manifest),
    'raw_collections' (the ieee8023 and Kaggle folders, selected by the article's rule),
    'adult_collections' (COVID-19 of the archive and ieee8023_more, NIH adult normals), or
    'other_findings' (the non-COVID findings of ieee8023_more).
  split: 'as_published' (the archive's Train/Val folders), 'by_patient' (60/20/20, no
    patient, no file-name series of images without a patient id and no near-duplicate cluster
    on two sides) or 'test_only' (one split, `test`).
  pediatric_normals: with 'adult_collections', add the archive's Kaggle pediatric normals.
  """
  source: str = 'article_archive'
  split: str = 'as_published'
  pediatric_normals: bool = False


def decode_for_dataset(contents: bytes, name: str) -> np.ndarray:
  """The stored image: gray uint8 (H, W, 1), longest side at most MAX_SIDE.

  Raises:
    InvalidImageError: naming `name`, for a file that is not a decodable image.
  """
  image = preprocess.decode_bytes(contents, name)
  return preprocess.resize_longest_side(image, MAX_SIDE).numpy()


def feature_specs() -> dict[str, tfds.features.FeatureConnector]:
  """The covid_xray features by name (also the core of labelled_xrays' layout)."""
  return {
      'image': tfds.features.Image(shape=(None, None, 1), encoding_format='png'),
      'label': tfds.features.ClassLabel(names=['normal', 'covid']),
      'image/filename': tfds.features.Text(),
      'patient_id': tfds.features.Text(),
      'source': tfds.features.Text(),
      'view': tfds.features.Text(),
      'age': tfds.features.Scalar(dtype=np.int32),
      'finding': tfds.features.Text(),
  }


def features() -> tfds.features.FeaturesDict:
  """The covid_xray example layout (every config); label 1 = COVID-19, 0 = not COVID-19."""
  return tfds.features.FeaturesDict(feature_specs())


class Builder(tfds.core.GeneratorBasedBuilder):
  """COVID-19 vs normal chest X-rays: the article's split, a patient split, and a re-curation."""

  VERSION = tfds.core.Version('1.2.0')
  RELEASE_NOTES = {
      '1.0.0': 'Initial release.',
      '1.1.0': 'Configs adult, adult_pediatric (NIH adult normals, COVID-19 aged 18 or over) and '
               'other_findings (non-COVID findings, evaluation only); a `finding` feature; one '
               'manual dir for every config; `info.metadata["excluded"]`.',
      '1.2.0': 'Images without a patient id are split by file-name series (extubation-1 ... '
               'extubation-13 as one group, <hash>-<4 hex>-<n> uploads of one hash as one), so '
               'no series spans two splits: the splits of patient_split, curated, adult and '
               'adult_pediatric change (seed stays as published); other_findings also leaves '
               'out films sharing a series with a COVID-19 film of adult; '
               '`info.metadata["unknown_patient_series"]`.',
  }
  MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_DOWNLOAD_INSTRUCTIONS
  BUILDER_CONFIGS = [
      CovidXrayConfig(
          name='seed', source='article_archive', split='as_published',
          description='The article\'s own split: train = CovidDataset/Train (224 images), '
                      'validation = CovidDataset/Val (60). Kept as published; it leaks patients.'),
      CovidXrayConfig(
          name='patient_split', source='article_archive', split='by_patient',
          description='The same images re-split 60/20/20 into train/validation/test so that no '
                      'patient, no near-duplicate cluster and no file-name series of images '
                      'without a patient id is on two sides.'),
      CovidXrayConfig(
          name='curated', source='raw_collections', split='by_patient',
          description='The article\'s data preparation re-run on the raw collections: COVID-19 '
                      'PA X-rays and as many sampled Kaggle normals, split by patient.'),
      CovidXrayConfig(
          name='adult', source='adult_collections', split='by_patient',
          description='Adults only. COVID-19: the article\'s COVID-19 images and the COVID-19 '
                      'images of ieee8023_more (same collection), patients aged 18 or over or '
                      'of unknown age. Normal: NIH ChestX-ray14 "No Finding" adults '
                      '(nih_adult_normals). Split 60/20/20 by patient (or file-name series, '
                      'without a patient id) and near-duplicate cluster. Each class still comes '
                      'from its own sites.'),
      CovidXrayConfig(
          name='adult_pediatric', source='adult_collections', split='by_patient',
          pediatric_normals=True,
          description='adult plus the article\'s Kaggle pediatric normals as a second normal '
                      'source, split together 60/20/20 by patient and near-duplicate cluster.'),
      CovidXrayConfig(
          name='other_findings', source='other_findings', split='test_only',
          description='Evaluation only, one split `test`: the non-COVID findings of '
                      'ieee8023_more (SARS, Pneumocystis, Streptococcus, ARDS, ...), all ages. '
                      'Label 0 ("normal") here means NOT COVID-19, not a healthy film: it asks '
                      'whether a model sees COVID-19 or any opacity. Images sharing a patient (or, '
                      'without a patient id, a file-name series) or a near-duplicate with a '
                      'COVID-19 image of adult are left out (listed in '
                      'info.metadata["excluded"]).'),
  ]
  DEFAULT_BUILDER_CONFIG_NAME = 'seed'

  def __init__(self, *, allow_missing: bool = False,
               manifest_path: epath.PathLike | None = None,
               nih_manifest_path: epath.PathLike | None = None,
               ieee8023_more_manifest_path: epath.PathLike | None = None, **kwargs):
    if not isinstance(allow_missing, bool):
      raise errors.UsageError(f'allow_missing must be True or False, got {allow_missing!r}')
    self._allow_missing = allow_missing
    self._manifest_path = epath.Path(manifest_path) if manifest_path else _MANIFEST
    self._collection_manifests = {
        _NIH.folder: epath.Path(nih_manifest_path) if nih_manifest_path else _NIH.manifest,
        _IEEE8023_MORE.folder: (epath.Path(ieee8023_more_manifest_path)
                                if ieee8023_more_manifest_path else _IEEE8023_MORE.manifest),
    }
    super().__init__(**kwargs)
    self._original_state.update(allow_missing=allow_missing, manifest_path=manifest_path,
                                nih_manifest_path=nih_manifest_path,
                                ieee8023_more_manifest_path=ieee8023_more_manifest_path)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=features(),
        supervised_keys=('image', 'label'),
        homepage='https://github.com/dakshtrehan/Covid-19-Detection',
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    config = self.builder_config
    excluded = []
    if config.source == 'article_archive':
      load, images, missing = self._archive_images(dl_manager)
    elif config.source == 'raw_collections':
      load, images, missing = self._raw_images(dl_manager)
    elif config.source == 'adult_collections':
      load, images, missing, excluded = self._adult_images(dl_manager, config.pediatric_normals)
    else:
      load, images, missing, excluded = self._other_findings(dl_manager)
    self.info.metadata['missing_files'] = missing
    self.info.metadata['excluded'] = excluded
    self.info.metadata['unknown_patient_series'] = _unknown_patient_series(images)
    if config.source == 'other_findings':
      self.info.metadata['label_note'] = OTHER_FINDINGS_LABEL_NOTE
    for line in excluded:
      logging.warning('Excluded from covid_xray/%s: %s', config.name, line)
    if config.split == 'by_patient':
      images = _split_by_patient(images, load)
      names = list(_SPLIT_FRACTIONS)
    elif config.split == 'test_only':
      images = [dataclasses.replace(i, split='test') for i in images]
      names = ['test']
    else:
      names = list(_SEED_SPLITS.values())
    for name in names:
      labels = collections.Counter(i.label for i in images if i.split == name)
      logging.info('covid_xray/%s %s: %d images (%s)', config.name, name,
                   sum(labels.values()), ', '.join(f'{k} {v}' for k, v in sorted(labels.items())))
    return {name: self._generate_examples(load, [i for i in images if i.split == name])
            for name in names}

  def _generate_examples(self, load, images):
    for image in images:
      yield image.key, {
          'image': load(image.key),
          'label': image.label,
          'image/filename': image.key,
          'patient_id': image.patient_id,
          'source': image.source,
          'view': image.view,
          'age': image.age,
          'finding': image.finding,
      }

  def _archive_images(self, dl_manager):
    """The article's images, verified against the manifest, with what metadata knows of them."""
    archive = (_manual_file(dl_manager, _ARCHIVE_NAME)
               or _manual_file(dl_manager, f'{_SEED_FOLDER}/{_ARCHIVE_NAME}')
               or _download_archive(dl_manager))
    entries = manifest_lib.read_manifest(self._manifest_path)
    read = _ZipReader(archive, _ARCHIVE_ROOT)
    listed = [p for p in read.paths() if p.startswith(_ARCHIVE_IMAGES)]
    missing = manifest_lib.compare_listing(entries, listed, archive=_ARCHIVE_NAME,
                                           allow_missing=self._allow_missing)
    for path in listed:
      manifest_lib.verify_image(entries[path], read(path))
    metadata = sources.metadata_by_filename(sources.read_ieee8023_metadata(_IEEE8023_METADATA))
    images = []
    for path in sorted(listed):
      entry = entries[path]
      label = _FOLDER_LABELS[entry.label]
      name = path.rsplit('/', 1)[-1]
      split = _SEED_SPLITS[entry.split]
      if label == 'covid':
        row = metadata.get(name)
        images.append(_Image(
            key=path, label=label, split=split, source=sources.IEEE8023,
            patient_id=row['patientid'] if row else '', view=row['view'] if row else '',
            age=sources.parse_age(row['age']) if row else -1,
            finding=(row['finding'] if row and row['finding'] else 'COVID-19')))
      else:
        images.append(_Image(key=path, label=label, split=split, source=sources.KAGGLE_PEDIATRIC,
                             patient_id=sources.kaggle_patient_id(name), finding=_NO_FINDING))
    return _decoder(read), images, missing

  def _raw_images(self, dl_manager):
    """The article's selection re-run on the raw collections in the manual dir."""
    root = _manual_file(dl_manager, '')
    if root is None or not (root / _RAW_METADATA).exists():
      raise errors.DataError(
          f'the curated config needs {_RAW_METADATA} in the manual dir '
          f'(--manual_dir); expected layout:\n{_MANUAL_DOWNLOAD_INSTRUCTIONS}')
    rows = sources.select_covid_pa_xrays(sources.read_ieee8023_metadata(root / _RAW_METADATA))
    wanted = [f'{_RAW_IMAGES}/{row["filename"]}' for row in rows]
    present = {p for p in wanted if (root / p).exists()}
    missing = sorted(set(wanted) - set(present))
    if missing and not self._allow_missing:
      raise errors.DataError(
          f'{len(missing)} selected image(s) are missing from the manual dir: '
          f'{manifest_lib.name_list(missing)}. To build without them, allow it explicitly: '
          '`python -m covidlib_tfds.build --allow_missing ...` (allow_missing=True)')
    for path in missing:
      logging.warning('Missing image, allowed by allow_missing=True: %s', path)
    images = [_Image(key=f'{_RAW_IMAGES}/{row["filename"]}', label='covid',
                     source=sources.IEEE8023, patient_id=row['patientid'], view=row['view'],
                     age=sources.parse_age(row['age']), finding=row['finding'])
              for row in rows if f'{_RAW_IMAGES}/{row["filename"]}' in present]
    normals = _kaggle_normals(root)
    for key in sources.sample(normals, len(images), _SPLIT_SEED,
                              f'Kaggle NORMAL images in {", ".join(_KAGGLE_NORMAL_DIRS)}'):
      images.append(_Image(key=key, label='normal', source=sources.KAGGLE_PEDIATRIC,
                           patient_id=sources.kaggle_patient_id(key), finding=_NO_FINDING))
    return _decoder(_FolderReader(root)), images, missing

  def _adult_covid(self, dl_manager):
    """COVID-19 images of the archive and ieee8023_more, 18 or over or of unknown age.

    Returns:
      (load, COVID-19 images kept, the archive's other images, ieee8023_more's other images,
      missing files, excluded 'name: reason' lines).
    """
    archive_load, archive, missing = self._archive_images(dl_manager)
    more_load, more, more_missing = self._collection_images(dl_manager, _IEEE8023_MORE)
    load = _Loader({i.key: archive_load for i in archive} | {i.key: more_load for i in more})
    covid, excluded = [], []
    for image in [i for i in archive + more if i.label == 'covid']:
      if 0 <= image.age < _ADULT_AGE:
        excluded.append(f'{image.key}: COVID-19 patient {image.patient_id} aged {image.age}, '
                        f'under {_ADULT_AGE}')
      else:
        covid.append(image)
    rest = [i for i in archive if i.label != 'covid']
    others = [i for i in more if i.label != 'covid']
    return load, covid, rest, others, missing + more_missing, excluded

  def _adult_images(self, dl_manager, pediatric_normals: bool):
    """The adult configs: adult COVID-19 vs NIH adult normals (and the Kaggle ones)."""
    load, covid, archive_normals, _, missing, excluded = self._adult_covid(dl_manager)
    nih_load, nih, nih_missing = self._collection_images(dl_manager, _NIH)
    load.add({i.key: nih_load for i in nih})
    images = covid + nih + (archive_normals if pediatric_normals else [])
    return load, images, missing + nih_missing, excluded

  def _other_findings(self, dl_manager):
    """ieee8023_more's other findings, labelled 0 (not COVID-19), none linked to adult's COVID-19.

    An image is left out, and listed, if its patient (without a patient id: its file-name
    series) also has COVID-19 images in the adult configs or it is a near-duplicate of one of
    those images.
    """
    load, covid, _, others, missing, _ = self._adult_covid(dl_manager)
    covid_files = collections.defaultdict(list)
    for image in covid:
      if _split_key(image):
        covid_files[_split_key(image)].append(image.key)
    hashes = [perceptual_hash.image_hash(load(i.key)) for i in covid + others]
    reasons = collections.defaultdict(list)
    for other in others:
      if _split_key(other) in covid_files:
        files = covid_files[_split_key(other)]
        who = (f'patient {other.patient_id}' if other.patient_id
               else f'its series {_split_key(other)} (no patient id)')
        reasons[other.key].append(
            f'{who} also has COVID-19 image(s) in covid_xray/adult: '
            f'{manifest_lib.name_list(sorted(files))}')
    for i, j, distance in perceptual_hash.near_duplicate_pairs(hashes):
      if i < len(covid) <= j:
        reasons[others[j - len(covid)].key].append(
            f'near-duplicate ({distance} of {perceptual_hash.HASH_BITS} hash bits) of the '
            f'COVID-19 image {covid[i].key}')
    excluded = [f'{key}: {"; ".join(why)}' for key, why in sorted(reasons.items())]
    images = [dataclasses.replace(i, label='normal') for i in others if i.key not in reasons]
    return load, images, missing, excluded

  def _collection_images(self, dl_manager, collection: _Collection):
    """A prepared collection's images, verified, from the manual dir or else downloaded.

    Offline, `manual_dir/<folder>/` must hold exactly the files its manifest lists, each with the
    manifest's sha256. Otherwise the repository's archive at the pinned commit is downloaded,
    each original checked against `original_sha256` and prepared as the folder's copy was.
    Either way an image's key is `<folder>/<file>`, so both routes give the same examples.
    """
    manifest_path = self._collection_manifests[collection.folder]
    entries = manifest_lib.read_source_manifest(manifest_path)
    for file, entry in entries.items():
      if (entry.original_repo, entry.commit) != (collection.repo, collection.commit):
        raise errors.DataError(
            f'{manifest_path.name}: {file} comes from {entry.original_repo}@{entry.commit}, '
            f'not {collection.repo}@{collection.commit}')
    keyed = {f'{collection.folder}/{file}': entry for file, entry in entries.items()}
    folder = _manual_file(dl_manager, collection.folder)
    if folder is not None:
      root = folder.parent
      listed = sorted(f'{collection.folder}/{d}/{p.name}'
                      for d in sorted({f.rsplit('/', 1)[0] for f in entries})
                      if (folder / d).is_dir() for p in (folder / d).iterdir())
      missing = manifest_lib.compare_listing(keyed, listed, archive=f'{collection.folder}/',
                                             allow_missing=self._allow_missing)
      for key in listed:
        manifest_lib.verify_sha256(key, (root / key).read_bytes(), keyed[key].sha256,
                                   manifest_path.name)
      load = _decoder(_FolderReader(root))
    else:
      read = _ZipReader(_download_archive(dl_manager, collection.url, collection.folder),
                        collection.root)
      members = set(read.paths())
      listed = sorted(k for k, e in keyed.items() if e.original_path in members)
      missing = manifest_lib.compare_listing(keyed, listed, archive=collection.url,
                                             allow_missing=self._allow_missing)
      for key in listed:
        entry = keyed[key]
        manifest_lib.verify_sha256(f'{collection.repo}:{entry.original_path}',
                                   read(entry.original_path), entry.original_sha256,
                                   f'{manifest_path.name} (original_sha256)')

      def load(key):
        entry = keyed[key]
        name = f'{collection.repo}:{entry.original_path}'
        image = collection.prepare(read(entry.original_path), name)
        # The manifest records our copy's size: a cheap check that both routes agree.
        if (entry.width, entry.height) != (str(image.shape[1]), str(image.shape[0])):
          raise errors.DataError(
              f'{name}: prepared to {image.shape[1]} x {image.shape[0]}, but {key} is '
              f'{entry.width} x {entry.height} in {manifest_path.name}')
        return image

    images = [_Image(key=key, label=keyed[key].label, source=keyed[key].source,
                     patient_id=keyed[key].patient_id, view=keyed[key].view,
                     age=sources.parse_age(keyed[key].age), finding=keyed[key].finding)
              for key in listed]
    return load, images, missing


def _download_archive(dl_manager, url: str = _ARCHIVE_URL, folder: str = '') -> epath.Path:
  """Downloads an archive; a failure is one DataError saying how to work offline.

  Args:
    dl_manager: the TFDS download manager.
    url: the article's archive, or a prepared collection's repository archive.
    folder: for a collection, its folder name (what a manual dir would hold instead).
  """
  try:
    return epath.Path(dl_manager.download(url))
  except Exception as e:  # requests' ConnectionError, HTTP errors, TFDS checksum errors...
    offline = (f'pass as --manual_dir a folder holding {folder}/ (images/ and manifest.tsv)'
               if folder else f'put {_ARCHIVE_NAME} in a folder and pass it as --manual_dir')
    raise errors.DataError(
        f'cannot download {url} ({type(e).__name__}: {str(e)[:160]}); offline, {offline}'
    ) from None


def _manual_file(dl_manager, name):
  """`manual_dir / name` if the manual dir exists and holds it, else None."""
  try:
    path = dl_manager.manual_dir / name
  except AssertionError:  # No manual dir given, or it is empty.
    return None
  return path if path.exists() else None


def _kaggle_normals(root):
  """Relative paths of the images in the Kaggle NORMAL folders; anything else is logged."""
  normals = []
  for folder in _KAGGLE_NORMAL_DIRS:
    if not (root / folder).exists():
      continue
    for path in sorted((root / folder).iterdir()):
      if path.suffix.lower() in sources.IMAGE_SUFFIXES:
        normals.append(f'{folder}/{path.name}')
      else:
        logging.warning('Not an image, skipped: %s/%s', folder, path.name)
  return normals


def _patient_key(image: _Image) -> str:
  """'source:patient_id', '' when the patient is unknown; one key is one patient."""
  return f'{image.source}:{image.patient_id}' if image.patient_id else ''


def _series_key(image: _Image) -> str:
  """'series:source:<series of the base name>' of an image without a patient id, else ''."""
  if image.patient_id:
    return ''
  return splitting.series_group_key(image.source, splitting.series_key(image.key))


def _split_key(image: _Image) -> str:
  """What splits group by: the patient, else (splitting.GROUP_SERIES) the file-name series."""
  return _patient_key(image) or (_series_key(image) if splitting.GROUP_SERIES else '')


def _unknown_patient_series(images) -> dict[str, list[str]]:
  """{series key: its files} of every series of two or more images without a patient id.

  Recorded whether or not splits group by series, so the audit can check them either way.
  """
  series = collections.defaultdict(list)
  for image in images:
    if _series_key(image):
      series[_series_key(image)].append(image.key)
  return {key: sorted(files) for key, files in sorted(series.items()) if len(files) > 1}


def _split_by_patient(images, load):
  """Re-splits images by patient (or series) and near-duplicate cluster (covidlib_tfds.splitting).

  The splitter balances strata of (class, source), so a class drawn from two sources
  (adult_pediatric's NIH and Kaggle normals) has each source spread 60/20/20 too. Where each
  class has one source (patient_split, curated, adult) the strata are the classes, in the same
  order: the split is the one balancing classes alone.
  """
  keys = [_split_key(i) for i in images]
  for key, files in _unknown_patient_series(images).items():
    logging.info('%d images without a patient id, series %s: %s', len(files), key,
                 'split as one group' if splitting.GROUP_SERIES else 'NOT grouped (GROUP_SERIES '
                 'is off)')
  hashes = [perceptual_hash.image_hash(load(i.key)) for i in images]
  groups = splitting.group_images(keys, hashes)
  strata = [(int(i.label == 'covid'), i.source) for i in images]
  index = {stratum: n for n, stratum in enumerate(sorted(set(strata)))}
  names = splitting.split_groups(groups, [index[s] for s in strata], _SPLIT_FRACTIONS,
                                 seed=_SPLIT_SEED)
  empty = [name for name in _SPLIT_FRACTIONS if name not in names]
  if empty:
    raise errors.DataError(
        f'{len(images)} images in {len(set(groups))} patient / near-duplicate groups are too few '
        f'to fill the {", ".join(_SPLIT_FRACTIONS)} splits: {", ".join(empty)} would be empty')
  logging.info('%d images in %d patient / near-duplicate groups', len(images), len(set(groups)))
  return [dataclasses.replace(i, split=name) for i, name in zip(images, names)]


def _decoder(read: Callable[[str], bytes]) -> Callable[[str], np.ndarray]:
  """key -> the stored image: `decode_for_dataset` of the file `read` gives."""
  return lambda key: decode_for_dataset(read(key), key)


class _Loader:
  """key -> the stored image, each key with the loader of the source it comes from."""

  def __init__(self, by_key: dict[str, Callable[[str], np.ndarray]]):
    self._by_key = dict(by_key)

  def add(self, by_key: dict[str, Callable[[str], np.ndarray]]) -> None:
    self._by_key.update(by_key)

  def __call__(self, key: str) -> np.ndarray:
    return self._by_key[key](key)


class _ZipReader:
  """Reads members of a zip archive under `root` by their relative path; no extraction."""

  def __init__(self, path: epath.Path, root: str):
    self._path = path
    self._root = root
    with path.open('rb') as f, zipfile.ZipFile(f) as archive:
      names = [n for n in archive.namelist() if not n.endswith('/')]
    outside = [n for n in names if not n.startswith(root)]
    if names and len(outside) == len(names):
      raise errors.DataError(f'{path.name}: no member under {root}; not the pinned archive?')
    self._members = {n[len(root):]: n for n in names if n.startswith(root)}

  def paths(self) -> list[str]:
    return sorted(self._members)

  def __call__(self, relative: str) -> bytes:
    with self._path.open('rb') as f, zipfile.ZipFile(f) as archive:
      return archive.read(self._members[relative])


class _FolderReader:
  """Reads files under a root folder by their relative path."""

  def __init__(self, root: epath.Path):
    self._root = root

  def __call__(self, relative: str) -> bytes:
    return (self._root / relative).read_bytes()
