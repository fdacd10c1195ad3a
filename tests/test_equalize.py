"""Tests for the Equalize layer (histogram equalization and CLAHE) and its place in the models."""

import io

import keras
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from trainer import config
from trainer import export
from trainer import layers
from trainer import models

SIZE = 32


def _low_contrast(batch=2, size=64, seed=0):
  """Grey levels crowded around 100, the case equalization is for."""
  rng = np.random.default_rng(seed)
  return rng.normal(100, 10, (batch, size, size, 1)).clip(0, 255).astype(np.uint8)


def _reference_clahe(image, tiles, clip_limit):
  """CLAHE written out pixel by pixel, from the description in the layer's docstring."""
  height, width = image.shape
  row_tile, col_tile = np.arange(height) * tiles // height, np.arange(width) * tiles // width
  mappings = np.zeros((tiles, tiles, 256))
  for i in range(tiles):
    for j in range(tiles):
      pixels = image[row_tile == i][:, col_tile == j].ravel()
      histogram = np.bincount(pixels, minlength=256).astype(np.float64)
      limit = clip_limit * pixels.size / 256
      histogram = np.minimum(histogram, limit) + np.maximum(histogram - limit, 0).sum() / 256
      mappings[i, j] = 255 * np.cumsum(histogram) / pixels.size

  def neighbours(index, size):
    position = (index + 0.5) * tiles / size - 0.5
    before = int(min(max(np.floor(position), 0), tiles - 1))
    return before, min(before + 1, tiles - 1), min(max(position - before, 0), 1)

  out = np.zeros((height, width))
  for y in range(height):
    top, bottom, down = neighbours(y, height)
    for x in range(width):
      left, right, across = neighbours(x, width)
      v = image[y, x]
      out[y, x] = ((1 - down) * ((1 - across) * mappings[top, left, v] + across * mappings[top, right, v]) +
                   down * ((1 - across) * mappings[bottom, left, v] + across * mappings[bottom, right, v]))
  return out


def test_histogram_equalization_flattens_the_histogram():
  images = _low_contrast()
  out = layers.Equalize('histogram')(images).numpy()
  assert out.shape == images.shape and out.dtype == np.float32
  assert 0 <= out.min() and out.max() == pytest.approx(255)
  # One of 4 equal-width bins holds nearly all of the input; the output fills all 4 about equally (within the
  # lumpiness of ~60 grey levels).
  assert np.histogram(images[0], bins=4, range=(0, 256))[0].max() > 0.99 * images[0].size
  counts = np.histogram(out[0], bins=4, range=(0, 256))[0]
  np.testing.assert_allclose(counts / counts.mean(), 1, atol=0.12)
  # Exactly the textbook mapping, 255 * cdf(v) / n_pixels, per image.
  for image, equalized in zip(images[..., 0], out[..., 0]):
    cdf = np.cumsum(np.bincount(image.ravel(), minlength=256))
    np.testing.assert_allclose(equalized, 255 * cdf[image] / image.size, rtol=1e-6)


def test_clahe_matches_a_pixel_by_pixel_reference():
  image = _low_contrast(batch=1, size=20, seed=3)
  out = layers.Equalize('clahe', tiles=3, clip_limit=2.0)(image).numpy()[0, ..., 0]
  np.testing.assert_allclose(out, _reference_clahe(image[0, ..., 0], tiles=3, clip_limit=2.0), atol=1e-3)


def test_clahe_differs_from_histogram_equalization():
  images = _low_contrast()
  he = layers.Equalize('histogram')(images).numpy()
  clahe = layers.Equalize('clahe')(images).numpy()
  assert np.abs(clahe - he).mean() > 10
  assert 0 <= clahe.min() and clahe.max() <= 255
  # One tile and a clip limit that never clips is plain histogram equalization.
  np.testing.assert_allclose(layers.Equalize('clahe', tiles=1, clip_limit=1e9)(images), he, atol=1e-3)
  # A flat image stays flat: the tile mappings blend into one value.
  flat = layers.Equalize('clahe')(np.full((1, SIZE, SIZE, 1), 77, np.uint8)).numpy()
  assert np.ptp(flat) < 1e-3


