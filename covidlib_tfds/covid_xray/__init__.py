"""The covid_xray dataset (see covid_xray_dataset_builder.py and README.md)."""
