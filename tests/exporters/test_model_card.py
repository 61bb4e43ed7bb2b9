"""exporters.model_card: an evaluation report's figures and groups appear; fallbacks say so."""

import os
import time

import numpy as np
import pytest

from covidlib import errors
from covidlib import evaluate
from covidlib import model_dir as model_dir_lib
from covidlib import scored
from exporters import model_card

CONFIG = {'model': 'compact_resnet', 'image_size': 224, 'channels': 1,
          'dataset': 'covid_xray/patient_split', 'epochs': 30, 'learning_rate': 0.001}
DECISION = model_dir_lib.Decision(threshold=0.31, policy='youden', temperature=1.2,
                                  split='validation')


@pytest.fixture(scope='module')
def evaluation():
  """A real covidlib.evaluate report on fixed scores, with per-source groups."""
  rs = np.random.RandomState(0)
  labels = np.array([0] * 30 + [1] * 30)
  scores = np.clip(labels * 0.4 + rs.uniform(0, 0.6, 60), 0, 1)
  sources = np.array(['kaggle_pediatric'] * 30 + ['ieee8023'] * 30, dtype=object)
  predictions = scored.Scored(labels=labels, scores=scores, metadata={'source': sources})
  report = evaluate.evaluate_predictions(predictions, DECISION, group_by=['source'],
                                         n_bootstrap=100)
  report['data'] = {'description': 'covid_xray/patient_split split test', 'n': 60}
  return report


def test_card_shows_the_evaluation_report(evaluation):
  card = model_card.render_model_card(CONFIG, DECISION, evaluation=evaluation,
                                      evaluation_source='report `eval/report.json`',
                                      parity=None, files=['saved_model'], params=1234)
  auc = evaluation['metrics']['figures']['roc_auc']
  assert f'| ROC-AUC | {auc["value"]:.3f} [{auc["ci95"][0]:.3f}, {auc["ci95"][1]:.3f}] |' in card
  sensitivity = evaluation['groups']['source']['ieee8023']['figures']['sensitivity']
  assert f'| ieee8023 | 30 | 30 / 0 | ' in card
  assert f'{sensitivity["value"]:.3f} [' in card
  assert 'Source: report `eval/report.json`. Data: covid_xray/patient_split split test' in card
  assert 'compact_resnet`, 1,234 parameters' in card
  assert 'threshold 0.31, policy `youden`, temperature 1.2' in card
  assert 'Not measured (export without parity data).' in card
  assert 'add its sources and licences here' not in card  # Trained on covid_xray.


def test_card_without_any_metrics_says_so():
  card = model_card.render_model_card({**CONFIG, 'dataset': 'folder:/data/xrays'}, DECISION,
                                      evaluation=None, evaluation_source='none', parity=None,
                                      files=[])
  assert 'No metrics: no evaluation report in the model_dir and no parity data' in card
  assert 'add its sources and licences here' in card
  assert card.count('Research') >= 2


def test_find_evaluation_report_takes_the_newest(tmp_path, evaluation):
  assert model_card.find_evaluation_report(str(tmp_path)) is None
  model_dir_lib.write_json(tmp_path / 'eval_validation' / 'report.json', evaluation)
  time.sleep(0.01)
  newest = tmp_path / 'eval_test' / 'report.json'
  model_dir_lib.write_json(newest, evaluation)
  os.utime(tmp_path / 'eval_validation' / 'report.json', (1, 1))
  assert model_card.find_evaluation_report(str(tmp_path)) == str(newest)
  assert model_card.load_evaluation_report(str(newest))['metrics']['n'] == 60
  model_dir_lib.write_json(tmp_path / 'not_a_report.json', {'a': 1})
  with pytest.raises(errors.DataError, match='not a covidlib-evaluate report'):
    model_card.load_evaluation_report(str(tmp_path / 'not_a_report.json'))


