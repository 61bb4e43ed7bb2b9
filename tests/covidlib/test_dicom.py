"""DICOM -> displayed uint8 gray: MONOCHROME1/2, 12- and 16-bit, rescale, window, VOI LUT, errors.

Fixtures are written with pydicom from a known 8-bit image `g`; each encoding is chosen so that
the display pipeline must give back exactly `g`, the pixels a PNG of `g` decodes to.
"""

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from covidlib import dicom
from covidlib import errors
from covidlib import preprocess


def write_dicom(path, stored: np.ndarray | None, photometric='MONOCHROME2', bits_stored=16,
                **elements) -> str:
  """A minimal Part 10 file (Secondary Capture) holding `stored` (None: no pixel data)."""
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
  meta.MediaStorageSOPInstanceUID = generate_uid()
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds = Dataset()
  ds.file_meta = meta
  ds.SOPClassUID = SecondaryCaptureImageStorage
  ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
  ds.Modality = 'DX'
  ds.PatientID = 'anonymous'
  if stored is not None:
    ds.set_pixel_data(stored, photometric, bits_stored)
  for key, value in elements.items():
    setattr(ds, key, value)
  ds.save_as(path, enforce_file_format=True)
  return str(path)


@pytest.fixture
def g(gray_image) -> np.ndarray:
  """The known 8-bit image, stretched to use 0..255 fully."""
  image = gray_image.astype(np.float64)
  return np.round((image - image.min()) / (image.max() - image.min()) * 255).astype(np.uint8)


def _encodings(g):
  g16 = g.astype(np.uint16)
  return {
      'mono2_8bit': (g, 'MONOCHROME2', 8, {}),
      'mono2_12bit': (np.round(g * 4095.0 / 255).astype(np.uint16), 'MONOCHROME2', 12, {}),
      'mono2_16bit': (g16 * 257, 'MONOCHROME2', 16, {}),
      'mono1_12bit': (4095 - np.round(g * 4095.0 / 255).astype(np.uint16), 'MONOCHROME1', 12,
                      {}),
      'mono1_16bit': (65535 - g16 * 257, 'MONOCHROME1', 16, {}),
      # Stored 1000..3040, a LINEAR window exactly over that range (PS3.3 C.11.2.1.2.1):
      # ((x - (c - 0.5)) / (w - 1) + 0.5) maps 1000 -> 0 and 3040 -> 1.
      'mono2_16bit_window': (1000 + g16 * 8, 'MONOCHROME2', 16,
                             {'WindowCenter': 2020.5, 'WindowWidth': 2041}),
      'mono1_12bit_window': (4095 - (500 + g16 * 8), 'MONOCHROME1', 12,
                             {'WindowCenter': 4095 - 1520 + 0.5, 'WindowWidth': 2041}),
      # Rescale slope 2, intercept -1024: displayed range doubles, the mapping stays exact.
      'mono2_12bit_rescale': (np.round(g * 4095.0 / 255).astype(np.uint16), 'MONOCHROME2', 12,
                              {'RescaleSlope': 2, 'RescaleIntercept': -1024,
                               'RescaleType': 'US'}),
  }


@pytest.mark.parametrize('name', list(_encodings(np.zeros((2, 2), np.uint8))))
def test_displays_as_the_same_pixels_as_png(name, g, tmp_path, encode):
  stored, photometric, bits, elements = _encodings(g)[name]
  path = write_dicom(tmp_path / f'{name}.dcm', stored, photometric, bits, **elements)
  from_png = preprocess.decode_bytes(encode(g), 'g.png')
  loaded = dicom.load_dicom(path)
  assert loaded.dtype == np.uint8 and loaded.shape == g.shape + (1,)
  np.testing.assert_array_equal(loaded, from_png)


def test_window_clips_outside_values(tmp_path):
  stored = np.array([[0, 100, 150, 200, 4095]], np.uint16)
  path = write_dicom(tmp_path / 'w.dcm', stored, 'MONOCHROME2', 12, WindowCenter=150.5,
                     WindowWidth=101)
  np.testing.assert_array_equal(dicom.load_dicom(path)[..., 0], [[0, 0, 128, 255, 255]])


def test_voi_lut_sequence_is_applied(tmp_path):
  """A VOI LUT that inverts 4 input values onto an 8-bit output range."""
  stored = np.array([[0, 1, 2, 3]], np.uint16)
  item = Dataset()
  item.LUTDescriptor = [4, 0, 8]
  item.add_new(0x00283006, 'US', [255, 170, 85, 0])  # LUT Data.
  path = write_dicom(tmp_path / 'lut.dcm', stored, 'MONOCHROME2', 12,
                     VOILUTSequence=Sequence([item]))
  np.testing.assert_array_equal(dicom.load_dicom(path)[..., 0], [[255, 170, 85, 0]])


def test_file_without_pixel_data_names_the_file(tmp_path):
  path = write_dicom(tmp_path / 'no_pixels.dcm', None)
  with pytest.raises(errors.InvalidImageError, match='no_pixels.dcm: DICOM file has no pixel '
                     'data'):
    dicom.load_dicom(path)


def test_truncated_pixel_data_names_the_file(tmp_path, g):
  path = write_dicom(tmp_path / 'short.dcm', g.astype(np.uint16) * 257)
  data = open(path, 'rb').read()
  (tmp_path / 'short.dcm').write_bytes(data[:-200])
  with pytest.raises(errors.InvalidImageError, match='short.dcm: DICOM pixel data cannot be '
                     'decoded'):
    dicom.load_dicom(path)


def test_text_named_dcm_is_not_readable_dicom(tmp_path):
  path = tmp_path / 'notes.dcm'
  path.write_text('not a dicom file\n')
  with pytest.raises(errors.InvalidImageError, match='notes.dcm: not a readable DICOM file'):
    dicom.load_dicom(path)


def test_multi_frame_is_refused(tmp_path, g):
  path = write_dicom(tmp_path / 'cine.dcm', np.stack([g, g]), 'MONOCHROME2', 8)
  with pytest.raises(errors.InvalidImageError, match='holds 2 frames'):
    dicom.load_dicom(path)


def test_is_dicom_by_magic_or_extension(tmp_path, g, encode):
  no_extension = write_dicom(tmp_path / 'IM0001', g, 'MONOCHROME2', 8)
  (tmp_path / 'x.png').write_bytes(encode(g))
  assert dicom.is_dicom(no_extension)
  assert dicom.is_dicom(tmp_path / 'anything.DCM')
  assert not dicom.is_dicom(tmp_path / 'x.png')
  assert pydicom.dcmread(no_extension).Modality == 'DX'


def test_missing_pydicom_is_a_clear_per_file_error(tmp_path, g, monkeypatch):
  import builtins
  path = write_dicom(tmp_path / 'a.dcm', g, 'MONOCHROME2', 8)
  real_import = builtins.__import__

  def no_pydicom(name, *args, **kwargs):
    if name == 'pydicom' or name.startswith('pydicom.'):
      raise ImportError('No module named pydicom')
    return real_import(name, *args, **kwargs)
  monkeypatch.setattr(builtins, '__import__', no_pydicom)
  with pytest.raises(errors.InvalidImageError, match=r"a.dcm: reading DICOM needs pydicom: pip "
                     r"install 'covidlib\[dicom\]'"):
    dicom.load_dicom(path)
