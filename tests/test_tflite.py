"""Tests for trainer.tflite: the export's TFLite models agree with Keras on real chest X-rays, the int8 variant is kept
only within its tolerance, Flex ops are named, and trainer.predict runs them."""

import json

import keras
import numpy as np
import pytest

from trainer import errors
from trainer import export
from trainer.export import card
from trainer import models
from trainer import predict
from trainer import tflite

SIZE = 64


def _spread(model, images):
  """An untrained model whose probabilities spread over (0, 1) on `images`: its output layer rescaled so that their
  logits have median 0 and standard deviation 2 (an untrained model answers about the same for every image, which
  would hide a difference)."""
  features = keras.Model(model.inputs, model.get_layer('pool').output).predict(images, verbose=0)
  kernel, bias = model.get_layer('probability').get_weights()
  logits = features @ kernel[:, 0]
  scale = 2 / logits.std()
  model.get_layer('probability').set_weights([kernel * scale, np.array([-np.median(logits) * scale], np.float32)])
  return model


@pytest.fixture(scope='module')
def real_images(real_data):
  """32 real test-folder X-rays (16 of each class) as the model at SIZE takes them."""
  files = [sorted((real_data / 'test' / label).glob('*.jpeg'))[:16] for label in ('NORMAL', 'PNEUMONIA')]
  return np.stack([predict.read_image(str(f), [SIZE])[SIZE] for f in files[0] + files[1]])


@pytest.fixture(scope='module')
def recipe_model(real_images):
  """launch/recipe.sh's CNN (16 filters, depth 4, CLAHE) at SIZE, untrained but spread."""
  keras.utils.set_random_seed(4)
  return _spread(models.build('cnn', image_size=SIZE, cnn_filters=16, cnn_depth=4, equalize='clahe'),
                 real_images)


@pytest.fixture(scope='module')
def exported(untrained_run, recipe_model, real_images):
  """A run's folder with the recipe model, its TFLite models and run.json's 'tflite' entry: (folder, entry)."""
  model_dir = untrained_run(SIZE)
  export.save_keras(recipe_model, str(model_dir / 'model.keras'))
  run = json.loads((model_dir / 'run.json').read_text())
  run['tflite'] = tflite.write(str(model_dir), recipe_model, SIZE, real_images)
  (model_dir / 'run.json').write_text(json.dumps(run))
  return model_dir, run['tflite']


def test_the_tflite_models_agree_with_keras_on_real_images(recipe_model, real_images, exported):
  expected = np.asarray(recipe_model(real_images, training=False))[:, 0]  # As tflite.write computes it.
  assert expected.std() > 0.1, expected  # Spread: a difference would show.
  tmp_path, entry = exported
  assert entry['float32']['select_tf_ops'] == []
  got = tflite.load(str(tmp_path / tflite.FLOAT_FILE))(real_images)
  np.testing.assert_allclose(got, expected, atol=tflite.FLOAT_TOLERANCE)
  assert entry['float32']['max_difference'] == pytest.approx(np.max(np.abs(got - expected)), abs=1e-7)
  # Dynamic-range int8: its 3x3x16x16 kernels (2,304 values) are quantized, so the file shrinks.
  assert entry['int8'].get('file') == tflite.INT8_FILE, entry
  quantized = tflite.load(str(tmp_path / tflite.INT8_FILE), threads=1)
  assert np.max(np.abs(quantized(real_images) - expected)) <= tflite.INT8_TOLERANCE
  assert entry['int8']['bytes'] < entry['float32']['bytes']
  # One image at a time, as on a device: the same probabilities.
  np.testing.assert_allclose([quantized(image[None])[0] for image in real_images[:4]], quantized(real_images)[:4],
                             atol=1e-6)