def test_card_shows_the_shortcut_figures(evaluation):
  from covidlib import shortcuts

  rs = np.random.RandomState(3)
  evaluated = scored.Scored(np.array([1] * 20 + [0] * 20), rs.rand(40),
                            {'source': np.array(['ieee8023'] * 20 + ['nih'] * 20, object)})
  other = scored.Scored(np.zeros(10, np.int64), rs.rand(10),
                        {'source': np.array(['ieee8023'] * 10, object)})
  pediatric = scored.Scored(np.zeros(12, np.int64), rs.rand(12),
                            {'source': np.array(['kaggle_pediatric'] * 12, object)})
  section = shortcuts.shortcut_report(
      DECISION, evaluated, other=other, other_description='covid_xray/other_findings',
      unseen={'kaggle_pediatric': (pediatric, 'pediatric normals')}, probe=False,
      n_bootstrap=50)
  card = model_card.render_model_card(CONFIG, DECISION,
                                      evaluation={**evaluation, 'shortcuts': section},
                                      evaluation_source='r', parity=None, files=[])
  auc = section['within_source']['ieee8023: COVID-19 vs other findings']['roc_auc']
  assert f'| ieee8023: COVID-19 vs other findings | 20 | 10 (other findings (not COVID-19)) | '\
         f'{auc["value"]:.3f} [' in card
  spec = section['held_out_source'][0]['specificity']['value']
  assert f'| kaggle_pediatric | never in the training set: evaluated directly | 12 | ' \
         f'{spec:.3f} [' in card
  assert 'not COVID-19' in card and '## Shortcuts: source, not disease?' in card
  bare = model_card.render_model_card(CONFIG, DECISION, evaluation=evaluation,
                                      evaluation_source='r', parity=None, files=[])
  assert 'Not measured (covidlib-evaluate --shortcuts was off' in bare


def test_card_of_own_data_describes_that_data_only(evaluation):
  """A labelled_xrays model: its sites and classes from the dataset, no covid_xray text."""
  config = {**CONFIG, 'dataset': 'labelled_xrays/mysite'}
  strata = {('north', 0): 40, ('north', 1): 35, ('south', 0): 20}
  own = {**evaluation, 'groups': {}}  # The evaluated films name no site.
  card = model_card.render_model_card(config, DECISION, evaluation=own, evaluation_source='r',
                                      parity=None, files=[], training_strata=strata)
  for public_text in ('ieee8023', 'Kermany', 'NIH', 'The seed split leaks', '445 of 448',
                      'Each class from its own sources', 'add its sources and licences',
                      'pediatric normals'):
    assert public_text not in card, public_text
  assert '| north | 40 | 35 |' in card and '| south | 20 | 0 |' in card
  assert 'Sites holding one class only:** south' in card
  assert '2 site(s): north, south' in card
  assert '95 training images' in card  # 40 + 35 + 20, under 1,000: the small-data line.
  assert 'the evaluated images name no site' in card
  assert model_card.OWN_DATA_USE in card
  # Without strata (a folder, or not built here) it asks for the sources instead.
  card = model_card.render_model_card(config, DECISION, evaluation=None, evaluation_source='r',
                                      parity=None, files=[])
  assert 'add its sources and licences here' in card and 'Not evaluated' in card


def test_training_line_names_the_kept_epoch_and_its_figures():
  history = {'loss': [0.9, 0.5, 0.4], 'val_loss': [1.0, 0.6, 0.8], 'val_auc': [0.7, 0.86, 0.68],
             'kept_epoch': 2, 'kept_by': 'val_auc', 'kept_reason': 'highest val_auc',
             'kept_metrics': {'loss': 0.5, 'val_loss': 0.6, 'val_auc': 0.86},
             'extended_from_epochs': 2}
  card = model_card.render_model_card(CONFIG, DECISION, evaluation=None, evaluation_source='none',
                                      parity=None, files=[], history=history)
  assert ('## Training configuration\n\nTraining: 3 epochs (extended from 2); the model holds '
          'epoch 2 of 3 (highest val_auc): val_auc 0.8600, val_loss 0.6000.\n') in card
  old = {k: v for k, v in history.items() if isinstance(v, list)}
  assert model_card.training_line(old) == (
      'Training: 3 epochs; history.json does not record which epoch the weights are from '
      '(written before covidlib recorded it).')
  assert model_card.training_line(None) == (
      'Training history: none (no history.json in the model_dir).')
