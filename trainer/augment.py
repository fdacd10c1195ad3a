"""The model's random augmentation: acquisition-shift families as Keras layers on [0, 255] grey images.

    images (uint8 or float32, batch x side x side x 1)
      -> affine       rotation, translation and field of view ('fov': zoom out into a black border, or crop in),
                      composed into one 3x3 matrix per image and applied in one bilinear resampling
      -> gamma, contrast, brightness, blur, noise, jpeg   photometric families, each optional

Every layer is the identity unless training=True, computes in float32 under any mixed-precision policy, and is
registered for .keras files. `augmentation(...)` builds the block trainer.models puts in front of every model.

One warp, not three. Keras's RandomRotation, RandomZoom and RandomTranslation each resample the image, and the three
bilinear warps were ~90% of the augmentation's cost (BENCHMARKS.md). `RandomAffine` draws the same parameters from
the same distributions (tests/test_augment.py compares them, and the warped pixels, with two-sample tests) and
multiplies the three output-to-input matrices, so the image is resampled once; it also blurs it once, not three
times, and keeps the content a chain of warps cuts off at an intermediate border. The resampling is written with
gathers instead of ImageProjectiveTransformV3, which has no XLA kernel: so the model compiles with
`jit_compile=True` unless the 'jpeg' family is on (EncodeJpeg has no XLA kernel either). Where XLA is faster on a CPU
(the warp, gamma, and trainer.layers.Equalize), the layer compiles its own work (`compiled`).

Per-replica streams. Each layer's seed state is a Keras SeedGenerator, one variable, which MirroredStrategy mirrors:
drawn from directly, the i-th image of every replica would get the same transform in a step. Every draw here folds
the replica's id (`replica_id_in_sync_group`) into the layer's seed, so each replica draws its own transforms, and a
seeded run still draws the same ones on the same number of replicas.

Families and their ranges at --augment_strength=1 (every range scales with it); FAMILIES names them in
trainer.config, and each of trainer.shift's stress-test shifts names the family that covers it:

    rotation    angle uniform in +-10 degrees
    translation up to +-5% of the side, each axis
    fov         zoom factor uniform in [1 - fov, 1 + fov] (--augment_fov, 0.1): above 1 the border is black, below it
                the image is cropped; the stress test's x0.85 and x1.15 need fov=0.15
    contrast    (x - mean) * c + mean, c uniform in [1 - contrast, 1 + contrast] (--augment_contrast, 0.1)
    brightness  + b * 255, b uniform in +-brightness (--augment_brightness, 0.1)
    noise       Gaussian noise of --augment_noise (4) grey levels
    gamma       255 (x / 255) ** g, log g uniform in +-log(1 + gamma) (--augment_gamma, 0.6: g in [0.625, 1.6])
    blur        Gaussian blur, sigma uniform in [0, blur] pixels per 128 pixels of side (--augment_blur, 1.5)
    jpeg        JPEG re-encoding at a quality uniform in [100 - (100 - jpeg) * strength, 100] (--augment_jpeg, 20)
"""

import math

import keras
import tensorflow as tf

from trainer import ops
# Defined in trainer.config, which main checks before it imports TensorFlow.
from trainer.config import FAMILIES  # pylint: disable=g-importing-member


def compiled(function):
  """`function` as a tf.function compiled with XLA (jit_compile=True), for a layer to call inside any model.

  Measured on this project's 2-core CPU (batch 32, 128 pixels, one run of each layer alone): the fused warp 2.4 ms
  compiled against 8.7 ms without, gamma 4.1 against 7.9, CLAHE 5.0 against 16.7. XLA is not always faster: its
  random normals took 130 ms against 0.6 and the per-image blur 76 against 3, so those layers stay uncompiled. The whole
  training step compiled is slower (XLA's CPU convolutions are not oneDNN's: 1.17 s
  against 0.66 s a step in one run of trainer.benchmark's train_step_recipe_model), so only these layers compile.

  Called eagerly (the run's preview of augmented images, a notebook), `function` runs as it is: there each call
  with a new shape would trace and compile to run once. Measured on a one-epoch run of a 4-filter CNN at 32 pixels
  (one process, two runs each): 8.7 to 10.0 s with the preview compiled, 6.9 and 7.9 s without.
  """
  jitted = tf.function(function, jit_compile=True, autograph=False)

  def call(*args):
    return function(*args) if tf.executing_eagerly() else jitted(*args)

  call.jitted = jitted
  return call


