"""Does the shift score (issue #10) flag images unlike the training data? Measured on real data.

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
     with the features as a second output plus the numpy score, and the score alone; the TFLite
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
  import keras
  import numpy as np

  from covidlib import model_dir as md
  from covidlib import models
  from covidlib import scoring
  from covidlib import shift
  from exporters import tflite

  model = md.load_model(model_dir)
  fitted = shift.load(model_dir)
  extractor = models.feature_model(model)
  x = images[:1]
  features = scoring.penultimate_features(model, x)

  def median_ms(fn, runs=50, warmup=5):
    for _ in range(warmup):
      fn()
    times = []
    for _ in range(runs):
      start = time.perf_counter()
      fn()
      times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000)

  out = {'keras_model_ms': median_ms(lambda: model(x, training=False)),
         'keras_with_features_and_score_ms': median_ms(
             lambda: fitted.score(np.asarray(extractor(x, training=False)[1]))),
         'score_only_numpy_ms': median_ms(lambda: fitted.score(features), runs=200)}
  del keras
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
    out[key] = median_ms(run)
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
      'shrinkage': fitted.shrinkage, 'n_per_class': list(fitted.n_per_class),
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
      'shrinkage': afit.shrinkage, 'n_per_class': list(afit.n_per_class),
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


if __name__ == '__main__':
  app.run(main)
