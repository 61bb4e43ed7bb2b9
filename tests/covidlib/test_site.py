"""covidlib-site end to end on generated sites: check, validate, adapt, and every bad input.

    .venv/bin/python -m pytest tests/covidlib/test_site.py -q

Site A trains a compact_resnet at 32 px for 2 epochs (a folder dataset; covidlib-train's hook
writes its shift score and reference). Site B's films are made by the same generator with
another acquisition style (darker, more contrast and noise), listed in a labels CSV with patient
ids (some patients have two films), site, view, age and sex.
"""

import hashlib
import json
import os
import shutil

import keras
import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver
from PIL import Image

from covidlib import calibration
from covidlib import errors
from covidlib import model_dir as md
from covidlib import reference
from covidlib import scoring
from covidlib import site
from covidlib import site_adapt
from covidlib import sites
from covidlib import threshold
from covidlib import train
from covidlib.cli import common
from covidlib.cli import site as cli
from covidlib_tfds import privacy

SIZE = 32
SALT = 'a test salt of the site tests'
PROG = 'covidlib-site'


def _film(rs, label: int, style: str) -> np.ndarray:
  yy, xx = np.mgrid[0:40, 0:40] / 40.0
  image = 0.45 + 0.15 * np.sin(rs.uniform(2, 4) * xx + rs.uniform(0, 3)) * np.cos(
      rs.uniform(1, 3) * yy) + 0.04 * rs.randn(40, 40)
  if label:
    image[12:24, 10:22] += 0.3
  if style == 'b':
    image = 0.1 + 0.7 * image ** 2 + 0.08 * rs.randn(40, 40)
  return (np.clip(image, 0, 1) * 255).astype(np.uint8)


def _write_csv(root, rows, header='path,label,patient_id,site,view,age,sex'):
  root.mkdir(parents=True, exist_ok=True)
  lines = [header] + [','.join(str(v) for v in r) for r in rows]
  (root / 'labels.csv').write_text('\n'.join(lines) + '\n')
  return str(root / 'labels.csv')


def _site_b(root, rs, patients_per_class=36, positive='covid', split=None):
  """Films of site B and their labels CSV rows; every 3rd patient has two films."""
  rows = []
  (root / 'images').mkdir(parents=True, exist_ok=True)
  for label in (0, 1):
    for p in range(patients_per_class):
      for k in range(2 if p % 3 == 0 else 1):
        name = f'images/{label}_{p}_{k}.png'
        Image.fromarray(_film(rs, label, 'b')).save(root / name)
        rows.append([name, positive if label else 'normal', f'P{label}{p:03d}', 'b',
                     'AP' if p % 2 else 'PA', 20 + p, 'F' if p % 2 else 'M']
                    + ([] if split is None else [split(label, p, k)]))
  return rows


@pytest.fixture(scope='module')
def world(tmp_path_factory):
  root = tmp_path_factory.mktemp('site')
  rs = np.random.RandomState(0)
  for split, n in (('train', 40), ('validation', 20), ('test', 25)):
    for label, name in ((0, 'normal'), (1, 'covid')):
      folder = root / 'a' / split / name
      folder.mkdir(parents=True)
      for i in range(n):
        Image.fromarray(_film(rs, label, 'a')).save(folder / f'{i}.png')
  model_dir = str(root / 'model_a')
  config = train.make_config(model='compact_resnet', image_size=SIZE, dataset=f'folder:{root}/a',
                             epochs=2, batch_size=16, seed=0)
  train.train(config, model_dir)
  assert reference.exists(model_dir)  # covidlib-train's hook wrote it (covidlib.shift_fit).
  b = root / 'b'
  rows = _site_b(b, rs)
  csv = _write_csv(b, rows)
  return {'root': root, 'model_dir': model_dir, 'csv': csv, 'rows': rows,
          'a_test': [str(root / 'a' / 'test')], 'b_images': str(b / 'images'), 'rs': rs}


