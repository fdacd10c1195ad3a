"""Grad-CAM (Selvaraju et al., ICCV 2017): where a model looks for pneumonia, for one run, an export, or an ensemble.

`make_gradcam` explains one model from `trainer.models.build_model`; `make_ensemble_gradcam` explains several (the
members of an exported ensemble, or several runs given together) as the mean of their maps, each member's map put back
through its own crop first (`CropToContent.boxes` / `uncrop`, inside `make_gradcam`), so the maps agree on where a
region of the image is. `overlay_png` draws a map over its X-ray. trainer.predict, trainer.serve and the gallery of
trainer.evaluate all draw through here.
"""

from collections.abc import Mapping, Sequence
import io

import keras
from matplotlib import colormaps
import numpy as np
from PIL import Image
import tensorflow as tf

from trainer import config as config_lib
from trainer import models

# Grad-CAM overlay: the heat map's colours cover the X-ray in proportion to the heat, up to this opacity.
_OVERLAY_OPACITY = 0.5


def make_gradcam(model: keras.Model, image_size: int):
  """A traced Grad-CAM (Selvaraju et al., ICCV 2017) of the pneumonia score, for a model from `build_model`.

  The backbone's last rectified feature maps (`trainer.models.feature_layer`: the cnn's last ReLU, ResNet50's
  conv5_block3_out, VGG16's block5_conv3, ...) are weighted by the spatial mean of the gradient of the pneumonia logit
  with respect to them, summed, kept where positive (the regions that raise the score), upsampled bilinearly to the
  input size (and, under --crop=content, put back where the crop came from) and divided by their maximum. The logit,
  not the probability: a confident prediction saturates the sigmoid, whose gradient then vanishes and leaves a blank
  map.

  Args:
    model: a model from `trainer.models.build_model`: layers up to a nested 'backbone' Model, then 'pool',
      'dropout' and the sigmoid Dense 'probability'.
    image_size: the model's input side.

  Returns:
    A function: uint8 images (batch, image_size, image_size, 1) -> float32 maps (batch, image_size, image_size) in
    [0, 1]. An image with no evidence for pneumonia gets a map of zeros.

  Raises:
    ValueError: if the model does not have that structure.
  """
  layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
  names = [layer.name for layer in layers]
  if 'backbone' not in names or names[-1] != 'probability':
    raise ValueError(f'Model {model.name!r} has layers {names}; Grad-CAM needs a model from build_model (a nested '
                     "'backbone' and the output layer 'probability').")
  features = _with_last_features(model)
  before, head = layers[:names.index('backbone')], layers[names.index('backbone') + 1:-1]
  output = layers[-1]

  @tf.function(input_signature=[tf.TensorSpec([None, image_size, image_size, 1], tf.uint8)])
  def gradcam(images):
    x, crops = images, []
    for layer in before:
      if isinstance(layer, models.CropToContent):
        crops.append((layer, layer.boxes(x)))
      x = layer(x, training=False)
    with tf.GradientTape() as tape:
      feature_maps, x = features(x, training=False)
      for layer in head:
        x = layer(x, training=False)
      logit = keras.ops.matmul(tf.cast(x, output.kernel.dtype), output.kernel) + output.bias
    gradients = tape.gradient(logit, feature_maps)
    feature_maps, gradients = tf.cast(feature_maps, tf.float32), tf.cast(gradients, tf.float32)
    weights = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)
    maps = tf.nn.relu(tf.reduce_sum(weights * feature_maps, axis=-1, keepdims=True))
    maps = tf.image.resize(maps, [image_size, image_size], method='bilinear')[..., 0]
    for layer, boxes in crops:  # --crop=content: the map of the cropped image, over the image as given.
      maps = layer.uncrop(maps, boxes)
    return tf.math.divide_no_nan(maps, tf.reduce_max(maps, axis=(1, 2), keepdims=True))

  return gradcam


