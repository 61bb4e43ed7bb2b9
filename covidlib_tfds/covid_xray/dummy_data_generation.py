r"""Writes covid_xray's dummy_data/: tiny images in the real layouts, and their manifest.

    python -m covidlib_tfds.covid_xray.dummy_data_generation   # rewrites dummy_data/

Deterministic. Each image is a 32 x 40 smooth random field (a different seed per image), so
images are far apart in perceptual hash, except the planted copies. What it writes:

- `Covid-19-Detection-<commit>.zip`, stored like GitHub's archive of the article's repository:
  `Covid-19-Detection-<commit>/CovidDataset/{Train,Val}/{Covid,Normal}/*`, 16 images, file
  names taken from the real data so that the shipped ieee8023 metadata gives them patient ids.
  Planted for the patient split and the audit: patient 51 twice in Train; patient 186 in Train
  (4-x-day1.jpg) and in Val (4-x-day13.jpg); AR-2.jpg in Val a resized, re-encoded copy of
  AR-1.jpg in Train (no metadata: only the hash links them); Kaggle patient IM-0551 twice in
  Train. Formats mix RGB and gray JPEG and an RGBA PNG, as in the real archive.
- `manifest.tsv` pinning those 16 images (one by git blob id only, as the real manifest does for
  the image our copy lacks).
- `covid-chestxray-dataset/{metadata.csv,images/}` and `chest_xray/{train,val,test}/{NORMAL,
  PNEUMONIA}/` for the `curated` config: 8 metadata rows of which 4 pass the selection (COVID-19,
  PA, X-ray), 7 Kaggle normals to sample 4 from, and pneumonia images that must be ignored.
"""

import hashlib
import io
import zipfile

import numpy as np
from etils import epath
from PIL import Image

from covidlib_tfds import manifest as manifest_lib
from covidlib_tfds import perceptual_hash

DUMMY_DIR = epath.Path(__file__).parent / 'dummy_data'
COMMIT = 'a70eb2394d4b75ef6765aa79394e765ee6f9faf2'
ROOT = f'Covid-19-Detection-{COMMIT}/'
_DATE = (2021, 4, 17, 0, 0, 0)

# (path in the archive, format, mode, seed). A seed of None marks a planted copy.
SEED_IMAGES = [
    ('CovidDataset/Train/Covid/F4341CE7-73C9-45C6-99C8-8567A5484B63.jpeg', 'JPEG', 'RGB', 1),
    ('CovidDataset/Train/Covid/E63574A7-4188-4C8D-8D17-9D67A18A1AFA.jpeg', 'JPEG', 'L', 2),
    ('CovidDataset/Train/Covid/AR-1.jpg', 'JPEG', 'RGB', 3),
    ('CovidDataset/Train/Covid/4-x-day1.jpg', 'JPEG', 'RGB', 4),
    ('CovidDataset/Train/Covid/23E99E2E-447C-46E5-8EB2-D35D12473C39.png', 'PNG', 'RGBA', 5),
    ('CovidDataset/Train/Normal/IM-0551-0001-0001.jpeg', 'JPEG', 'L', 6),
    ('CovidDataset/Train/Normal/IM-0551-0001-0002.jpeg', 'JPEG', 'L', 7),
    ('CovidDataset/Train/Normal/IM-0156-0001.jpeg', 'JPEG', 'L', 8),
    ('CovidDataset/Train/Normal/NORMAL2-IM-1020-0001-0001.jpeg', 'JPEG', 'L', 9),
    ('CovidDataset/Train/Normal/IM-0172-0001.jpeg', 'JPEG', 'L', 10),
    ('CovidDataset/Val/Covid/AR-2.jpg', 'JPEG', 'RGB', None),  # A copy of AR-1.jpg.
    ('CovidDataset/Val/Covid/4-x-day13.jpg', 'JPEG', 'RGB', 12),
    ('CovidDataset/Val/Covid/paving.jpg', 'JPEG', 'RGB', 13),
    ('CovidDataset/Val/Normal/NORMAL2-IM-0416-0001-0001.jpeg', 'JPEG', 'L', 14),
    ('CovidDataset/Val/Normal/NORMAL2-IM-0851-0001.jpeg', 'JPEG', 'L', 15),
    ('CovidDataset/Val/Normal/IM-0182-0001.jpeg', 'JPEG', 'L', 16),
]
COPIES = {'CovidDataset/Val/Covid/AR-2.jpg': 'CovidDataset/Train/Covid/AR-1.jpg'}
GIT_BLOB_ONLY = 'CovidDataset/Val/Covid/paving.jpg'

