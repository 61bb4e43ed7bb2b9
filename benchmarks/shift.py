"""Does the shift score (issues #10, #17) flag images unlike the training data? Measured on real
data, in two parts (--parts, comma-separated).

cross_site (issue 17), about 10 min on 2 shared cores:

    .venv/bin/python benchmarks/shift.py --parts=cross_site --runs_dir=runs \\
        --same_site_src=/work/main/runs/same_site --same_site_data_dir=/work/main/tfds_data \\
        --sites_out=benchmarks/results/shift_sites

Needs the two `make same-site` models (compact_resnet on labelled_xrays/nih_pneumonia and
labelled_xrays/guangzhou_pneumonia, each with issue 10's penultimate-only shift score) and those
datasets built. Each model_dir is copied into --runs_dir/same_site/NAME (the source is never
written to; its shift.npz/json go to shift_format_1/, the old score), and covidlib-fit-shift
(`shift_fit.fit_model_dir`) fits the multi-depth score and the reference there. Then, for each
model, its own test split and every film of the other site, one scoring pass each:
  - old score against new, flagged at the default policy (quantile:0.99 of validation) and at
    quantile:0.95; ROC-AUC of the score, own test (negative) against the unseen site (positive).
    Target (issue 17): >= 80% of unseen-site films flagged, <= 5% of own test films.
  - per depth: each depth's standardised distance alone (at its own validation quantile 0.99)
    and the share of films above the ensemble's threshold at that depth.
  - combinations of depths that need no out-of-distribution data, at quantile:0.99 (why the
    library takes the maximum of standardised depths: covidlib/shift.py).
  - TFLite fp32, fp16, dynamic and int8 (calibrated on 100 training films) with the old and
    the new score: the flag's agreement with the Keras model's score of the same depths (int8
    carries the penultimate depth alone) on the own test split and 200 unseen-site films.
  - latency (NIH model), batch of one, median of 200 with the paths compared called in turn:
    Keras alone and the Predictor's Keras path (tap model + numpy score), TFLite fp32 and int8
    (1 thread) without and with each score.
Writes <sites_out>.json and .md.

issue10 (the default; the covid_xray models of issue 10):

    .venv/bin/python benchmarks/shift.py --seed_data_dir=tfds_data \\
        --adult_data_dir=/work/main/tfds_data --runs_dir=runs/shift \\
        --nih_dir=../shared/data/nih_adult_normals/images --out=benchmarks/results/shift

Needs covid_xray/seed built in --seed_data_dir and covid_xray/adult in --adult_data_dir
(`python -m covidlib_tfds.build --config=NAME --manual_dir=../shared/data --data_dir=DIR
--allow_missing`). Steps:

  1. train compact_resnet --epochs on covid_xray/seed (pediatric normals + ieee8023 COVID-19)
     and on covid_xray/adult (NIH adult normals + ieee8023 COVID-19); train() fits the shift
     score at its end (threshold quantile:0.99 of the validation scores).
  2. seed model: the share flagged of the NIH adult normals (files, through covidlib.predict;
     target >= 90%), of its own validation split (where the threshold was chosen, ~1% by
     construction) and, honestly held out, of each half of validation with the threshold chosen
     on the other half (target <= 5%).
  3. adult model: the share flagged of the archive's pediatric normals (covid_xray/seed, every
     split), and of its own test split (target <= 5%).
  4. both: generated non-X-rays (photo-like colour scenes, the model's own validation films
     rotated 90 degrees, uniform gray frames, rendered text), the share flagged of each kind.
  5. ROC-AUC of the score, held-out source normals against the model's own evaluation images.
  6. latency, batch of one, median of 50 runs: the Keras model alone, the same forward pass
     with the tap features as more outputs plus the numpy score, and the score alone; the TFLite
     fp32 model with and without the shift_score output. Target: the score costs < 5% of
     inference.

A model whose model_dir exists is not trained again (delete it to redo). Writes <out>.json and
<out>.md.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

_SEED_DATA_DIR = flags.DEFINE_string('seed_data_dir', 'tfds_data', 'data_dir of covid_xray/seed.')
_ADULT_DATA_DIR = flags.DEFINE_string('adult_data_dir', 'tfds_data',
                                      'data_dir of covid_xray/adult.')
_RUNS_DIR = flags.DEFINE_string('runs_dir', 'runs/shift', 'Where the two models go.')
_NIH_DIR = flags.DEFINE_string('nih_dir', '../shared/data/nih_adult_normals/images',
                               'Folder of NIH adult normal films.')
_EPOCHS = flags.DEFINE_integer('epochs', 25, 'Training epochs of each model.')
_OUT = flags.DEFINE_string('out', 'benchmarks/results/shift', 'Report path without suffix.')
_N_GENERATED = flags.DEFINE_integer('n_generated', 20, 'Generated images of each kind.')
_PARTS = flags.DEFINE_list('parts', ['issue10'], 'What to measure: issue10 (the covid_xray '
                           'models, trained here), cross_site (issue 17: two same-site models '
                           'across sites, old score against the new one).')
_SAME_SITE_SRC = flags.DEFINE_string('same_site_src', 'runs/same_site',
                                     'Trained `make same-site` model_dirs (nih_pneumonia, '
                                     'guangzhou_pneumonia); read only, copied into --runs_dir.')
_SAME_SITE_DATA_DIR = flags.DEFINE_string('same_site_data_dir', 'tfds_data',
                                          'data_dir of labelled_xrays/{nih,guangzhou}_pneumonia.')
_SITES_OUT = flags.DEFINE_string('sites_out', 'benchmarks/results/shift_sites',
                                 'Report path of the cross_site part, no suffix.')

SIZE = 224


def _train(name: str, dataset: str, data_dir: str) -> str:
  from covidlib import model_dir as md
  from covidlib import train

  model_dir = os.path.join(_RUNS_DIR.value, name)
  if os.path.isfile(os.path.join(model_dir, md.MODEL)):
    print(f'{name}: reusing {model_dir}', flush=True)
    return model_dir
  config = train.make_config(model='compact_resnet', dataset=dataset, data_dir=data_dir,
                             epochs=_EPOCHS.value, seed=0)
  start = time.time()
  train.train(config, model_dir, overwrite=True, verbose=2)
  print(f'{name}: trained in {time.time() - start:.0f} s', flush=True)
  return model_dir


def _split_images(model_dir: str, dataset: str, data_dir: str, split: str):
  import numpy as np

  from covidlib import scoring
  from covidlib import model_dir as md

  config = md.load_config(model_dir)
  ds, _ = scoring.load_split(config, split, dataset=dataset, data_dir=data_dir)
  images, labels, sources = [], [], []
  for x, y, meta in ds:
    images.append(x.numpy())
    labels.append(y.numpy().reshape(-1))
    sources += [s.decode() for s in meta['source'].numpy().reshape(-1)]
  return np.concatenate(images), np.concatenate(labels).astype(int), np.asarray(sources)


def _scores(predictor, images):
  _, scores = predictor.predict_preprocessed_with_shift(images)
  return scores


def _generated(n: int, films):
  """{kind: float32 (n, S, S, 1)} of images that are not frontal chest X-rays."""
  import numpy as np
  from PIL import Image, ImageDraw, ImageFont

  from covidlib import preprocess

  rs = np.random.RandomState(0)

  def gray(array):
    return preprocess.preprocess(array, SIZE, 1).numpy()

  def photo():
    # A colour "scene": sky gradient, ground, a few coloured blobs, texture noise.
    h = w = 256
    yy, xx = np.mgrid[0:h, 0:w] / h
    rgb = np.zeros((h, w, 3))
    rgb[..., 2] = 0.9 - 0.5 * yy
    rgb[..., 1] = 0.6 - 0.2 * yy
    horizon = rs.uniform(0.4, 0.7)
    ground = yy > horizon + 0.05 * np.sin(xx * rs.uniform(3, 10))
    rgb[ground] = rs.uniform(0.2, 0.6, 3)
    for _ in range(rs.randint(3, 8)):
      cy, cx, r = rs.rand(), rs.rand(), rs.uniform(0.05, 0.2)
      rgb[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rs.rand(3)
    rgb += rs.normal(0, 0.05, rgb.shape)
    array = (np.clip(rgb, 0, 1) * 255).astype(np.uint8)
    # Through the real decoder path: gray = what covidlib does to colour input.
    return np.asarray(Image.fromarray(array).convert('L'))[..., None]

  def text():
    image = Image.new('L', (256, 256), int(rs.choice([255, 240, 20])))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    ink = 0 if image.getpixel((0, 0)) > 128 else 255
    words = ('PATIENT REPORT', 'chest x-ray', 'impression:', 'no acute findings', 'lorem ipsum',
             'dolor sit amet', 'ref 2020-04-18', 'page 1 of 2')
    for row in range(14):
      draw.text((8, 8 + row * 17), ' '.join(rs.choice(words, 2)), fill=ink, font=font)
    return np.asarray(image)[..., None]

  def uniform():
    return np.full((256, 256, 1), rs.randint(0, 256), np.uint8)

  out = {
      'photo-like colour scene': np.stack([gray(photo()) for _ in range(n)]),
      'rendered text': np.stack([gray(text()) for _ in range(n)]),
      'uniform gray frame': np.stack([gray(uniform()) for _ in range(n)]),
      'own validation film rotated 90 deg': np.rot90(films[:n], k=1, axes=(1, 2)).copy(),
  }
  return out


def _latency(model_dir: str, images) -> dict:
  import numpy as np

  from covidlib import model_dir as md
  from covidlib import models
  from covidlib import shift
  from exporters import tflite

  model = md.load_model(model_dir)
  fitted = shift.load(model_dir)
  extractor = models.tap_model(model, fitted.tap_names, fitted.feature_dims)
  x = images[:1]
  features = [np.asarray(f) for f in extractor(x, training=False)[1:]]

  out = {'keras_model_ms': _median_ms(lambda: model(x, training=False)),
         'keras_with_features_and_score_ms': _median_ms(
             lambda: fitted.score([np.asarray(f) for f in extractor(x, training=False)[1:]])),
         'score_only_numpy_ms': _median_ms(lambda: fitted.score(features), runs=200)}
  from ai_edge_litert.interpreter import Interpreter

  for key, shift_model in (('tflite_fp32_ms', None), ('tflite_fp32_with_shift_ms', fitted)):
    interpreter = Interpreter(model_content=tflite.convert_tflite(
        model, 'fp32', decision=md.load_decision(model_dir), shift_model=shift_model),
        num_threads=1)
    interpreter.allocate_tensors()
    detail = interpreter.get_input_details()[0]

    def run():
      interpreter.set_tensor(detail['index'], x)
      interpreter.invoke()
    out[key] = _median_ms(run)
  out['score_share_of_keras'] = out['score_only_numpy_ms'] / out['keras_model_ms']
  out['keras_overhead'] = out['keras_with_features_and_score_ms'] / out['keras_model_ms'] - 1
  out['tflite_overhead'] = out['tflite_fp32_with_shift_ms'] / out['tflite_fp32_ms'] - 1
  return out


def _auc(negatives, positives) -> float:
  from sklearn.metrics import roc_auc_score
  import numpy as np

  y = np.r_[np.zeros(len(negatives)), np.ones(len(positives))]
  return float(roc_auc_score(y, np.r_[negatives, positives]))


def main(argv):
  del argv
  parts = [p for p in _PARTS.value if p]
  unknown = sorted(set(parts) - {'issue10', 'cross_site'})
  if unknown:
    raise app.UsageError(f'--parts: unknown {unknown}; valid: issue10, cross_site')
  if 'cross_site' in parts:
    results = cross_site()
    os.makedirs(os.path.dirname(_SITES_OUT.value) or '.', exist_ok=True)
    with open(_SITES_OUT.value + '.json', 'w') as f:
      json.dump(results, f, indent=2, sort_keys=True, default=str)
    text = render_cross_site(results)
    with open(_SITES_OUT.value + '.md', 'w') as f:
      f.write(text)
    print(text)
  if 'issue10' in parts:
    issue10()


def issue10():
  import numpy as np

  from covidlib import predict
  from covidlib import shift

  results = {'machine': f'{platform.machine()}, {os.cpu_count()} CPUs (shared with other busy '
                        'processes), no GPU', 'epochs': _EPOCHS.value,
             'python': sys.version.split()[0]}
  seed_dir = _train('seed', 'covid_xray/seed', _SEED_DATA_DIR.value)
  adult_dir = _train('adult', 'covid_xray/adult', _ADULT_DATA_DIR.value)

  # ----------------------------------------------------------------------- Seed model.
  seed = predict.Predictor(seed_dir)
  fitted = shift.load(seed_dir)
  threshold = fitted.threshold
  val_x, val_y, val_src = _split_images(seed_dir, 'covid_xray/seed', _SEED_DATA_DIR.value,
                                        'validation')
  train_x, _, _ = _split_images(seed_dir, 'covid_xray/seed', _SEED_DATA_DIR.value, 'train')
  val_s = _scores(seed, val_x)
  train_s = _scores(seed, train_x)
  # Held out: threshold from one half of validation, flagged share of the other, both ways.
  order = np.random.RandomState(0).permutation(len(val_s))
  halves = order[:len(order) // 2], order[len(order) // 2:]
  cross = []
  for a, b in (halves, halves[::-1]):
    t = float(np.quantile(val_s[a], shift.parse_policy(fitted.policy)))
    cross.append(float(np.mean(val_s[b] > t)))
  nih_files = sorted(os.path.join(_NIH_DIR.value, f) for f in os.listdir(_NIH_DIR.value))
  nih = [r for r in seed.predict_files(nih_files) if r.ok]
  nih_s = np.array([r.shift_score for r in nih])
  seed_res = {
      'threshold': threshold, 'policy': fitted.policy, 'feature_dim': fitted.feature_dim,
      'shrinkage': [t.shrinkage for t in fitted.taps], 'n_per_class': list(fitted.n_per_class),
      'train_flagged': float(np.mean(train_s > threshold)), 'n_train': len(train_s),
      'validation_flagged': float(np.mean(val_s > threshold)), 'n_validation': len(val_s),
      'validation_flagged_held_out_halves': cross,
      'nih_adult_normals_flagged': float(np.mean(nih_s > threshold)), 'n_nih': len(nih_s),
      'nih_called_covid': float(np.mean([r.label == 1 for r in nih])),
      'auc_nih_vs_validation': _auc(val_s, nih_s),
  }

  # ---------------------------------------------------------------------- Adult model.
  adult = predict.Predictor(adult_dir)
  afit = shift.load(adult_dir)
  test_x, test_y, test_src = _split_images(adult_dir, 'covid_xray/adult', _ADULT_DATA_DIR.value,
                                           'test')
  aval_x, _, _ = _split_images(adult_dir, 'covid_xray/adult', _ADULT_DATA_DIR.value,
                               'validation')
  test_s = _scores(adult, test_x)
  ped = []
  for split in ('train', 'validation'):
    x, y, src = _split_images(adult_dir, 'covid_xray/seed', _SEED_DATA_DIR.value, split)
    ped.append(x[y == 0])
  ped_x = np.concatenate(ped)
  ped_s = _scores(adult, ped_x)
  adult_res = {
      'threshold': afit.threshold, 'feature_dim': afit.feature_dim,
      'shrinkage': [t.shrinkage for t in afit.taps], 'n_per_class': list(afit.n_per_class),
      'validation_flagged': float(np.mean(_scores(adult, aval_x) > afit.threshold)),
      'test_flagged': float(np.mean(test_s > afit.threshold)), 'n_test': len(test_s),
      'pediatric_normals_flagged': float(np.mean(ped_s > afit.threshold)),
      'n_pediatric': len(ped_s),
      'auc_pediatric_vs_test': _auc(test_s, ped_s),
  }

  # ------------------------------------------------------------- Generated non-X-rays.
  generated = {}
  for name, predictor, own, films in (('seed', seed, val_s, val_x), ('adult', adult, test_s,
                                                                     test_x)):
    kinds = _generated(_N_GENERATED.value, films)
    generated[name] = {}
    for kind, images in kinds.items():
      s = _scores(predictor, images)
      generated[name][kind] = {'flagged': float(np.mean(s > predictor.shift_threshold)),
                               'n': len(s), 'auc_vs_own': _auc(own, s)}

  results.update(seed=seed_res, adult=adult_res, generated=generated,
                 latency=_latency(seed_dir, val_x))
  os.makedirs(os.path.dirname(_OUT.value) or '.', exist_ok=True)
  with open(_OUT.value + '.json', 'w') as f:
    json.dump(results, f, indent=2, sort_keys=True)
  text = render(results)
  with open(_OUT.value + '.md', 'w') as f:
    f.write(text)
  print(text)


def _pct(x: float) -> str:
  return f'{100 * x:.1f}%'


def _ok(met: bool) -> str:
  return 'met' if met else '**missed**'


def render(r: dict) -> str:
  s, a, lat = r['seed'], r['adult'], r['latency']
  lines = [
      f'compact_resnet, {r["epochs"]} epochs, seed 0, 224 px; threshold quantile:0.99 of the '
      f'validation scores. Machine: {r["machine"]}.', '',
      '| measure | value | target | verdict |', '|---|---|---|---|',
      f'| seed model: NIH adult normals flagged (files via covidlib.predict) | '
      f'{_pct(s["nih_adult_normals_flagged"])} of {s["n_nih"]} (it calls '
      f'{_pct(s["nih_called_covid"])} of them COVID-19) | >= 90% | '
      f'{_ok(s["nih_adult_normals_flagged"] >= 0.9)} |',
      f'| seed model: own validation flagged, threshold chosen on it | '
      f'{_pct(s["validation_flagged"])} of {s["n_validation"]} | (1% by construction) | - |',
      f'| seed model: validation half flagged, threshold from the other half | '
      f'{" / ".join(_pct(x) for x in s["validation_flagged_held_out_halves"])} | <= 5% | '
      f'{_ok(max(s["validation_flagged_held_out_halves"]) <= 0.05)} |',
      f'| seed model: own training images flagged | {_pct(s["train_flagged"])} of '
      f'{s["n_train"]} | - | - |',
      f'| adult model: archive pediatric normals flagged | '
      f'{_pct(a["pediatric_normals_flagged"])} of {a["n_pediatric"]} | "flags them" (>= 90%) | '
      f'{_ok(a["pediatric_normals_flagged"] >= 0.9)} |',
      f'| adult model: own test split flagged | {_pct(a["test_flagged"])} of {a["n_test"]} | '
      f'<= 5% | {_ok(a["test_flagged"] <= 0.05)} |',
      '', '| held-out source | model | shift-score ROC-AUC (held-out vs own images) |',
      '|---|---|---|',
      f'| NIH adult normals | seed | {s["auc_nih_vs_validation"]:.3f} (vs seed validation) |',
      f'| pediatric normals (Kaggle) | adult | {a["auc_pediatric_vs_test"]:.3f} (vs adult test) |',
      '', '| generated, not a frontal chest X-ray | seed model flagged | adult model flagged |',
      '|---|---|---|',
  ]
  for kind, v in r['generated']['seed'].items():
    w = r['generated']['adult'][kind]
    lines.append(f'| {kind} (n={v["n"]}) | {_pct(v["flagged"])} (AUC {v["auc_vs_own"]:.3f}) | '
                 f'{_pct(w["flagged"])} (AUC {w["auc_vs_own"]:.3f}) |')
  lines += [
      '', '| latency, one image, median | ms |', '|---|---|',
      f'| Keras model alone | {lat["keras_model_ms"]:.2f} |',
      f'| Keras, one pass with features + numpy score | '
      f'{lat["keras_with_features_and_score_ms"]:.2f} ({lat["keras_overhead"]:+.1%}) |',
      f'| numpy score alone | {lat["score_only_numpy_ms"]:.3f} '
      f'({lat["score_share_of_keras"]:.2%} of the Keras model) |',
      f'| TFLite fp32, 1 thread, without / with shift_score | {lat["tflite_fp32_ms"]:.2f} / '
      f'{lat["tflite_fp32_with_shift_ms"]:.2f} ({lat["tflite_overhead"]:+.1%}) |',
      '', f'Latency target (score < 5% of inference): numpy score '
      f'{_ok(lat["score_share_of_keras"] < 0.05)}; TFLite in-graph '
      f'{_ok(lat["tflite_overhead"] < 0.05)}.', '']
  return '\n'.join(lines)


# --------------------------------------------------------------------------------------------
# Issue 17: the per-image flag across sites, old score (penultimate only) against the new one.
# --------------------------------------------------------------------------------------------

SITES = (('nih_pneumonia', 'guangzhou_pneumonia'), ('guangzhou_pneumonia', 'nih_pneumonia'))
ALT_POLICY = 0.95  # A second operating point, to show the trade-off; the default is 0.99.


def _copy_model_dir(source: str, target: str) -> None:
  """model.keras, config.json, decision.json and the old shift files, nothing else (the source
  is never written to)."""
  import shutil

  from covidlib import model_dir as md
  from covidlib import shift

  os.makedirs(target, exist_ok=True)
  for name in (md.MODEL, md.CONFIG, md.DECISION):
    if os.path.isfile(os.path.join(source, name)):
      shutil.copy2(os.path.join(source, name), os.path.join(target, name))
  old = os.path.join(target, 'shift_format_1')
  os.makedirs(old, exist_ok=True)
  for name in (shift.SHIFT_NPZ, shift.SHIFT_JSON):
    shutil.copy2(os.path.join(source, name), os.path.join(old, name))


def _scored(model, config, dataset: str, data_dir: str, splits):
  """One scoring pass (taps) over each split of `dataset`, concatenated."""
  from covidlib import scored as scored_lib
  from covidlib import scoring

  parts = []
  for split in splits:
    ds, _ = scoring.load_split(config, split, dataset=dataset, data_dir=data_dir, cache=False)
    parts.append(scoring.score_dataset(model, ds, taps=True))
  return scored_lib.concat(parts)


def _rates(own, unseen, threshold) -> dict:
  """Shares flagged at `threshold`, ROC-AUC, and the share of unseen films flagged at the
  threshold that flags 5% of the own test films (an oracle: chosen on the test split itself)."""
  import numpy as np

  return {'unseen_flagged': float(np.mean(unseen > threshold)),
          'own_test_flagged': float(np.mean(own > threshold)),
          'auc': _auc(own, unseen),
          'unseen_flagged_at_own_5pct': float(np.mean(unseen > np.quantile(own, 0.95)))}


def _site_figures(name: str, other: str, model_dir: str, data_dir: str) -> dict:
  """Old and new score, per depth and per combination, of one model on its own test split and
  on every film of the other site."""
  import numpy as np

  from covidlib import model_dir as md
  from covidlib import predict
  from covidlib import scoring
  from covidlib import shift
  from covidlib import shift_fit

  start = time.time()
  fitted = shift_fit.fit_model_dir(model_dir)  # What covidlib-fit-shift runs.
  fit_s = time.time() - start
  old = shift.load(os.path.join(model_dir, 'shift_format_1'))
  assert old.format == 1
  config = md.load_config(model_dir)
  model = md.load_model(model_dir)
  own = f'labelled_xrays/{name}'
  validation = _scored(model, config, own, data_dir, ['validation'])
  test = _scored(model, config, own, data_dir, ['test'])
  unseen = _scored(model, config, f'labelled_xrays/{other}', data_dir,
                   ['train', 'validation', 'test'])
  out = {'n_own_test': len(test), 'n_unseen': len(unseen), 'n_validation': len(validation),
         'fit_seconds': fit_s, 'taps': list(fitted.tap_names),
         'feature_dims': list(fitted.feature_dims),
         'shrinkage': [t.shrinkage for t in fitted.taps],
         'threshold_old': old.threshold, 'threshold_new': fitted.threshold}
  # The library's own Keras path (covidlib.predict) gives the same scores as the arrays here.
  ds, _ = scoring.load_split(config, 'test', dataset=own, data_dir=data_dir, cache=False)
  images = np.concatenate([x.numpy() for x, *_ in ds.take(1)])
  _, via_predict = predict.Predictor(model_dir).predict_preprocessed_with_shift(images)
  out['predictor_max_abs_diff'] = float(np.max(np.abs(
      via_predict - fitted.score(test.taps)[:len(images)])))

  old_scores = [old.score(s.taps) for s in (validation, test, unseen)]
  new_scores = [fitted.score(s.taps) for s in (validation, test, unseen)]
  out['old'] = {'q0.99': _rates(old_scores[1], old_scores[2], old.threshold),
                'q0.95': _rates(old_scores[1], old_scores[2],
                                float(np.quantile(old_scores[0], ALT_POLICY)))}
  out['new'] = {'q0.99': _rates(new_scores[1], new_scores[2], fitted.threshold),
                'q0.95': _rates(new_scores[1], new_scores[2],
                                float(np.quantile(new_scores[0], ALT_POLICY)))}
  # Each depth alone, thresholded at its own validation quantile 0.99 (what a one-depth score
  # at that depth would flag), and its share above the ensemble's threshold.
  z = [fitted.tap_scores(s.taps) for s in (validation, test, unseen)]
  out['depths'] = {}
  for k, tap in enumerate(fitted.tap_names):
    alone = _rates(z[1][:, k], z[2][:, k], float(np.quantile(z[0][:, k], 0.99)))
    out['depths'][tap] = {**alone,
                          'unseen_above_ensemble': float(np.mean(z[2][:, k] > fitted.threshold)),
                          'own_above_ensemble': float(np.mean(z[1][:, k] > fitted.threshold))}
  # Combinations that need no out-of-distribution data (shift.py's docstring: why max).
  raw = [np.stack([t.distance(s.taps[t.name]) for t in fitted.taps], 1)
         for s in (validation, test, unseen)]
  mu, sd = raw[0].mean(0), raw[0].std(0)
  med, q90 = np.median(raw[0], 0), np.quantile(raw[0], 0.9, axis=0)
  combos = {
      'max of standardised depths (the library)': [(r - mu) / sd for r in raw],
      'mean of standardised depths': [((r - mu) / sd) for r in raw],
      'max of depths / validation median': [r / med for r in raw],
      'max of robust-standardised depths ((d - median) / (q90 - median))':
          [(r - med) / (q90 - med) for r in raw],
      'max of standardised log-distances': [(np.log(r) - np.log(raw[0]).mean(0))
                                            / np.log(raw[0]).std(0) for r in raw],
      'max of raw distances': raw,
  }
  out['combinations'] = {}
  for label, (v, t, u) in combos.items():
    reduce = np.mean if label.startswith('mean') else np.max
    v, t, u = reduce(v, axis=1), reduce(t, axis=1), reduce(u, axis=1)
    out['combinations'][label] = _rates(t, u, float(np.quantile(v, 0.99)))
  return out


def _tflite_figures(model_dir: str, name: str, other: str, data_dir: str) -> dict:
  """TFLite fp32 and int8 with the old and the new score: the flag's agreement with Keras on
  the own test split and 200 unseen-site films, and latency (batch of one, 1 thread)."""
  import numpy as np
  from ai_edge_litert.interpreter import Interpreter

  from covidlib import model_dir as md
  from covidlib import scoring
  from covidlib import shift
  from exporters import tflite

  config = md.load_config(model_dir)
  model = md.load_model(model_dir)
  decision = md.load_decision(model_dir)

  def images(dataset, splits, n=None):
    xs = []
    for split in splits:
      ds, _ = scoring.load_split(config, split, dataset=dataset, data_dir=data_dir, cache=False)
      xs += [x.numpy() for x, *_ in ds]
    x = np.concatenate(xs)
    return x if n is None else x[np.random.RandomState(0).permutation(len(x))[:n]]

  calibration = images(f'labelled_xrays/{name}', ['train'], 100)  # As covidlib-export does.
  test = images(f'labelled_xrays/{name}', ['test'])
  unseen = images(f'labelled_xrays/{other}', ['train', 'validation', 'test'], 200)
  contents = {'calibration': calibration}
  out = {}
  taps = [scoring.score_dataset(model, _batches(x), taps=True).taps for x in (test, unseen)]
  for label, fitted in (('old', shift.load(os.path.join(model_dir, 'shift_format_1'))),
                        ('new', shift.load(model_dir))):
    for quant in ('fp32', 'fp16', 'dynamic', 'int8') + (('int8-all-depths',) if label == 'new'
                                                         else ()):
      # What the variant carries: int8 the penultimate depth alone (tflite.int8_shift_model).
      # 'int8-all-depths' is the alternative not shipped: every depth in the int8 file.
      carried = tflite.int8_shift_model(fitted) if quant == 'int8' else fitted
      keras_scores = [carried.score(t) for t in taps]
      shipped = tflite.int8_shift_model
      if quant == 'int8-all-depths':
        tflite.int8_shift_model = lambda m: m
      try:
        content = tflite.convert_tflite(
            model, quant[:4] if quant.startswith('int8') else quant,
            calibration if quant.startswith('int8') else None, decision=decision,
            shift_model=fitted)
      finally:
        tflite.int8_shift_model = shipped
      interpreter = Interpreter(model_content=content, num_threads=1)
      runner = interpreter.get_signature_runner()
      got = [np.array([float(runner(images=x[None])['shift_score'][0]) for x in part])
             for part in (test, unseen)]
      threshold = carried.threshold
      agree = [float(np.mean((g > threshold) == (k > threshold)))
               for g, k in zip(got, keras_scores)]
      out[f'{label}_{quant}'] = {
          'taps': list(carried.tap_names), 'threshold': threshold,
          'flag_agreement_own_test': agree[0], 'flag_agreement_unseen': agree[1],
          'unseen_flagged': float(np.mean(got[1] > threshold)),
          'own_test_flagged': float(np.mean(got[0] > threshold)),
          'keras_unseen_flagged': float(np.mean(keras_scores[1] > threshold)),
          'size_bytes': len(content)}
      contents[(label, quant)] = content
  return out, contents, test[:1]


def _batches(x):
  import numpy as np
  import tensorflow as tf

  return tf.data.Dataset.from_tensor_slices((x, np.zeros(len(x), np.int64))).batch(32)


LATENCY_RUNS = 200


def _site_latency(model_dir: str, contents: dict, x) -> dict:
  """Batch of one, median of LATENCY_RUNS: Keras alone, Keras taps + numpy score (the
  Predictor's Keras path), and TFLite (1 thread) without / with each score. The paths compared
  run in turn, one call each per round, so a change of load on the shared machine hits all
  alike."""
  import numpy as np
  from ai_edge_litert.interpreter import Interpreter

  from covidlib import model_dir as md
  from covidlib import models
  from covidlib import shift
  from exporters import tflite

  model = md.load_model(model_dir)
  keras_paths = {'keras_model_ms': lambda: model(x, training=False)}
  for label, fitted in (('old', shift.load(os.path.join(model_dir, 'shift_format_1'))),
                        ('new', shift.load(model_dir))):
    extractor = models.tap_model(model, fitted.tap_names, fitted.feature_dims)

    def keras_path(extractor=extractor, fitted=fitted):
      _, *features = extractor(x, training=False)
      return fitted.score([np.asarray(f) for f in features])
    keras_paths[f'keras_{label}_ms'] = keras_path
  out = _interleaved_median_ms(keras_paths)
  decision = md.load_decision(model_dir)
  for quant in ('fp32', 'int8'):
    plain = tflite.convert_tflite(model, quant, contents['calibration'] if quant == 'int8'
                                  else None, decision=decision)
    runs = {}
    for label, content in (('none', plain), ('old', contents[('old', quant)]),
                           ('new', contents[('new', quant)])):
      interpreter = Interpreter(model_content=content, num_threads=1)
      interpreter.allocate_tensors()
      detail = interpreter.get_input_details()[0]
      image = edge_quantize(x, detail)

      def run(interpreter=interpreter, detail=detail, image=image):
        interpreter.set_tensor(detail['index'], image)
        interpreter.invoke()
      runs[f'tflite_{quant}_{label}_ms'] = run
    out.update(_interleaved_median_ms(runs))
  return out


def _interleaved_median_ms(fns: dict, runs: int = LATENCY_RUNS, warmup: int = 5) -> dict:
  """{name: median ms} of each function, called in turn `runs` times after a warm-up."""
  import numpy as np

  times = {name: [] for name in fns}
  for _ in range(warmup):
    for fn in fns.values():
      fn()
  for _ in range(runs):
    for name, fn in fns.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return {name: float(np.median(t) * 1000) for name, t in times.items()}


def edge_quantize(x, detail):
  """The float input as the interpreter wants it (int8 inputs quantized)."""
  from covidlib import edge

  return edge.quantize(x, detail)


def _median_ms(fn, runs=50, warmup=5) -> float:
  import numpy as np

  for _ in range(warmup):
    fn()
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times) * 1000)


def cross_site() -> dict:
  results = {'machine': f'{platform.machine()}, {os.cpu_count()} CPUs (shared with other busy '
                        'processes), no GPU', 'python': sys.version.split()[0],
             'date': time.strftime('%Y-%m-%d'), 'models': {}}
  for name, other in SITES:
    start = time.time()
    model_dir = os.path.join(_RUNS_DIR.value, 'same_site', name)
    if not os.path.isdir(os.path.join(model_dir, 'shift_format_1')):
      _copy_model_dir(os.path.join(_SAME_SITE_SRC.value, name), model_dir)
    figures = _site_figures(name, other, model_dir, _SAME_SITE_DATA_DIR.value)
    tfl, contents, x = _tflite_figures(model_dir, name, other, _SAME_SITE_DATA_DIR.value)
    figures['tflite'] = tfl
    if name == SITES[0][0]:
      results['latency'] = _site_latency(model_dir, contents, x)
    figures['seconds'] = time.time() - start
    results['models'][name] = {'unseen_site': other, **figures}
    print(f'{name}: {figures["seconds"]:.0f} s', flush=True)
  return results


def render_cross_site(r: dict) -> str:
  lines = [f'Two compact_resnet models (224 px, 30 epochs, seed 0; `make same-site`), each '
           f'scored on its own test split and on every film of the other site. Flagged = score '
           f'above the threshold, policy quantile:0.99 of the validation split (quantile:0.95 '
           f'beside it). Old: the penultimate-only score of issue 10, as its model_dir stored '
           f'it. New: covidlib-fit-shift today. Machine: {r["machine"]}; {r["date"]}.', '',
           '| model -> unseen site | score | unseen films flagged | own test flagged | '
           'ROC-AUC own test vs unseen | flagged at q0.95: unseen / own test | unseen flagged '
           'when 5% of own test are (oracle) |', '|---|---|---|---|---|---|---|']
  for name, m in r['models'].items():
    for label in ('old', 'new'):
      a, b = m[label]['q0.99'], m[label]['q0.95']
      what = ('penultimate only (issue 10)' if label == 'old' else
              f'max of {len(m["taps"])} standardised depths')
      lines.append(f'| {name} -> {m["unseen_site"]} (n = {m["n_unseen"]} / {m["n_own_test"]}) '
                   f'| {what} | {_pct(a["unseen_flagged"])} | {_pct(a["own_test_flagged"])} | '
                   f'{a["auc"]:.3f} | {_pct(b["unseen_flagged"])} / '
                   f'{_pct(b["own_test_flagged"])} | {_pct(a["unseen_flagged_at_own_5pct"])} |')
  lines += ['', 'Per depth (each depth alone at its own validation quantile 0.99; and the share '
            'of films above the ensemble threshold at that depth, i.e. the depths that flag):',
            '', '| model | depth (features) | unseen flagged alone | own test flagged alone | '
            'ROC-AUC | unseen above ensemble threshold | own test above it |',
            '|---|---|---|---|---|---|---|']
  for name, m in r['models'].items():
    for (tap, d), dim in zip(m['depths'].items(), m['feature_dims']):
      lines.append(f'| {name} | {tap} ({dim}) | {_pct(d["unseen_flagged"])} | '
                   f'{_pct(d["own_test_flagged"])} | {d["auc"]:.3f} | '
                   f'{_pct(d["unseen_above_ensemble"])} | {_pct(d["own_above_ensemble"])} |')
  names = list(r['models'])
  lines += ['', 'Combinations of the depths that need no out-of-distribution data (threshold '
            'quantile:0.99 of validation; unseen flagged / own test flagged / ROC-AUC):', '',
            '| combination | ' + ' | '.join(names) + ' |', '|---|' + '---|' * len(names)]
  for label in r['models'][names[0]]['combinations']:
    cells = []
    for name in names:
      c = r['models'][name]['combinations'][label]
      cells.append(f'{_pct(c["unseen_flagged"])} / {_pct(c["own_test_flagged"])} / '
                   f'{c["auc"]:.3f}')
    lines.append(f'| {label} | ' + ' | '.join(cells) + ' |')
  lines += ['', 'TFLite: the flag against the Keras model\'s score of the same depths on the same '
            'images (own test split, 200 unseen-site films), and what each variant flags. The '
            'int8 file carries the penultimate depth alone, with its own threshold (8-bit '
            'activations do not carry the earlier depths):', '',
            '| model | variant | score carried | flag agreement own test | flag agreement '
            'unseen | unseen flagged (Keras, same depths) | own test flagged | file |',
            '|---|---|---|---|---|---|---|---|']
  for name, m in r['models'].items():
    for key, t in m['tflite'].items():
      label, quant = key.split('_', 1)
      carried = ('issue 10' if label == 'old' else
                 'penultimate alone' if len(t['taps']) == 1 else f'{len(t["taps"])} depths')
      if quant == 'int8-all-depths':
        quant, carried = 'int8', f'{len(t["taps"])} depths (not shipped)'

      lines.append(f'| {name} | {quant} | {carried} | {t["flag_agreement_own_test"]:.3f} | '
                   f'{t["flag_agreement_unseen"]:.3f} | {_pct(t["unseen_flagged"])} '
                   f'({_pct(t["keras_unseen_flagged"])}) | {_pct(t["own_test_flagged"])} | '
                   f'{t["size_bytes"] / 1e6:.2f} MB |')
  lat = r['latency']
  lines += ['', f'Latency, one image, median of {LATENCY_RUNS}, the paths of a row called in '
            f'turn ({names[0]} model; TFLite 1 thread):', '',
            '| path | no score | old score | new score |', '|---|---|---|---|',
            f'| Keras (Predictor: tap model + numpy score) | {lat["keras_model_ms"]:.2f} ms | '
            f'{lat["keras_old_ms"]:.2f} ms | {lat["keras_new_ms"]:.2f} ms |']
  for quant in ('fp32', 'int8'):
    lines.append(f'| TFLite {quant} | {lat[f"tflite_{quant}_none_ms"]:.2f} ms | '
                 f'{lat[f"tflite_{quant}_old_ms"]:.2f} ms | {lat[f"tflite_{quant}_new_ms"]:.2f} '
                 'ms |')
  for name, m in r['models'].items():
    lines.append('')
    lines.append(f'{name}: covidlib-fit-shift took {m["fit_seconds"]:.0f} s; the Predictor\'s '
                 f'Keras path agrees with the arrays to {m["predictor_max_abs_diff"]:.1e}; '
                 f'whole part {m["seconds"]:.0f} s.')
  return '\n'.join(lines) + '\n'


if __name__ == '__main__':
  app.run(main)
