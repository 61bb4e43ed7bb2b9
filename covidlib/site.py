"""A model at a new hospital: load the site's films, check the site, validate the model there.

    from covidlib import site
    films = site.load_films('newsite/', config)                      # unlabelled: a folder
    report = site.check('runs/mysite', films, out='runs/newsite_check')
    report['verdict']      # 'site differs from training (p < 0.001; domain ROC-AUC ...)'
    films = site.load_films('newsite/labels.csv', config, labelled=True)
    report = site.validate('runs/mysite', films, out='runs/newsite_validate',
                           targets={'sensitivity': 0.9, 'specificity': 0.8})
    report['verdict']      # 'PASS: sensitivity 0.93 [0.90, 0.96] >= 0.9; ...'

or `covidlib-site check|validate|adapt ...` (covidlib/cli/site.py; adapt: covidlib/site_adapt.py).

Films (`load_films`) come from:
  - a labels CSV in the own-data format (README "Your own data", covidlib_tfds/labels.py): the
    labels must name the model's two classes; `patient_id`, `site`, `view`, `age`, `sex`,
    `split` are used where present;
  - a built dataset, `labelled_xrays/NAME` (every split) or `labelled_xrays/NAME:SPLIT` (e.g.
    `:test`, `:train+validation`), read from `data_dir`; its patient ids are already pseudonyms;
  - for `check` only (no labels needed): a folder (every file under it, recursively; names
    starting with '.' are passed over), a text file listing one image path per line (relative
    to the list's folder), or image files.
Every file is decoded once (DICOM through covidlib.dicom, the rest by covidlib.preprocess, the
one preprocessing function): a file that does not decode, or a CSV row that cannot be used, is
named in `Films.bad` and left out. `check` and `validate` go on with the good films, report every
bad one and the binary then exits 1; `adapt` refuses to start.

Each subcommand scores the films once (covidlib.scoring, with the pooled features at every tap
for `check`); the statistics are covidlib.sites' on those arrays. Reports (check.json/.md,
validate.json/.md) are written atomically into `out`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import os
from typing import Mapping, Sequence

import numpy as np
import tensorflow as tf

import covidlib
from covidlib import calibration
from covidlib import data
from covidlib import dicom
from covidlib import errors
from covidlib import metrics
from covidlib import model_dir as md
from covidlib import models
from covidlib import preprocess
from covidlib import reference as reference_lib
from covidlib import scoring
from covidlib import shift as shift_lib
from covidlib import sites
from covidlib_tfds import labels as labels_lib
from covidlib_tfds import privacy
from covidlib_tfds import splitting

CHECK_JSON, CHECK_MD = 'check.json', 'check.md'
VALIDATE_JSON, VALIDATE_MD = 'validate.json', 'validate.md'
LINEAGE = 'lineage.json'  # Written by covidlib.site_adapt into an adapted model_dir.
MIN_CHECK_FILMS = 10
CAVEAT = ('Research software, not a diagnostic device. These figures describe one model on '
          'these films; other films, scanners or patients can differ.')
META_KEYS = ('filename', 'site', 'view', 'patient_id', 'age', 'sex', 'split')


@dataclasses.dataclass
class Films:
  """Decoded, preprocessed films of one site, in memory (200 KB each at 224 px, gray)."""
  images: np.ndarray               # (n, S, S, C) float32 in [0, 1].
  labels: np.ndarray | None        # (n,) int64, 1 = the positive class; None: unlabelled.
  metadata: dict[str, np.ndarray]  # META_KEYS: object arrays ('' unknown), 'age' int (-1).
  description: str
  bad: list[str] = dataclasses.field(default_factory=list)  # 'name: reason', left out.
  # True when 'patient_id' holds pseudonyms already (a built dataset); False: raw ids of a CSV,
  # kept in memory only and hashed (covidlib_tfds.privacy) before anything is written.
  pseudonymised: bool = False

  def __len__(self) -> int:
    return int(len(self.images))

  def select(self, index) -> 'Films':
    return Films(self.images[index], None if self.labels is None else self.labels[index],
                 {k: v[index] for k, v in self.metadata.items()}, self.description, [],
                 self.pseudonymised)

  def patient_keys(self) -> np.ndarray:
    """Per film: site + patient id, the unit the bootstrap and splits keep whole. A film without
    an id falls in the series its file name names (covidlib_tfds.splitting.series_key, as the
    dataset builders group them), else ('') stands alone."""
    def key(site, patient, filename):
      if patient:
        return f'{site}\0{patient}'
      if filename and splitting.GROUP_SERIES:
        return splitting.series_group_key(site, splitting.series_key(filename))
      return ''
    return np.asarray([key(*k) for k in zip(self.metadata['site'], self.metadata['patient_id'],
                                             self.metadata['filename'])], dtype=object)

  def hashed_patients(self, salt: str | None) -> np.ndarray:
    """Pseudonyms of the patients ('' unknown): as stored for a dataset, else salted hashes."""
    ids = self.metadata['patient_id']
    if self.pseudonymised:
      return ids
    if any(ids) and salt is None:
      raise errors.UsageError('the films carry patient ids: pseudonymising them needs the salt '
                              f'of your builds (${privacy.SALT_ENV})')
    return np.asarray([privacy.pseudonym(salt, s, p) if p else '' for s, p in
                       zip(self.metadata['site'], ids)], dtype=object)


# --------------------------------------------------------------------------------------------
# Loading films.
# --------------------------------------------------------------------------------------------


def _read(path: str, image_size: int, channels: int) -> np.ndarray:
  gray = dicom.load_dicom(path) if dicom.is_dicom(path) else preprocess.load_image(path)
  return np.asarray(preprocess.preprocess(tf.constant(gray), image_size, channels), np.float32)


def decode_files(paths: Sequence[str], image_size: int, channels: int = 1
                 ) -> tuple[list[np.ndarray | None], list[str]]:
  """Each file decoded and preprocessed (None where it failed), and 'path: reason' per failure."""
  def one(path):
    try:
      return _read(path, image_size, channels), None
    except (errors.InvalidImageError, errors.DataError) as e:
      return None, str(e)

  workers = min(len(paths), os.cpu_count() or 1) or 1
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    results = list(pool.map(one, paths))
  return [r[0] for r in results], [r[1] for r in results if r[1]]


def _empty_meta(n: int) -> dict[str, np.ndarray]:
  meta = {k: np.full(n, '', dtype=object) for k in META_KEYS}
  meta['age'] = np.full(n, -1, np.int64)
  return meta


def _from_files(paths, labels, meta, config, description, bad) -> Films:
  size, channels = int(config['image_size']), int(config.get('channels', 1))
  images, failures = decode_files(paths, size, channels)
  keep = np.asarray([im is not None for im in images], bool)
  if not keep.any():
    raise errors.DataError(f'{description}: none of the {len(paths)} files could be read: '
                           + '; '.join((bad + failures)[:10]))
  stack = np.stack([im for im in images if im is not None]).astype(np.float32)
  return Films(stack, None if labels is None else np.asarray(labels, np.int64)[keep],
               {k: np.asarray(v)[keep] for k, v in meta.items()}, description, bad + failures)


def _model_classes(config: dict) -> tuple[str, str]:
  return md.class_names(config)


def _from_csv(path: str, config: dict, labelled: bool) -> Films:
  rows, bad, _ = labels_lib.read_labels(path)
  bad = [str(b) for b in bad]
  if labelled:
    names = _model_classes(config)
    found, rows, other = labels_lib.resolve_classes(rows, positive=names[1],
                                                    csv_name=os.path.basename(path))
    bad += [str(b) for b in other]
    if [labels_lib.class_key(n) for n in found] != [labels_lib.class_key(n) for n in names]:
      raise errors.UsageError(f'{path} labels its films {found[1]!r} and {found[0]!r}; the model '
                              f'tells {names[1]!r} from {names[0]!r}')
  if not rows:
    raise errors.DataError(f'{path}: no usable row: ' + '; '.join(bad[:10]))
  root = os.path.dirname(os.path.abspath(path))
  paths = [os.path.join(root, *r.path.split('/')) for r in rows]
  meta = _empty_meta(len(rows))
  meta['filename'] = np.asarray([r.path for r in rows], dtype=object)
  for key in ('site', 'view', 'patient_id', 'sex', 'split'):
    meta[key] = np.asarray([getattr(r, key) for r in rows], dtype=object)
  meta['age'] = np.asarray([r.age for r in rows], np.int64)
  labels = None
  if labelled:
    labels = [int(labels_lib.class_key(r.label) == labels_lib.class_key(found[1])) for r in rows]
  return _from_files(paths, labels, meta, config, f'labels CSV {path}', bad)


def _from_dataset(spec: str, config: dict, data_dir: str | None, labelled: bool) -> Films:
  name, _, split = spec.partition(':')
  builder = data.builder(name, data_dir)
  splits = split.split('+') if split else sorted(builder.info.splits.keys())
  if labelled:
    found, names = data.class_names(name, data_dir), _model_classes(config)
    if [n.lower() for n in found] != [n.lower() for n in names]:
      raise errors.UsageError(f'{name} labels its films {found[1]!r} and {found[0]!r}; the model '
                              f'tells {names[1]!r} from {names[0]!r}')
  parts = []
  for s in splits:
    ds = data.load_tfds(name, s, data_dir=data_dir, image_size=int(config['image_size']),
                        channels=int(config.get('channels', 1)), batch_size=64,
                        with_metadata=True, cache=False)
    images, labels, meta = scoring.read_dataset(ds)
    meta = {**_empty_meta(len(labels)), **{k: v for k, v in meta.items() if k in META_KEYS},
            'site': meta.get('source', np.full(len(labels), '', object)),
            'split': np.full(len(labels), s, dtype=object)}
    meta['age'] = np.asarray(meta['age'], np.int64)
    parts.append((images, labels, meta))
  return Films(np.concatenate([p[0] for p in parts]),
               np.concatenate([p[1] for p in parts]) if labelled else None,
               {k: np.concatenate([p[2][k] for p in parts]) for k in META_KEYS},
               f'{name} split {"+".join(splits)}', [], pseudonymised=True)


def _listed_files(spec: Sequence[str]) -> tuple[list[str], list[str]]:
  """Files of folders (recursively), list files (.txt) and image paths; and 'path: reason' for
  paths that do not exist."""
  files, bad = [], []
  for item in spec:
    if os.path.isdir(item):
      for folder, subdirs, names in os.walk(item, followlinks=True):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith('.'))
        files += [os.path.join(folder, n) for n in sorted(names) if not n.startswith('.')]
    elif item.lower().endswith('.txt') and os.path.isfile(item):
      root = os.path.dirname(os.path.abspath(item))
      with open(item, encoding='utf-8') as f:
        for line in f:
          line = line.strip()
          if line and not line.startswith('#'):
            files.append(line if os.path.isabs(line) else os.path.join(root, line))
    elif os.path.exists(item):
      files.append(item)
    else:
      bad.append(f'{item}: no such file or folder')
  return files, bad


def load_films(spec: str | Sequence[str], config: dict, *, labelled: bool = False,
               data_dir: str | None = None) -> Films:
  """The films `spec` names (module docstring), preprocessed as the model was trained.

  Args:
    spec: a labels CSV, 'labelled_xrays/NAME[:SPLIT]', or (unlabelled only) folders, .txt lists
      and image files; a list for several.
    config: the model_dir's config.json (image_size, channels, class_names).
    labelled: the films must carry labels (validate, adapt).
    data_dir: TFDS data_dir of a dataset.

  Raises:
    UsageError: nothing named, a path that does not exist, labels that name other classes, or
      an unlabelled source where labels are needed.
    DataError: no film could be read (each bad one named).
  """
  items = [spec] if isinstance(spec, str) else list(spec)
  items = [i for i in items if i]
  if not items:
    raise errors.UsageError('no films given: pass --films=(a labels CSV, a folder, a list file or '
                            'labelled_xrays/NAME)')
  if len(items) == 1 and items[0].lower().endswith('.csv'):
    if not os.path.isfile(items[0]):
      raise errors.UsageError(f'labels CSV {items[0]!r} does not exist')
    return _from_csv(items[0], config, labelled)
  if len(items) == 1 and '/' in items[0] and not os.path.exists(items[0]) and \
      items[0].split('/')[0] in ('labelled_xrays', 'covid_xray'):
    return _from_dataset(items[0], config, data_dir, labelled)
  if labelled:
    raise errors.UsageError(f'{", ".join(items)[:200]}: labelled films come from a labels CSV '
                            '(README "Your own data") or a built labelled_xrays/NAME dataset')
  files, missing = _listed_files(items)
  if missing and not files:
    raise errors.UsageError(f'input {missing[0].split(": ")[0]!r} does not exist')
  if not files:
    raise errors.UsageError(f'no files under {", ".join(items)[:200]}')
  meta = _empty_meta(len(files))
  meta['filename'] = np.asarray(files, dtype=object)
  return _from_files(files, None, meta, config, ', '.join(items)[:200], missing)


# --------------------------------------------------------------------------------------------
# Scoring and the shared bits of the reports.
# --------------------------------------------------------------------------------------------


def score_films(model, films: Films, *, taps: bool = False, batch_size: int = 32):
  """The one scoring pass over in-memory films: covidlib.scoring.Scored (taps if asked)."""
  labels = films.labels if films.labels is not None else np.zeros(len(films), np.int64)
  ds = tf.data.Dataset.from_tensor_slices((films.images, labels.astype(np.float32)))
  return scoring.score_dataset(model, ds.batch(batch_size), features=False, taps=taps)


def share_flagged(model_dir: str, scored) -> float | None:
  """Share of films the model_dir's per-image shift score flags (covidlib.shift, at the depths
  it was fitted on); None without a score."""
  shift_model = shift_lib.load(model_dir)
  if shift_model is None or shift_model.threshold is None or scored.taps is None:
    return None
  return float(np.mean(~shift_model.in_distribution(shift_model.score(scored.taps))))


def site_name_of(films: Films, site: str | None) -> str:
  if site:
    return site
  known = sorted({s for s in films.metadata['site'] if s})
  return known[0] if len(known) == 1 else (films.description if not known else '+'.join(known))


def write_report(out: str, json_name: str, md_name: str, report: dict, markdown: str) -> dict:
  os.makedirs(out, exist_ok=True)
  md.write_json(os.path.join(out, json_name), report)
  md.write_bytes_atomic(os.path.join(out, md_name), markdown.encode())
  return {'json': os.path.join(out, json_name), 'markdown': os.path.join(out, md_name)}


def report_header(report: dict, title: str) -> list[str]:
  lines = [f'# {title}', '', f'> **{CAVEAT}**', '', f'**{report["verdict"]}**', '',
           f'- Model: `{report["model_dir"]}`', f'- Films: {report["data"]["description"]} '
           f'({report["data"]["n"]} films read)', f'- Site: {report["site"]}',
           f'- Date: {report["date"]}, covidlib {covidlib.__version__}']
  if report['data']['bad']:
    lines += [f'- **{len(report["data"]["bad"])} files not read** (left out):', '']
    lines += [f'  - {b}' for b in report['data']['bad'][:200]]
  return lines + ['']


def _data_section(films: Films) -> dict:
  return {'description': films.description, 'n': len(films), 'bad': list(films.bad)}


def now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')


# --------------------------------------------------------------------------------------------
# check.
# --------------------------------------------------------------------------------------------


def check(model_dir: str, films: Films | None = None, *, out: str | None = None,
          spec: str | Sequence[str] | None = None, data_dir: str | None = None,
          site: str | None = None, alpha: float = sites.DEFAULT_ALPHA,
          n_permutations: int = sites.DEFAULT_PERMUTATIONS, seed: int = 0, model=None) -> dict:
  """Does this site's batch of (unlabelled) films differ from the model's training site?

  Args:
    model_dir: a finished model_dir holding a reference (covidlib.reference).
    films: the films (load_films), or `spec` to load them.
    out: folder for check.json and check.md (None: write nothing).

  Returns:
    The report: 'verdict' (one line), 'test' (covidlib.sites.two_sample_test), 'share_flagged'.

  Raises:
    UsageError: a model_dir without a reference (before any film is read), fewer than
      MIN_CHECK_FILMS films, a reference of another network.
  """
  md.check_model_dir(model_dir)
  ref = reference_lib.load(model_dir)  # The refusal of a model_dir without one comes first.
  config = md.load_config(model_dir)
  if films is None:
    films = load_films(spec, config, data_dir=data_dir)
  if len(films) < MIN_CHECK_FILMS:
    raise errors.UsageError(f'check needs at least {MIN_CHECK_FILMS} films of the site to test '
                            f'a batch; got {len(films)}')
  model = model if model is not None else md.load_model(model_dir)
  if list(models.feature_taps(model)) != list(ref.taps):
    raise errors.DataError(f'{model_dir}: its reference was taken at taps {list(ref.taps)}, the '
                           f'model has {models.feature_taps(model)}: refit it with '
                           f'covidlib-fit-shift --model_dir={model_dir}')
  scored = score_films(model, films, taps=True)
  test = sites.two_sample_test(ref.features, [scored.taps[t] for t in ref.taps], ref.taps,
                               alpha=alpha, n_permutations=n_permutations, seed=seed)
  flagged = share_flagged(model_dir, scored)
  report = {'caveat': CAVEAT, 'model_dir': model_dir, 'site': site_name_of(films, site),
            'date': now(), 'data': _data_section(films),
            'reference': {'n': ref.n, 'split': ref.split, 'taps': list(ref.taps)},
            'verdict': sites.check_verdict(test, flagged), 'test': test,
            'share_flagged': flagged, 'seed': seed}
  if out:
    report['written'] = write_report(out, CHECK_JSON, CHECK_MD, report, render_check(report))
  return report


def render_check(report: dict) -> str:
  test = report['test']
  lines = report_header(report, f'Site check: {report["site"]}')
  lines += [f'Batch test: {test["n_site"]} films of the site against {test["n_reference"]} films '
            f'of the training site (the model_dir\'s reference, split '
            f'`{report["reference"]["split"]}`), at {len(test["taps"])} depths of the network. '
            f'Combined p-value {sites.format_p(test["p_value"], test["n_permutations"])} '
            f'({test["n_permutations"]} permutations, min-p over the taps); the site differs '
            f'when it is below {test["alpha"]:g}.', '',
            '| tap (shallow to deep) | features | MMD^2 | p-value | domain ROC-AUC [95%] |',
            '|---|---|---|---|---|']
  for row in test['taps']:
    lines.append(f'| {row["tap"]} | {row["dim"]} | {row["mmd2"]:.4f} | '
                 f'{sites.format_p(row["p_value"], test["n_permutations"])} | '
                 f'{metrics.format_figure(row["domain_roc_auc"])} |')
  lines.append(f'| all taps | {sum(r["dim"] for r in test["taps"])} | | '
               f'{sites.format_p(test["p_value"], test["n_permutations"])} (combined) | '
               f'{metrics.format_figure(test["domain_roc_auc"])} |')
  flagged = report['share_flagged']
  lines += ['', 'Domain ROC-AUC: how well a logistic regression, cross-validated, tells these '
            'films from the training site\'s (0.5 = indistinguishable, 1.0 = every film betrays '
            'its site). Shallow taps carry acquisition style (scanner, digitisation, '
            'processing); deep taps what the model reads, so a case mix far from the training '
            'site\'s (e.g. normals only) can also move them.', '',
            'Per image: ' + ('the model carries no shift score.' if flagged is None else
                             f'{flagged:.1%} of the films are flagged out of distribution one by '
                             'one (the model\'s shift score).'), '',
            'What this does not show: "no difference detected" is no proof that the model works '
            'here (a small batch, or a difference the features do not see); "differs" says '
            'nothing about how well it works. Only `covidlib-site validate` on labelled local '
            'films measures that.', '']
  return '\n'.join(lines)


# --------------------------------------------------------------------------------------------
# validate.
# --------------------------------------------------------------------------------------------


def model_scores(model, films: Films, decision: md.Decision) -> np.ndarray:
  """P(positive) after the model's temperature: what its threshold applies to."""
  return calibration.apply_temperature(score_films(model, films).scores, decision.temperature)


