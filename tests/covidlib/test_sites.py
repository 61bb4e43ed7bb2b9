"""covidlib.sites: the statistics of covidlib-site on arrays (no model, no files).

    .venv/bin/python -m pytest tests/covidlib/test_sites.py -q
"""

import numpy as np
import pytest
from scipy import special, stats

from covidlib import errors
from covidlib import metrics
from covidlib import sites


def _naive_mmd2(x, y, h2):
  """Textbook unbiased MMD^2 with exp(-d^2 / 2h^2), by loops over pairs."""
  def k(a, b):
    return np.exp(-np.sum((a - b) ** 2) / (2 * h2))

  m, n = len(x), len(y)
  xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
  xy = sum(k(a, b) for a in x for b in y) / (m * n)
  return xx + yy - 2 * xy


def test_mmd_matches_the_textbook_formula():
  rs = np.random.RandomState(0)
  ref, new = rs.randn(9, 3), rs.randn(6, 3) + 0.7
  a, b = sites._standardise(ref, new)
  pooled = np.vstack([a, b])
  d2 = ((pooled[:, None] - pooled[None]) ** 2).sum(-1)
  h2 = np.median(d2[np.triu_indices(15, 1)])
  expected = _naive_mmd2(b, a, h2)
  got = sites.mmd_test([ref], [new], n_permutations=99, seed=0)
  assert got['mmd2'][0] == pytest.approx(expected, rel=1e-9)
  # With one tap, the combined (min-p) p-value is that tap's p-value.
  assert got['p_value'] == pytest.approx(got['p_values'][0])


def test_mmd_p_values_hold_their_level_and_detect_a_shift():
  rs = np.random.RandomState(1)
  ref = [rs.randn(80, 4), rs.randn(80, 6)]
  null_p = [sites.mmd_test(ref, [rs.randn(25, 4), rs.randn(25, 6)], n_permutations=199,
                           seed=s)['p_value'] for s in range(40)]
  assert np.mean(np.asarray(null_p) < 0.05) <= 0.125  # 5% expected; 40 draws.
  shifted = [rs.randn(25, 4), rs.randn(25, 6) + 1.0]  # Only the deeper tap moves.
  test = sites.mmd_test(ref, shifted, n_permutations=199, seed=0)
  assert test['p_values'][1] == pytest.approx(1 / 200) and test['p_values'][0] > 0.01
  assert test['p_value'] <= 2 / 200  # min-p over 2 taps: found, at most twice the floor.


def test_domain_classifier_auc_is_near_half_for_one_site_and_near_one_for_two():
  rs = np.random.RandomState(2)
  same = sites.domain_classifier(rs.randn(200, 8), rs.randn(50, 8))
  other = sites.domain_classifier(rs.randn(200, 8), rs.randn(50, 8) + 1.5)
  assert abs(same.value - 0.5) < 0.12 and same.low < 0.5 < same.high
  assert other.value > 0.97 and other.low > 0.9


def test_delong_auc_and_its_standard_error_match_a_reference_by_loops():
  rs = np.random.RandomState(7)
  y = np.r_[np.zeros(30, int), np.ones(20, int)]
  p = np.round(rs.rand(50) + 0.4 * y, 2)
  got = sites.delong_auc(y, p)
  pos, neg = p[y == 1], p[y == 0]
  psi = (pos[:, None] > neg[None]) + 0.5 * (pos[:, None] == neg[None])
  auc = psi.mean()
  se = np.sqrt(psi.mean(axis=1).var(ddof=1) / pos.size + psi.mean(axis=0).var(ddof=1) / neg.size)
  assert got.value == pytest.approx(auc) == pytest.approx(metrics.roc_auc(y, p)[0])
  logit_se = se / (auc * (1 - auc))
  assert [got.low, got.high] == pytest.approx(
      list(special.expit(special.logit(auc) + np.array([-1, 1]) * metrics.Z95 * logit_se)))