_METADATA_HEADER = (
    'patientid,offset,sex,age,finding,survival,intubated,intubation_present,went_icu,'
    'needed_supplemental_O2,extubated,temperature,pO2_saturation,leukocyte_count,'
    'neutrophil_count,lymphocyte_count,view,modality,date,location,folder,filename,doi,url,'
    'license,clinical_notes,other_notes,')
# (patientid, age, finding, view, modality, filename, format, mode, seed)
RAW_COVID_ROWS = [
    ('101', '50', 'COVID-19', 'PA', 'X-ray', 'c101-a.jpg', 'JPEG', 'RGB', 21),
    ('101', '50', 'COVID-19', 'PA', 'X-ray', 'c101-b.png', 'PNG', 'RGBA', 22),
    ('102', '', 'COVID-19, ARDS', 'PA', 'X-ray', 'c102.jpeg', 'JPEG', 'L', 23),
    ('103', '70', 'COVID-19', 'PA', 'X-ray', 'c103.jpg', 'JPEG', 'RGB', 24),
    ('104', '60', 'COVID-19', 'AP', 'X-ray', 'c104-ap.jpg', 'JPEG', 'RGB', 25),
    ('105', '40', 'COVID-19', 'PA', 'CT', 'c105-ct.jpg', 'JPEG', 'L', 26),
    ('106', '30', 'SARS', 'PA', 'X-ray', 'c106-sars.jpg', 'JPEG', 'RGB', 27),
    ('107', '45', 'No Finding', 'PA', 'X-ray', 'c107-none.jpg', 'JPEG', 'L', 28),
]
RAW_NORMALS = [
    ('chest_xray/train/NORMAL/IM-0115-0001.jpeg', 31),
    ('chest_xray/train/NORMAL/IM-0117-0001.jpeg', 32),
    ('chest_xray/train/NORMAL/IM-0119-0001.jpeg', 33),
    ('chest_xray/train/NORMAL/NORMAL2-IM-0381-0001.jpeg', 34),
    ('chest_xray/val/NORMAL/NORMAL2-IM-1427-0001.jpeg', 35),
    ('chest_xray/test/NORMAL/IM-0001-0001.jpeg', 36),
    ('chest_xray/test/NORMAL/NORMAL2-IM-0012-0001.jpeg', 37),
    ('chest_xray/train/PNEUMONIA/person1_bacteria_1.jpeg', 38),
    ('chest_xray/val/PNEUMONIA/person1946_bacteria_4874.jpeg', 39),
    ('chest_xray/test/PNEUMONIA/person100_bacteria_475.jpeg', 40),
]


def smooth_image(seed: int, height: int = 40, width: int = 32) -> np.ndarray:
  """uint8 (height, width): a 5 x 4 random field, bicubically enlarged, plus faint noise."""
  rs = np.random.RandomState(seed)
  coarse = Image.fromarray((rs.rand(5, 4) * 255).astype(np.uint8))
  field = np.asarray(coarse.resize((width, height), Image.BICUBIC), np.float64)
  return np.clip(field + rs.randint(-3, 4, field.shape), 0, 255).astype(np.uint8)


def encode(gray: np.ndarray, fmt: str, mode: str) -> bytes:
  image = Image.fromarray(gray)
  if mode == 'RGB':
    image = Image.merge('RGB', [image, image, image])  # Gray content in RGB files, as in X-rays.
  elif mode == 'RGBA':
    image = Image.merge('RGBA', [image, image, image, Image.new('L', image.size, 255)])
  buffer = io.BytesIO()
  image.save(buffer, fmt, **({'quality': 90} if fmt == 'JPEG' else {}))
  return buffer.getvalue()


