r"""Writes covid_xray's dummy_data/: tiny images in the real layouts, and their manifest.

    python -m covidlib_tfds.covid_xray.dummy_data_generation   # rewrites dummy_data/

Deterministic. Each image is a 32 x 40 smooth random field (a different seed per image), so
images are far apart in perceptual hash, except the planted copies. What it writes:

- `Covid-19-Detection-<commit>.zip`, stored like GitHub's archive of the article's repository:
  `Covid-19-Detection-<commit>/CovidDataset/{Train,Val}/{Covid,Normal}/*`, 23 images, file
  names taken from the real data so that the shipped ieee8023 metadata gives them patient ids
  (or, for 9 of them, none). Planted for the patient split and the audit: patient 51 twice in
  Train; patient 186 in Train (4-x-day1.jpg) and in Val (4-x-day13.jpg); AR-2.jpg in Val a
  resized, re-encoded copy of AR-1.jpg in Train (no metadata: the hash and the file-name series
  `ar` link them); Kaggle patient IM-0551 twice in Train; images without a patient id in
  file-name series (`SERIES`): extubation-1, -4 and -13 in Train and extubation-8 in Val, two
  uploads 88de9d8c...-2ee6-0 and ...-6531-0 in Val, and a lone upload ae6c954c...-e6c8-0 in Train
  that must stay apart. Formats mix RGB and gray JPEG and an RGBA PNG, as in the real archive.
- `manifest.tsv` pinning those 23 images (one by git blob id only, as the real manifest does for
  the image our copy lacks).
- `covid-chestxray-dataset/{metadata.csv,images/}` and `chest_xray/{train,val,test}/{NORMAL,
  PNEUMONIA}/` for the `curated` config: 8 metadata rows of which 4 pass the selection (COVID-19,
  PA, X-ray), 7 Kaggle normals to sample 4 from, and pneumonia images that must be ignored.
- `shared/`, a manual dir for every config in the layout of `../shared/data`:
  `covid_xray_seed/` (a copy of the archive above), `nih_adult_normals/` (6 images of 5
  patients) and `ieee8023_more/` (5 COVID-19 and 6 other findings), each `images/` +
  `manifest.tsv`. Planted: a COVID-19 patient aged 15 (left out of adult), one of unknown age
  (kept), ieee8023 patient 186 with COVID-19 in the archive and in ieee8023_more (one group) and
  an ARDS film (left out of other_findings), an other-finding film that is a near-duplicate of
  the archive's F4341CE7-... (left out of other_findings), an other-finding film without a
  patient id, extubation-20, in the series of the archive's extubation films (left out of
  other_findings), a 2048 px wide original (halved by
  the 1024 px cap), originals with alpha (RGBA, gray + alpha) and a gray JPEG.
- `github/`, the two repositories' archives holding the originals (`COVID-19-<commit>.zip`,
  `covid-chestxray-dataset-<commit>.zip`, plus files that must be ignored), for the download
  route. The prepared copies in `shared/` are made from these originals by `prepare_*` below, a
  numpy/PIL implementation written apart from `covidlib_tfds.originals` (which uses TF), so the
  test that both routes agree is not circular.
"""

import hashlib
import io
import zipfile

import numpy as np
from etils import epath
from PIL import Image

from covidlib_tfds import manifest as manifest_lib
from covidlib_tfds import perceptual_hash
from covidlib_tfds import sources

