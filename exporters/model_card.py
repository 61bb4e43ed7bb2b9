"""MODEL_CARD.md, written by `covidlib-export` next to the exported models.

    from exporters import model_card
    text = model_card.render_model_card(config, decision, evaluation=report_json,
                                        evaluation_source='runs/x/eval/report.json',
                                        parity=export_report, files=['saved_model', ...])

Sections (after Mitchell et al., "Model Cards for Model Reporting", 2019): model details,
intended use and what it must not be used for, training data and licences, training
configuration (config.json) and the epoch whose weights the model holds (history.json), metrics
with 95% intervals (the evaluation report.json when the model_dir has one, else computed at
export on the parity split), per-source metrics, known confounds of this data, and the
quantization deltas of each exported variant (parity report).
"""

from __future__ import annotations

import glob
import json
import os

import covidlib
from covidlib import metrics as metrics_lib
from covidlib import model_dir as model_dir_lib
from covidlib import report
from covidlib import shortcuts
from covidlib import sites

FILENAME = 'MODEL_CARD.md'
_FIGURES = (('roc_auc', 'ROC-AUC'), ('sensitivity', 'Sensitivity (COVID-19 recall)'),
            ('specificity', 'Specificity (normal recall)'), ('accuracy', 'Accuracy'),
            ('ppv', 'PPV'), ('npv', 'NPV'), ('f1', 'F1'), ('brier', 'Brier score'),
            ('ece', 'ECE'))

INTENDED_USE = """\
**Research use only. Not a medical device. Not for diagnosis, triage, screening or any decision
about a patient.** It exists to study how (and how badly) small CNNs trained on public COVID-19
chest X-ray collections generalise, to reproduce the 2020 article "Detecting COVID-19 using Deep
Learning" (D. Trehan), and to measure shortcut learning. Out of scope: any clinical use; images
other than frontal chest X-rays; populations, scanners or hospitals absent from the training data
(its figures say nothing about them); telling COVID-19 from other pneumonias (the training data
has no such class)."""

DATA_SOURCES = """\
- **COVID-19 images**: the COVID-19 image data collection, J. P. Cohen, P. Morrison, L. Dao et al.
  (github.com/ieee8023/covid-chestxray-dataset, arXiv:2006.11988), as curated by the article's
  repository (dakshtrehan/Covid-19-Detection). Images come from many papers, websites and
  hospitals; **each image has its own licence** (the collection's metadata.csv, column
  `license`: CC BY, CC BY-NC-SA, Apache 2.0, unknown ...). Check them before redistributing.
- **Normal images**: "Chest X-Ray Images (Pneumonia)", D. Kermany, K. Zhang, M. Goldbaum et al.
  (Mendeley Data v2, doi:10.17632/rscbjbr9sj.2; Cell 2018), **CC BY 4.0**: pediatric patients
  aged 1 to 5 from one hospital (Guangzhou Women and Children's Medical Center). In configs
  `seed`, `patient_split`, `curated` and `adult_pediatric`.
- **Adult normal images** (configs `adult`, `adult_pediatric`): 427 "No Finding" films of the
  NIH Clinical Center ChestX-ray14 set (X. Wang et al., CVPR 2017; nihcc.app.box.com/v/
  ChestXray-NIHCC), adults aged 18-82 from ONE site; NIH states no restrictions on use; cite Wang
  et al. and acknowledge the NIH Clinical Center.
- **Other findings** (config `other_findings`, evaluation only): 51 SARS, Pneumocystis,
  bacterial pneumonia, ARDS... films of the same ieee8023 collection; label 0 there means "not
  COVID-19", not "normal"."""

