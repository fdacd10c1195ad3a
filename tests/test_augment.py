"""Tests for trainer.augment: the fused warp draws what Keras's three layers drew, per-replica streams, the families,
the edge channel, and the layers in saved models and under XLA."""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from scipy import stats
import tensorflow as tf

from benchmarks import benchmark
from trainer import augment
from trainer import config
from trainer import layers
from trainer import models
from trainer import shift

DRAWS = 2000


def _old_matrices(strength, batch, side, seed):
  """The output-to-input matrices Keras's RandomRotation, RandomZoom and RandomTranslation drew, composed."""
  old = benchmark.keras_layers_augmentation(strength, seed)
  images = np.zeros((batch, side, side, 1), np.float32)
  rotation, zoom, translation = (old.get_layer(name) for name in ('rotation', 'zoom', 'translation'))
  r = rotation.get_random_transformation(images, training=True)['rotation_matrix']
  z = zoom.get_random_transformation(images, training=True)
  z = zoom._get_zoom_matrix(tf.concat([z['width_zoom'], z['height_zoom']], axis=1), side, side)
  t = translation._get_translation_matrix(translation.get_random_transformation(images, training=True)['translations'])

  def square(m):
    return tf.reshape(tf.concat([m, tf.ones_like(m[:, :1])], axis=1), [-1, 3, 3])

  return tf.reshape(square(r) @ square(z) @ square(t), [-1, 9])[:, :6].numpy()


def _in_training(block, images):
  """`block(images, training=True)` in a graph, as the training step calls it: there the layers that compile do
  (augment.compiled; called eagerly they do not)."""
  return tf.function(lambda images: block(images, training=True))(tf.constant(images)).numpy()


def _new_matrices(strength, batch, side, seed):
  layer = augment.augmentation(strength, families=config.DEFAULT_FAMILIES, seed=seed).get_layer('affine')
  angle, zoom, shift_x, shift_y = layer.parameters(batch, tf.constant([seed, 0], tf.int64))
  return augment.affine_matrices(angle, zoom, shift_x * side, shift_y * side, side, side).numpy()[:, :6]


@pytest.mark.parametrize('strength', [0.5, 1.0, 3.0])
def test_fused_warp_draws_the_distribution_of_keras_three_layers(strength):
  old, new = _old_matrices(strength, DRAWS, 64, seed=1), _new_matrices(strength, DRAWS, 64, seed=2)
  for entry in range(6):
    assert stats.ks_2samp(old[:, entry], new[:, entry]).pvalue > 1e-3, entry
  # The test can tell a different strength apart.
  other = _new_matrices(strength * 1.25, DRAWS, 64, seed=3)
  assert min(stats.ks_2samp(old[:, e], other[:, e]).pvalue for e in range(6)) < 1e-6


def test_fused_warp_moves_the_pixels_as_the_three_layers_did():
  # A blob well inside the frame, so that the border the chained warps cut off holds nothing anyway.
  yy, xx = np.mgrid[:48, :48]
  blob = (255 * np.clip(1 - np.hypot(yy - 26, xx - 22) / 12, 0, 1)).astype(np.float32)
  images = np.repeat(blob[None, ..., None], 1000, axis=0)
  geometric = ('rotation', 'fov', 'translation')
  new = _in_training(augment.augmentation(1.0, families=geometric, seed=4), images)[..., 0]
  old_layers = benchmark.keras_layers_augmentation(1.0, seed=5)
  old = images
  for name in ('rotation', 'zoom', 'translation'):
    old = old_layers.get_layer(name)(old, training=True)
  old = np.asarray(old)[..., 0]

  def statistics(batch):
    mass = batch.sum(axis=(1, 2))
    return mass, (batch * yy).sum(axis=(1, 2)) / mass, (batch * xx).sum(axis=(1, 2)) / mass

  for a, b in zip(statistics(old), statistics(new)):
    assert stats.ks_2samp(a, b).pvalue > 1e-3
  assert np.std(statistics(new)[1]) > 1  # The centre moves by pixels: the warp is on.


def test_warp_is_keras_affine_transform():
  images = tf.constant(np.random.default_rng(0).uniform(0, 255, (3, 20, 24, 1)), tf.float32)
  matrices = augment.affine_matrices(tf.constant([0.3, -0.1, 0.0]), tf.constant([0.9, 1.2, 1.0]),
                                     tf.constant([2.0, -3.5, 0.0]), tf.constant([-1.5, 0.25, 0.0]), 20.0, 24.0)
  expected = keras.ops.image.affine_transform(images, matrices, fill_mode='constant')
  np.testing.assert_allclose(augment.warp(images, matrices), expected, atol=1e-3)
  np.testing.assert_allclose(augment.warp(images, matrices)[2], images[2], atol=1e-4)  # The identity.