def test_two_sample_test_decides_at_alpha_and_the_verdict_says_so():
  rs = np.random.RandomState(3)
  ref = [rs.randn(100, 3), rs.randn(100, 5)]
  differs = sites.two_sample_test(ref, [rs.randn(40, 3) + 2, rs.randn(40, 5)], ['a', 'b'],
                                  n_permutations=199)
  assert differs['differs'] and [r['tap'] for r in differs['taps']] == ['a', 'b']
  assert sites.check_verdict(differs).startswith(
      'site differs from training (p < 0.01; domain ROC-AUC ')
  assert sites.check_verdict(differs, 0.25).endswith(
      '25% of films flagged out of distribution one by one) on 40 films: validate before use')
  same = sites.two_sample_test(ref, [rs.randn(40, 3), rs.randn(40, 5)], ['a', 'b'],
                               n_permutations=199)
  assert not same['differs']
  assert sites.check_verdict(same).startswith('no difference from training detected (p = ')
  assert 'this does not show that the model works here' in sites.check_verdict(same)


@pytest.mark.parametrize('reference, site, message', [
    ([np.zeros((5, 2))], [np.zeros((5, 3))], "tap 'a': reference features"),
    ([np.zeros((5, 2))], [np.zeros((1, 2))], 'at least 2 films on each side'),
])
def test_two_sample_test_refuses_mismatched_inputs(reference, site, message):
  with pytest.raises(errors.UsageError, match=message):
    sites.two_sample_test(reference, site, ['a'])


def test_format_p():
  assert sites.format_p(1 / 1001, 1000) == 'p < 0.001'
  assert sites.format_p(0.0342, 1000) == 'p = 0.034'
  assert sites.format_p(1 / 200, 199) == 'p < 0.01'


def test_weighted_auc_is_the_auc_of_the_resampled_films():
  rs = np.random.RandomState(4)
  y = np.r_[np.zeros(15, int), np.ones(12, int)]
  p = np.round(rs.rand(27), 1)  # Ties on purpose.
  np.testing.assert_allclose(sites.weighted_auc(y, p, np.ones((1, 27))), metrics.roc_auc(y, p))
  w = rs.randint(0, 3, size=(5, 27)).astype(float)
  for row in w:
    idx = np.repeat(np.arange(27), row.astype(int))
    assert sites.weighted_auc(y, p, row[None])[0] == pytest.approx(
        metrics.roc_auc(y[idx], p[idx])[0])


def test_bootstrap_weights_resample_patients_within_their_class():
  labels = np.array([0, 0, 0, 1, 1, 1, 1])
  clusters = sites.patient_index(['a', 'a', 'b', 'c', 'c', 'd', ''])  # '' = its own patient.
  assert len(set(clusters.tolist())) == 5
  w = sites.bootstrap_weights(labels, clusters, 50, seed=0)
  assert w.shape == (50, 7)
  np.testing.assert_array_equal(w[:, 0], w[:, 1])  # One patient, one weight.
  np.testing.assert_array_equal(w[:, 3], w[:, 4])
  # Each resample draws 2 negative and 3 positive patients.
  assert np.all(w[:, 0] + w[:, 2] == 2)
  assert np.all(w[:, [3, 5, 6]].sum(axis=1) == 3)


def _clustered_draws(rng, n_draws, n_patients, mu=1.5, sd_patient=0.7):
  """n_draws data sets: n_patients per class, 1-3 films each, patient random effects.

  Film logits: class * mu + u_patient + N(0, 1), u ~ N(0, sd_patient^2); so the marginal scores
  are N(0, s^2) and N(mu, s^2), s^2 = 1 + sd_patient^2, which gives the true figures in closed
  form: AUC = Phi(mu / sqrt(2 s^2)), sensitivity at t = 1 - Phi((t - mu) / s), specificity
  Phi(t / s).
  """
  for _ in range(n_draws):
    films = rng.integers(1, 4, size=2 * n_patients)
    label = np.repeat(np.r_[np.zeros(n_patients, int), np.ones(n_patients, int)], films)
    patient = np.repeat(np.arange(2 * n_patients), films)
    u = rng.normal(0, sd_patient, 2 * n_patients)[patient]
    logits = label * mu + u + rng.normal(0, 1, label.size)
    yield label, special.expit(logits), patient.astype(str)


