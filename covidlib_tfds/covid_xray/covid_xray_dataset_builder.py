"""covid_xray: COVID-19 vs normal chest X-rays, as in "Detecting COVID-19 using Deep Learning".

Build offline from our copy of the article's archive (one image absent from it, so allow that):

    python -m covidlib_tfds.build --config=seed --manual_dir=../shared/data/covid_xray_seed \
        --data_dir=$HOME/tensorflow_datasets --allow_missing
    python -m covidlib_tfds.build --config=patient_split \
        --manual_dir=../shared/data/covid_xray_seed --data_dir=$HOME/tensorflow_datasets \
        --allow_missing

Where apache-beam is installed (the `tfds` command of tensorflow-datasets 4.9.10 imports it at
start-up), the same is `tfds build covid_xray/seed/allow_missing=True --imports=covidlib_tfds
--manual_dir=... --data_dir=...`. Without a manual dir holding the archive, `seed` and
`patient_split` download it from GitHub. Then:

    import covidlib_tfds, tensorflow_datasets as tfds
    ds = tfds.load('covid_xray/seed', split='train', data_dir=...)

Builder arguments (also as `covid_xray/<config>/name=value` in a dataset name):
  allow_missing: build even when images the manifest lists are absent from the archive. They
    are logged by name and listed in `info.metadata['missing_files']`. Never silent.
  manifest_path: verify against another manifest than the shipped `manifest.tsv` (the tests
    point it at `dummy_data/manifest.tsv`, which pins the dummy images).
"""

import collections
import dataclasses
import zipfile

from absl import logging
from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from covidlib import errors
from covidlib import preprocess
from covidlib_tfds import manifest as manifest_lib
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
_SEED_SPLITS = {'Train': 'train', 'Val': 'validation'}
_FOLDER_LABELS = {'Covid': 'covid', 'Normal': 'normal'}

# Layout of the raw collections the `curated` config reads from its manual dir.
_RAW_METADATA = 'covid-chestxray-dataset/metadata.csv'
_RAW_IMAGES = 'covid-chestxray-dataset/images'
_KAGGLE_NORMAL_DIRS = ('chest_xray/train/NORMAL', 'chest_xray/val/NORMAL', 'chest_xray/test/NORMAL')

# The largest source image is 4280 x 3520 and models use at most 512 x 512: storing images with
# their longest side capped at 1024 keeps the prepared dataset small and decoding fast, and still
# leaves headroom for higher-resolution models. Aspect ratio is kept; smaller images are untouched.
MAX_SIDE = 1024

_SPLIT_SEED = 2020  # Fixes the patient-level splits (and the curated config's normal sample).
_SPLIT_FRACTIONS = {'train': 0.6, 'validation': 0.2, 'test': 0.2}

_MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
seed, patient_split: put {_ARCHIVE_NAME} (the GitHub archive of dakshtrehan/Covid-19-Detection at
commit {_COMMIT}, {_ARCHIVE_URL}) in the manual dir, or give no manual dir to download it.
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


@dataclasses.dataclass
class CovidXrayConfig(tfds.core.BuilderConfig):
  """A config: where the images come from and how they are split.

  source: 'article_archive' (the article's zip, verified against the manifest) or
    'raw_collections' (the ieee8023 and Kaggle folders, selected by the article's rule).
  split: 'as_published' (the archive's Train/Val folders) or 'by_patient' (60/20/20, no
    patient or near-duplicate cluster on two sides).
  """
  source: str = 'article_archive'
  split: str = 'as_published'


def decode_for_dataset(contents: bytes, name: str) -> np.ndarray:
  """The stored image: gray uint8 (H, W, 1), longest side at most MAX_SIDE.

  Raises:
    InvalidImageError: naming `name`, for a file that is not a decodable image.
  """
  image = preprocess.decode_bytes(contents, name)
  return preprocess.resize_longest_side(image, MAX_SIDE).numpy()


def features() -> tfds.features.FeaturesDict:
  """The covid_xray example layout (every config); label 1 = COVID-19."""
  return tfds.features.FeaturesDict({
      'image': tfds.features.Image(shape=(None, None, 1), encoding_format='png'),
      'label': tfds.features.ClassLabel(names=['normal', 'covid']),
      'image/filename': tfds.features.Text(),
      'patient_id': tfds.features.Text(),
      'source': tfds.features.Text(),
      'view': tfds.features.Text(),
      'age': tfds.features.Scalar(dtype=np.int32),
  })