def test_contrast_and_brightness_draw_as_keras_layers():
  two_levels = np.zeros((DRAWS, 8, 8, 1), np.float32) + 100
  two_levels[:, :4] = 140
  new = augment.augmentation(1.0, families=('contrast',), seed=0)(two_levels, training=True).numpy()
  old = keras.layers.RandomContrast((0.1, 0.1), seed=1, value_range=(0, 255))(two_levels, training=True).numpy()
  assert stats.ks_2samp(new.std(axis=(1, 2, 3)), old.std(axis=(1, 2, 3))).pvalue > 1e-3
  new = augment.augmentation(1.0, families=('brightness',), seed=0)(two_levels, training=True).numpy()
  old = keras.layers.RandomBrightness(0.1, seed=1)(two_levels, training=True).numpy()
  assert stats.ks_2samp(new.mean(axis=(1, 2, 3)), old.mean(axis=(1, 2, 3))).pvalue > 1e-3
  assert new.mean(axis=(1, 2, 3)).std() > 5


def test_families_by_name_each_active_only_in_training():
  images = np.random.default_rng(0).integers(30, 220, (4, 32, 32, 1)).astype(np.uint8)
  block = augment.augmentation(1.0, families=config.FAMILIES, seed=0)
  assert [layer.name for layer in block.layers] == ['affine', 'gamma', 'contrast', 'brightness', 'blur', 'noise',
                                                    'jpeg']
  np.testing.assert_array_equal(block(images, training=False), images)
  for name in config.FAMILIES:
    if name in ('rotation', 'fov', 'translation'):
      continue
    layer = augment.augmentation(1.0, families=(name,), seed=0).get_layer(name)
    changed = layer(images, training=True).numpy()
    assert changed.shape == images.shape and changed.dtype == np.float32
    assert np.mean(np.abs(changed - images)) > 0.2, name
  # Leaving a family out leaves its layer out.
  assert 'gamma' not in [layer.name for layer in augment.augmentation(
      1.0, families=[f for f in config.FAMILIES if f != 'gamma']).layers]
  with pytest.raises(ValueError, match="Unknown augmentation families \\['sharpen'\\]"):
    augment.augmentation(1.0, families=('gamma', 'sharpen'))


def test_gamma_and_blur_reach_the_stress_tests_range():
  images = np.full((DRAWS, 16, 16, 1), 64, np.float32)
  gamma = _in_training(augment.augmentation(1.0, families=('gamma',), seed=0), images)[:, 0, 0, 0]
  exponents = np.log(gamma / 255) / np.log(64 / 255)
  assert exponents.min() < 1 / 1.5 and exponents.max() > 1.5  # trainer.shift's gamma 0.67 and 1.5.
  assert np.mean(exponents < 1) == pytest.approx(0.5, abs=0.05)
  step = np.zeros((DRAWS, 128, 128, 1), np.float32)
  step[:, :, 64:] = 255
  blurred = augment.augmentation(1.0, families=('blur',), seed=0)(step, training=True).numpy()
  # The stress test's sigma is 1 pixel at 128: its step is 255 * Phi(0.5) - 255 * Phi(-0.5) = 98 at the edge.
  edge = blurred[:, 64, 64, 0] - blurred[:, 64, 63, 0]
  assert edge.min() < 98 < edge.max()


def test_every_stress_shift_has_its_family():
  assert set(shift.SHIFT_FAMILIES) == set(shift.SHIFTS) - {'none'}
  assert set(shift.SHIFT_FAMILIES.values()) <= set(config.FAMILIES)


def test_same_seed_same_draws():
  images = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 1)).astype(np.uint8)
  first, second = (augment.augmentation(1.0, families=config.FAMILIES, seed=7) for _ in range(2))
  np.testing.assert_array_equal(first(images, training=True), second(images, training=True))
  assert not np.array_equal(first(images, training=True), second(images, training=False))


