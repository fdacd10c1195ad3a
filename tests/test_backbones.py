"""The backbones beyond the first version's, end to end on the synthetic config: train, evaluate, export, serve."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from trainer import config as config_lib
from trainer import data
from trainer import export
from trainer import predict
from trainer import train
from trainer.config import Config


@pytest.mark.parametrize('name', ['efficientnetb0', 'densenet121', 'efficientnet_lite0'])
def test_a_new_backbone_trains_evaluates_exports_and_serves(name, synthetic_data_dir, tmp_path):
  model_dir = str(tmp_path / name)
  # 32 px and one epoch a phase: these backbones are slow on a CPU; the whole last stage fine-tunes.
  config = Config(model=name, dataset='chest_xray_pneumonia/synthetic', data_dir=synthetic_data_dir,
                  model_dir=model_dir, image_size=32, epochs=1, fine_tune_epochs=1, batch_size=256,
                  unfreeze=config_lib.BACKBONES[name].last_stage, weights='none', seed=1).validate()
  keras.utils.set_random_seed(config.seed)
  report = train.run(config, tf.distribute.OneDeviceStrategy('/cpu:0'))
  assert report['model'] == name and report['n_images'] == 120  # The synthetic test split.
  with open(os.path.join(model_dir, 'report.json')) as f:
    assert json.load(f)['n_images'] == report['n_images'] > 0

  model = keras.saving.load_model(os.path.join(model_dir, 'model.keras'), safe_mode=True)
  assert model.name == name
  served = tf.saved_model.load(export.saved_model_path(model_dir)).signatures[export.SERVING_ENDPOINT]
  builder = tfds.builder('chest_xray_pneumonia/synthetic', data_dir=synthetic_data_dir)
  encoded = [ex['image'] for ex in builder.as_dataset('test', decoders={'image': tfds.decode.SkipDecoding()}).take(4)]
  images = tf.stack([data.decode_image(b, 32) for b in encoded])
  expected = model(images, training=False).numpy()[:, 0]
  answer = served(image_bytes=tf.stack(encoded))
  np.testing.assert_allclose(answer['probability'].numpy(), expected, atol=1e-5)
  assert answer['pneumonia'].shape == (4,)

  # Grad-CAM reads the layer the registry names, and gives maps in [0, 1] at the input size.
  maps = predict.make_gradcam(model, 32)(images).numpy()
  assert maps.shape == (4, 32, 32) and maps.min() >= 0 and maps.max() <= 1