class Builder(tfds.core.GeneratorBasedBuilder):
  """COVID-19 vs normal chest X-rays: the article's split, a patient split, and a re-curation."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_DOWNLOAD_INSTRUCTIONS
  BUILDER_CONFIGS = [
      CovidXrayConfig(
          name='seed', source='article_archive', split='as_published',
          description='The article\'s own split: train = CovidDataset/Train (224 images), '
                      'validation = CovidDataset/Val (60). Kept as published; it leaks patients.'),
      CovidXrayConfig(
          name='patient_split', source='article_archive', split='by_patient',
          description='The same images re-split 60/20/20 into train/validation/test so that no '
                      'patient and no near-duplicate cluster is on two sides.'),
      CovidXrayConfig(
          name='curated', source='raw_collections', split='by_patient',
          description='The article\'s data preparation re-run on the raw collections: COVID-19 '
                      'PA X-rays and as many sampled Kaggle normals, split by patient.'),
  ]
  DEFAULT_BUILDER_CONFIG_NAME = 'seed'

  def __init__(self, *, allow_missing: bool = False,
               manifest_path: epath.PathLike | None = None, **kwargs):
    if not isinstance(allow_missing, bool):
      raise errors.UsageError(f'allow_missing must be True or False, got {allow_missing!r}')
    self._allow_missing = allow_missing
    self._manifest_path = epath.Path(manifest_path) if manifest_path else _MANIFEST
    super().__init__(**kwargs)
    self._original_state.update(allow_missing=allow_missing, manifest_path=manifest_path)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=features(),
        supervised_keys=('image', 'label'),
        homepage='https://github.com/dakshtrehan/Covid-19-Detection',
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    if self.builder_config.source == 'article_archive':
      read, images, missing = self._archive_images(dl_manager)
    else:
      read, images, missing = self._raw_images(dl_manager)
    self.info.metadata['missing_files'] = missing
    if self.builder_config.split == 'by_patient':
      images = _split_by_patient(images, read)
    by_patient = self.builder_config.split == 'by_patient'
    names = list(_SPLIT_FRACTIONS) if by_patient else list(_SEED_SPLITS.values())
    for name in names:
      labels = collections.Counter(i.label for i in images if i.split == name)
      logging.info('covid_xray/%s %s: %d images (%s)', self.builder_config.name, name,
                   sum(labels.values()), ', '.join(f'{k} {v}' for k, v in sorted(labels.items())))
    return {name: self._generate_examples(read, [i for i in images if i.split == name])
            for name in names}

  def _generate_examples(self, read, images):
    for image in images:
      yield image.key, {
          'image': decode_for_dataset(read(image.key), image.key),
          'label': image.label,
          'image/filename': image.key,
          'patient_id': image.patient_id,
          'source': image.source,
          'view': image.view,
          'age': image.age,
      }

  def _archive_images(self, dl_manager):
    """The article's images, verified against the manifest, with what metadata knows of them."""
    archive = _manual_file(dl_manager, _ARCHIVE_NAME) or _download_archive(dl_manager)
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
            age=sources.parse_age(row['age']) if row else -1))
      else:
        images.append(_Image(key=path, label=label, split=split, source=sources.KAGGLE_PEDIATRIC,
                             patient_id=sources.kaggle_patient_id(name)))
    return read, images, missing

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
                     age=sources.parse_age(row['age']))
              for row in rows if f'{_RAW_IMAGES}/{row["filename"]}' in present]
    normals = _kaggle_normals(root)
    for key in sources.sample(normals, len(images), _SPLIT_SEED,
                              f'Kaggle NORMAL images in {", ".join(_KAGGLE_NORMAL_DIRS)}'):
      images.append(_Image(key=key, label='normal', source=sources.KAGGLE_PEDIATRIC,
                           patient_id=sources.kaggle_patient_id(key)))
    return _FolderReader(root), images, missing


def _download_archive(dl_manager) -> epath.Path:
  """Downloads the article's archive; a failure is one DataError saying how to work offline."""
  try:
    return epath.Path(dl_manager.download(_ARCHIVE_URL))
  except Exception as e:  # requests' ConnectionError, HTTP errors, TFDS checksum errors...
    raise errors.DataError(
        f'cannot download {_ARCHIVE_URL} ({type(e).__name__}: {str(e)[:160]}); offline, put '
        f'{_ARCHIVE_NAME} in a folder and pass it as --manual_dir') from None


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


def _split_by_patient(images, read):
  """Re-splits images by patient and near-duplicate cluster (see covidlib_tfds.splitting)."""
  keys = [f'{i.source}:{i.patient_id}' if i.patient_id else '' for i in images]
  hashes = [perceptual_hash.image_hash(decode_for_dataset(read(i.key), i.key)) for i in images]
  groups = splitting.group_images(keys, hashes)
  labels = [int(i.label == 'covid') for i in images]
  names = splitting.split_groups(groups, labels, _SPLIT_FRACTIONS, seed=_SPLIT_SEED)
  empty = [name for name in _SPLIT_FRACTIONS if name not in names]
  if empty:
    raise errors.DataError(
        f'{len(images)} images in {len(set(groups))} patient / near-duplicate groups are too few '
        f'to fill the {", ".join(_SPLIT_FRACTIONS)} splits: {", ".join(empty)} would be empty')
  logging.info('%d images in %d patient / near-duplicate groups', len(images), len(set(groups)))
  return [dataclasses.replace(i, split=name) for i, name in zip(images, names)]


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