def test_validate_intervals_cover_the_truth_in_at_least_93_percent_of_draws():
  """Issue 17's target, on 300 simulated sites of 30 patients per class (1-3 films each)."""
  mu, sd_patient, t = 1.5, 0.7, 1.0
  s = np.sqrt(1 + sd_patient ** 2)
  truth = {'roc_auc': stats.norm.cdf(mu / np.sqrt(2) / s),
           'sensitivity': 1 - stats.norm.cdf((t - mu) / s), 'specificity': stats.norm.cdf(t / s)}
  rng = np.random.default_rng(0)
  covered = {k: 0 for k in truth}
  n_draws = 300
  for k, (y, p, patients) in enumerate(_clustered_draws(rng, n_draws, 30, mu, sd_patient)):
    figures = sites.site_figures(y, p, patients, special.expit(t), n_bootstrap=300, seed=k)
    for name, value in truth.items():
      low, high = figures[name]['ci95']
      covered[name] += low <= value <= high
  rates = {k: v / n_draws for k, v in covered.items()}
  assert all(r >= 0.93 for r in rates.values()), rates
  assert all(r <= 0.99 for r in rates.values()), rates  # Not coverage by width alone.


def test_site_figures_point_values_and_too_few_films():
  y = np.r_[np.zeros(12, int), np.ones(12, int)]
  p = np.r_[np.linspace(0.05, 0.6, 12), np.linspace(0.3, 0.95, 12)]
  f = sites.site_figures(y, p, None, 0.5, n_bootstrap=200, seed=0,
                         class_names=('normal', 'pneumonia'))
  assert f['sensitivity']['value'] == pytest.approx(np.mean(p[y == 1] >= 0.5))
  assert f['specificity']['value'] == pytest.approx(np.mean(p[y == 0] < 0.5))
  assert f['roc_auc']['value'] == pytest.approx(metrics.roc_auc(y, p)[0])
  # One film per patient: the Wilson interval itself.
  k, n = int(np.sum(p[y == 1] >= 0.5)), 12
  assert f['sensitivity']['ci95'] == pytest.approx(list(metrics.wilson_interval(k, n)), abs=1e-9)
  few = sites.site_figures(y[:16], p[:16], None, 0.5, n_bootstrap=50,
                           class_names=('normal', 'pneumonia'))
  assert few['sensitivity']['value'] is None
  assert few['sensitivity']['reason'] == ('too few pneumonia films: 4, needs at least '
                                          f'{sites.MIN_FILMS_PER_CLASS}')
  assert few['roc_auc']['reason'].startswith('too few films: 4 pneumonia, needs at least')
  assert few['specificity']['value'] is not None


def test_films_needed_scales_as_one_over_root_n():
  assert sites.films_needed(100, 0.7, 0.9) == 400   # Half-width 0.1 -> 0.05: 4 times the films.
  assert sites.films_needed(100, 0.78, 0.86) == 100  # Already under 0.05.
  assert sites.films_needed(100, None, None) is None


def test_parse_targets():
  assert sites.parse_targets('sensitivity:0.9, specificity:0.8') == {
      'sensitivity': 0.9, 'specificity': 0.8}
  assert sites.parse_targets('ROC_AUC:0.85') == {'roc_auc': 0.85}


@pytest.mark.parametrize('text, message', [
    ('sensitivty:0.9', "--target part 'sensitivty:0.9': unknown figure 'sensitivty'"),
    ('sensitivity=0.9', "--target part 'sensitivity=0.9': unknown figure 'sensitivity=0.9'"),
    ('sensitivity:', "--target part 'sensitivity:': needs a value after the colon"),
    ('sensitivity:high', "--target part 'sensitivity:high': 'high' is not a number"),
    ('specificity:80', "--target part 'specificity:80': 80 is outside (0, 1]"),
    ('sensitivity:0.9,sensitivity:0.8', "'sensitivity:0.8': sensitivity is given twice"),
    ('sensitivity:0.9,', 'has an empty part (a stray comma)'),
    ('', '--target is empty'),
])
def test_parse_targets_names_the_bad_part(text, message):
  with pytest.raises(errors.UsageError) as e:
    sites.parse_targets(text)
  assert message in str(e.value)