CONFOUNDS = """\
- **Each class from its own sources.** COVID-19 images are adults from many papers and
  hospitals (figures, often cropped, annotated and re-compressed); normals are either children
  from one hospital (`seed`, `patient_split`) or adults from one NIH site (`adult`). A model can
  separate the classes by age, body size, scanner, hospital or annotation style without seeing
  any disease (DeGrave et al., Nature Machine Intelligence 2021: such models "appear accurate,
  but fail when tested in new hospitals"). Per-source metrics cannot remove this: within a
  source only one class exists. The shortcut figures above are the evidence that counts:
  within-source ROC-AUC, specificity on normals from sources never trained on, the source probe
  and the share of other findings called COVID-19.
- **Mixed file formats.** Every normal image is a grayscale JPEG, while COVID-19 images are RGB
  JPEG, RGBA PNG and gray JPEG: the file format alone predicts the label. covidlib canonicalises
  every image to one 8-bit gray channel (BT.601 luma, alpha dropped, 16-bit scaled) in its one
  preprocessing function, used for training, export and prediction alike; compression
  artefacts and paper-figure margins remain.
- **The seed split leaks.** The article's own train/validation split (config `seed`) puts images
  of the same patient, and near-duplicates, on both sides; figures measured on it are
  optimistic. The `patient_split` and `curated` configs split by patient.
- **External validation.** The article's recipe, re-run faithfully, scored 57/59 on its own
  validation split, yet on adult X-rays from other hospitals it called 445 of 448 normal adults
  COVID-19 (ROC-AUC 0.33, worse than chance). Expect the same of this model until it is shown
  otherwise on data from hospitals absent from training.
- **Small data.** A few hundred images: intervals are wide; a different seed or split moves the
  figures by more than the differences between model variants."""


OWN_DATA_USE = """\
**Research use only. Not a medical device. Not for diagnosis, triage, screening or any decision
about a patient** until it has been validated, at the site where it would be used, on films it
never learned from. Out of scope: images other than frontal chest X-rays; sites, scanners and
populations absent from the training data (its figures say nothing about them)."""


def _own_data_lines(config: dict, strata: dict | None) -> list[str]:
  """The training data of a user's own dataset: its sites and classes as the dataset holds
  them (strata: {(site, label): images} of the training split), never covid_xray's text."""
  if not strata:
    return ['The sources of this dataset are not recorded in it (a folder of images, or a '
            'dataset that is not built here): add its sources and licences here.', '']
  lines = ['Training split, by site (the dataset\'s `source`) and label, as built:', '',
           '| site | label 0 | label 1 |', '|---|---|---|']
  for site in sorted({s for s, _ in strata}):
    lines.append(f'| {site or "(none given)"} | {strata.get((site, 0), 0)} | '
                 f'{strata.get((site, 1), 0)} |')
  lines += ['', 'Add the data\'s provenance and licences here.', '']
  return lines


def _own_data_limits(config: dict, strata: dict | None, evaluation: dict | None) -> str:
  """Limitations from what was given and measured, for a user's own dataset."""
  sites = sorted({s for s, _ in strata}) if strata else []
  one_class = sorted({s for s, _ in strata if (s, 0) not in strata or (s, 1) not in strata}) \
      if strata else []
  n = sum(strata.values()) if strata else None
  lines = [f'- **Sites.** Trained on `{config.get("dataset", "?")}`'
           + (f', {len(sites)} site(s): {", ".join(s or "(none given)" for s in sites)}.'
              if sites else '.')
           + ' The figures describe those sites only. A model trained at one site can fail at '
           'the next without warning (covidlib measured a same-site pneumonia model that scored '
           'ROC-AUC 0.93 at its own site and 0.13 at another hospital): validate on local films '
           'before any use elsewhere.']
  if one_class:
    lines.append(f'- **Sites holding one class only:** {", ".join(one_class)}. There the site '
                 'alone predicts the label, a shortcut the model can learn instead of the finding.')
  if n is not None and n < 1000:
    lines.append(f'- **Small data.** {n} training images: intervals are wide, and another seed or '
                 'split moves the figures.')
  if evaluation is None:
    lines.append('- **Not evaluated** by covidlib-evaluate: no figure above comes from held-out '
                 'films of this dataset.')
  return '\n'.join(lines)


def find_evaluation_report(model_dir: str) -> str | None:
  """The newest report.json written by covidlib-evaluate in model_dir or one folder below."""
  candidates = [os.path.join(model_dir, 'report.json')]
  candidates += glob.glob(os.path.join(model_dir, '*', 'report.json'))
  candidates = [c for c in candidates if os.path.isfile(c)]
  if not candidates:
    return None
  return max(candidates, key=os.path.getmtime)