def validation_figures(films: Films, scores: np.ndarray, decision: md.Decision, *,
                       targets: Mapping[str, float], class_names: tuple[str, str],
                       n_bootstrap: int = metrics.DEFAULT_BOOTSTRAP, seed: int = 0) -> dict:
  """Overall and per-stratum figures, the targets judged and the verdict line (no model)."""
  patients = films.patient_keys()
  kwargs = dict(n_bootstrap=n_bootstrap, seed=seed, class_names=class_names)
  figures = sites.site_figures(films.labels, scores, patients, decision.threshold, **kwargs)
  strata = {'site': films.metadata['site'], 'view': films.metadata['view'],
            'sex': films.metadata['sex'],
            'age_band': [sites.age_band(a) for a in films.metadata['age']]}
  judged = sites.judge(figures, targets)
  return {'figures': figures, 'judged': judged,
          'strata': sites.strata_figures(films.labels, scores, patients, decision.threshold,
                                         strata, **kwargs),
          'verdict': sites.validate_verdict(judged, figures)}


def adapted_patients(model_dir: str) -> set[str]:
  """Pseudonyms of the patients an adapted model_dir was adapted on (lineage.json); empty for a
  model that was not adapted."""
  path = os.path.join(model_dir, LINEAGE)
  if not os.path.isfile(path):
    return set()
  return set(md.read_json(path).get('adapt', {}).get('patients', [])) - {''}


