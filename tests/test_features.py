"""The feature cache of a frozen backbone (trainer.features): phase 1 from features computed once trains the same head
as phase 1 from the images, and leaves the same kind of run."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer import config as config_lib
from trainer import data
from trainer import features
from trainer import models
from trainer import train
from trainer.config import Config


def _config(synthetic_data_dir, model_dir, **overrides):
  settings = dict(model='efficientnet_lite0', weights='none', dataset='chest_xray_pneumonia/synthetic',
                  data_dir=synthetic_data_dir, model_dir=model_dir, image_size=32, epochs=2, fine_tune_epochs=0,
                  batch_size=16, augment_strength=0, learning_rate=1e-2, seed=1)
  return Config(**{**settings, **overrides}).validate()


def _train(config):
  keras.utils.set_random_seed(config.seed)
  report = train.run(config, tf.distribute.OneDeviceStrategy('/cpu:0'))
  model = keras.models.load_model(os.path.join(config.model_dir, 'model.keras'))
  return report, model


@pytest.fixture(scope='module')
def cached_and_not(synthetic_data_dir, tmp_path_factory):
  """The same phase-1 run twice, from the images (--feature_cache=off) and from cached features (auto), each with
  the log lines it wrote."""
  runs = {}
  for mode in ('off', 'auto'):
    config = _config(synthetic_data_dir, str(tmp_path_factory.mktemp(mode)), feature_cache=mode)
    built = []
    with pytest.MonkeyPatch.context() as patch:
      patch.setattr(features, 'build', lambda *args, **kwargs: built.append(features_build(*args, **kwargs)) or
                    built[-1])
      report, model = _train(config)
    runs[mode] = config, report, model, built
  return runs


features_build = features.build


@pytest.fixture(scope='module')
def plain():
  """EfficientNet-Lite0 without augmentation, built once for the tests that only read it."""
  return models.build('efficientnet_lite0', image_size=32, augment_strength=0)


def test_cached_and_uncached_phase_1_train_the_same_head(cached_and_not):
  (_, _, plain, plain_built), (config, _, cached, cached_built) = cached_and_not['off'], cached_and_not['auto']
  assert not plain_built
  # Built once, of every training and validation image.
  [cache] = cached_built
  builder = data.prepare(config.dataset, data_dir=config.data_dir, manual_dir=None)
  assert len(cache.train[1]) == builder.info.splits['train'].num_examples
  assert len(cache.validation[1]) == builder.info.splits['validation'].num_examples
  plain_kernel, cached_kernel = (m.get_layer('probability').kernel.numpy() for m in (plain, cached))
  # Trained at all (the output layer starts from Glorot-uniform weights, far from a trained head)...
  assert np.abs(plain_kernel).max() > 0
  # ...and the same batches in the same order: the features differ only by float rounding between batch shapes.
  np.testing.assert_allclose(cached_kernel, plain_kernel, rtol=1e-3, atol=1e-4)
  # The backbone is untouched in both: phase 1 freezes it.
  for name in ('stem_conv', 'top_conv'):
    np.testing.assert_array_equal(plain.get_layer('backbone').get_layer(name).kernel.numpy(),
                                  cached.get_layer('backbone').get_layer(name).kernel.numpy())


def test_a_cached_run_keeps_its_best_epoch_threshold_and_export(cached_and_not):
  (_, plain_report, _, _), (config, cached_report, _, _) = cached_and_not['off'], cached_and_not['auto']
  assert cached_report['ranking']['roc_auc'] == pytest.approx(plain_report['ranking']['roc_auc'], abs=1e-3)
  run = json.load(open(os.path.join(config.model_dir, 'run.json')))
  assert run['threshold'] == pytest.approx(cached_report['at_val_threshold']['threshold'])
  # The exported model still takes the image bytes.
  assert os.path.isdir(os.path.join(config.model_dir, 'saved_model'))


def test_the_cache_applies_only_where_nothing_random_precedes_a_frozen_backbone(plain):
  augmented = models.build('efficientnet_lite0', image_size=32, augment_strength=1)
  cnn = models.build('cnn', image_size=32, augment_strength=0)
  assert features.applies(plain, 'auto') and features.applies(plain, 'on')
  assert not features.applies(augmented, 'auto') and features.applies(augmented, 'on')
  assert not features.applies(plain, 'off')
  assert not any(features.applies(cnn, mode) for mode in config_lib.FEATURE_CACHE)


def test_the_head_shares_the_models_variables(plain):
  model = plain
  head = features.head(model)
  assert {id(v) for v in head.trainable_variables} == {id(v) for v in model.get_layer('probability').weights}
  pooled = keras.Model(model.inputs, model.get_layer('pool').output)
  images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 1), dtype=np.uint8)
  np.testing.assert_allclose(head(pooled(images)).numpy(), model(images).numpy(), rtol=1e-5)


def test_the_features_come_in_the_order_the_images_are_cached(synthetic_data_dir, plain):
  builder = data.prepare('chest_xray_pneumonia/synthetic', data_dir=synthetic_data_dir, manual_dir=None)
  first = [label for _, label in data.train_examples(builder, image_size=32, seed=3).as_numpy_iterator()]
  again = [label for _, label in data.train_examples(builder, image_size=32, seed=3).as_numpy_iterator()]
  extractor = features.extractor(plain)
  _, labels = features.extract(extractor, data.train_examples(builder, image_size=32, seed=3).batch(7))
  assert first == again == labels.tolist()
  assert len(labels) % 7  # A last batch of another size, and still one trace.
  assert extractor.experimental_get_tracing_count() == 1
