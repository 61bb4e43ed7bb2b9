"""Builds labelled_xrays from generated folders of N files; prints files/s and peak RSS.

    .venv/bin/python benchmarks/labelled_build.py --num_files=1000,10000 --work_dir=/tmp/lxb

For each N it writes a folder of N generated images (64 x 64 by default, --side; coarse random
blocks plus noise, so no two are near-duplicates; half 12-bit MONOCHROME1 DICOM with
PatientID and ViewPosition in the header, half 8-bit PNG with the patient id in the CSV; 3
sites, 3 images per patient) and its labels.csv, then runs the real binary as a child process:

    COVIDLIB_SALT=... python -m covidlib_tfds.build --labels_csv=DIR/labels.csv --name=bench_N \
        --data_dir=DIR/tfds

and reads the child's peak RSS and CPU time from the kernel (wait4). The baseline row is a child
that only imports the binary (TensorFlow and TFDS loaded, nothing built): memory the build adds
beyond it is what grows, or not, with N. Prints a markdown table (for BENCHMARKS.md) and keeps
each build's log in DIR/build_N.log.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import time

from absl import app
from absl import flags
import numpy as np
from PIL import Image

_NUM_FILES = flags.DEFINE_list('num_files', ['1000', '10000'], 'Folder sizes to build.')
_WORK_DIR = flags.DEFINE_string('work_dir', '/tmp/labelled_build_benchmark',
                                'Where the folders and datasets go (deleted and rewritten).')
_SIDE = flags.DEFINE_integer('side', 64, 'Image side in pixels.')
_SITES = ('north', 'south', 'east')
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dicom_bytes(gray: np.ndarray, patient_id: str) -> bytes:
  from pydicom.dataset import Dataset, FileMetaDataset
  from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
  meta.MediaStorageSOPInstanceUID = generate_uid()
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds = Dataset()
  ds.file_meta = meta
  ds.SOPClassUID = SecondaryCaptureImageStorage
  ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
  ds.Modality = 'DX'
  ds.PatientID = patient_id
  ds.PatientName = 'Bench^Patient'
  ds.ViewPosition = 'PA'
  ds.set_pixel_data(4095 - np.round(gray * (4095.0 / 255)).astype(np.uint16), 'MONOCHROME1', 12)
  buffer = io.BytesIO()
  ds.save_as(buffer, enforce_file_format=True)
  return buffer.getvalue()


def write_folder(root: str, n: int, side: int) -> None:
  """n files in root/<site>/ and root/labels.csv; 3 images per patient, labels by patient."""
  rs = np.random.RandomState(n)
  lines = ['path,label,patient_id,site']
  for site in _SITES:
    os.makedirs(os.path.join(root, site), exist_ok=True)
  for k in range(n):
    site = _SITES[k % len(_SITES)]
    patient = k // (3 * len(_SITES)) * len(_SITES) + k % len(_SITES)  # 3 images each.
    label = 'covid' if patient % 2 else 'normal'
    # Coarse random blocks (what the perceptual hash sees: films must differ there, or they
    # are near-duplicates and grouped) plus fine noise.
    blocks = np.kron(rs.randint(0, 200, (8, 8)), np.ones((side // 8, side // 8)))
    gray = (blocks + rs.randint(0, 56, (side, side))).astype(np.uint8)
    if k % 2:
      path = f'{site}/x{k:05d}.dcm'
      contents = _dicom_bytes(gray, f'P{patient:05d}')
      lines.append(f'{path},{label},,{site}')  # Patient id from the header.
    else:
      path = f'{site}/x{k:05d}.png'
      buffer = io.BytesIO()
      Image.fromarray(gray).save(buffer, 'PNG')
      contents = buffer.getvalue()
      lines.append(f'{path},{label},P{patient:05d},{site}')
    with open(os.path.join(root, path), 'wb') as f:
      f.write(contents)
  with open(os.path.join(root, 'labels.csv'), 'w') as f:
    f.write('\n'.join(lines) + '\n')


def run_measured(command: list[str], log: str) -> tuple[int, float, float, float]:
  """(exit status, wall s, CPU s, peak RSS MiB) of a child process."""
  env = dict(os.environ, COVIDLIB_SALT='benchmark-salt-not-secret', TF_CPP_MIN_LOG_LEVEL='2',
             CUDA_VISIBLE_DEVICES='')
  start = time.perf_counter()
  with open(log, 'w') as out:
    child = subprocess.Popen(command, cwd=_REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(child.pid, 0)
  wall = time.perf_counter() - start
  child.returncode = os.waitstatus_to_exitcode(status)
  return (child.returncode, wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024)


def _size_mib(folder: str) -> float:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder)
             for f in files) / 2**20


def main(argv):
  del argv
  work = _WORK_DIR.value
  shutil.rmtree(work, ignore_errors=True)
  os.makedirs(work)
  rows = []
  status, wall, cpu, rss = run_measured(
      [sys.executable, '-c', 'import covidlib_tfds.build'], os.path.join(work, 'baseline.log'))
  assert status == 0, 'baseline import failed'
  rows.append(f'| baseline: import only | - | {wall:.1f} s | {cpu:.1f} s | - | {rss:.0f} MiB | - |')
  for n in map(int, _NUM_FILES.value):
    root = os.path.join(work, f'export_{n}')
    start = time.perf_counter()
    write_folder(root, n, _SIDE.value)
    print(f'{n} files written in {time.perf_counter() - start:.0f} s '
          f'({_size_mib(root):.0f} MiB)', flush=True)
    data_dir = os.path.join(work, f'tfds_{n}')
    log = os.path.join(work, f'build_{n}.log')
    status, wall, cpu, rss = run_measured(
        [sys.executable, '-m', 'covidlib_tfds.build', f'--labels_csv={root}/labels.csv',
         f'--name=bench_{n}', f'--data_dir={data_dir}'], log)
    if status != 0:
      raise SystemExit(f'build of {n} files failed (exit {status}); see {log}')
    rows.append(f'| {n} files | {n / wall:.0f} | {wall:.0f} s | {cpu:.0f} s | '
                f'{_size_mib(root):.0f} MiB | {rss:.0f} MiB | {_size_mib(data_dir):.0f} MiB |')
    print(rows[-1], flush=True)
  print('\n| build | files/s | wall | CPU | input | peak RSS | prepared |')
  print('|---|---|---|---|---|---|---|')
  print('\n'.join(rows))


if __name__ == '__main__':
  app.run(main)