def copy_of(gray: np.ndarray) -> bytes:
  """A near-duplicate: slightly smaller and re-encoded at another JPEG quality."""
  smaller = Image.fromarray(gray).resize((30, 38), Image.BILINEAR)
  buffer = io.BytesIO()
  Image.merge('RGB', [smaller] * 3).save(buffer, 'JPEG', quality=70)
  return buffer.getvalue()


def seed_archive_files() -> dict[str, bytes]:
  grays = {path: smooth_image(seed) for path, _, _, seed in SEED_IMAGES if seed is not None}
  files = {}
  for path, fmt, mode, seed in SEED_IMAGES:
    files[path] = copy_of(grays[COPIES[path]]) if seed is None else encode(grays[path], fmt, mode)
  return files


def zip_bytes(files: dict[str, bytes], root: str = ROOT) -> bytes:
  """A stored (not deflated) zip with GitHub-archive style directory entries under `root`."""
  dirs = sorted({root} | {root + p.rsplit('/', i)[0] + '/' for p in files for i in (1, 2, 3)})
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, 'w', zipfile.ZIP_STORED) as archive:
    for name in dirs:
      archive.writestr(zipfile.ZipInfo(name, _DATE), b'')
    for path in sorted(files):
      archive.writestr(zipfile.ZipInfo(root + path, _DATE), files[path])
  return buffer.getvalue()


def manifest_text(files: dict[str, bytes], git_blob_only: tuple[str, ...] = ()) -> str:
  lines = ['path\tsplit\tlabel\tbytes\tgit_blob_sha1\tsha256\tpresent']
  for path in sorted(files):
    _, split, label, _ = path.split('/')
    sha256 = '' if path in git_blob_only else hashlib.sha256(files[path]).hexdigest()
    lines.append('\t'.join([path, split, label, str(len(files[path])),
                            manifest_lib.git_blob_sha1(files[path]), sha256, 'yes']))
  return '\n'.join(lines) + '\n'


def raw_collection_files() -> dict[str, bytes]:
  files = {}
  rows = [_METADATA_HEADER]
  for patient, age, finding, view, modality, name, fmt, mode, seed in RAW_COVID_ROWS:
    finding = f'"{finding}"' if ',' in finding else finding
    rows.append(f'{patient},0,M,{age},{finding},,,,,,,,,,,,{view},{modality},,,images,{name},,,,,,')
    files[f'covid-chestxray-dataset/images/{name}'] = encode(smooth_image(seed), fmt, mode)
  files['covid-chestxray-dataset/metadata.csv'] = ('\n'.join(rows) + '\n').encode()
  for path, seed in RAW_NORMALS:
    files[path] = encode(smooth_image(seed), 'JPEG', 'L')
  return files


def _check_hashes(files: dict[str, bytes]) -> None:
  """The planted copies must be near-duplicates and nothing else may be."""
  from covidlib_tfds.covid_xray import covid_xray_dataset_builder as builder  # Heavy: TF.
  paths = sorted(p for p in files if not p.endswith('.csv'))
  hashes = [perceptual_hash.image_hash(builder.decode_for_dataset(files[p], p)) for p in paths]
  found = {(paths[i], paths[j]) for i, j, _ in perceptual_hash.near_duplicate_pairs(hashes)}
  planted = {tuple(sorted(pair)) for pair in COPIES.items()}
  assert found == planted, f'near-duplicates {found}, planted {planted}'


def main() -> None:
  seed_files = seed_archive_files()
  raw_files = raw_collection_files()
  _check_hashes({**seed_files, **raw_files})
  DUMMY_DIR.mkdir(exist_ok=True)
  (DUMMY_DIR / f'Covid-19-Detection-{COMMIT}.zip').write_bytes(zip_bytes(seed_files))
  (DUMMY_DIR / 'manifest.tsv').write_text(manifest_text(seed_files, (GIT_BLOB_ONLY,)))
  for path, contents in raw_files.items():
    (DUMMY_DIR / path).parent.mkdir(parents=True, exist_ok=True)
    (DUMMY_DIR / path).write_bytes(contents)
  print(f'wrote {len(seed_files)} archive images and {len(raw_files)} raw files to {DUMMY_DIR}')


if __name__ == '__main__':
  main()