DUMMY_DIR = epath.Path(__file__).parent / 'dummy_data'
COMMIT = 'a70eb2394d4b75ef6765aa79394e765ee6f9faf2'
ROOT = f'Covid-19-Detection-{COMMIT}/'
NIH_REPO, NIH_COMMIT = 'muhammedtalo/COVID-19', 'ee3e2cffc0824711bed675275506b26f19be7198'
IEEE_REPO = 'raiprabh/covid-chestxray-dataset'
IEEE_COMMIT = '0e8f80adc2e951778cda8da0e8f0ee7beb00ca00'
NIH_ZIP = f'COVID-19-{NIH_COMMIT}.zip'
IEEE_ZIP = f'covid-chestxray-dataset-{IEEE_COMMIT}.zip'
_NIH_FOLDER = 'X-Ray Image DataSet/No_findings/'
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
    # Without a patient id (the shipped metadata lacks them), named as in the real archive: one
    # case's films over time, one upload's two images, and another upload that must stay apart.
    ('CovidDataset/Train/Covid/extubation-1.jpg', 'JPEG', 'RGB', 81),
    ('CovidDataset/Train/Covid/extubation-4.jpg', 'JPEG', 'L', 82),
    ('CovidDataset/Val/Covid/extubation-8.jpg', 'JPEG', 'RGB', 83),
    ('CovidDataset/Train/Covid/extubation-13.jpg', 'JPEG', 'RGB', 84),
    ('CovidDataset/Val/Covid/88de9d8c39e946abd495b37cd07d89e5-2ee6-0.jpg', 'JPEG', 'RGB', 85),
    ('CovidDataset/Val/Covid/88de9d8c39e946abd495b37cd07d89e5-6531-0.jpg', 'JPEG', 'RGB', 86),
    ('CovidDataset/Train/Covid/ae6c954c0039de4b5edee53865ffee43-e6c8-0.jpg', 'JPEG', 'RGB', 87),
]
# File-name series of the images above without a patient id (splitting.series_key).
SERIES = {
    'series:ieee8023:extubation': ['CovidDataset/Train/Covid/extubation-1.jpg',
                                   'CovidDataset/Train/Covid/extubation-13.jpg',
                                   'CovidDataset/Train/Covid/extubation-4.jpg',
                                   'CovidDataset/Val/Covid/extubation-8.jpg'],
    'series:ieee8023:88de9d8c39e946abd495b37cd07d89e5': [
        'CovidDataset/Val/Covid/88de9d8c39e946abd495b37cd07d89e5-2ee6-0.jpg',
        'CovidDataset/Val/Covid/88de9d8c39e946abd495b37cd07d89e5-6531-0.jpg'],
    'series:ieee8023:ar': ['CovidDataset/Train/Covid/AR-1.jpg', 'CovidDataset/Val/Covid/AR-2.jpg'],
}
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


# nih_adult_normals: (file, patient_id, age, sex, view, mode, seed); originals 48 x 40 -> 24 x 20.
NIH_ROWS = [
    ('00000001_000.png', '1', '45', 'M', 'PA', 'L', 51),
    ('00000001_001.png', '1', '46', 'M', 'AP', 'L', 52),
    ('00000002_000.png', '2', '30', 'F', 'AP', 'RGBA', 53),
    ('00000003_000.png', '3', '62', 'F', 'PA', 'L', 54),
    ('00000004_000.png', '4', '18', 'M', 'AP', 'L', 55),
    ('00000005_000.png', '5', '77', 'F', 'PA', 'L', 56),
]
# ieee8023_more: (stem, original suffix, label, finding, patient_id, age, view, format, mode,
# seed, (height, width)). A seed of None: a near-duplicate of the archive's F4341CE7-....
IEEE_ROWS = [
    ('m-covid-1', '.jpeg', 'covid', 'COVID-19', '201', '54', 'PA', 'JPEG', 'L', 61, (40, 32)),
    ('m-covid-2', '.jpg', 'covid', 'COVID-19, ARDS', '201', '54', 'AP', 'JPEG', 'RGB', 62,
     (36, 30)),
    ('m-covid-186', '.png', 'covid', 'COVID-19', '186', '73', 'AP', 'PNG', 'RGBA', 63, (40, 32)),
    ('m-covid-child', '.jpg', 'covid', 'COVID-19', '202', '15', 'AP Supine', 'JPEG', 'L', 64,
     (40, 32)),
    ('m-covid-wide', '.png', 'covid', 'COVID-19', '203', '', 'PA', 'PNG', 'L', 65, (24, 2048)),
    ('m-sars', '.jpeg', 'other', 'SARS', '301', '40', 'PA', 'JPEG', 'L', 66, (40, 32)),
    ('m-pcp', '.png', 'other', 'Pneumocystis', '302', '', 'AP Supine', 'PNG', 'LA', 67, (40, 32)),
    ('m-ards-186', '.jpg', 'other', 'ARDS', '186', '73', 'PA', 'JPEG', 'L', 68, (40, 32)),
    ('m-strep-copy', '.jpg', 'other', 'Streptococcus', '303', '35', 'PA', 'JPEG', 'RGB', None,
     (38, 30)),
    ('m-none', '.jpeg', 'other', 'No Finding', '304', '8', 'PA', 'JPEG', 'L', 69, (40, 32)),
    # No patient id, in the series of the archive's extubation-*.jpg COVID-19 films.
    ('extubation-20', '.jpg', 'other', 'ARDS', '', '', 'AP', 'JPEG', 'L', 88, (40, 32)),
]
NEAR_COPY_OF = 'CovidDataset/Train/Covid/F4341CE7-73C9-45C6-99C8-8567A5484B63.jpeg'
_SOURCE_HEADER = ('file\tlabel\tfinding\tsource\toriginal_repo\tcommit\toriginal_path\t'
                  'original_sha256\tsha256\tpatient_id\tage\tsex\tview\twidth\theight\tlicence')


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
  elif mode in ('RGBA-alpha', 'LA-alpha'):  # Alpha varying: a transparent ramp at the top.
    alpha = np.full(gray.shape, 255, np.uint8)
    alpha[:8] = np.linspace(0, 250, 8, dtype=np.uint8)[:, None]
    alpha = Image.fromarray(alpha)
    # In colour, so that the gray conversion's weights and rounding are put to the test.
    tinted = [image, Image.fromarray(np.roll(gray, 3, axis=1)), Image.fromarray(255 - gray)]
    image = (Image.merge('RGBA', tinted + [alpha]) if mode == 'RGBA-alpha'
             else Image.merge('LA', [image, alpha]))
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