def test_replicas_draw_their_own_transforms():
  out = subprocess.run([sys.executable, '-c', textwrap.dedent("""
      from trainer import distribute
      distribute.configure_logical_devices(2)
      import numpy as np, tensorflow as tf
      from trainer import augment, config
      strategy = distribute.get_strategy('mirrored')
      with strategy.scope():
        block = augment.augmentation(1.0, families=config.FAMILIES, seed=3)
      image = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 1)).astype(np.float32)
      step = tf.function(lambda: strategy.run(lambda: block(tf.constant(image), training=True)))
      for _ in range(2):
        a, b = (np.asarray(t) for t in strategy.experimental_local_results(step()))
        print(float(np.abs(a - b).mean()), float(np.abs(a - image).mean()))
  """)], env={**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '2'}, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  for line in out.stdout.split('\n')[-3:-1]:
    between, changed = map(float, line.split())
    # The same per-replica input, different transforms: the replicas differ as much as an image differs from its
    # augmented copy.
    assert between > 0.5 * changed > 1, out.stdout


def test_sobel_edges():
  layer = layers.SobelEdges()
  flat = np.full((2, 16, 16, 1), 90, np.uint8)
  out = layer(flat).numpy()
  assert out.shape == (2, 16, 16, 2)
  np.testing.assert_array_equal(out[..., 0], flat[..., 0])
  np.testing.assert_array_equal(out[..., 1], 0)
  step = np.zeros((1, 16, 16, 1), np.uint8)
  step[:, :, 8:] = 255
  edges = layer(step).numpy()[0, :, :, 1]
  assert set(np.flatnonzero(edges.max(axis=0))) == {7, 8}  # A vertical line on both sides of the step.
  np.testing.assert_allclose(edges[:, 7:9], 255 / np.sqrt(2))  # 4 * 255 over the scale 4 sqrt(2).
  assert edges.max() <= 255


@pytest.mark.parametrize('name', ['cnn', 'vgg16'])
def test_edge_channel_in_the_model(name):
  images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 1)).astype(np.uint8)
  model = models.build(name, image_size=32, edge_channel='sobel', equalize='clahe', cnn_filters=4, cnn_depth=2)
  names = [layer.name for layer in model.layers]
  assert names.index('equalize') + 1 == names.index('edges')
  if name == 'cnn':
    assert model.get_layer('backbone').input.shape[-1] == 2
  else:
    edges = model.get_layer('edges')(model.get_layer('equalize')(images))
    rgb = keras.applications.vgg16.preprocess_input(
        np.concatenate([edges[..., :1], edges[..., :1], edges[..., 1:]], axis=-1))
    np.testing.assert_allclose(model.get_layer('preprocess')(edges), rgb, rtol=1e-5, atol=1e-3)
  assert model(images, training=False).shape == (2, 1)
  from trainer import predict  # pylint: disable=import-outside-toplevel
  maps = predict.make_gradcam(model, 32)(images).numpy()
  assert maps.shape == (2, 32, 32) and np.all(np.isfinite(maps)) and maps.max() <= 1


def test_keras_file_with_every_new_layer_loads(tmp_path):
  model = models.build('cnn', image_size=32, cnn_filters=4, cnn_depth=2, seed=0, augment_families=config.FAMILIES,
                             equalize='clahe', edge_channel='sobel', horizontal_flip=True, crop='content')
  path = str(tmp_path / 'model.keras')
  model.save(path)
  loaded = keras.saving.load_model(path, safe_mode=True)
  assert [l.name for l in loaded.get_layer('augmentation').layers] == [
      l.name for l in model.get_layer('augmentation').layers]
  assert loaded.get_layer('augmentation').get_layer('affine').get_config() == \
      model.get_layer('augmentation').get_layer('affine').get_config()
  images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 1)).astype(np.uint8)
  np.testing.assert_allclose(loaded(images, training=False), model(images, training=False), rtol=1e-5)


def test_equalize_compiled_in_training_matches_evaluation():
  images = np.random.default_rng(0).integers(0, 256, (2, 40, 40, 1)).astype(np.uint8)
  layer = layers.Equalize('clahe')
  # In a graph, as in the training step, training compiles with XLA; eagerly nothing compiles (augment.compiled).
  in_training = tf.function(lambda images: layer(images, training=True))(tf.constant(images))
  assert layer._compiled.jitted.experimental_get_tracing_count() == 1  # pylint: disable=protected-access
  np.testing.assert_allclose(in_training, layer(images, training=False), atol=1e-3)
  np.testing.assert_allclose(layer(images, training=True), in_training, atol=1e-3)
  assert layer._compiled.jitted.experimental_get_tracing_count() == 1  # pylint: disable=protected-access


def test_recipe_model_forward_and_backward_compile_with_xla():
  model = models.build('cnn', image_size=32, cnn_filters=4, cnn_depth=2, equalize='clahe', seed=0)
  images = tf.constant(np.random.default_rng(0).integers(0, 256, (4, 32, 32, 1)).astype(np.uint8))

  @tf.function(jit_compile=True)
  def gradients(images):
    with tf.GradientTape() as tape:
      loss = tf.reduce_mean(model(images, training=True))
    return tape.gradient(loss, model.trainable_variables)

  assert all(np.all(np.isfinite(g)) for g in gradients(images))


