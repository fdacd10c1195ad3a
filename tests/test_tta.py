"""Tests for trainer/tta.py: the views, and the model that averages over them."""

import json

import keras
import numpy as np
import pytest

from trainer import data
from trainer import metrics
from trainer import models
from trainer import tta

SIDE = 50


@pytest.fixture(scope='module')
def model():
  keras.utils.set_random_seed(0)
  return models.build('cnn', image_size=SIDE, cnn_filters=4, cnn_depth=2, augment_strength=0)


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


def _validation_threshold_and_test_auc(model, builder, views):
  """The youden threshold on validation and the test ROC-AUC of `model` over `views` views, computed here."""
  averaged = tta.with_tta(model, views)
  out = {}
  for split in ('validation', 'test'):
    ds = data.eval_dataset(builder, split, image_size=SIZE_CLI, batch_size=32, cache=False)
    labels = np.concatenate([batch['label'].numpy() for batch in ds])
    probs = np.concatenate([averaged.predict(batch['image'], verbose=0)[:, 0] for batch in ds])
    out[split] = (labels, probs)
  return metrics.choose_threshold(*out['validation']), metrics.ranking_metrics(*out['test'])['roc_auc']


SIZE_CLI = 48


def test_evaluate_export_and_predict_take_tta_and_choose_the_threshold_with_the_views(untrained_run, synthetic_data_dir,
                                                                                     tmp_path, run_program):
  model_dir = untrained_run(SIZE_CLI)
  builder = data.prepare('chest_xray_pneumonia/synthetic', data_dir=synthetic_data_dir, manual_dir=None)
  model = keras.models.load_model(model_dir / 'model.keras')
  threshold, test_auc = _validation_threshold_and_test_auc(model, builder, 3)
  assert threshold != 0.5  # The stored one, which the views must not keep.

  code, _, stderr = run_program('trainer.evaluate', f'--model_dir={model_dir}', '--tta=3',
                                 f'--out_dir={tmp_path / "eval"}', '--n_resamples=20')
  assert code == 0, stderr[-3000:]
  report = json.loads((tmp_path / 'eval' / 'report.json').read_text())
  assert report['operating_point'] == {'threshold': pytest.approx(threshold), 'threshold_rule': 'youden',
                                       'chosen': 'now'}
  assert report['ranking']['roc_auc'] == pytest.approx(test_auc, abs=1e-6)
  assert report['tta_views'] == list(tta.VIEWS[:3])

  out = tmp_path / 'export'
  code, _, stderr = run_program('trainer.export', f'--model_dir={model_dir}', '--tta=3',
                                 f'--out_dir={out}', '--n_resamples=20')
  assert code == 0, stderr[-3000:]
  assert json.loads((out / 'run.json').read_text())['threshold'] == pytest.approx(threshold)
  exported = keras.models.load_model(out / 'model.keras')
  assert exported.get_layer('views').views == 3  # The deployable model averages over the views itself.
  image = np.asarray(next(iter(data.eval_dataset(builder, 'test', image_size=SIZE_CLI, batch_size=1)))['image'])
  png = tmp_path / 'x.png'
  keras.utils.save_img(png, image[0], scale=False)
  code, stdout, stderr = run_program('trainer.predict', f'--model_dir={out}', str(png))
  assert code == 0, stderr[-3000:]
  result = json.loads(stdout.strip().splitlines()[-1])
  assert result['probability'] == pytest.approx(float(tta.with_tta(model, 3).predict(image, verbose=0)[0, 0]),
                                                abs=1e-5)
  assert result['threshold'] == pytest.approx(threshold)

  code, _, stderr = run_program('trainer.predict', f'--model_dir={model_dir}', '--tta=2',
                                 f'--gradcam_dir={tmp_path / "cam"}', str(png))
  assert code == 1
  assert stderr.strip().splitlines()[-1] == (
      'error: --gradcam_dir explains the model on one view of each image: drop --tta to draw it.')