@pytest.mark.parametrize('method', ['histogram', 'clahe'])
def test_each_image_is_equalized_on_its_own(method):
  images = np.concatenate([_low_contrast(1, seed=1), 255 - _low_contrast(1, seed=2) // 2, _low_contrast(1, seed=3)])
  layer = layers.Equalize(method)
  together = layer(images).numpy()
  for i, image in enumerate(images):
    np.testing.assert_allclose(together[i], layer(image[None]).numpy()[0], atol=1e-4)
  # The augmentation layers hand over fractional float32 values; they are rounded to grey levels.
  np.testing.assert_allclose(layer(images.astype(np.float32) + 0.3), together, atol=1e-4)


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="method='gamma' is not one of"):
    layers.Equalize('gamma')
  with pytest.raises(ValueError, match='tiles=0 must be a positive integer'):
    layers.Equalize('clahe', tiles=0)
  with pytest.raises(ValueError, match='clip_limit=0 must be positive'):
    layers.Equalize('clahe', clip_limit=0)
  with pytest.raises(ValueError, match='tiles=40 is more than the 32x32 image'):
    layers.Equalize('clahe', tiles=40)(np.zeros((1, SIZE, SIZE, 1), np.uint8))
  with pytest.raises(ValueError, match="equalize='hist' is not one of"):
    models.build('cnn', image_size=SIZE, equalize='hist')


@pytest.mark.parametrize('name', ['cnn', 'vgg16'])
def test_model_applies_it_after_augmentation(name):
  model = models.build(name, image_size=SIZE, equalize='clahe', cnn_filters=4, cnn_depth=2, seed=0)
  names = [layer.name for layer in model.layers]
  after = 'rescale' if name == 'cnn' else 'preprocess'
  assert names.index('augmentation') < names.index('equalize') == names.index(after) - 1
  plain = models.build(name, image_size=SIZE, cnn_filters=4, cnn_depth=2, seed=0)
  plain.set_weights(model.get_weights())
  images = _low_contrast(4, SIZE)
  assert not np.allclose(model(images), plain(images), atol=1e-6)


def test_keras_file_savedmodel_and_strategy_agree(tmp_path):
  model = models.build('cnn', image_size=SIZE, equalize='clahe', cnn_filters=4, cnn_depth=2, seed=0)
  images = _low_contrast(4, SIZE)
  expected = model(images, training=False).numpy()[:, 0]

  path = export.save_keras(model, str(tmp_path / 'model.keras'))
  loaded = keras.saving.load_model(path, safe_mode=True)
  layer = loaded.get_layer('equalize')
  assert isinstance(layer, layers.Equalize)
  assert (layer.method, layer.tiles, layer.clip_limit) == ('clahe', 8, 2.0)
  np.testing.assert_allclose(loaded(images, training=False).numpy()[:, 0], expected, atol=1e-6)

  served = tf.saved_model.load(export.export_saved_model(model, str(tmp_path / 'saved_model'), image_size=SIZE,
                                                         threshold=0.5)).signatures[export.SERVING_ENDPOINT]
  # PNG is lossless, so the served model decodes exactly these pixels.
  encoded = []
  for image in images[..., 0]:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format='PNG')
    encoded.append(buffer.getvalue())
  np.testing.assert_allclose(served(image_bytes=tf.constant(encoded))['probability'].numpy(), expected, atol=1e-5)

  strategy = tf.distribute.MirroredStrategy(['/cpu:0'])
  with strategy.scope():
    mirrored = models.build('cnn', image_size=SIZE, equalize='clahe', cnn_filters=4, cnn_depth=2, seed=0)
  mirrored.set_weights(model.get_weights())

  @tf.function
  def step(images):
    return strategy.run(lambda x: mirrored(x, training=False), args=(images,))

  distributed = strategy.experimental_local_results(step(tf.constant(images)))[0]
  np.testing.assert_allclose(distributed.numpy()[:, 0], expected, atol=1e-6)


def test_config_offers_the_same_methods():
  assert config.EQUALIZE == models.EQUALIZE
