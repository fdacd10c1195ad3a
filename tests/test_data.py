"""Tests for trainer/data.py's training stream: class balance by resampling, and its exact resume."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from trainer import data

BATCH = 32


@pytest.fixture(scope='module')
def builder(synthetic_data_dir):
  return tfds.builder('chest_xray_pneumonia/synthetic', data_dir=synthetic_data_dir)


def _labels(builder, *, steps, **kwargs):
  ds = data.train_dataset(builder, image_size=32, global_batch=BATCH, seed=3, **kwargs)
  return np.stack([labels.numpy() for _, labels in ds.take(steps)])


def test_resampling_draws_each_class_half_the_time_where_the_split_is_a_quarter_normal(builder):
  counts = data.class_counts(builder, 'train')
  normal_share = counts[0] / counts.sum()
  assert 0.15 < normal_share < 0.35  # The split itself is unbalanced.
  plain = _labels(builder, steps=30)
  balanced = _labels(builder, steps=30, balanced=True)
  # 960 draws: a binomial's standard deviation at p = 1/2 is 0.016, so 0.06 is almost four of them.
  assert abs((plain == 0).mean() - normal_share) < 0.06
  assert abs((balanced == 0).mean() - 0.5) < 0.06
  # The minority's images come round again within the stream rather than the majority's fewer times: more normal
  # draws than the split holds normal images, in less than two passes' worth of steps.
  assert (balanced == 0).sum() > counts[0]


def test_a_resampled_stream_resumes_exactly_where_it_stopped(builder):
  whole = _labels(builder, steps=12, balanced=True)
  resumed = _labels(builder, steps=5, balanced=True, skip_steps=7)
  np.testing.assert_array_equal(resumed, whole[7:])
  # And a seed fixes it: the same seed draws the same labels again.
  np.testing.assert_array_equal(_labels(builder, steps=12, balanced=True), whole)