class _RandomLayer(keras.layers.Layer):
  """A random transform of float32 [0, 255] images, drawn per image from a per-replica stream; identity unless
  training. `transform` runs compiled with XLA unless the class sets xla = False."""

  xla = True

  def __init__(self, seed=None, **kwargs):
    kwargs.setdefault('dtype', 'float32')
    super().__init__(**kwargs)
    self.seed = seed
    self.seed_generator = keras.random.SeedGenerator(seed)
    self._transform = compiled(self.transform) if self.xla else self.transform

  def _seed(self):
    """A fresh stateless seed: the layer's next one, with the replica's id folded in (module docstring)."""
    seed = tf.cast(self.seed_generator.next(), tf.int64)
    context = tf.distribute.get_replica_context()
    replica = 0 if context is None else context.replica_id_in_sync_group
    return tf.random.experimental.stateless_fold_in(seed, tf.cast(replica, tf.int32))

  def _uniform(self, images, low, high, seed):
    """One draw per image, uniform in [low, high), shaped (batch, 1, 1, 1)."""
    return tf.random.stateless_uniform([tf.shape(images)[0], 1, 1, 1], seed, low, high)

  def call(self, images, training=False):
    if not training:
      return images
    # The seed is drawn outside the compiled function: it updates a (mirrored) variable and reads the replica.
    return self._transform(tf.cast(images, tf.float32), self._seed())

  def transform(self, images, seed):
    raise NotImplementedError

  def compute_output_shape(self, input_shape):
    return input_shape

  def get_config(self):
    return {**super().get_config(), 'seed': self.seed}


def affine_matrices(angle, zoom, shift_x, shift_y, height, width):
  """Output-to-input matrices (batch, 8) of a rotation, then a zoom, then a translation, as Keras's layers compose.

  Each argument is a (batch,) tensor: the angle in radians and the zoom factor about the image centre, and the
  translation in pixels. The same matrices as Keras's RandomRotation, RandomZoom (aspect kept) and RandomTranslation,
  multiplied: applying them one after the other maps an output pixel p to the input pixel R Z T p.
  """
  cos, sin = tf.cos(angle), tf.sin(angle)
  zeros, ones = tf.zeros_like(angle), tf.ones_like(angle)
  cx, cy = (width - 1) / 2, (height - 1) / 2

  def matrix(*rows):
    return tf.reshape(tf.stack(rows, axis=-1), [-1, 3, 3])

  rotation = matrix(cos, -sin, cx - cx * cos + cy * sin, sin, cos, cy - cx * sin - cy * cos, zeros, zeros, ones)
  scale = matrix(zoom, zeros, cx * (1 - zoom), zeros, zoom, cy * (1 - zoom), zeros, zeros, ones)
  translation = matrix(ones, zeros, -shift_x, zeros, ones, -shift_y, zeros, zeros, ones)
  return tf.reshape(rotation @ scale @ translation, [-1, 9])[:, :8]


def warp(images, matrices):
  """Bilinear resampling of `images` (batch, h, w, c) at input = matrices @ output, black outside the image.

  The convention of keras.ops.image.affine_transform (ImageProjectiveTransformV3, fill_mode='constant'), with gathers:
  those compile with XLA. A neighbour pixel outside the image counts as 0.
  """
  batch, height, width, channels = tf.shape(images)[0], images.shape[1], images.shape[2], images.shape[3]
  ys, xs = tf.meshgrid(tf.range(height, dtype=tf.float32), tf.range(width, dtype=tf.float32), indexing='ij')
  m = matrices[:, :, None, None]
  x = m[:, 0] * xs + m[:, 1] * ys + m[:, 2]
  y = m[:, 3] * xs + m[:, 4] * ys + m[:, 5]
  x0, y0 = tf.floor(x), tf.floor(y)
  flat = tf.reshape(images, [-1, channels])
  base = (tf.range(batch) * height * width)[:, None, None]

  def corner(cx, cy):
    inside = (cx >= 0) & (cx <= width - 1) & (cy >= 0) & (cy <= height - 1)
    index = base + tf.cast(tf.clip_by_value(cy, 0, height - 1), tf.int32) * width + tf.cast(
        tf.clip_by_value(cx, 0, width - 1), tf.int32)
    return tf.gather(flat, index) * tf.cast(inside, images.dtype)[..., None]

  wx, wy = (x - x0)[..., None], (y - y0)[..., None]
  top = (1 - wx) * corner(x0, y0) + wx * corner(x0 + 1, y0)
  bottom = (1 - wx) * corner(x0, y0 + 1) + wx * corner(x0 + 1, y0 + 1)
  return (1 - wy) * top + wy * bottom