# The reference preparation of the originals: Pillow and numpy only, written apart from
# covidlib_tfds.originals (TF decoders) so that the two-routes test compares two implementations:
# Pillow decodes (JPEG: libjpeg's accurate IDCT); alpha is composited on black channel by
# channel, round(c * alpha / 255); Pillow's convert('L') makes gray; NIH is halved by 2 x 2 means
# rounded half up; ieee8023's longest side is capped at 1024 (the dummy's only case: exactly
# halved, the area mean rounded half to even, as tf.round does).


def _reference_gray(contents: bytes) -> np.ndarray:
  image = Image.open(io.BytesIO(contents))
  image.load()
  if image.mode in ('LA', 'RGBA'):
    array = np.asarray(image).astype(np.int64)
    colour = (array[..., :-1] * array[..., -1:] + 127) // 255  # Exact rounding: 255 is odd.
    image = Image.fromarray(colour.astype(np.uint8).squeeze(-1) if image.mode == 'LA'
                            else colour.astype(np.uint8))
  return np.asarray(image.convert('L'))


def prepare_nih(contents: bytes) -> np.ndarray:
  gray = _reference_gray(contents).astype(np.int64)
  h, w = gray.shape
  return ((gray.reshape(h // 2, 2, w // 2, 2).sum(axis=(1, 3)) + 2) // 4).astype(np.uint8)


def prepare_ieee8023(contents: bytes) -> np.ndarray:
  gray = _reference_gray(contents)
  h, w = gray.shape
  if max(h, w) <= 1024:
    return gray
  assert max(h, w) == 2048 and h % 2 == 0 and w % 2 == 0, 'the reference only halves'
  means = gray.astype(np.float64).reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
  return np.rint(means).astype(np.uint8)


def _png(gray: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(gray, 'L').save(buffer, 'PNG')
  return buffer.getvalue()


def collection_files(seed_files: dict[str, bytes]) -> tuple[dict[str, bytes], dict[str, bytes],
                                                            dict[str, bytes]]:
  """({shared/ path: bytes}, {NIH original path: bytes}, {ieee8023 original path: bytes})."""
  shared, nih, ieee = {}, {}, {}
  lines = [_SOURCE_HEADER]
  licence = 'NIH Clinical Center ChestX-ray14: no restrictions'
  for name, patient, age, sex, view, mode, seed in NIH_ROWS:
    original = encode(smooth_image(seed, 48, 40), 'PNG',
                      'RGBA-alpha' if mode == 'RGBA' else mode)
    nih[_NIH_FOLDER + name] = original
    prepared = _png(prepare_nih(original))
    shared[f'nih_adult_normals/images/{name}'] = prepared
    lines.append('\t'.join([
        f'images/{name}', 'normal', 'No Finding', 'nih', NIH_REPO, NIH_COMMIT, _NIH_FOLDER + name,
        hashlib.sha256(original).hexdigest(), hashlib.sha256(prepared).hexdigest(), patient, age,
        sex, view, '20', '24', licence]))
  shared['nih_adult_normals/manifest.tsv'] = ('\n'.join(lines) + '\n').encode()
  lines = [_SOURCE_HEADER]
  near = Image.open(io.BytesIO(seed_files[NEAR_COPY_OF])).convert('L')
  for (stem, suffix, label, finding, patient, age, view, fmt, mode, seed,
       (height, width)) in IEEE_ROWS:
    if seed is None:
      original = copy_of(np.asarray(near))
    else:
      alpha_mode = {'RGBA': 'RGBA-alpha', 'LA': 'LA-alpha'}.get(mode, mode)
      original = encode(smooth_image(seed, height, width), fmt, alpha_mode)
    path = f'images/{stem}{suffix}'
    ieee[path] = original
    prepared_gray = prepare_ieee8023(original)
    prepared = _png(prepared_gray)
    shared[f'ieee8023_more/images/{stem}.png'] = prepared
    lines.append('\t'.join([
        f'images/{stem}.png', label, finding, 'ieee8023', IEEE_REPO, IEEE_COMMIT, path,
        hashlib.sha256(original).hexdigest(), hashlib.sha256(prepared).hexdigest(), patient, age,
        'M', view, str(prepared_gray.shape[1]), str(prepared_gray.shape[0]), 'CC BY']))
  shared['ieee8023_more/manifest.tsv'] = ('\n'.join(lines) + '\n').encode()
  shared[f'covid_xray_seed/Covid-19-Detection-{COMMIT}.zip'] = zip_bytes(seed_files)
  return shared, nih, ieee


def github_archives(nih: dict[str, bytes], ieee: dict[str, bytes]) -> dict[str, bytes]:
  """{file name: zip bytes}: the two repositories' archives, with files to be ignored."""
  nih = {**nih, 'README.md': b'# COVID-19\n',
         'X-Ray Image DataSet/Covid-19/01E392EE-69F9-4E33-BFCE-E5C968654078.jpeg':
             encode(smooth_image(70), 'JPEG', 'L')}
  ieee = {**ieee, 'metadata.csv': b'patientid,finding\n', 'images/not-selected.jpg':
              encode(smooth_image(71), 'JPEG', 'L')}
  return {NIH_ZIP: zip_bytes(nih, f'COVID-19-{NIH_COMMIT}/'),
          IEEE_ZIP: zip_bytes(ieee, f'covid-chestxray-dataset-{IEEE_COMMIT}/')}


def _check_hashes(files: dict[str, bytes]) -> None:
  """The planted copies must be near-duplicates and nothing else may be."""
  from covidlib_tfds.covid_xray import covid_xray_dataset_builder as builder  # Heavy: TF.
  paths = sorted(p for p in files if p.endswith(sources.IMAGE_SUFFIXES))
  hashes = [perceptual_hash.image_hash(builder.decode_for_dataset(files[p], p)) for p in paths]
  found = {(paths[i], paths[j]) for i, j, _ in perceptual_hash.near_duplicate_pairs(hashes)}
  planted = {tuple(sorted(pair)) for pair in COPIES.items()}
  planted.add(tuple(sorted([NEAR_COPY_OF, 'ieee8023_more/images/m-strep-copy.png'])))
  assert found == planted, f'near-duplicates {found}, planted {planted}'


def main() -> None:
  seed_files = seed_archive_files()
  raw_files = raw_collection_files()
  shared, nih, ieee = collection_files(seed_files)
  prepared = {p: c for p, c in shared.items() if '/images/' in p}
  _check_hashes({**seed_files, **raw_files, **prepared})
  DUMMY_DIR.mkdir(exist_ok=True)
  (DUMMY_DIR / f'Covid-19-Detection-{COMMIT}.zip').write_bytes(zip_bytes(seed_files))
  (DUMMY_DIR / 'manifest.tsv').write_text(manifest_text(seed_files, (GIT_BLOB_ONLY,)))
  archives = {f'github/{name}': data for name, data in github_archives(nih, ieee).items()}
  shared = {f'shared/{path}': data for path, data in shared.items()}
  for path, contents in {**raw_files, **shared, **archives}.items():
    (DUMMY_DIR / path).parent.mkdir(parents=True, exist_ok=True)
    (DUMMY_DIR / path).write_bytes(contents)
  print(f'wrote {len(seed_files)} archive images, {len(raw_files)} raw files, {len(shared)} '
        f'shared files and {len(archives)} GitHub archives to {DUMMY_DIR}')


if __name__ == '__main__':
  main()