def load_evaluation_report(path: str) -> dict:
  report = model_dir_lib.read_json(path)
  if not isinstance(report, dict) or 'metrics' not in report:
    raise covidlib.errors.DataError(f'{path}: not a covidlib-evaluate report (no "metrics")')
  return report


def _figure(figure: dict | None) -> str:
  return metrics_lib.format_figure(figure, undefined='n/a', reason=True)


def _metrics_section(evaluation: dict | None, source: str, public: bool = True,
                     names: tuple[str, str] = ('normal', 'COVID-19')) -> list[str]:
  if evaluation is None:
    return ['No metrics: no evaluation report in the model_dir and no parity data at export.', '']
  neg, pos = names
  metrics = evaluation['metrics']
  data = evaluation.get('data', {})
  lines = [f'Source: {source}. Data: {data.get("description", "?")}: {metrics["n"]} images '
           f'({metrics["n_covid"]} {pos}, {metrics["n_normal"]} {neg}), threshold '
           f'{metrics["threshold"]:.4g}. 95% intervals: Wilson for proportions, stratified '
           'bootstrap otherwise.', '',
           '| Figure | Value [95% interval] |', '|---|---|']
  titles = {'sensitivity': f'Sensitivity ({pos} recall)',
            'specificity': f'Specificity ({neg} recall)'}
  for key, name in _FIGURES:
    name = titles.get(key, name)
    if key in metrics['figures']:
      lines.append(f'| {name} | {_figure(metrics["figures"][key])} |')
  c = metrics.get('confusion')
  if c:
    lines += ['', f'Confusion: TN {c["tn"]}, FP {c["fp"]}, FN {c["fn"]}, TP {c["tp"]}.']
  lines.append('')
  groups = evaluation.get('groups') or {}
  lines += ['### Per-source metrics', '']
  if 'source' not in groups and not public:
    lines += ['Not available: the evaluated images name no site (no `site` column in the '
              'labels CSV, or a folder of images).', '']
  elif 'source' not in groups:
    lines += ['Not available: the evaluation data carries no `source` feature (a folder of '
              'images rather than the covid_xray TFDS dataset).', '']
  else:
    lines += [f'| Source | n | {pos} / {neg} | Accuracy | Sensitivity | Specificity |',
              '|---|---|---|---|---|---|']
    for value, g in groups['source'].items():
      f = g['figures']
      lines.append(f'| {value} | {g["n"]} | {g["n_covid"]} / {g["n_normal"]} | '
                   f'{_figure(f.get("accuracy"))} | {_figure(f.get("sensitivity"))} | '
                   f'{_figure(f.get("specificity"))} |')
    if public:
      lines += ['', 'Each source holds one class only, so these figures measure each class '
                'within its source; they cannot separate disease from source (see Known '
                'confounds).', '']
    else:
      lines += ['', 'A site holding both classes compares like with like; a site holding one '
                'class measures that class alone.', '']
  return lines


def _quantization_section(parity: dict | None) -> list[str]:
  if parity is None:
    return ['Not measured (export without parity data).', '']
  reference = parity['models']['keras']['figures']['roc_auc']['value']
  lines = [f'On {parity["split"] or "the parity data"} ({parity["n"]} images), against the Keras '
           f'model (ROC-AUC {reference if reference is None else f"{reference:.3f}"}); full '
           'table in export_report.md.', '',
           '| Variant | Size | ROC-AUC drop | Agreement | max abs dp | mean abs dp | Targets |',
           '|---|---|---|---|---|---|---|']
  for name, m in parity['models'].items():
    if name == 'keras':
      continue
    verdicts = [c['pass'] for c in m['targets'].values()]
    verdict = ('met' if all(v is True for v in verdicts) else
               'MISSED' if False in verdicts else 'n/a')
    drop = m['roc_auc_drop']
    lines.append(f'| {name} | {m["file_size_bytes"] / 1024:,.0f} KiB | '
                 f'{"n/a" if drop is None else f"{drop:+.4f}"} | {m["agreement"]:.4f} | '
                 f'{m["max_abs_dp"]:.4f} | {m["mean_abs_dp"]:.4f} | {verdict} |')
  lines.append('')
  return lines


