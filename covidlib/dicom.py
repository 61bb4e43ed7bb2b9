"""DICOM chest X-rays -> the same uint8 (H, W, 1) gray image that `covidlib.preprocess` decodes.

    from covidlib import dicom
    if dicom.is_dicom('IM0001'):
      gray = dicom.load_dicom('IM0001')   # uint8 (H, W, 1), 0 = black, as displayed

Needs pydicom (`pip install 'covidlib[dicom]'`); without it, reading a DICOM file raises
InvalidImageError saying so. The display pipeline of DICOM PS3.4 (Grayscale Standard Display),
in order, with pydicom's own functions:

  1. Modality LUT (`apply_modality_lut`): Rescale Slope/Intercept or a Modality LUT Sequence.
  2. VOI LUT (`apply_voi_lut`): a VOI LUT Sequence or the first Window Center/Width.
  3. Scale to 8 bits: the output range of step 2 (or, without VOI, the range of values the
     Bits Stored / Pixel Representation / rescale can hold) maps linearly onto 0..255. A 12-bit
     image is therefore scaled by 255/4095 and a 16-bit one by 255/65535, never stretched to its
     own min and max (that would make brightness depend on the image's content).
  4. MONOCHROME1 (0 = white) is inverted so that, as in every PNG/JPEG X-ray, bone is bright.
"""

from __future__ import annotations

import os

import numpy as np

from covidlib import errors

_LUMA = (0.2989, 0.5870, 0.1140)  # As covidlib.preprocess.
_EXTENSIONS = ('.dcm', '.dicom', '.dic')


def is_dicom(path: str | os.PathLike) -> bool:
  """True for a DICOM Part 10 file ('DICM' at byte 128) or a .dcm/.dicom name."""
  path = os.fspath(path)
  if path.lower().endswith(_EXTENSIONS):
    return True
  try:
    with open(path, 'rb') as f:
      header = f.read(132)
  except OSError:
    return False
  return header[128:132] == b'DICM'


def _stored_range(ds) -> tuple[float, float]:
  """The range the modality-LUT output can take (pydicom's apply_windowing uses the same)."""
  if ds.get('ModalityLUTSequence'):
    bits = int(ds.ModalityLUTSequence[0].LUTDescriptor[2])
    return 0.0, float(2**bits - 1)
  bits = int(ds.BitsStored)
  if int(ds.get('PixelRepresentation', 0)) == 0:
    low, high = 0.0, float(2**bits - 1)
  else:
    low, high = float(-(2**(bits - 1))), float(2**(bits - 1) - 1)
  slope, intercept = ds.get('RescaleSlope'), ds.get('RescaleIntercept')
  if slope is not None and intercept is not None:
    low, high = sorted((low * float(slope) + float(intercept),
                        high * float(slope) + float(intercept)))
  return low, high


def to_uint8(ds, name: str) -> np.ndarray:
  """A pydicom Dataset's image as displayed: uint8 (H, W, 1). See the module docstring.

  Raises:
    InvalidImageError: naming `name`, for a dataset without (decodable) pixel data.
  """
  from pydicom.pixels import apply_modality_lut  # Optional (covidlib[dicom]).
  from pydicom.pixels import apply_voi_lut  # Optional, as above.

  if 'PixelData' not in ds and 'FloatPixelData' not in ds and 'DoubleFloatPixelData' not in ds:
    raise errors.InvalidImageError(name, 'DICOM file has no pixel data')
  try:
    pixels = ds.pixel_array
  except Exception as e:  # pydicom raises assorted errors (missing decoder, bad length, ...).
    raise errors.InvalidImageError(
        name, f'DICOM pixel data cannot be decoded ({type(e).__name__}: {str(e)[:160]})') \
        from None
  frames = int(ds.get('NumberOfFrames', 1) or 1)
  if frames > 1:
    raise errors.InvalidImageError(
        name, f'DICOM holds {frames} frames; a chest X-ray has one (multi-frame not supported)')
  photometric = str(ds.get('PhotometricInterpretation', 'MONOCHROME2')).upper()
  if int(ds.get('SamplesPerPixel', 1)) == 3:
    # pydicom hands colour as RGB (it converts YBR by default); gray via the luma weights.
    rgb = np.asarray(pixels, np.float64)
    gray = np.tensordot(rgb[..., :3], np.asarray(_LUMA), axes=([-1], [0]))
    high = float(2**int(ds.BitsStored) - 1)
    out = gray / high * 255.0
  elif photometric in ('MONOCHROME1', 'MONOCHROME2'):
    values = apply_modality_lut(pixels, ds)
    low, high = _stored_range(ds)
    if ds.get('VOILUTSequence') or 'WindowCenter' in ds:
      try:
        values = apply_voi_lut(values, ds, index=0, prefer_lut=True)
      except ValueError as e:
        raise errors.InvalidImageError(name, f'DICOM VOI LUT / window is invalid ({e})') from None
      if ds.get('VOILUTSequence'):
        low, high = 0.0, float(2**int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1)
    out = (np.asarray(values, np.float64) - low) / max(high - low, 1e-12) * 255.0
    if photometric == 'MONOCHROME1':
      out = 255.0 - out
  else:
    raise errors.InvalidImageError(
        name, f'DICOM photometric interpretation {photometric!r} is not supported')
  out = np.clip(np.round(out), 0, 255).astype(np.uint8)
  if out.ndim != 2 or min(out.shape) < 1:
    raise errors.InvalidImageError(name, f'DICOM image has shape {out.shape}, expected 2-D')
  return out[..., np.newaxis]


def load_dicom(path: str | os.PathLike) -> np.ndarray:
  """Reads a DICOM file to uint8 (H, W, 1) as displayed.

  Raises:
    InvalidImageError: naming `path`: pydicom missing, not DICOM, no or undecodable pixel data.
  """
  path = os.fspath(path)
  try:
    import pydicom  # Optional (covidlib[dicom]): without it, a clear error.
  except ImportError:
    raise errors.InvalidImageError(
        path, "reading DICOM needs pydicom: pip install 'covidlib[dicom]'") from None
  try:
    ds = pydicom.dcmread(path)
  except FileNotFoundError:
    raise errors.InvalidImageError(path, 'no such file') from None
  except (pydicom.errors.InvalidDicomError, OSError, ValueError, EOFError) as e:
    raise errors.InvalidImageError(path, f'not a readable DICOM file ({str(e)[:160]})') from None
  return to_uint8(ds, path)
