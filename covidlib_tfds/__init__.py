"""covidlib_tfds: the `covid_xray` and `labelled_xrays` TFDS builders, the leakage audit, helpers.

    import covidlib_tfds  # registers covid_xray with TFDS
    import tensorflow_datasets as tfds
    ds = tfds.load('covid_xray/adult', split='train', data_dir=DIR)

Build: `python -m covidlib_tfds.build --config=adult --manual_dir=../shared/data --data_dir=DIR
--allow_missing` (configs: seed, patient_split, curated, adult, adult_pediatric, other_findings)
Audit: `python -m covidlib_tfds.audit --config=adult --data_dir=DIR`
Your own labelled X-rays: `python -m covidlib_tfds.build --labels_csv=FILE --name=NAME
--data_dir=DIR`, then `tfds.load('labelled_xrays/NAME', ...)` (see labelled_xrays/).
Usable without the rest of covidlib's training code: it needs only covidlib.preprocess, dicom
and errors.
"""

from covidlib_tfds.covid_xray import covid_xray_dataset_builder  # noqa: F401  (registers)
from covidlib_tfds.labelled_xrays import labelled_xrays_dataset_builder  # noqa: F401  (registers)

Builder = covid_xray_dataset_builder.Builder
LabelledXrays = labelled_xrays_dataset_builder.Builder
