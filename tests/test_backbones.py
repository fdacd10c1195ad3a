"""The backbones beyond the first version's, end to end on the synthetic config: train, evaluate, export, serve.

The cheapest of them, EfficientNet-Lite0, goes through the whole program (`train.run`: both phases, the final export
with its TFLite models). The others go through the same functions at a smaller cost: the state `train.run` builds, one
step of its fine-tuning phase, the validation threshold and the test report, the `.keras` file and the SavedModel; each
is then loaded, served and explained as the program's export is.
"""

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
from trainer import inference
from trainer import inputs
from trainer import metrics
from trainer import predict
from trainer import report as report_lib
from trainer import steps
from trainer import train
from trainer.config import Config

_TEST_IMAGES = 120  # The synthetic test split.


def _config(name, synthetic_data_dir, model_dir):
  # 32 px and one epoch a phase: these backbones are slow on a CPU; the whole last stage fine-tunes.
  return Config(model=name, dataset='chest_xray_pneumonia/synthetic', data_dir=synthetic_data_dir,
                model_dir=model_dir, image_size=32, epochs=1, fine_tune_epochs=1, batch_size=256,
                unfreeze=config_lib.BACKBONES[name].last_stage, weights='none', seed=1).validate()


def _check_the_report(report, name, model_dir):
  assert report['model'] == name and report['n_images'] == _TEST_IMAGES
  with open(os.path.join(model_dir, 'report.json')) as f:
    assert json.load(f)['n_images'] == report['n_images'] > 0


def _check_the_export_serves(name, model_dir, synthetic_data_dir):
  """The `.keras` file loads safely, the SavedModel serves its probabilities from image bytes, and Grad-CAM runs."""
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


def test_a_new_backbone_trains_evaluates_exports_and_serves(synthetic_data_dir, tmp_path):
  name = 'efficientnet_lite0'
  model_dir = str(tmp_path / name)
  config = _config(name, synthetic_data_dir, model_dir)
  keras.utils.set_random_seed(config.seed)
  report = train.run(config, tf.distribute.OneDeviceStrategy('/cpu:0'))
  _check_the_report(report, name, model_dir)
  _check_the_export_serves(name, model_dir, synthetic_data_dir)


def _fine_tune_a_step(config, builder, strategy):
  """The model of `train.run`'s state after one step of its fine-tuning phase, which trains the registry's whole last
  stage; checks that the step changed the backbone and nothing the phase does not train."""
  class_weights, steps_per_epoch = steps.class_weights_and_steps(
      builder, batch_size=config.batch_size, class_weight=config.class_weight, dataset=config.dataset, replicas=1)
  state = train.build_state(config, strategy, image_size=32, steps_per_epoch=steps_per_epoch,
                            write_dir=config.model_dir)
  model, make_iterator, _ = inputs.phase_inputs(config, strategy, state.model, builder, 32)('fine_tune')
  phase, train_step, _ = state.enter_phase(config.epochs, class_weights, model=model)
  assert phase == 'fine_tune'
  trained = {id(v) for v in model.trainable_variables}
  before = {id(w): w.numpy() for w in model.weights}  # Weights: the variables without the random seeds' states.
  train_step(make_iterator(0))
  # Only what the phase trains (no BatchNormalization statistic: frozen, in inference mode), the backbone's included.
  changed = {id(w) for w in model.weights if not np.array_equal(before[id(w)], w.numpy())}
  assert changed <= trained
  assert any(id(w) in changed for w in model.get_layer('backbone').trainable_weights)
  return model


@pytest.mark.parametrize('name', ['efficientnetb0', 'densenet121'])
def test_the_other_new_backbones_train_evaluate_export_and_serve_through_the_same_functions(name, synthetic_data_dir,
                                                                                            tmp_path):
  model_dir = str(tmp_path / name)
  config = _config(name, synthetic_data_dir, model_dir)
  keras.utils.set_random_seed(config.seed)
  builder = data.prepare(config.dataset, data_dir=config.data_dir, manual_dir=None)
  model = _fine_tune_a_step(config, builder, tf.distribute.OneDeviceStrategy('/cpu:0'))

  # Evaluated as `train.finish` evaluates: the threshold chosen on validation, the report on test.
  run_predict = inference.make_predict(model)
  validation = inference.predict_split(model, data.eval_dataset(builder, 'validation', image_size=32,
                                                                batch_size=config.batch_size), predict=run_predict)
  threshold = metrics.choose_threshold(validation['labels'], validation['probs'])
  test = inference.predict_split(model, data.eval_dataset(builder, 'test', image_size=32, batch_size=config.batch_size,
                                                          cache=False), predict=run_predict)
  report = report_lib.report_predictions(test, threshold=threshold, out_dir=model_dir, n_resamples=100,
                                         extra={'model': name, 'dataset': config.dataset, 'image_size': 32,
                                                'split': 'test'})
  _check_the_report(report, name, model_dir)

  # Exported as `export.write_export` exports, in the layout `export.saved_model_path` reads.
  export.save_keras(model, os.path.join(model_dir, 'model.keras'))
  export.export_saved_model(model, os.path.join(model_dir, 'saved_model', '1'), image_size=32, threshold=threshold)
  _check_the_export_serves(name, model_dir, synthetic_data_dir)
