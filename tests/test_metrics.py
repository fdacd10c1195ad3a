"""Tests of trainer.metrics: hand-computed metrics, the threshold rule, calibration, the patient bootstrap."""

import warnings

import numpy as np
import pytest
from sklearn import metrics as sk_metrics

from conftest import ALL_METRICS, THRESHOLD_METRICS, patients as _patients  # pylint: disable=g-importing-member
from trainer import metrics

def _scores(n, separation, seed):
  """Labels and probabilities of a model whose positive scores sit `separation` above the negative ones."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 2, n)
  probs = np.clip(rng.normal(0.35 + separation * labels, 0.2), 0, 1)
  return labels, probs


def _width(interval):
  return interval[1] - interval[0]


# metrics_at


def test_metrics_at_matches_hand_computed_confusion_matrix():
  labels = [1, 1, 1, 1, 0, 0, 0, 0, 0, 1]
  probs = [0.9, 0.7, 0.5, 0.2, 0.1, 0.3, 0.6, 0.4, 0.05, 0.8]
  # At 0.5 (>= is positive): tp = {0.9, 0.7, 0.5, 0.8} = 4, fn = {0.2} = 1, fp = {0.6} = 1, tn = 4.
  m = metrics.metrics_at(labels, probs, 0.5)
  assert m['confusion_matrix'] == [[4, 1], [1, 4]]
  assert all(isinstance(v, int) for row in m['confusion_matrix'] for v in row)
  assert m['accuracy'] == pytest.approx(8 / 10)
  assert m['sensitivity'] == pytest.approx(4 / 5)
  assert m['specificity'] == pytest.approx(4 / 5)
  assert m['precision'] == pytest.approx(4 / 5)
  assert m['f1'] == pytest.approx(4 / 5)
  assert m['threshold'] == 0.5
  # Raising the threshold past 0.5 loses one true positive.
  m = metrics.metrics_at(labels, probs, 0.55)
  assert m['confusion_matrix'] == [[4, 1], [2, 3]]
  assert m['sensitivity'] == pytest.approx(3 / 5)
  assert m['precision'] == pytest.approx(3 / 4)
  assert m['f1'] == pytest.approx(2 * 3 / (2 * 3 + 1 + 2))


def test_metrics_at_defines_zero_over_zero_as_zero_without_warnings():
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    # Nothing called positive: precision = 0 / 0.
    m = metrics.metrics_at([1, 0, 1, 0], [0.1, 0.2, 0.3, 0.4], 0.9)
    assert m['confusion_matrix'] == [[2, 0], [2, 0]]
    assert (m['precision'], m['sensitivity'], m['f1'], m['specificity']) == (0.0, 0.0, 0.0, 1.0)
    # No normal images: specificity = 0 / 0.
    m = metrics.metrics_at([1, 1, 1], [0.9, 0.8, 0.2], 0.5)
    assert m['confusion_matrix'] == [[0, 0], [1, 2]]
    assert m['specificity'] == 0.0
    assert m['sensitivity'] == pytest.approx(2 / 3)


def test_inputs_are_validated_with_one_line_errors():
  with pytest.raises(ValueError, match='same length'):
    metrics.metrics_at([0, 1], [0.5], 0.5)
  with pytest.raises(ValueError, match=r'\[0, 1\].*logits'):
    metrics.metrics_at([0, 1], [-2.0, 3.0], 0.5)
  with pytest.raises(ValueError, match='NaN'):
    metrics.metrics_at([0, 1], [0.2, np.nan], 0.5)
  with pytest.raises(ValueError, match='labels must be 0'):
    metrics.metrics_at([0, 2], [0.2, 0.3], 0.5)
  with pytest.raises(ValueError, match='threshold'):
    metrics.metrics_at([0, 1], [0.2, 0.3], 1.5)
  with pytest.raises(ValueError, match='shape'):
    metrics.metrics_at(np.zeros((2, 2)), np.zeros((2, 2)), 0.5)
  # Model outputs of shape (n, 1) are fine.
  m = metrics.metrics_at(np.array([[0], [1]]), np.array([[0.2], [0.7]]), 0.5)
  assert m['accuracy'] == 1.0


# ranking_metrics


def test_ranking_metrics_match_sklearn_and_the_extremes():
  labels, probs = _scores(500, 0.2, seed=1)
  r = metrics.ranking_metrics(labels, probs)
  assert r['roc_auc'] == pytest.approx(sk_metrics.roc_auc_score(labels, probs))
  assert r['pr_auc'] == pytest.approx(sk_metrics.average_precision_score(labels, probs))
  assert 0.6 < r['roc_auc'] < 0.95
  perfect = metrics.ranking_metrics(labels, labels * 0.5 + 0.25)
  assert perfect == {'roc_auc': 1.0, 'pr_auc': 1.0}
  rng = np.random.default_rng(2)
  random_labels = rng.integers(0, 2, 20000)
  chance = metrics.ranking_metrics(random_labels, rng.random(20000))
  assert chance['roc_auc'] == pytest.approx(0.5, abs=0.02)
  assert chance['pr_auc'] == pytest.approx(random_labels.mean(), abs=0.02)
  with pytest.raises(ValueError, match='both classes'):
    metrics.ranking_metrics([1, 1], [0.2, 0.9])


# choose_threshold


def test_choose_threshold_finds_the_best_cut_on_overlapping_data():
  negatives = [0.1, 0.2, 0.3, 0.45]
  positives = [0.4, 0.6, 0.7, 0.8, 0.9]
  # Cut at 0.6: sensitivity 4/5, specificity 4/4, J = 0.8; at 0.4: J = 5/5 + 3/4 - 1 = 0.75; at 0.45: 0.55.
  t = metrics.choose_threshold([0] * 4 + [1] * 5, negatives + positives)
  assert t == 0.6


def test_choose_threshold_maximises_youden_over_every_possible_cut():
  labels, probs = _scores(300, 0.25, seed=3)
  t = metrics.choose_threshold(labels, probs)
  assert t in probs

  def youden(cut):
    m = metrics.metrics_at(labels, probs, cut)
    return m['sensitivity'] + m['specificity'] - 1

  assert youden(t) == pytest.approx(max(youden(cut) for cut in np.unique(probs)))
  assert youden(t) > youden(0.5)


@pytest.mark.parametrize('negatives, positives, expected', [
    # J = 2/3 at 0.75 and at 0.35: 0.35 is nearer 0.5.
    ([0.1, 0.3, 0.7], [0.35, 0.75, 0.9], 0.35),
    # J = 2/3 at 0.65 and at 0.2: 0.65 is nearer 0.5.
    ([0.1, 0.15, 0.6], [0.2, 0.65, 0.9], 0.65),
])
def test_choose_threshold_ties_go_to_the_threshold_nearest_one_half(negatives, positives, expected):
  assert metrics.choose_threshold([0] * 3 + [1] * 3, negatives + positives) == expected


def test_choose_threshold_rejects_a_single_class():
  with pytest.raises(ValueError, match='both classes.*normal'):
    metrics.choose_threshold([0, 0, 0], [0.1, 0.5, 0.9])


# calibration


def test_calibration_small_ece_when_calibrated_large_when_overconfident():
  rng = np.random.default_rng(4)
  truth = rng.random(20000)
  labels = (rng.random(truth.size) < truth).astype(int)
  calibrated = metrics.calibration(labels, truth)
  assert calibrated['ece'] < 0.02
  # Pushing every probability towards 0 or 1 keeps the ranking but claims more certainty than the data has.
  overconfident = metrics.calibration(labels, np.clip(0.5 + 3 * (truth - 0.5), 0, 1))
  assert overconfident['ece'] > 0.15
  assert overconfident['brier'] > calibrated['brier']


def test_calibration_bins_by_hand():
  labels = [0, 1, 1, 0, 1]
  probs = [0.05, 0.15, 0.12, 0.95, 1.0]
  c = metrics.calibration(labels, probs, n_bins=4)
  assert c['bin_edges'] == [0.0, 0.25, 0.5, 0.75, 1.0]
  assert c['count'] == [3, 0, 0, 2]  # 1.0 belongs to the last bin.
  assert c['mean_predicted'][0] == pytest.approx((0.05 + 0.15 + 0.12) / 3)
  assert c['observed_frequency'][0] == pytest.approx(2 / 3)
  assert c['mean_predicted'][1] is None and c['observed_frequency'][2] is None
  expected_ece = (3 * abs(0.32 / 3 - 2 / 3) + 2 * abs(0.975 - 0.5)) / 5
  assert c['ece'] == pytest.approx(expected_ece)
  with pytest.raises(ValueError, match='n_bins'):
    metrics.calibration(labels, probs, n_bins=0)


# bootstrap_ci


def test_bootstrap_intervals_contain_the_estimate_and_are_reproducible():
  labels, probs, groups = _patients(150, 3, seed=5)
  ci = metrics.bootstrap_ci(labels, probs, groups, 0.5, n_resamples=500)
  assert set(ci) == set(ALL_METRICS)
  point = {**metrics.metrics_at(labels, probs, 0.5), **metrics.ranking_metrics(labels, probs)}
  for name in ALL_METRICS:
    low, high = ci[name]
    assert low < point[name] < high, name
  assert ci == metrics.bootstrap_ci(labels, probs, groups, 0.5, n_resamples=500)
  assert ci != metrics.bootstrap_ci(labels, probs, groups, 0.5, n_resamples=500, seed=1)
  narrower = metrics.bootstrap_ci(labels, probs, groups, 0.5, n_resamples=500, confidence=0.5)
  assert _width(narrower['roc_auc']) < _width(ci['roc_auc'])


def test_bootstrap_intervals_narrow_as_patients_grow():
  small = metrics.bootstrap_ci(*_patients(50, 2, seed=6), 0.5, n_resamples=400)
  large = metrics.bootstrap_ci(*_patients(2000, 2, seed=6), 0.5, n_resamples=400)
  for name in ALL_METRICS:
    # sqrt(2000 / 50) ~ 6; ask for a safe 3.
    assert _width(large[name]) * 3 < _width(small[name]), name


def test_bootstrap_resamples_patients_not_images():
  labels, probs, groups = _patients(100, 10, seed=7)
  by_patient = metrics.bootstrap_ci(labels, probs, groups, 0.5, n_resamples=500)
  by_image = metrics.bootstrap_ci(labels, probs, np.arange(labels.size), 0.5, n_resamples=500)
  # Ten near-copies per patient carry the information of about one image, so the honest interval is ~sqrt(10)
  # times wider than one that treats the copies as independent.
  for name in ('accuracy', 'sensitivity', 'roc_auc'):
    assert _width(by_patient[name]) > 2 * _width(by_image[name]), name
  # Patient ids may be strings, as the dataset stores them.
  as_strings = metrics.bootstrap_ci(labels, probs, np.char.add('person', groups.astype(str)), 0.5,
                                     n_resamples=500)
  assert _width(as_strings['accuracy']) > 2 * _width(by_image['accuracy'])


def test_weighted_ranking_matches_sklearn_with_sample_weights():
  # The vectorised AUC / AP behind the bootstrap, against sklearn, with ties in the probabilities.
  labels, probs = _scores(300, 0.2, seed=8)
  probs = probs.round(2)
  weights = np.random.default_rng(9).integers(0, 3, (4, labels.size)).astype(float)
  roc_auc, average_precision = metrics._weighted_ranking(weights, labels, probs)
  for row, auc, ap in zip(weights, roc_auc, average_precision):
    assert auc == pytest.approx(sk_metrics.roc_auc_score(labels, probs, sample_weight=row))
    assert ap == pytest.approx(sk_metrics.average_precision_score(labels, probs, sample_weight=row))


def test_bootstrap_rejects_bad_groups_and_single_patient_data():
  labels, probs, groups = _patients(20, 2, seed=10)
  with pytest.raises(ValueError, match='one patient id per image'):
    metrics.bootstrap_ci(labels, probs, groups[:-1], 0.5)
  # One patient with both classes: every resample is that patient, fine. Two patients of different classes: most
  # resamples hold one class only.
  with pytest.raises(ValueError, match='hold both classes'):
    metrics.bootstrap_ci([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], ['a', 'a', 'b', 'b'], 0.5, n_resamples=200)
  with pytest.raises(ValueError, match='confidence'):
    metrics.bootstrap_ci(labels, probs, groups, 0.5, confidence=95)


def test_sensitivity_threshold_is_the_highest_that_keeps_the_target():
  rng = np.random.default_rng(0)
  labels = np.r_[np.zeros(100, int), np.ones(300, int)]
  probs = np.r_[rng.uniform(0, 0.6, 100), rng.uniform(0.3, 1, 300)]
  for target in (0.9, 0.95, 0.97, 1.0):
    threshold = metrics.sensitivity_threshold(labels, probs, target)
    assert metrics.metrics_at(labels, probs, threshold)['sensitivity'] >= target
    # The next pneumonia probability up would lose the target: no higher threshold keeps it.
    higher = np.sort(probs[labels == 1])
    higher = higher[higher > threshold]
    if higher.size:
      assert metrics.metrics_at(labels, probs, higher[0])['sensitivity'] < target
  with pytest.raises(ValueError, match='no pneumonia image'):
    metrics.sensitivity_threshold(np.zeros(5, int), np.linspace(0, 1, 5), 0.97)


def test_the_sensitivity_rule_reads_only_the_unshifted_split():
  rule = metrics.RULES['sensitivity_at_0.95']
  labels = np.r_[np.zeros(50, int), np.ones(100, int)]
  plain = {'labels': labels, 'probs': np.r_[np.linspace(0, 0.5, 50), np.linspace(0.4, 1, 100)]}
  shifted = {'labels': labels, 'probs': np.r_[np.linspace(0.5, 1, 50), np.linspace(0.4, 1, 100)]}
  assert rule.shifted
  threshold = rule.choose({'none': plain, 'noise': shifted})
  assert threshold == metrics.sensitivity_threshold(labels, plain['probs'], 0.95)
  assert threshold == rule.choose({'none': plain})
  assert '95%' in rule.text
