"""Issue 6's bad-input matrix through the serving paths: covidlib.predict (what covidlib-predict
runs) and the SavedModel bytes signature (what TF Serving runs).

Valid-but-odd files (CMYK JPEG, palette/16-bit/RGBA PNG, 1x1 and 10x10) are predicted, and
both paths give the same probability. Invalid ones give a per-file error naming the problem from
Predictor.predict_files while the other files of the call are still predicted; through the
signature they fail that request with InvalidArgumentError, and the same loaded model then
serves the next request.
"""

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from covidlib import predict
from exporters import saved_model


def _save(image: Image.Image, fmt: str, **kwargs) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, fmt, **kwargs)
  return buffer.getvalue()


def _cases(gray: np.ndarray) -> dict[str, tuple[bytes, str, str | None]]:
  """name -> (file contents, file name, None if valid else the error text expected)."""
  png = _save(Image.fromarray(gray), 'PNG')
  jpeg = _save(Image.fromarray(gray), 'JPEG', quality=95)
  cmyk = np.stack([gray, 255 - gray, gray // 2, np.full_like(gray, 30)], axis=-1)
  rgba = np.concatenate([np.stack([gray] * 3, -1), np.full(gray.shape + (1,), 128, np.uint8)],
                        -1)
  bomb = bytearray(png)
  bomb[16:24] = (30000).to_bytes(4, 'big') * 2  # IHDR width and height; a few KB of data.
  return {
      'zero_byte': (b'', 'zero.png', 'empty file (0 bytes)'),
      'truncated_jpeg': (jpeg[:len(jpeg) // 2], 'truncated.jpg', 'not a decodable image'),
      'truncated_png': (png[:len(png) // 2], 'truncated.png', 'not a decodable image'),
      'text_as_png': (b'hello, this is text\n' * 5, 'text.png', 'not a decodable image'),
      'html_as_jpg': (b'<!DOCTYPE html><html><body>404 Not Found</body></html>\n', 'page.jpg',
                      'not a decodable image'),
      'bomb': (bytes(bomb), 'bomb.png', 'image declares more pixels than the limit'),
      'cmyk_jpeg': (_save(Image.fromarray(cmyk, 'CMYK'), 'JPEG'), 'cmyk.jpg', None),
      'palette_png': (_save(Image.fromarray(gray).convert('P'), 'PNG'), 'palette.png', None),
      'png16': (_save(Image.fromarray(gray.astype(np.uint16) * 257), 'PNG'), 'deep.png', None),
      'rgba_png': (_save(Image.fromarray(rgba, 'RGBA'), 'PNG'), 'rgba.png', None),
      'one_pixel': (_save(Image.fromarray(gray[:1, :1]), 'PNG'), 'one.png', None),
      'ten_pixels': (_save(Image.fromarray(gray[:10, :10]), 'JPEG'), 'ten.jpg', None),
  }


NAMES = list(_cases(np.zeros((2, 2), np.uint8)))


@pytest.fixture(scope='module')
def served(model_dir, tmp_path_factory):
  out = saved_model.export_saved_model(model_dir, tmp_path_factory.mktemp('bad') / 'sm')
  return predict.Predictor(out), tf.saved_model.load(out).signatures['serving_default']


@pytest.mark.parametrize('name', NAMES)
def test_bad_input_matrix(name, served, gray_image, tmp_path, encode):
  predictor, signature = served
  contents, filename, error = _cases(gray_image)[name]
  (tmp_path / filename).write_bytes(contents)
  good = tmp_path / 'good.png'
  good.write_bytes(encode(gray_image))
  results = predictor.predict_files([good, tmp_path / filename, good])
  assert results[0].ok and results[2].ok  # The neighbours are predicted regardless.
  if error is None:
    assert results[1].ok and 0.0 <= results[1].probability <= 1.0
    served_p = signature(image_bytes=tf.constant([contents]))['probability'].numpy()[0]
    assert served_p == pytest.approx(results[1].probability, abs=1e-6)
    return
  assert not results[1].ok and results[1].probability is None
  assert results[1].error.startswith(error), results[1].error
  with pytest.raises(tf.errors.InvalidArgumentError):
    signature(image_bytes=tf.constant([encode(gray_image), contents]))
  again = signature(image_bytes=tf.constant([encode(gray_image)]))['probability'].numpy()[0]
  assert again == pytest.approx(results[0].probability, abs=1e-6)


def test_dicom_without_pixel_data(served, tmp_path, encode, gray_image):
  """Only covidlib.predict reads DICOM; the file is named in its error."""
  from pydicom.dataset import Dataset, FileMetaDataset
  from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
  ds = Dataset()
  ds.file_meta = FileMetaDataset()
  ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
  ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
  ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
  ds.save_as(tmp_path / 'empty.dcm', enforce_file_format=True)
  (tmp_path / 'good.png').write_bytes(encode(gray_image))
  predictor, _ = served
  bad, good = predictor.predict_files([tmp_path / 'empty.dcm', tmp_path / 'good.png'])
  assert bad.error == 'DICOM file has no pixel data' and good.ok
