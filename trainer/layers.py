"""The preprocessing layers every model puts between its augmentation and its backbone (trainer.models' diagram).

    CropToContent       each image cropped to the rows and columns its content spans (--crop=content)
    Equalize            histogram equalization or CLAHE, per image (--equalize)
    SobelEdges          the Sobel magnitude beside the image (--edge_channel=sobel)
    BackbonePreprocess  grey -> 3 channels and the backbone's own keras.applications preprocess_input

Each is registered for .keras files under the name it had before this module existed ('cxr_trainer>NAME'), so the
models of older runs still load.
"""

import math

import keras
import numpy as np
import tensorflow as tf

from trainer import augment
from trainer import efficientnet_lite
# Defined in trainer.config, which main checks before it imports TensorFlow.
from trainer.config import BACKBONES, EQUALIZE  # pylint: disable=g-importing-member


def preprocess_input(name):
  """The backbone's documented preprocessing: keras.applications.<module>.preprocess_input; Lite's (x - 127) / 128."""
  if BACKBONES[name].module == 'efficientnet_lite':
    return efficientnet_lite.preprocess_input
  return getattr(keras.applications, BACKBONES[name].module).preprocess_input


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


@keras.saving.register_keras_serializable(package='cxr_trainer')
class SobelEdges(keras.layers.Layer):
  """Appends the Sobel gradient magnitude of a one-channel [0, 255] image as a second channel, in [0, 255].

  The magnitude is divided by 4 * sqrt(2), the largest a [0, 255] image can give, so it is on the image's scale.
  tf.image.sobel_edges pads by reflection, so the image's own border makes no edge.
  """

  def __init__(self, **kwargs):
    kwargs.setdefault('dtype', 'float32')
    super().__init__(**kwargs)

  def call(self, images):
    images = tf.cast(images, tf.float32)
    gradients = tf.image.sobel_edges(images)[..., 0, :]  # (batch, h, w, [dy, dx])
    squared = tf.reduce_sum(tf.square(gradients), axis=-1, keepdims=True)
    # sqrt's gradient is infinite at 0; nothing trains before this layer, but Grad-CAM and input gradients pass it.
    magnitude = tf.where(squared > 0, tf.sqrt(tf.maximum(squared, 1e-12)), 0.0)
    return tf.concat([images, magnitude / (4 * math.sqrt(2))], axis=-1)

  def compute_output_shape(self, input_shape):
    return (*input_shape[:-1], 2)