def test_a_model_without_a_weight_to_quantize_has_no_int8_variant(recipe_model, real_images, tmp_path):
  keras.utils.set_random_seed(0)
  small = models.build('cnn', image_size=SIZE, cnn_filters=4, cnn_depth=2)
  assert max(np.prod(w.shape) for w in small.weights) < 1024
  entry = tflite.write(str(tmp_path), small, SIZE, real_images)
  assert entry['int8']['kept'] is False and 'no weight tensor large enough' in entry['int8']['why']
  assert not (tmp_path / tflite.INT8_FILE).exists() and (tmp_path / tflite.FLOAT_FILE).exists()
  # Not converted, rightly: the converter's int8 model of it quantizes nothing; the recipe's CNN's does.
  assert not tflite.has_int8_weights(tflite.convert(small, SIZE, int8=True)[0])
  assert tflite.has_int8_weights(tflite.convert(recipe_model, SIZE, int8=True)[0])


def test_an_int8_model_beyond_the_tolerance_is_not_kept(recipe_model, real_images, tmp_path, monkeypatch):
  monkeypatch.setattr(tflite, 'INT8_TOLERANCE', 1e-9)
  entry = tflite.write(str(tmp_path), recipe_model, SIZE, real_images)
  assert entry['int8']['kept'] is False and 'moved by' in entry['int8']['why']
  assert not (tmp_path / tflite.INT8_FILE).exists() and (tmp_path / tflite.FLOAT_FILE).exists()


def test_a_layer_that_needs_tensorflow_ops_is_named(tmp_path):
  keras.utils.set_random_seed(1)
  model = models.build('cnn', image_size=32, cnn_filters=4, cnn_depth=2, crop='content')
  entry = tflite.write(str(tmp_path), model, 32, None)
  assert entry['float32']['select_tf_ops'] == ['CropAndResize']
  (tmp_path / 'run.json').write_text(json.dumps({'tflite': entry}))
  with pytest.raises(errors.InvalidValue, match='CropAndResize'):
    tflite.load_export(str(tmp_path))
  lines = card.tflite_card(entry)
  assert 'needs the TensorFlow ops CropAndResize' in lines[0] and lines[-1].startswith('No int8 variant: not checked')


def test_predict_runs_the_tflite_models(recipe_model, exported, real_data, run_program):
  model_dir, _ = exported
  files = [str(f) for f in sorted((real_data / 'test' / 'PNEUMONIA').glob('*.jpeg'))[:3]]
  expected = recipe_model.predict(np.stack([predict.read_image(f, [SIZE])[SIZE] for f in files]), verbose=0)[:, 0]
  for runtime, tolerance in (('tflite', tflite.FLOAT_TOLERANCE), ('tflite_int8', tflite.INT8_TOLERANCE)):
    code, stdout, stderr = run_program('trainer.predict', f'--model_dir={model_dir}', f'--runtime={runtime}', *files)
    assert code == 0, stderr[-2000:]
    lines = [json.loads(line) for line in stdout.splitlines()]
    np.testing.assert_allclose([line['probability'] for line in lines], expected, atol=tolerance)
  (model_dir / tflite.INT8_FILE).unlink()
  code, _, stderr = run_program('trainer.predict', f'--model_dir={model_dir}', '--runtime=tflite_int8', *files)
  assert code == 1 and stderr.strip().splitlines()[-1].startswith(
      f'error: {model_dir / tflite.INT8_FILE}: no such file'), stderr[-2000:]


def test_a_model_tflite_cannot_convert_is_exported_without_it_and_says_why(tmp_path):
  from trainer import tta  # pylint: disable=import-outside-toplevel
  model = tta.with_tta(models.build('cnn', image_size=32, cnn_filters=4, cnn_depth=2), 3)
  entry = tflite.write(str(tmp_path), model, 32, None)
  assert entry == {'error': 'not convertible to TFLite: it needs ScaleAndTranslate, which TFLite has neither as a '
                            'built-in nor as a Flex op'}
  assert not list(tmp_path.iterdir())
  assert card.tflite_card(entry) == [f'No TFLite model in this export: {entry["error"]}.']
  (tmp_path / 'run.json').write_text(json.dumps({'tflite': entry}))
  with pytest.raises(errors.MissingPath, match='ScaleAndTranslate'):
    tflite.load_export(str(tmp_path))
