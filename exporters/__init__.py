"""exporters: a trained model_dir -> artifacts for servers and devices, with proof they agree.

    covidlib-export --model_dir=runs/seed_cnn --out=exports/seed_cnn

Modules (each one concept):
  serving      the serving model: the inference model with the calibration temperature folded in
  saved_model  SavedModel with an encoded-bytes signature and a preprocessed-tensor signature
  tflite       TFLite fp32 / dynamic / fp16 / int8, labels and decision embedded as metadata
  parity       every exported variant against the Keras model: metrics, agreement, size, latency
  model_card   MODEL_CARD.md
  export       the whole export as one function: atomic, the output appears complete or not at all
  cli          the `covidlib-export` binary over `export`

Every exported probability is P(COVID-19) after the stored temperature; `label` is 1 (COVID-19)
when probability >= the stored threshold. Research software, not a diagnostic device.
"""