@keras.saving.register_keras_serializable(package='cxr_trainer')
class RandomAffine(_RandomLayer):
  """Rotation, zoom and translation in one bilinear warp, black outside the image.

  Args:
    rotation: the largest angle, in degrees; uniform in [-rotation, rotation].
    zoom: the zoom factor is uniform in [1 - zoom, 1 + zoom] (Keras's RandomZoom: above 1 the image shrinks into a
      black border, a wider field of view; below 1 it is cropped).
    translation: the largest shift, as a fraction of the side; uniform in [-translation, translation] on each axis.
    seed: the layer's seed; None for a fresh one.
  """

  def __init__(self, rotation=0.0, zoom=0.0, translation=0.0, seed=None, **kwargs):
    super().__init__(seed=seed, **kwargs)
    if not 0 <= zoom < 1:
      raise ValueError(f'zoom={zoom!r} must be in [0, 1).')
    self.rotation, self.zoom, self.translation = float(rotation), float(zoom), float(translation)

  def parameters(self, batch, seed):
    """(angle in radians, zoom factor, shift x and shift y as fractions of the side), each (batch,)."""
    seeds = tf.random.experimental.stateless_split(seed, 4)
    radians = math.radians(self.rotation)
    angle = tf.random.stateless_uniform([batch], seeds[0], -radians, radians)
    zoom = tf.random.stateless_uniform([batch], seeds[1], 1 - self.zoom, 1 + self.zoom)
    shift_y, shift_x = (tf.random.stateless_uniform([batch], s, -self.translation, self.translation)
                        for s in (seeds[2], seeds[3]))
    return angle, zoom, shift_x, shift_y

  def transform(self, images, seed):
    height, width = images.shape[1], images.shape[2]
    angle, zoom, shift_x, shift_y = self.parameters(tf.shape(images)[0], seed)
    return warp(images, affine_matrices(angle, zoom, shift_x * width, shift_y * height, height, width))

  def get_config(self):
    return {**super().get_config(), 'rotation': self.rotation, 'zoom': self.zoom, 'translation': self.translation}


@keras.saving.register_keras_serializable(package='cxr_trainer')
class RandomContrast(_RandomLayer):
  """(x - mean) * c + mean per image, c uniform in [1 - factor, 1 + factor], clipped to [0, 255] (Keras's
  RandomContrast with both bounds given)."""

  xla = False  # As fast without (1.0 ms), and one compilation fewer.

  def __init__(self, factor, seed=None, **kwargs):
    super().__init__(seed=seed, **kwargs)
    self.factor = float(factor)

  def transform(self, images, seed):
    factor = self._uniform(images, 1 - self.factor, 1 + self.factor, seed)
    return tf.clip_by_value(ops.contrast(images, factor), 0, 255)

  def get_config(self):
    return {**super().get_config(), 'factor': self.factor}


@keras.saving.register_keras_serializable(package='cxr_trainer')
class RandomBrightness(_RandomLayer):
  """+ b * 255 per image, b uniform in [-factor, factor], clipped to [0, 255] (Keras's RandomBrightness)."""

  xla = False  # As fast without (0.9 ms), and one compilation fewer.

  def __init__(self, factor, seed=None, **kwargs):
    super().__init__(seed=seed, **kwargs)
    self.factor = float(factor)

  def transform(self, images, seed):
    return tf.clip_by_value(images + 255 * self._uniform(images, -self.factor, self.factor, seed), 0, 255)

  def get_config(self):
    return {**super().get_config(), 'factor': self.factor}


@keras.saving.register_keras_serializable(package='cxr_trainer')
class PixelNoise(_RandomLayer):
  """Adds Gaussian noise of `stddev` grey levels to [0, 255] images, in training only.

  keras.layers.GaussianNoise does the same but refuses a stddev above 1 (it expects inputs in [0, 1]).
  """

  xla = False  # XLA's random normals are 200x slower here (`compiled`).

  def __init__(self, stddev, seed=None, **kwargs):
    super().__init__(seed=seed, **kwargs)
    if not stddev >= 0:
      raise ValueError(f'stddev={stddev!r} must be zero or more.')
    self.stddev = float(stddev)

  def transform(self, images, seed):
    return ops.noise(images, self.stddev, seed)

  def get_config(self):
    return {**super().get_config(), 'stddev': self.stddev}


@keras.saving.register_keras_serializable(package='cxr_trainer')
class RandomGamma(_RandomLayer):
  """255 * (x / 255) ** g per image, log g uniform in [-log(1 + gamma), log(1 + gamma)]: as likely darker as
  brighter, like the stress test's gamma 1.5 and 1 / 1.5."""

  def __init__(self, gamma, seed=None, **kwargs):
    super().__init__(seed=seed, **kwargs)
    if not gamma >= 0:
      raise ValueError(f'gamma={gamma!r} must be zero or more.')
    self.gamma = float(gamma)

  def transform(self, images, seed):
    bound = math.log1p(self.gamma)
    exponent = tf.exp(self._uniform(images, -bound, bound, seed))
    return ops.gamma(images, exponent)

  def get_config(self):
    return {**super().get_config(), 'gamma': self.gamma}


