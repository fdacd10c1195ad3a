"""The run layer: `trainer.runs.Runs` loads a run or an ensemble with its views and data, and gives its threshold and
predictions; `trainer.metrics.RULES` is the one registry of threshold rules."""

import os

import numpy as np
import pytest
import tensorflow as tf

import conftest
from trainer import errors
from trainer import metrics
from trainer import ops
from trainer import runs as runs_lib

SIZE = 32


@pytest.fixture(scope='module')
def two_runs(untrained_run):
  return untrained_run(SIZE, seed=5, threshold=0.4), untrained_run(SIZE, seed=6, threshold=0.6)


def test_one_run_keeps_its_stored_threshold_and_predicts_like_its_model(two_runs, synthetic_data_dir):
  runs = runs_lib.Runs.load([str(two_runs[0])])
  [run] = runs.members
  assert (run.model_dir, run.image_size, run.threshold, run.tta_views) == (str(two_runs[0]), SIZE, 0.4, 1)
  assert runs.dataset == 'chest_xray_pneumonia/synthetic'
  assert runs.operating_point() == {'threshold': 0.4, 'threshold_rule': 'youden', 'chosen': 'stored'}
  predictions = runs.predict(runs.builder('test'), 'test')
  labels, probs = conftest.reference_predictions([two_runs[0]], synthetic_data_dir)
  np.testing.assert_array_equal(predictions['labels'], labels)
  np.testing.assert_allclose(predictions['probs'], probs, atol=1e-5)


def test_an_ensemble_averages_and_chooses_its_threshold_on_validation(two_runs, synthetic_data_dir):
  runs = runs_lib.Runs.load([str(d) for d in two_runs])
  labels, probs = conftest.reference_predictions(two_runs, synthetic_data_dir, split='validation')
  point = runs.operating_point()
  assert point['chosen'] == 'now' and point['threshold_rule'] == 'youden'
  assert point['threshold'] == pytest.approx(metrics.choose_threshold(labels, probs), abs=1e-5)
  assert point['member_thresholds'] == [0.4, 0.6] and point['validation_images'] == labels.size
  # The ensemble as one model (what trainer.export writes) predicts the same mean.
  one = runs.as_one('ensemble')
  assert one.members[0].model_dir == 'ensemble' and one.members[0].threshold_rule is None
  np.testing.assert_allclose(one.predict(one.builder(), 'validation')['probs'], probs, atol=1e-5)


def test_test_time_views_average_the_model_and_choose_the_threshold_again(two_runs):
  plain = runs_lib.Runs.load([str(two_runs[0])])
  views = runs_lib.Runs.load([str(two_runs[0])], tta=2)
  assert views.members[0].tta_views == 2
  builder = views.builder()
  # tta.VIEWS[:2]: the image itself and zoomed in x1.1.
  zoomed = plain.predict(builder, 'test', transform=lambda x: ops.to_uint8(ops.zoom(tf.cast(x, tf.float32), 1.1)))
  np.testing.assert_allclose(views.predict(builder, 'test')['probs'],
                             (plain.predict(builder, 'test')['probs'] + zoomed['probs']) / 2, atol=1e-5)
  point = views.operating_point()
  assert point['chosen'] == 'now' and point['threshold_rule'] == 'youden'
  with pytest.raises(errors.InvalidValue, match='--tta=9'):
    runs_lib.Runs.load([str(two_runs[0])], tta=9)


def test_the_data_is_found_where_the_run_was_trained_unless_given(two_runs, synthetic_data_dir):
  runs = runs_lib.Runs.load([str(two_runs[0])])
  assert (runs.data_dir, runs.manual_dir) == (synthetic_data_dir, None)
  given = runs_lib.Runs.load([str(two_runs[0])], data_dir='~/tfds', manual_dir='~/downloads')
  assert (given.data_dir, given.manual_dir) == (os.path.expanduser('~/tfds'), os.path.expanduser('~/downloads'))
  with pytest.raises(errors.InvalidValue, match='No run given'):
    runs_lib.Runs([])
  with pytest.raises(errors.InvalidValue, match='--split=nope is not a split of chest_xray_pneumonia/synthetic'):
    runs.builder('nope')


def test_a_rule_is_declared_once_with_its_name_text_and_computation():
  assert metrics.THRESHOLD_RULES == tuple(metrics.RULES) == ('youden', 'youden_with_shifts', 'sensitivity_at_0.95')
  assert all(name == rule.name and rule.text for name, rule in metrics.RULES.items())
  labels, probs = np.array([0, 0, 1, 1, 1]), np.array([0.1, 0.6, 0.4, 0.8, 0.9])
  split = {'labels': labels, 'probs': probs}
  assert metrics.RULES['youden'].choose(split) == metrics.choose_threshold(labels, probs)
  assert not metrics.RULES['youden'].shifted and metrics.RULES['youden_with_shifts'].shifted
  # With every shifted copy equal to the unshifted one, pooling changes nothing.
  assert metrics.RULES['youden_with_shifts'].choose({'none': split, 'a': split}) == metrics.choose_threshold(
      labels, probs)
  with pytest.raises(errors.InvalidValue, match="Unknown threshold rule 'median'"):
    metrics.threshold_rule('median')
  with pytest.raises(errors.InvalidValue, match="Unknown threshold rule 'median'"):
    runs_lib.operating_point([], 'median')