def _with_last_features(model: keras.Model) -> keras.Model:
  """A model of the backbone's own layers (same weights) that outputs its last rectified feature maps too."""
  backbone = model.get_layer('backbone')
  return keras.Model(backbone.inputs, [_feature_layer(model).output, *backbone.outputs])


def overlay_png(image: np.ndarray, heatmap: np.ndarray) -> bytes:
  """The X-ray with its Grad-CAM map in the 'jet' colours on top, opaque where the map is hot, as PNG bytes.

  Args:
    image: uint8 (size, size, 1), the image as the model saw it.
    heatmap: (size, size) in [0, 1].

  Returns:
    PNG bytes of an RGB image of the same size.
  """
  gray = np.repeat(image.astype(np.float32) / 255, 3, axis=-1)
  opacity = _OVERLAY_OPACITY * heatmap[..., None]
  rgb = (1 - opacity) * gray + opacity * colormaps['jet'](heatmap)[..., :3]
  out = io.BytesIO()
  Image.fromarray(np.round(255 * rgb).astype(np.uint8)).save(out, format='PNG')
  return out.getvalue()


def members(model: keras.Model) -> list[keras.Model]:
  """The models from `build_model` inside `model`: itself, or the members of an exported ensemble
  (`trainer.export.ensemble_model`), or the model a test-time-augmentation wrapper (`trainer.tta`) averages.

  Raises:
    ValueError: there is none (a model not made by the trainer).
  """
  if _is_built_model(model):
    return [model]
  found = [member for layer in model.layers if isinstance(layer, keras.Model) for member in _members_or_none(layer)]
  if not found:
    raise ValueError(f'Model {model.name!r} holds no model from build_model (a nested \'backbone\' and the output '
                     "layer 'probability'): Grad-CAM cannot explain it.")
  return found


def _members_or_none(model):
  try:
    return members(model)
  except ValueError:
    return []


def _is_built_model(model) -> bool:
  names = [layer.name for layer in model.layers]
  return 'backbone' in names and names[-1] == 'probability'


def _feature_layer(model: keras.Model):
  """`models.feature_layer`, also for an ensemble's member, which `ensemble_model` renamed member_N: its backbone is
  told by the layer it has (a keras.applications backbone's named features layer; the cnn's ReLUs otherwise)."""
  if model.name in config_lib.MODELS:
    return models.feature_layer(model)
  backbone = model.get_layer('backbone')
  names = {layer.name for layer in backbone.layers}
  for spec in config_lib.BACKBONES.values():
    if spec.features in names:
      return backbone.get_layer(spec.features)
  return [layer for layer in backbone.layers if isinstance(layer, keras.layers.ReLU)][-1]


def make_ensemble_gradcam(models_and_sizes: Sequence[tuple[keras.Model, int]]):
  """Grad-CAM of an ensemble: the mean of its members' maps, each at its own input side and through its own crop.

  Each member's map is scaled to its own maximum (`make_gradcam`) before the mean, so every member has the same say;
  the mean is not scaled again, so a region all members point at is hotter (up to 1) than one only some point at.

  Args:
    models_and_sizes: (model, input side) of each run or export; a model may itself be an exported ensemble or a
      test-time-augmentation wrapper (`members` finds what is inside).

  Returns:
    A function: {side: uint8 images (batch, side, side, 1)} with one entry per side of the models -> float32 maps
    (batch, S, S) in [0, 1], S the largest side (the other members' maps are resized to it bilinearly).

  Raises:
    ValueError: a model holds no model from `build_model`.
  """
  explainers = [(make_gradcam(member, size), size) for model, size in models_and_sizes for member in members(model)]
  out = max(size for _, size in explainers)

  def gradcam(images: Mapping[int, np.ndarray]) -> np.ndarray:
    maps = []
    for explain, size in explainers:
      member_maps = explain(tf.constant(images[size]))
      if size != out:
        member_maps = tf.image.resize(member_maps[..., None], [out, out], method='bilinear')[..., 0]
      maps.append(member_maps)
    return tf.reduce_mean(tf.stack(maps), axis=0).numpy()

  return gradcam