def refuse_adapt_patients(model_dir: str, films: Films) -> str:
  """UsageError when films share patients with those the model was adapted on; returns a note
  on what could be checked."""
  used = adapted_patients(model_dir)
  if not used:
    return ''
  if not films.pseudonymised and any(films.metadata['patient_id']) and \
      not os.environ.get(privacy.SALT_ENV):
    return (f'not checked for patients the model was adapted on: set ${privacy.SALT_ENV} (the '
            'salt of your builds) to check')
  salt = None if films.pseudonymised else os.environ.get(privacy.SALT_ENV)
  shared = used & (set(films.hashed_patients(salt)) - {''})
  if shared:
    raise errors.UsageError(
        f'{len(shared)} patients of these films were used to adapt {model_dir} (its '
        f'{LINEAGE}): validate it on films it was not adapted on')
  return 'no film of a patient the model was adapted on'


def validate(model_dir: str, films: Films | None = None, *, out: str | None = None,
             spec: str | Sequence[str] | None = None, data_dir: str | None = None,
             targets: Mapping[str, float] | None = None, site: str | None = None,
             n_bootstrap: int = metrics.DEFAULT_BOOTSTRAP, seed: int = 0, model=None) -> dict:
  """How good is the model at this site: figures with patient-level intervals, PASS/FAIL.

  The model's own operating point (decision.json: threshold and temperature) is applied.

  Raises:
    UsageError: unlabelled films, labels of other classes, films of patients the model was
      adapted on. DataError: a class missing or with too few films (says how many are needed).
  """
  md.check_model_dir(model_dir)
  config = md.load_config(model_dir)
  targets = dict(sites.parse_targets(sites.DEFAULT_TARGETS) if targets is None else targets)
  if films is None:
    films = load_films(spec, config, labelled=True, data_dir=data_dir)
  if films.labels is None:
    raise errors.UsageError('validate needs labelled films (a labels CSV or a labelled_xrays '
                            'dataset)')
  names = md.class_names(config)
  sites.check_classes(films.labels, names, f'the films of {films.description}')
  lineage_note = refuse_adapt_patients(model_dir, films)
  decision = md.load_decision(model_dir)
  model = model if model is not None else md.load_model(model_dir)
  result = validation_figures(films, model_scores(model, films, decision), decision,
                              targets=targets, class_names=names, n_bootstrap=n_bootstrap,
                              seed=seed)
  report = {'caveat': CAVEAT, 'model_dir': model_dir, 'site': site_name_of(films, site),
            'date': now(), 'data': _data_section(films), 'class_names': list(names),
            'decision': dataclasses.asdict(decision), 'targets': targets,
            'lineage_check': lineage_note, 'seed': seed, 'n_bootstrap': n_bootstrap, **result}
  if out:
    report['written'] = write_report(out, VALIDATE_JSON, VALIDATE_MD, report, render_validate(report))
  return report