@keras.saving.register_keras_serializable(package='cxr_trainer')
class RandomBlur(_RandomLayer):
  """Gaussian blur per image, sigma uniform in [0, sigma] pixels per 128 pixels of side (the stress test's unit).

  Each image gets its own kernel: the batch is moved into the channels of one depthwise convolution per axis.
  """

  xla = False  # XLA's depthwise convolution is 25x slower here (`compiled`).

  def __init__(self, sigma, seed=None, **kwargs):
    super().__init__(seed=seed, **kwargs)
    if not sigma >= 0:
      raise ValueError(f'sigma={sigma!r} must be zero or more.')
    self.sigma = float(sigma)

  def transform(self, images, seed):
    largest = self.sigma * images.shape[1] / 128
    sigma = tf.random.stateless_uniform([tf.shape(images)[0]], seed, 0, largest)
    return ops.blur(images, sigma, ops.blur_radius(largest))

  def get_config(self):
    return {**super().get_config(), 'sigma': self.sigma}


@keras.saving.register_keras_serializable(package='cxr_trainer')
class RandomJpeg(_RandomLayer):
  """Re-encodes each image as JPEG at a quality uniform in [min_quality, 100]."""

  xla = False  # EncodeJpeg has no XLA kernel.

  def __init__(self, min_quality, seed=None, **kwargs):
    super().__init__(seed=seed, **kwargs)
    if not 1 <= min_quality <= 100:
      raise ValueError(f'min_quality={min_quality!r} must be in [1, 100].')
    self.min_quality = int(round(min_quality))

  def transform(self, images, seed):
    qualities = tf.random.stateless_uniform([tf.shape(images)[0]], seed, self.min_quality, 101, dtype=tf.int32)
    return ops.jpeg(images, qualities)

  def get_config(self):
    return {**super().get_config(), 'min_quality': self.min_quality}


def augmentation(strength, *, families, horizontal_flip=False, fov=0.1, contrast=0.1, brightness=0.1, noise=4.0,
                 gamma=0.6, blur=1.5, jpeg=20, seed=None):
  """The model's augmentation block: the given families (the module docstring), their ranges scaled by `strength`.

  Args:
    strength: scales every range; must be positive.
    families: the families to apply, a subset of FAMILIES; the order of the block is always FAMILIES' order.
    horizontal_flip: also flip left/right (Keras's RandomFlip).
    fov, contrast, brightness, noise, gamma, blur, jpeg: each family's range at strength 1 (the module docstring).
    seed: the first layer's seed (each further layer gets the next); None for fresh ones.

  Returns:
    A keras.Sequential named 'augmentation'.

  Raises:
    ValueError: for an unknown family or a range out of bounds.
  """
  unknown = sorted(set(families) - set(FAMILIES))
  if unknown:
    raise ValueError(f'Unknown augmentation families {unknown}; choose from {FAMILIES}.')
  # One seed per layer: layers given the same seed would draw correlated transforms.
  seeds = iter(range(seed, seed + 16)) if seed is not None else iter([None] * 16)
  on = set(families)
  layers = []
  if on & {'rotation', 'fov', 'translation'}:
    layers.append(RandomAffine(rotation=strength * 10 if 'rotation' in on else 0.0,
                               zoom=strength * fov if 'fov' in on else 0.0,
                               translation=strength * 0.05 if 'translation' in on else 0.0,
                               seed=next(seeds), name='affine'))
  photometric = {
      'gamma': lambda s: RandomGamma(math.expm1(strength * math.log1p(gamma)), seed=s, name='gamma'),
      'contrast': lambda s: RandomContrast(strength * contrast, seed=s, name='contrast'),
      'brightness': lambda s: RandomBrightness(strength * brightness, seed=s, name='brightness'),
      'blur': lambda s: RandomBlur(strength * blur, seed=s, name='blur'),
      # Sensor and quantum noise differ between machines, and --equalize=clahe amplifies it in flat regions.
      'noise': lambda s: PixelNoise(strength * noise, seed=s, name='noise'),
      'jpeg': lambda s: RandomJpeg(max(1.0, 100 - strength * (100 - jpeg)), seed=s, name='jpeg'),
  }
  layers += [photometric[name](next(seeds)) for name in FAMILIES if name in photometric and name in on]
  if horizontal_flip:
    layers.append(keras.layers.RandomFlip('horizontal', seed=next(seeds), dtype='float32', name='flip'))
  return keras.Sequential(layers, name='augmentation')
