"""covidlib: telling COVID-19 chest X-rays from normal ones, with TensorFlow.

Research software, not a diagnostic device.

    import covidlib
    image = covidlib.preprocess.load_image('xray.png')          # uint8 (H, W, 1)
    x = covidlib.preprocess.preprocess(image, image_size=224)   # float32 (224, 224, 1)

Submodules are imported on first use, so `import covidlib` stays cheap.
Label 1 = COVID-19 (the positive class), 0 = normal.
"""

import importlib

__version__ = '0.1.0'

CLASS_NAMES = ('normal', 'covid')  # index = label; label 1 = COVID-19.

_SUBMODULES = (
    'archive', 'augment', 'beam_options', 'beam_scoring', 'calibration', 'confounds', 'crossval',
    'data', 'dicom', 'distribute',
    'errors', 'edge', 'ensemble', 'evaluate', 'explain', 'hold_out', 'metrics', 'model_dir',
    'models', 'predict',
    'preprocess', 'reference', 'report', 'results', 'scored', 'scoring', 'shift', 'shift_fit',
    'shortcuts', 'site', 'site_adapt', 'sites',
    'standardize', 'threshold', 'tflite_metadata', 'train',
)


def __getattr__(name):
  if name in _SUBMODULES:
    return importlib.import_module(f'covidlib.{name}')
  raise AttributeError(f'module covidlib has no attribute {name!r}')


def __dir__():
  return sorted(list(globals()) + list(_SUBMODULES))