def training_line(history: dict | None) -> str:
  """One line: the epochs trained and the epoch whose weights the model holds, its figures."""
  if not history:
    return 'Training history: none (no history.json in the model_dir).'
  epochs = len(history.get('loss') or [])
  extended = history.get('extended_from_epochs')
  trained = f'{epochs} epochs{f" (extended from {extended})" if extended else ""}'
  kept = report.kept_epoch_text(history)
  if kept is None:
    return (f'Training: {trained}; history.json does not record which epoch the weights are '
            'from (written before covidlib recorded it).')
  return f'Training: {trained}; the model holds {kept}.'


def render_model_card(config: dict, decision: model_dir_lib.Decision, *,
                      evaluation: dict | None, evaluation_source: str,
                      parity: dict | None, files: list[str],
                      params: int | None = None, shift_info: dict | None = None,
                      training_strata: dict | None = None,
                      history: dict | None = None, lineage: dict | None = None) -> str:
  """The model card's Markdown. `evaluation` has covidlib-evaluate's report.json layout;
  `shift_info` is the model_dir's shift.json (None: the model carries no shift score);
  `training_strata` is {(source, label): images} of the training split (covidlib.data.
  stratum_counts), used to describe a user's own dataset (covid_xray's text is fixed);
  `history` its history.json (None: none); `lineage` the lineage.json of a model adapted to a
  site by covidlib-site adapt (None: not adapted)."""
  name = config.get('model', '?')
  public = model_dir_lib.trained_on_public_data(config)
  names = tuple(model_dir_lib.display_name(n) for n in model_dir_lib.class_names(config))
  size, channels = config.get('image_size', '?'), config.get('channels', 1)
  lines = [
      f'# Model card: {name} (covidlib {covidlib.__version__})', '',
      '> **Research software, not a diagnostic device. Do not use it to diagnose, triage or '
      'treat anyone.**', '',
      '## Model details', '',
      f'- Architecture: `{name}`{"" if params is None else f", {params:,} parameters"}.',
      f'- Input: one chest X-ray, decoded to 8-bit gray and resized to {size}x{size} '
      f'({channels} channel{"s" if channels != 1 else ""}), scaled to [0, 1], by '
      '`covidlib.preprocess` (inside the SavedModel `serving_default` signature; done by the '
      'caller for `serving_preprocessed` and TFLite).',
      f'- Output: P({names[1]}) after temperature scaling; label 1 = {names[1]}, 0 = '
      f'{names[0]}.',
      f'- Operating point (decision.json): threshold {decision.threshold:.4g}, policy '
      f'`{decision.policy}`, temperature {decision.temperature:.4g}'
      f'{f", chosen on split `{decision.split}`" if decision.split else " (default)"}.',
      *([f'- Site adaptation (lineage.json): {sites.lineage_line(lineage)}.'] if lineage else []),
      f'- Files: {", ".join(f"`{f}`" for f in files)}.', '',
      '## Intended use', '', INTENDED_USE if public else OWN_DATA_USE, '',
      '## Training data', '', f'Dataset: `{config.get("dataset", "?")}`.', '',
      *([DATA_SOURCES, ''] if public else _own_data_lines(config, training_strata)),
      '## Training configuration', '', training_line(history), '',
      '| Key | Value |', '|---|---|',
  ]
  for key in sorted(config):
    value = json.dumps(config[key], sort_keys=True)
    lines.append(f'| {key} | `{value}` |')
  lines += ['', '## Metrics', '']
  lines += _metrics_section(evaluation, evaluation_source, public, names)
  lines += shortcuts.render_markdown((evaluation or {}).get('shortcuts'), heading='##',
                                     positive=names[1])
  lines += out_of_distribution_section(shift_info, (evaluation or {}).get('shift'), public)
  limits = CONFOUNDS if public else _own_data_limits(config, training_strata, evaluation)
  lines += ['## Known confounds and limitations', '', limits, '',
            '## Quantization deltas', '']
  lines += _quantization_section(parity)
  lines += ['## Citation', '',
            ('Cohen J. P. et al., COVID-19 Image Data Collection, arXiv:2006.11988 (2020). '
             'Kermany D. et al., Cell 172(5):1122-1131 (2018). ' if public else
             'Cite the owners of the training data. ')
            + 'DeGrave A. J. et al., Nature Machine Intelligence 3:610-619 (2021)'
            + ('. Trehan D., "Detecting COVID-19 using Deep Learning" (2020).' if public
               else ' (shortcut learning across sites).'), '']
  return '\n'.join(lines)