def _run(argv, **values) -> int:
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  defaults = dict(model_dir=None, films=None, data_dir=None, out=None, site=None, seed=0,
                  n_bootstrap=200, alpha=0.01, n_permutations=199,
                  target='sensitivity:0.9,specificity:0.8', new_model_dir=None,
                  method='threshold', holdout_fraction=0.3, holdout_films=None, epochs=None,
                  learning_rate=None, batch_size=None, threshold_policy=None, verbose=0)
  with flagsaver.flagsaver(**{**defaults, **values}):
    return common.call_main(cli.main, [PROG] + list(argv), PROG)


def _digest(folder) -> dict:
  out = {}
  for dirpath, _, names in os.walk(folder):
    for name in names:
      path = os.path.join(dirpath, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
  return out


# --------------------------------------------------------------------------------------------
# check


@pytest.mark.slow
def test_check_tells_the_new_site_from_the_training_site(world, tmp_path):
  config = md.load_config(world['model_dir'])
  films = site.load_films([world['b_images']], config)
  report = site.check(world['model_dir'], films, out=str(tmp_path / 'b'), n_permutations=199)
  assert report['test']['differs'] and report['test']['p_value'] == pytest.approx(1 / 200)
  assert report['verdict'].startswith('site differs from training (p < 0.01; domain ROC-AUC ')
  assert report['verdict'].endswith(f'on {len(films)} films: validate before use')
  # The same statistics as a two-sample test on an independent scoring pass of the files.
  ref = reference.load(world['model_dir'])
  scored = scoring.score_files(md.load_model(world['model_dir']),
                               list(films.metadata['filename']), [0] * len(films), config,
                               taps=True)
  expected = sites.two_sample_test(ref.features, [scored.taps[t] for t in ref.taps], ref.taps,
                                   n_permutations=199)
  assert [r['mmd2'] for r in report['test']['taps']] == pytest.approx(
      [r['mmd2'] for r in expected['taps']], rel=1e-4)
  written = json.loads((tmp_path / 'b' / site.CHECK_JSON).read_text())
  assert written['verdict'] == report['verdict'] and written['share_flagged'] is not None
  assert (tmp_path / 'b' / site.CHECK_MD).read_text().startswith('# Site check: ')
  same = site.check(world['model_dir'], spec=world['a_test'], n_permutations=199)
  assert not same['test']['differs'], same['verdict']
  assert same['verdict'].startswith('no difference from training detected (p = ')


@pytest.mark.slow
def test_check_binary_names_every_bad_file_reports_the_rest_and_exits_1(world, tmp_path,
                                                                        capsys):
  folder = tmp_path / 'films'
  shutil.copytree(world['b_images'], folder)
  good = len(os.listdir(folder))
  (folder / 'truncated.png').write_bytes((folder / os.listdir(folder)[0]).read_bytes()[:60])
  (folder / 'notes.png').write_text('not an image\n')
  out = tmp_path / 'out'
  assert _run(['check', str(folder)], model_dir=world['model_dir'], out=str(out)) == 1
  stdout, stderr = capsys.readouterr()
  assert stdout.startswith('site differs from training (')
  lines = stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(
      f'{PROG}: error: 2 files could not be used (the other {good} were): ')
  assert f'{folder}/notes.png: not a decodable image' in lines[0]
  assert f'{folder}/truncated.png: not a decodable image' in lines[0]
  report = json.loads((out / site.CHECK_JSON).read_text())
  assert report['data']['n'] == good and len(report['data']['bad']) == 2


def test_a_model_dir_without_a_reference_is_refused_before_anything(world, tmp_path, capsys):
  bare = tmp_path / 'bare'
  shutil.copytree(world['model_dir'], bare)
  reference.remove(bare)
  out = tmp_path / 'out'
  assert _run(['check'], model_dir=str(bare), films=world['b_images'], out=str(out)) == 2
  err = capsys.readouterr().err
  assert err == (f"{PROG}: error: model_dir '{bare}' holds no reference of its training site "
                 '(reference.npz): it was trained by an older covidlib; add it with '
                 f'covidlib-fit-shift --model_dir={bare}\n')
  assert not out.exists()


def test_check_needs_enough_films(world, tmp_path):
  films = site.load_films([world['b_images']], md.load_config(world['model_dir']))
  with pytest.raises(errors.UsageError, match='check needs at least 10 films of the site to '
                                              'test a batch; got 4'):
    site.check(world['model_dir'], films.select(np.arange(4)))


# --------------------------------------------------------------------------------------------
# validate


@pytest.mark.slow
def test_validate_applies_the_models_operating_point_with_patient_intervals(world, tmp_path):
  config = md.load_config(world['model_dir'])
  targets = {'sensitivity': 0.5, 'specificity': 0.99}
  report = site.validate(world['model_dir'], spec=world['csv'], out=str(tmp_path),
                         targets=targets, n_bootstrap=200)
  rows = world['rows']
  films = site.load_films(world['csv'], config, labelled=True)
  assert films.labels.tolist() == [int(r[1] == 'covid') for r in rows]
  decision = md.load_decision(world['model_dir'])
  scored = scoring.score_files(md.load_model(world['model_dir']),
                               [os.path.join(os.path.dirname(world['csv']), r[0]) for r in rows],
                               films.labels, config)
  p = calibration.apply_temperature(scored.scores, decision.temperature)
  expected = sites.site_figures(films.labels, p, [f'b\0{r[2]}' for r in rows],
                                decision.threshold, n_bootstrap=200, seed=0,
                                class_names=('normal', 'covid'))
  for name in sites.TARGET_FIGURES:
    assert report['figures'][name]['value'] == pytest.approx(expected[name]['value'], abs=1e-6)
    assert report['figures'][name]['ci95'] == pytest.approx(expected[name]['ci95'], abs=1e-4)
  assert report['figures']['n_patients'] == 72 and report['figures']['n'] == len(rows)
  assert sorted(report['strata']) == ['age_band', 'sex', 'view']  # One site: no site table.
  assert sorted(report['strata']['view']) == ['AP', 'PA']
  assert report['verdict'].startswith(report['judged']['verdict'] + ': sensitivity ')
  assert report['verdict'].endswith(f'on {len(rows)} films (72 patients)')
  assert [t['figure'] for t in report['judged']['targets']] == ['sensitivity', 'specificity']
  text = (tmp_path / site.VALIDATE_MD).read_text()
  assert '## Targets' in text and '## By view' in text and 'films needed' in text.lower()


def _labelled_subset(world, tmp_path, keep):
  rows = [r for r in world['rows'] if keep(r)]
  folder = tmp_path / 'subset'
  shutil.copytree(os.path.join(os.path.dirname(world['csv']), 'images'), folder / 'images')
  return _write_csv(folder, rows)


def test_validate_refuses_a_missing_class_and_too_few_films(world, tmp_path, capsys):
  only_normal = _labelled_subset(world, tmp_path, lambda r: r[1] == 'normal')
  assert _run(['validate'], model_dir=world['model_dir'], films=only_normal,
              out=str(tmp_path / 'o1')) == 1
  err = capsys.readouterr().err
  assert err.startswith(f'{PROG}: error: the films of labels CSV {only_normal} hold no covid '
                        'film (0 covid, ') and err.count('\n') == 1
  few = tmp_path / 'few'
  shutil.copytree(os.path.dirname(only_normal), few)
  rows = [r for r in world['rows'] if r[1] == 'normal' or r[2] in ('P1000', 'P1001', 'P1002')]
  csv = _write_csv(few, rows)
  with pytest.raises(errors.DataError, match=r'too few films for a figure with an interval: 4 '
                                             r'covid; each class needs at least 10'):
    site.validate(world['model_dir'], spec=csv)
  assert not (tmp_path / 'o1').exists()


def test_validate_refuses_labels_of_other_classes(world, tmp_path):
  rows = [[r[0], 'pneumonia' if r[1] == 'covid' else r[1]] + r[2:] for r in world['rows']]
  folder = tmp_path / 'pneumonia'
  shutil.copytree(os.path.join(os.path.dirname(world['csv']), 'images'), folder / 'images')
  csv = _write_csv(folder, rows)
  with pytest.raises(errors.UsageError) as e:
    site.validate(world['model_dir'], spec=csv)
  assert str(e.value).endswith("--positive=covid: no row of labels.csv has that label; its "
                               "labels are 'normal' (48 rows), 'pneumonia' (48 rows)")


# --------------------------------------------------------------------------------------------
# adapt


@pytest.mark.slow
def test_adapt_threshold_writes_a_new_model_dir_and_never_touches_the_parent(world, tmp_path,
                                                                             monkeypatch):
  monkeypatch.setenv(privacy.SALT_ENV, SALT)
  before = _digest(world['model_dir'])
  new = tmp_path / 'adapted'
  config = md.load_config(world['model_dir'])
  films = site.load_films(world['csv'], config, labelled=True)
  report = site_adapt.adapt(world['model_dir'], str(new), films, method='threshold',
                            n_bootstrap=100)
  assert _digest(world['model_dir']) == before
  assert sorted(os.listdir(new)) == ['adapt', 'config.json', 'decision.json', 'lineage.json',
                                     'model.keras', 'reference.json', 'reference.npz',
                                     'shift.json', 'shift.npz']
  assert not [n for n in os.listdir(tmp_path) if n.startswith('.')]  # No partial folder left.
  lineage = json.loads((new / site.LINEAGE).read_text())
  # Patients whole on one side; only their pseudonyms stored, none of the raw ids anywhere.
  adapt_ids = {privacy.pseudonym(SALT, 'b', r[2]) for r in world['rows']} & set(
      lineage['adapt']['patients'])
  assert len(adapt_ids) == lineage['adapt']['n_patients'] == 50  # 72 patients - 0.3 * 36 * 2.
  assert report['n_adapt'] + report['n_hold_out'] == len(world['rows'])
  for name in os.listdir(new):
    if os.path.isfile(new / name):
      assert b'P1000' not in (new / name).read_bytes() and b'P0035' not in (
          new / name).read_bytes()
  # The decision: threshold and temperature chosen on the adapt films by the youden policy.
  keys = films.patient_keys()
  held_keys = {f'b\0{r[2]}' for r in world['rows']
               if privacy.pseudonym(SALT, 'b', r[2]) not in adapt_ids}
  adapt_part = films.select(~np.isin(keys, list(held_keys)))
  scores = site.score_films(md.load_model(world['model_dir']), adapt_part).scores
  decision, _ = threshold.choose_decision(adapt_part.labels, scores, 'youden', True, 'adapt')
  assert md.load_decision(new).threshold == pytest.approx(decision.threshold)
  assert md.load_decision(new).temperature == pytest.approx(decision.temperature, rel=1e-4)
  assert set(report['hold_out']) == {'parent', 'adapted'}
  assert report['hold_out']['parent']['figures']['n'] == report['n_hold_out']
  assert lineage['hold_out']['adapted']['roc_auc']['value'] == pytest.approx(
      report['hold_out']['adapted']['figures']['roc_auc']['value'])
  line = sites.lineage_line(lineage)
  assert line.startswith(f'adapted at b on {report["n_adapt"]} films (threshold) from ')
  assert f'validated on {report["n_hold_out"]} other films of that site: ROC-AUC ' in line
  # The model card and the export carry it.
  from exporters import export
  from exporters import model_card
  assert export._lineage(str(new)) == lineage and export._lineage(world['model_dir']) is None
  card = model_card.render_model_card(md.load_config(new), md.load_decision(new),
                                      evaluation=None, evaluation_source='none', parity=None,
                                      files=[], lineage=lineage)
  assert f'- Site adaptation (lineage.json): {line}.' in card
  # Validating the adapted model on films it was adapted on is refused.
  with pytest.raises(errors.UsageError, match=r'50 patients of these films were used to adapt'):
    site.validate(str(new), films)
  # Its own held-out films are accepted.
  held = films.select(np.isin(keys, list(held_keys)))
  assert site.validate(str(new), held, n_bootstrap=50)['figures']['n'] == report['n_hold_out']


def test_adapt_refuses_a_hold_out_sharing_patients(world, tmp_path, monkeypatch, capsys):
  monkeypatch.setenv(privacy.SALT_ENV, SALT)
  folder = tmp_path / 'split'
  shutil.copytree(os.path.join(os.path.dirname(world['csv']), 'images'), folder / 'images')
  # Patient P0000 has two films: one in the test split (the hold-out), one in train.
  rows = [r + ['test' if (r[2][2:] in ('000', '001', '002', '003', '004', '005',
                                     '006', '007', '008', '009', '010', '011')
                          and not (r[2] == 'P0000' and r[0].endswith('_1.png')))
               else 'train'] for r in world['rows']]
  csv = _write_csv(folder, rows, header='path,label,patient_id,site,view,age,sex,split')
  new = tmp_path / 'adapted'
  assert _run(['adapt'], model_dir=world['model_dir'], films=csv, new_model_dir=str(new)) == 2
  err = capsys.readouterr().err
  assert err == (f'{PROG}: error: the hold-out shares 1 patients with the adapt part (the labels '
                 "CSV's split column (rows 'test')): a hold-out must hold other patients only\n")
  assert not new.exists() and not [n for n in os.listdir(tmp_path) if n.startswith('.')]
  # The same with --holdout_films (here: films given in memory).
  films = site.load_films(world['csv'], md.load_config(world['model_dir']), labelled=True)
  keys = films.patient_keys()
  holdout = np.isin(keys, [f'b\0P{c}{p:03d}' for c in (0, 1) for p in range(12)])
  holdout[np.flatnonzero(keys == 'b\0P0000')[0]] = False  # P0000's first film in the adapt part.
  with pytest.raises(errors.UsageError, match=r'the hold-out shares 1 patients with the adapt '
                                              r'part \(given: labels CSV '):
    site_adapt.adapt(world['model_dir'], str(new), films.select(~holdout),
                     holdout=films.select(holdout))
  assert not new.exists()


def test_adapt_refuses_an_existing_folder_the_parent_and_bad_files(world, tmp_path,
                                                                   monkeypatch):
  monkeypatch.setenv(privacy.SALT_ENV, SALT)
  config = md.load_config(world['model_dir'])
  films = site.load_films(world['csv'], config, labelled=True)
  (tmp_path / 'exists').mkdir()
  with pytest.raises(errors.UsageError, match='exists: adapt never writes over a folder'):
    site_adapt.adapt(world['model_dir'], str(tmp_path / 'exists'), films)
  with pytest.raises(errors.UsageError, match='is the parent model_dir'):
    site_adapt.adapt(world['model_dir'], world['model_dir'], films)
  with pytest.raises(errors.UsageError, match="--method must be one of threshold, finetune, "
                                              "adabn, adabn\\+finetune, got 'tent'"):
    site_adapt.adapt(world['model_dir'], str(tmp_path / 'n'), films, method='tent')
  folder = tmp_path / 'bad'
  shutil.copytree(os.path.join(os.path.dirname(world['csv']), 'images'), folder / 'images')
  (folder / 'images' / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n broken')
  csv = _write_csv(folder, world['rows'] + [['images/broken.png', 'covid', 'P9', 'b', 'AP', 30,
                                             'F']])
  bad = site.load_films(csv, config, labelled=True)
  assert bad.bad == [f'{folder}/images/broken.png: not a decodable image (Invalid PNG data, '
                     'size 15)'] or bad.bad[0].startswith(f'{folder}/images/broken.png: ')
  with pytest.raises(errors.DataError, match='1 of the local films could not be used; adapt '
                                             'starts only from a complete set'):
    site_adapt.adapt(world['model_dir'], str(tmp_path / 'n'), bad)
  monkeypatch.delenv(privacy.SALT_ENV)
  with pytest.raises(errors.UsageError, match='a salt is required to pseudonymise patient ids'):
    site_adapt.adapt(world['model_dir'], str(tmp_path / 'n'), films)
  assert sorted(os.listdir(tmp_path)) == ['bad', 'exists']


def test_adabn_sets_each_batchnorm_to_the_statistics_of_its_inputs(world):
  model = md.load_model(world['model_dir'])
  images = site.load_films([world['b_images']], md.load_config(world['model_dir'])).images
  layers = [l for l in model.layers if isinstance(l, keras.layers.BatchNormalization)]
  assert site_adapt.adabn(model, images, batch_size=7) == len(layers) > 3
  for layer in (layers[0], layers[-1]):  # The last sees the earlier ones re-estimated.
    inputs = np.asarray(keras.Model(model.input, layer.input)(images, training=False),
                        np.float64)
    axes = tuple(range(inputs.ndim - 1))
    np.testing.assert_allclose(layer.moving_mean.numpy(), inputs.mean(axis=axes), rtol=1e-4,
                               atol=1e-5)
    np.testing.assert_allclose(layer.moving_variance.numpy(), inputs.var(axis=axes), rtol=1e-3,
                               atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize('method', ['finetune', 'adabn+finetune'])
def test_fine_tuning_methods(world, tmp_path, monkeypatch, method):
  monkeypatch.setenv(privacy.SALT_ENV, SALT)
  config = md.load_config(world['model_dir'])
  films = site.load_films(world['csv'], config, labelled=True)
  new = tmp_path / 'adapted'
  report = site_adapt.adapt(world['model_dir'], str(new), films, method=method, epochs=2,
                            learning_rate=1e-3, n_bootstrap=50)
  assert {'model.keras', 'decision.json', 'history.json', 'reference.npz', 'shift.npz',
          'lineage.json'} <= set(os.listdir(new))
  assert not {'checkpoints', 'logs', 'adabn_init.keras'} & set(os.listdir(new))
  history = json.loads((new / md.HISTORY).read_text())
  assert len(history['loss']) == 2 and history['kept_by'] == 'val_auc'
  saved = md.load_config(new)
  assert saved['init_from'] == world['model_dir'] and saved['learning_rate'] == 1e-3
  notes = ' '.join(report['notes'])
  assert 'best epoch by ROC-AUC on an inner validation of' in notes
  assert ('AdaBN' in notes) == (method == 'adabn+finetune')
  parent = md.load_model(world['model_dir'])
  adapted = md.load_model(new)
  assert not np.allclose(parent.get_layer('logit').get_weights()[0],
                         adapted.get_layer('logit').get_weights()[0])


def test_a_small_adapt_part_trains_without_an_inner_validation_and_says_so(world):
  config = md.load_config(world['model_dir'])
  films = site.load_films(world['csv'], config, labelled=True)
  small = films.select(np.r_[np.arange(12), np.arange(len(films) - 12, len(films))])
  train_part, inner, note = site_adapt.inner_split(small, seed=0)
  assert inner is None and len(train_part) == 24
  assert note.startswith('adapt part too small for an inner validation (12 positive, 12 '
                         'negative films; an inner validation of 0.25 needs 20 of each class)')


# --------------------------------------------------------------------------------------------
# The binary


def test_binary_usage_errors_are_one_line(world, tmp_path, capsys, monkeypatch):
  # covidlib-train/-evaluate/-export define --model_dir required=True; in a test process that
  # imported one of them first, absl's validator would answer for covidlib-site, which in its
  # own process has none. Drop it here so the message checked is covidlib-site's own.
  monkeypatch.setattr(flags.FLAGS['model_dir'], 'validators', [])
  cases = [
      ([], {}, 'the first argument is the subcommand: check, validate, adapt (none given)'),
      (['inspect'], {}, "the first argument is the subcommand: check, validate, adapt (got "
                        "'inspect')"),
      (['validate'], {'model_dir': world['model_dir'], 'films': world['csv'],
                      'out': str(tmp_path / 'o'), 'target': 'sensitivity=0.9'},
       "--target part 'sensitivity=0.9': unknown figure 'sensitivity=0.9'"),
      (['validate', 'x.png'], {'model_dir': world['model_dir'], 'films': world['csv'],
                               'out': str(tmp_path / 'o')},
       "unexpected arguments ['x.png']: validate takes its films from --films"),
      (['validate'], {'model_dir': world['model_dir'], 'films': str(tmp_path),
                      'out': str(tmp_path / 'o')},
       f'{tmp_path}: labelled films come from a labels CSV'),
      (['adapt'], {'model_dir': world['model_dir'], 'films': world['csv']},
       'flag --new_model_dir is required (where the adapted model goes)'),
      (['check'], {'films': world['b_images'], 'out': str(tmp_path / 'o')},
       'flag --model_dir is required'),
  ]
  for argv, values, message in cases:
    assert _run(argv, **values) == 2, message
    err = capsys.readouterr().err
    assert err.startswith(f'{PROG}: error: {message}') and err.count('\n') == 1, err
  assert not (tmp_path / 'o').exists()


def test_help_of_the_binary_and_of_a_subcommand(monkeypatch):
  monkeypatch.setattr('sys.argv', [PROG, '--help'])
  everything = cli.help_text()
  assert everything.startswith('covidlib-site: a model at a new hospital')
  assert '--n_permutations' in everything and '--method' in everything
  monkeypatch.setattr('sys.argv', [PROG, '--verbosity=1', 'adapt', '--help'])
  assert '--holdout_fraction' in cli.help_text()
  monkeypatch.setattr('sys.argv', [PROG, 'check', '--help'])
  check = cli.help_text()
  assert check.startswith('covidlib-site check: Does a batch of unlabelled films')
  assert '--n_permutations' in check and '--method' not in check and '--target' not in check


@pytest.mark.slow
def test_help_of_a_subcommand_from_the_command_line():
  import subprocess
  import sys

  done = subprocess.run([sys.executable, '-m', 'covidlib.cli.site', 'validate', '--help'],
                        capture_output=True, text=True, timeout=120,
                        env={**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '3'})
  assert done.returncode == 0, done.stderr
  assert done.stdout.startswith('covidlib-site validate: How good is the model at this site?')
  assert '--target' in done.stdout and '--method' not in done.stdout


def test_films_without_a_patient_id_are_grouped_by_series_as_the_builders_do():
  meta = {k: np.array(v, dtype=object) for k, v in {
      'filename': ['a/extubation-1.png', 'a/extubation-13.png', 'a/IM-0001-0001.png', ''],
      'site': ['s'] * 4, 'patient_id': ['', '', '', ''], 'view': [''] * 4, 'sex': [''] * 4,
      'split': [''] * 4}.items()}
  meta['age'] = np.full(4, -1)
  films = site.Films(np.zeros((4, 8, 8, 1), np.float32), np.array([0, 0, 1, 1]), meta, 'made up')
  keys = films.patient_keys()
  assert keys[0] == keys[1] == 'series:s:extubation' and keys[2] != keys[0] and keys[3] == ''
  assert len(set(sites.patient_index(keys).tolist())) == 3
