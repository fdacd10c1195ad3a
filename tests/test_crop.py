"""--crop=content: `layers.CropToContent` takes away black borders, and with them the chest's size in the frame."""

import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer import config
from trainer import layers
from trainer import models
from trainer import shift

SIDE = 64


def _framed(top, bottom, left, right, seed=0, background=0.0):
  """One (1, SIDE, SIDE, 1) float32 image: textured content in rows [top, bottom) and columns [left, right)."""
  rng = np.random.default_rng(seed)
  image = np.full((1, SIDE, SIDE, 1), background, np.float32)
  # Smooth texture (so resizing it is well defined) between grey levels ~60 and ~220.
  content = tf.image.resize(rng.uniform(60, 220, (1, 8, 8, 1)), [bottom - top, right - left]).numpy()
  image[:, top:bottom, left:right] = content
  return image


def _relative_error(a, b):
  return float(np.abs(np.asarray(a) - np.asarray(b)).mean() / np.asarray(b).mean())


def test_a_black_border_is_cropped_away_and_the_content_fills_the_frame():
  image = _framed(10, 50, 20, 60)
  out = layers.CropToContent()(image).numpy()
  assert out.shape == image.shape and out.dtype == np.float32
  expected = tf.image.resize(image[:, 10:50, 20:60], [SIDE, SIDE]).numpy()
  # Within the 3 x 3 smoothing's one pixel of the content's edge.
  assert _relative_error(out, expected) < 0.05
  assert (out < 20).mean() < 0.05 < (image < 20).mean()


def test_an_image_without_a_border_is_left_as_it_is():
  image = _framed(0, SIDE, 0, SIDE, seed=1)
  np.testing.assert_allclose(layers.CropToContent()(image), image, atol=1e-3)


def test_the_crop_sees_a_border_through_brightness_contrast_and_noise():
  image = _framed(8, 56, 12, 52, seed=2)
  shifted = np.clip(0.7 * image + 40 + np.random.default_rng(3).normal(0, 8, image.shape), 0, 255).astype(np.float32)
  out = layers.CropToContent()(shifted).numpy()
  expected = tf.image.resize(shifted[:, 8:56, 12:52], [SIDE, SIDE]).numpy()
  assert _relative_error(out, expected) < 0.05
  # The border (grey level ~40) is gone: what is left is content (>= ~80 after the shift).
  assert (out < 60).mean() < 0.03 < (shifted < 60).mean()


def test_a_marker_in_the_border_does_not_stop_the_crop_and_an_empty_image_is_kept_whole():
  image = _framed(10, 54, 10, 54, seed=4)
  image[:, 2:5, 2:5] = 255  # a burnt-in letter in the corner: 3 pixels of a 64-pixel row
  out = layers.CropToContent()(image).numpy()
  assert _relative_error(out, tf.image.resize(image[:, 10:54, 10:54], [SIDE, SIDE]).numpy()) < 0.05
  nearly_empty = _framed(30, 34, 30, 34, seed=5)  # content spans 4 of 64 pixels: under min_extent, not blown up
  np.testing.assert_allclose(layers.CropToContent()(nearly_empty), nearly_empty, atol=1e-3)


def test_the_stress_tests_zoom_out_is_undone():
  image = _framed(0, SIDE, 0, SIDE, seed=6)
  zoomed_out = shift.SHIFTS['zoom out (x0.85, black border)'](tf.constant(image)).numpy()
  crop = layers.CropToContent()
  assert _relative_error(zoomed_out, image) > 0.1
  assert _relative_error(crop(zoomed_out), crop(image)) < 0.05


def test_every_image_of_a_batch_gets_its_own_crop():
  batch = np.concatenate([_framed(10, 50, 20, 60, seed=7), _framed(0, SIDE, 0, SIDE, seed=8)])
  out = layers.CropToContent()(batch).numpy()
  crop = layers.CropToContent()
  for i in range(2):
    np.testing.assert_allclose(out[i:i + 1], crop(batch[i:i + 1]), atol=1e-4)


def test_bad_arguments_are_refused():
  for name in ('threshold', 'min_fraction', 'min_extent'):
    with pytest.raises(ValueError, match=f'{name}=1.5 must be in'):
      layers.CropToContent(**{name: 1.5})
  with pytest.raises(ValueError, match="crop='lungs' is not one of"):
    models.build('cnn', image_size=SIDE, crop='lungs')
  with pytest.raises(config.ConfigError, match="--crop='lungs' is not one of none, content"):
    config.Config(crop='lungs').validate()
  done = subprocess.run([sys.executable, '-m', 'trainer.main', '--crop=lungs'], capture_output=True, text=True,
                        timeout=120)
  assert done.returncode != 0 and 'crop' in done.stderr.strip().splitlines()[-1], done.stderr[-2000:]
  assert 'crop' in config.FIXED_ON_RESUME


def test_in_the_model_after_the_augmentation_before_equalization_and_saved_with_it(tmp_path):
  model = models.build('cnn', image_size=SIDE, crop='content', equalize='clahe', cnn_filters=4, cnn_depth=2,
                             seed=0)
  names = [layer.name for layer in model.layers]
  assert names.index('augmentation') + 1 == names.index('crop') == names.index('equalize') - 1
  path = str(tmp_path / 'model.keras')
  model.save(path)
  loaded = keras.saving.load_model(path, safe_mode=True)
  assert loaded.get_layer('crop').get_config() == model.get_layer('crop').get_config()
  images = np.concatenate([_framed(10, 50, 20, 60, seed=9), _framed(0, SIDE, 0, SIDE, seed=10)]).astype(np.uint8)
  np.testing.assert_allclose(loaded(images, training=False), model(images, training=False), rtol=1e-5)


def test_uncrop_puts_a_map_back_where_its_crop_came_from():
  image = _framed(10, 50, 20, 60, seed=12)
  crop = layers.CropToContent()
  boxes = crop.boxes(image)
  back = crop.uncrop(crop(image)[..., 0], boxes).numpy()
  assert back.shape == image.shape[:3]
  # Inside the content the round trip gives the image again; outside it (the border) nothing.
  assert _relative_error(back[:, 11:49, 21:59], image[:, 11:49, 21:59, 0]) < 0.03
  assert np.abs(back[:, :9]).max() == 0 and np.abs(back[:, :, :19]).max() == 0


def test_gradcam_of_a_cropped_model_lies_over_the_image_as_given():
  from trainer import predict  # pylint: disable=import-outside-toplevel
  # build's seed covers augmentation and dropout; the weights follow the global seed, which the tests before this one
  # leave anywhere (one order left weights whose map was zero on all 4 images: no evidence is a valid answer).
  keras.utils.set_random_seed(0)
  model = models.build('cnn', image_size=SIDE, crop='content', cnn_filters=4, cnn_depth=2, seed=0)
  images = np.concatenate([_framed(10, 50, 20, 60, seed=s) for s in range(13, 17)]).astype(np.uint8)
  maps = predict.make_gradcam(model, SIDE)(images).numpy()
  assert maps.shape == (4, SIDE, SIDE) and np.all(np.isfinite(maps)) and maps.max() == pytest.approx(1)
  # The border was never seen by the backbone: no evidence can lie there.
  assert maps[:, :9].max() == 0 and maps[:, 51:].max() == 0 and maps[:, :, :19].max() == 0
