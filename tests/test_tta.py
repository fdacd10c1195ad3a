"""Tests for trainer/tta.py: the views, and the model that averages over them."""

import keras
import numpy as np
import pytest

from trainer import models
from trainer import tta

SIDE = 50


@pytest.fixture(scope='module')
def model():
  keras.utils.set_random_seed(0)
  return models.build_model('cnn', image_size=SIDE, cnn_filters=4, cnn_depth=2, augment_strength=0)


def _images(n=3, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, SIDE, SIDE, 1), dtype=np.uint8)


def test_each_view_is_the_transform_it_is_named_for():
  images = np.zeros((2, SIDE, SIDE, 1), np.uint8)
  images[:, :, 10] = 200  # A bright column at x = 10.
  images[1, :, 30] = 100
  views = tta.TestTimeViews(tta.MAX_VIEWS)(images).numpy().reshape(tta.MAX_VIEWS, 2, SIDE, SIDE, 1)
  by_name = dict(zip(tta.VIEWS, views))
  np.testing.assert_array_equal(by_name['identity'], images)
  # 4% of 50 pixels is 2: the column moves two pixels, and black comes in from the edge.
  assert np.flatnonzero(by_name['shift left 4%'][0, 0, :, 0]).tolist() == [8]
  assert np.flatnonzero(by_name['shift right 4%'][0, 0, :, 0]).tolist() == [12]
  grey = np.full((1, SIDE, SIDE, 1), 128, np.uint8)
  grey_views = dict(zip(tta.VIEWS, tta.TestTimeViews(tta.MAX_VIEWS)(grey).numpy()))
  assert grey_views['gamma 0.8'][0, 0, 0] == round(255 * (128 / 255) ** 0.8)
  assert grey_views['gamma 1.25'][0, 0, 0] == round(255 * (128 / 255) ** 1.25)
  assert grey_views['contrast x0.85'][0, 0, 0] == 128  # A flat image is its own mean.
  # Zooming out leaves a black border; zooming in on a flat image leaves it flat.
  assert grey_views['zoom out x0.9 (black border)'][0, 0, 0] == 0
  assert grey_views['zoom out x0.9 (black border)'][SIDE // 2, SIDE // 2, 0] == 128
  assert (grey_views['zoom in x1.1'] == 128).all()


def test_the_tta_model_is_the_mean_of_the_model_over_the_views(model):
  images = _images()
  averaged = tta.with_tta(model, 4)
  views = tta.TestTimeViews(4)(images).numpy().reshape(4, *images.shape)
  expected = np.mean([model.predict(view, verbose=0) for view in views], axis=0)
  got = averaged.predict(images, verbose=0)
  assert got.shape == (3, 1)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
  # The views change what the model sees, so the mean is not the single view's probability.
  assert not np.allclose(got, model.predict(images, verbose=0), atol=1e-6)


def test_one_view_is_the_model_itself_and_bad_counts_are_refused(model):
  assert tta.with_tta(model, 1) is model
  for bad in (0, tta.MAX_VIEWS + 1, True, 2.0):
    with pytest.raises(ValueError, match='1 to 8 views'):
      tta.with_tta(model, bad)


def test_a_saved_tta_model_loads_and_gives_the_same_probabilities(model, tmp_path):
  averaged = tta.with_tta(model, 3)
  path = str(tmp_path / 'tta.keras')
  averaged.save(path)
  loaded = keras.models.load_model(path)
  images = _images(seed=1)
  np.testing.assert_allclose(loaded.predict(images, verbose=0), averaged.predict(images, verbose=0), rtol=1e-6)
