"""Fixtures for the covid_xray tests: the dummy data, a zip rewriter, tiny builds."""

import io
import zipfile

from etils import epath
import pytest
import tensorflow_datasets as tfds

from covidlib_tfds.covid_xray import covid_xray_dataset_builder as builder_lib
from covidlib_tfds.covid_xray import dummy_data_generation as dummy_gen

DUMMY_DIR = epath.Path(builder_lib.__file__).parent / 'dummy_data'
ARCHIVE_NAME = f'Covid-19-Detection-{dummy_gen.COMMIT}.zip'
SHARED_DIR = DUMMY_DIR / 'shared'  # A manual dir for every config, as ../shared/data.


class Dummy:
  """Paths of the dummy data and helpers to build from (altered copies of) it."""
  dir = DUMMY_DIR
  archive = DUMMY_DIR / ARCHIVE_NAME
  manifest = DUMMY_DIR / 'manifest.tsv'
  root = dummy_gen.ROOT
  shared = SHARED_DIR
  nih_manifest = SHARED_DIR / 'nih_adult_normals' / 'manifest.tsv'
  ieee8023_more_manifest = SHARED_DIR / 'ieee8023_more' / 'manifest.tsv'
  # What `dl_manager.download` returns for each pinned repository archive (the download route).
  github = {
      f'https://github.com/{dummy_gen.NIH_REPO}/archive/{dummy_gen.NIH_COMMIT}.zip':
          DUMMY_DIR / 'github' / dummy_gen.NIH_ZIP,
      f'https://github.com/{dummy_gen.IEEE_REPO}/archive/{dummy_gen.IEEE_COMMIT}.zip':
          DUMMY_DIR / 'github' / dummy_gen.IEEE_ZIP,
  }

  @staticmethod
  def members() -> dict[str, bytes]:
    """{path relative to the archive root: bytes} of the dummy archive's images."""
    with zipfile.ZipFile(io.BytesIO(DUMMY_DIR.joinpath(ARCHIVE_NAME).read_bytes())) as z:
      return {n[len(dummy_gen.ROOT):]: z.read(n) for n in z.namelist() if not n.endswith('/')}

  @staticmethod
  def write_archive(folder: epath.Path, files: dict[str, bytes]) -> epath.Path:
    """Writes `files` as the article's archive into `folder` (a manual dir); returns it."""
    folder = epath.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ARCHIVE_NAME).write_bytes(dummy_gen.zip_bytes(files))
    return folder

  @staticmethod
  def build(config: str, data_dir, manual_dir=DUMMY_DIR, manifest_path=None, name=None,
            **kwargs) -> tfds.core.DatasetBuilder:
    """Builds `config` (or the full `name`, e.g. 'covid_xray/seed/allow_missing=True').

    The dummy data's manifests are the defaults; kwargs may override them.
    """
    kwargs.setdefault('nih_manifest_path', Dummy.nih_manifest)
    kwargs.setdefault('ieee8023_more_manifest_path', Dummy.ieee8023_more_manifest)
    builder = tfds.builder(name or f'covid_xray/{config}', data_dir=data_dir,
                           manifest_path=manifest_path or DUMMY_DIR / 'manifest.tsv', **kwargs)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    return builder


@pytest.fixture(scope='session')
def dummy() -> type[Dummy]:
  return Dummy


@pytest.fixture(scope='session')
def built_dummy(tmp_path_factory) -> epath.Path:
  """A data_dir holding covid_xray/seed and covid_xray/patient_split built from dummy data."""
  data_dir = tmp_path_factory.mktemp('tfds')
  for config in ('seed', 'patient_split'):
    Dummy.build(config, data_dir)
  return epath.Path(data_dir)


@pytest.fixture(scope='session')
def built_shared(tmp_path_factory) -> dict[str, tfds.core.DatasetBuilder]:
  """adult, adult_pediatric and other_findings built from dummy_data/shared, by config."""
  data_dir = tmp_path_factory.mktemp('tfds_shared')
  return {config: Dummy.build(config, data_dir, manual_dir=Dummy.shared)
          for config in ('adult', 'adult_pediatric', 'other_findings')}
