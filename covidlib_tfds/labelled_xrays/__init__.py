"""The labelled_xrays dataset: your own labelled X-rays (see labelled_xrays_dataset_builder.py)."""
