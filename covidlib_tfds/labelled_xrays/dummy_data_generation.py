"""Writes labelled_xrays' dummy_data/: a tiny labelled export, as a user would have it.

    python -m covidlib_tfds.labelled_xrays.dummy_data_generation   # rewrites dummy_data/

Deterministic. 12 images of 32 x 32 (coarse random blocks, a different seed each, so no two are
near-duplicates) of 6 patients, 2 each, labels by patient:
- `site_a/p<k>_<n>.png`: 4 patients, ids in the CSV's patient_id column, view AP in the CSV;
- `site_b/im<k><n>.dcm`: 2 patients, 12-bit MONOCHROME1 DICOM, PatientID, ViewPosition PA,
  PatientAge and PatientSex in the header only (made-up values, no real person).
`labels.csv` lists them with `path,label,patient_id,site,view` (label as covid/normal and 1/0).
"""

import io

from etils import epath
import numpy as np
from PIL import Image

DUMMY_DIR = epath.Path(__file__).parent / 'dummy_data'
SIDE = 32


def _pixels(seed: int) -> np.ndarray:
  rs = np.random.RandomState(seed)
  blocks = np.kron(rs.randint(0, 200, (4, 4)), np.ones((SIDE // 4, SIDE // 4)))
  return (blocks + rs.randint(0, 56, (SIDE, SIDE))).astype(np.uint8)


def _png(gray: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(gray).save(buffer, 'PNG')
  return buffer.getvalue()


def _dicom(gray: np.ndarray, patient_id: str, seed: int) -> bytes:
  from pydicom.dataset import Dataset, FileMetaDataset
  from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

  uid = f'1.2.826.0.1.3680043.8.498.{seed + 1}'  # Fixed UIDs: the files stay byte-identical.
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
  meta.MediaStorageSOPInstanceUID = uid
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds = Dataset()
  ds.file_meta = meta
  ds.SOPClassUID = SecondaryCaptureImageStorage
  ds.SOPInstanceUID = uid
  ds.Modality = 'DX'
  ds.PatientID = patient_id
  ds.ViewPosition = 'PA'
  ds.PatientAge = '054Y'
  ds.PatientSex = 'F'
  ds.set_pixel_data(4095 - np.round(gray * (4095.0 / 255)).astype(np.uint16), 'MONOCHROME1', 12,
                    generate_instance_uid=False)
  buffer = io.BytesIO()
  ds.save_as(buffer, enforce_file_format=True)
  return buffer.getvalue()


def files() -> dict[str, bytes]:
  """{path relative to dummy_data/: contents}, labels.csv included."""
  out, lines, seed = {}, ['path,label,patient_id,site,view'], 0
  for k in range(4):
    for n in range(2):
      path = f'site_a/p{k}_{n}.png'
      out[path] = _png(_pixels(seed))
      lines.append(f'{path},{"covid" if k % 2 else "normal"},A-{k},site_a,AP')
      seed += 1
  for k in range(2):
    for n in range(2):
      path = f'site_b/im{k}{n}.dcm'
      out[path] = _dicom(_pixels(seed), f'B-{k}', seed)
      lines.append(f'{path},{1 if k % 2 else 0},,site_b,')
      seed += 1
  out['labels.csv'] = ('\n'.join(lines) + '\n').encode()
  return out


def main() -> None:
  for path, contents in files().items():
    (DUMMY_DIR / path).parent.mkdir(parents=True, exist_ok=True)
    (DUMMY_DIR / path).write_bytes(contents)


if __name__ == '__main__':
  main()