def _figure_cell(f: dict) -> str:
  return metrics.format_figure(f, reason=True)


def figures_table(named: Mapping[str, dict]) -> list[str]:
  """Markdown rows 'what | n | ROC-AUC | sensitivity | specificity' for {name: site_figures}."""
  lines = ['| | films (patients) | ROC-AUC [95%] | sensitivity [95%] | specificity [95%] |',
           '|---|---|---|---|---|']
  for name, f in named.items():
    lines.append(f'| {name} | {f["n"]} ({f["n_patients"]}) | {_figure_cell(f["roc_auc"])} | '
                 f'{_figure_cell(f["sensitivity"])} | {_figure_cell(f["specificity"])} |')
  return lines


def render_validate(report: dict, title: str | None = None) -> str:
  d = report['decision']
  neg, pos = report['class_names']
  f = report['figures']
  lines = report_header(report, title or f'Local validation: {report["site"]}')
  lines += [f'{f["n"]} films of {f["n_patients"]} patients ({f["n_per_class"][1]} {pos}, '
            f'{f["n_per_class"][0]} {neg}). The model\'s operating point: threshold '
            f'{d["threshold"]:.4g} on P({pos}) after temperature {d["temperature"]:.4g} '
            f'(policy `{d["policy"]}`). Intervals resample patients (covidlib/sites.py).', '']
  if report.get('lineage_check'):
    lines += [f'Patients the model was adapted on: {report["lineage_check"]}.', '']
  lines += ['## Targets', '', '| figure | target | value [95%] | result | why |', '|---|---|---|---|---|']
  for r in report['judged']['targets']:
    lines.append(f'| {r["figure"]} | {r["target"]:g} | {_figure_cell(f[r["figure"]])} | '
                 f'**{r["result"]}** | {r["why"]} |')
  lines += ['', 'PASS means the 95% interval\'s lower bound clears the target: these films show '
            'the model is at least that good here. FAIL means they do not: either it is worse, '
            'or there are too few films to tell (the "why" column says which).', '',
            '## Figures', ''] + figures_table({'all films': f}) + [
            '', '## Films needed for a half-width of 0.05', '',
            '| figure | films now | films needed |', '|---|---|---|']
  for name in sites.TARGET_FIGURES:
    needed, n = f[name]['films_needed'], f[name]['n']
    shown = ('—' if needed is None else 'already within +-0.05' if needed <= n and
             f[name]['value'] is not None else f'{needed} {f[name]["films_needed_of"]}')
    lines.append(f'| {name} | {n} | {shown} |')
  lines += ['', 'At the same case mix and films per patient; intervals narrow as 1/sqrt(n).', '']
  for stratum, values in report['strata'].items():
    lines += [f'## By {stratum}', ''] + figures_table(values) + ['']
  return '\n'.join(lines)