def test_judge_passes_only_on_the_lower_bound():
  def fig(value, low, high, needed=400):
    return {'value': value, 'ci95': [low, high], 'films_needed': needed,
            'films_needed_of': 'pneumonia films'}

  figures = {'sensitivity': fig(0.95, 0.91, 0.98), 'specificity': fig(0.85, 0.75, 0.92),
             'roc_auc': fig(0.7, 0.6, 0.78)}
  judged = sites.judge(figures, {'sensitivity': 0.9, 'specificity': 0.8, 'roc_auc': 0.8})
  assert [r['result'] for r in judged['targets']] == ['PASS', 'FAIL', 'FAIL']
  assert judged['verdict'] == 'FAIL'
  assert judged['targets'][1]['why'].startswith('not shown: the interval reaches below 0.8')
  assert 'about 400 pneumonia films would narrow it' in judged['targets'][1]['why']
  assert judged['targets'][2]['why'] == 'the whole interval lies below 0.8'
  assert sites.judge(figures, {'sensitivity': 0.9})['verdict'] == 'PASS'
  undefined = {'sensitivity': {'value': None, 'ci95': [None, None], 'reason': 'too few'}}
  assert sites.judge(undefined, {'sensitivity': 0.9})['targets'][0]['why'] == (
      'not measured: too few')


def test_check_classes_messages():
  names = ('normal', 'pneumonia')
  with pytest.raises(errors.DataError, match=r'hold no pneumonia film \(0 pneumonia, 30 normal'):
    sites.check_classes(np.zeros(30, int), names)
  with pytest.raises(errors.DataError, match=r'too few films .*: 4 pneumonia; each class needs '
                                             r'at least 10'):
    sites.check_classes(np.r_[np.zeros(30, int), np.ones(4, int)], names)
  sites.check_classes(np.r_[np.zeros(10, int), np.ones(10, int)], names)


def test_split_by_patient_keeps_patients_whole_and_is_seeded():
  rs = np.random.RandomState(5)
  groups = np.repeat(np.arange(40), rs.randint(1, 4, 40))
  labels = (groups % 2).astype(int)
  adapt, held = sites.split_by_patient(labels, groups, 0.3, seed=1)
  assert sorted(np.r_[adapt, held].tolist()) == list(range(groups.size))
  assert not set(groups[adapt]) & set(groups[held])
  assert len(set(groups[held][labels[held] == 1])) == 6  # 0.3 of 20 patients per class.
  again = sites.split_by_patient(labels, groups, 0.3, seed=1)
  np.testing.assert_array_equal(held, again[1])
  assert not np.array_equal(held, sites.split_by_patient(labels, groups, 0.3, seed=2)[1])
  with pytest.raises(errors.UsageError, match=r'--holdout_fraction must be in \(0, 1\), got 1.5'):
    sites.split_by_patient(labels, groups, 1.5, seed=0)
  with pytest.raises(errors.DataError, match='each class needs at least 2 patients'):
    sites.split_by_patient([0, 0, 1], [1, 2, 3], 0.3, seed=0)


def test_age_bands_and_strata():
  assert [sites.age_band(a) for a in (-1, 5, 18, 64, 65)] == ['', '0-17', '18-39', '40-64', '65+']
  rs = np.random.RandomState(6)
  y = np.r_[np.zeros(40, int), np.ones(40, int)]
  p = np.clip(y * 0.4 + rs.rand(80) * 0.6, 0, 1)
  view = np.array(['AP', 'PA'] * 40, object)
  strata = sites.strata_figures(y, p, None, 0.5, {'view': view, 'site': ['a'] * 80},
                                n_bootstrap=50)
  assert list(strata) == ['view'] and list(strata['view']) == ['AP', 'PA']  # One site: left out.
  assert strata['view']['AP']['n'] == 40
