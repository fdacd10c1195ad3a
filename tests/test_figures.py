"""Tests of trainer.figures: every picture is a PNG that decodes, shows something, and reacts to its inputs."""

import io

import numpy as np
import pytest
from PIL import Image

from trainer import figures
from trainer import metrics


def _decode(png):
  assert png.startswith(b'\x89PNG\r\n\x1a\n')
  with Image.open(io.BytesIO(png)) as image:
    pixels = np.asarray(image.convert('RGB'))
  assert pixels.std() > 0, 'the figure is a blank image'
  return pixels


@pytest.fixture(scope='module')
def scores():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 2, 400)
  probs = np.clip(rng.normal(0.35 + 0.3 * labels, 0.2), 0, 1)
  return labels, probs


def test_confusion_matrix_png_shows_the_counts():
  pixels = _decode(figures.confusion_matrix_png([[50, 5], [10, 80]], title='Test, threshold 0.5'))
  assert pixels.shape == (400, 400, 3)
  assert not np.array_equal(pixels, _decode(figures.confusion_matrix_png([[5, 50], [80, 10]])))
  # Twice the counts: the same row shares, so the same colours and percentages; only the drawn counts differ.
  doubled = _decode(figures.confusion_matrix_png([[100, 10], [20, 160]], title='Test, threshold 0.5'))
  assert np.array_equal(pixels, _decode(figures.confusion_matrix_png([[50, 5], [10, 80]], title='Test, threshold 0.5')))
  assert not np.array_equal(pixels, doubled)
  with pytest.raises(ValueError, match='2x2'):
    figures.confusion_matrix_png([[1, 2, 3]])
  with pytest.raises(ValueError, match='non-negative'):
    figures.confusion_matrix_png([[1, -2], [3, 4]])


@pytest.mark.parametrize('draw', [figures.roc_curve_png, figures.pr_curve_png])
def test_curves_mark_the_operating_point(draw, scores):
  labels, probs = scores
  plain = _decode(draw(labels, probs))
  marked = _decode(draw(labels, probs, threshold=0.42))
  assert plain.shape == marked.shape == (400, 400, 3)
  assert not np.array_equal(plain, marked)
  with pytest.raises(ValueError, match='both classes'):
    draw(np.ones(10), probs[:10])


def test_reliability_png_draws_the_calibration(scores):
  labels, probs = scores
  calibrated = _decode(figures.reliability_png(metrics.calibration(labels, probs)))
  overconfident = _decode(figures.reliability_png(metrics.calibration(labels, np.round(probs))))
  assert not np.array_equal(calibrated, overconfident)
  with pytest.raises(ValueError, match='lacks'):
    figures.reliability_png({'ece': 0.1})


@pytest.mark.parametrize('channels', [1, 3])
def test_image_grid_png_tiles_the_images(channels):
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (10, 32, 32, channels), dtype=np.uint8)
  wide = _decode(figures.image_grid_png(images, labels=rng.integers(0, 2, 10), ncols=5))
  tall = _decode(figures.image_grid_png(images, ncols=2))
  # 5 columns x 2 rows against 2 columns x 5 rows.
  assert wide.shape[1] > wide.shape[0] and tall.shape[0] > tall.shape[1]
  titled = _decode(figures.image_grid_png(images[:2], labels=[b'normal', 'pneumonia']))
  assert titled.shape[1] < wide.shape[1]  # ncols shrinks to the number of images.


def test_image_grid_png_rejects_bad_input():
  images = np.zeros((2, 8, 8, 1), np.uint8)
  with pytest.raises(ValueError, match='uint8'):
    figures.image_grid_png(images.astype(np.float32))
  with pytest.raises(ValueError, match='shape'):
    figures.image_grid_png(np.zeros((2, 8, 8), np.uint8))
  with pytest.raises(ValueError, match='one entry per image'):
    figures.image_grid_png(images, labels=[0])
  with pytest.raises(ValueError, match='class_names'):
    figures.image_grid_png(images, labels=[0, 5])
  with pytest.raises(ValueError, match='ncols'):
    figures.image_grid_png(images, ncols=0)


def test_figures_leave_pyplot_alone(scores):
  # A training loop draws every epoch; figures made through pyplot would pile up in its global list.
  pyplot = pytest.importorskip('matplotlib.pyplot')
  before = pyplot.get_fignums()
  figures.roc_curve_png(*scores)
  figures.image_grid_png(np.zeros((2, 8, 8, 1), np.uint8))
  assert pyplot.get_fignums() == before