def out_of_distribution_section(shift_info: dict | None, evaluated: dict | None,
                                public: bool = True) -> list[str]:
  """"Out of distribution", in plain words: what the flag means and what it does not promise."""
  lines = ['## Out of distribution', '']
  if not shift_info:
    return lines + [
        'This model carries no shift score, so nothing tells you when an image is unlike its '
        'training images. Fit one with `covidlib-fit-shift --model_dir=...` and export again.', '']
  taps = [t['name'] for t in shift_info.get('taps') or []]
  if len(taps) > 1:
    measured = (
        'Every output comes with `shift_score` and `in_distribution`. The score measures how '
        f'far an image\'s internal features lie from those of the training images at {len(taps)} '
        'depths of the network, from the first layers, which see how a film was taken and '
        'processed (scanner, digitisation, post-processing), to the layer before the output, '
        'which sees what the model learned about the finding. At each depth it is a squared '
        'Mahalanobis distance to the nearest class, standardised by its mean and spread on the '
        'validation images; the score is the largest of them, so a film unusual at any one '
        'depth scores high (the int8 TFLite file carries the last of these depths alone, with '
        'its own threshold: 8-bit activations do not carry the earlier ones). ')
  else:
    measured = (
        'Every output comes with `shift_score` and `in_distribution`. The score measures how '
        'far an image\'s internal features (the layer before the output) lie from those of the '
        'training images (a squared Mahalanobis distance to the nearest class). ')
  lines += [
      measured + 'An image is '
      f'flagged **out of distribution** when its score is above {shift_info["threshold"]:.4g}, '
      f'a threshold chosen so that about {_share_above(shift_info["policy"])} of the '
      f'`{shift_info.get("split") or "validation"}` images are flagged (policy '
      f'`{shift_info["policy"]}`).', '',
      '- **Flagged** means: this image does not look like what the model learned from (another '
      'kind of picture, another body part or view, a scanner or hospital unlike the training '
      'ones). Do not use the model\'s answer for it. `covidlib-predict --on_shift=abstain` '
      'gives such images no label (decision `out_of_distribution`).',
      '- **Not flagged does not mean correct.** An image like the training images can still be '
      'misclassified: the training data itself has shortcuts (see "Known confounds"), and the '
      'model can be confidently wrong on images that look familiar.',
      '- The score knows only the feature distribution of the training images. A change the '
      'features do not register goes unnoticed; in particular, images from a new hospital '
      'that resemble the training images of the *other* class are often not flagged'
      + (' (a model trained on pediatric normals and adult COVID-19 sees adult normals as '
         'close to its adult COVID-19 images).' if public else '.'),
      '- The flag rate on new data is an estimate from validation images: expect about '
      f'{_share_above(shift_info["policy"])} of ordinary images like the training ones to be '
      'flagged.', '']
  if evaluated:
    lines.append(f'Measured by covidlib-evaluate: {evaluated["n_flagged"]} of {evaluated["n"]} '
                 f'evaluated images flagged ({evaluated["share_flagged"]:.1%}).')
    for e in evaluated.get('unseen_sources', []):
      auc = (e.get('roc_auc') or {}).get('value')
      lines.append(f'- Normals of unseen source {e["source"]}: {e["share_flagged"]:.1%} of '
                   f'{e["n"]} flagged' + ('' if auc is None else
                                         f', shift-score ROC-AUC {auc:.3f} against the '
                                         'evaluated images') + '.')
    lines.append('')
  return lines


def _share_above(policy: str) -> str:
  try:
    q = float(str(policy).split(':', 1)[1])
  except (IndexError, ValueError):
    return 'a small share'
  return f'{100 * (1 - q):.3g}%'