def test_families_flag_is_checked_and_spelled_one_way(tmp_path, run_program):
  from absl import flags
  from trainer import main  # pylint: disable=import-outside-toplevel  # Defines the flags.
  try:
    flags.FLAGS(['trainer.main', '--augment_families=noise, gamma,rotation', '--augment_gamma=0.5'])
    settings = main.config_from_flags()
  finally:
    flags.FLAGS.unparse_flags()
  assert settings.augment_families == 'rotation,gamma,noise' and settings.families == ('rotation', 'gamma', 'noise')
  assert settings.augment_ranges['gamma'] == 0.5
  with pytest.raises(config.ConfigError, match='--augment_families: sharpen is not a family'):
    config.Config(augment_families='gamma,sharpen').validate()
  with pytest.raises(config.ConfigError, match='--augment_fov=0.3 times --augment_strength=4.0'):
    config.Config(augment_fov=0.3, augment_strength=4.0).validate()
  with pytest.raises(config.ConfigError, match="--edge_channel='canny' is not one of none, sobel"):
    config.Config(edge_channel='canny').validate()
  code, _, stderr = run_program('trainer.main', f'--model_dir={tmp_path}', '--augment_jpeg=0')
  assert code == 1 and stderr.strip().splitlines()[-1] == (
      'error: --augment_jpeg must be a JPEG quality in [1, 100], got 0.0.'), stderr[-2000:]
  for name in ('augment_families', 'augment_gamma', 'augment_jpeg', 'edge_channel'):
    assert name in config.FIXED_ON_RESUME


def test_train_export_and_load_with_every_family_the_edge_channel_and_the_crop(synthetic_data_dir, tmp_path):
  import json  # pylint: disable=import-outside-toplevel
  import dataclasses  # pylint: disable=import-outside-toplevel
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  from trainer import data, train  # pylint: disable=import-outside-toplevel
  settings = config.Config(
      model='cnn', weights='none', dataset='chest_xray_pneumonia/synthetic', data_dir=synthetic_data_dir,
      model_dir=str(tmp_path / 'run'), image_size=32, epochs=1, fine_tune_epochs=0, batch_size=64, cnn_filters=4,
      cnn_depth=2, seed=2, equalize='clahe', edge_channel='sobel', augment_families=','.join(config.FAMILIES),
      augment_contrast=0.3, augment_noise=8.0, crop='content').validate()
  train.run(settings, tf.distribute.OneDeviceStrategy('/cpu:0'))
  stored = json.load(open(tmp_path / 'run' / 'config.json'))
  assert stored['augment_families'] == ','.join(config.FAMILIES) and stored['edge_channel'] == 'sobel'
  assert stored['augment_contrast'] == 0.3 and stored['crop'] == 'content'
  model = keras.saving.load_model(str(tmp_path / 'run' / 'model.keras'), safe_mode=True)
  assert model.get_layer('crop').get_config()['threshold'] == layers.CropToContent().threshold
  assert model.get_layer('backbone').input.shape[-1] == 2
  assert [l.name for l in model.get_layer('augmentation').layers][-1] == 'jpeg'
  served = tf.saved_model.load(str(tmp_path / 'run' / 'saved_model' / '1')).signatures['serve']
  builder = tfds.builder('chest_xray_pneumonia/synthetic', data_dir=synthetic_data_dir)
  encoded = [ex['image'] for ex in builder.as_dataset('test', decoders={'image': tfds.decode.SkipDecoding()}).take(4)]
  images = tf.stack([data.decode_image(b, 32) for b in encoded])
  np.testing.assert_allclose(served(image_bytes=tf.stack(encoded))['probability'].numpy(),
                             model(images, training=False).numpy()[:, 0], atol=1e-5)
  # The families are part of the model: a resume without one is refused, naming it.
  with pytest.raises(ValueError, match='--augment_families=rotation,fov,.*jpeg \\(this run: rotation,fov'):
    train.run(dataclasses.replace(settings, augment_families=','.join(config.FAMILIES[:-1]), epochs=2),
              tf.distribute.OneDeviceStrategy('/cpu:0'))


def test_a_model_saved_with_the_old_keras_layers_still_loads(tmp_path):
  old = benchmark._recipe_model('keras_layers', seed=0, image_size=32)  # pylint: disable=protected-access
  assert [l.name for l in old.get_layer('augmentation').layers][:3] == ['rotation', 'zoom', 'translation']
  path = str(tmp_path / 'old.keras')
  old.save(path)
  loaded = keras.saving.load_model(path, safe_mode=True)
  images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 1)).astype(np.uint8)
  np.testing.assert_allclose(loaded(images, training=False), old(images, training=False), rtol=1e-5)
  assert loaded(images, training=True).shape == (2, 1)
