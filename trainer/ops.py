"""Fixed image transforms of float32 [0, 255] batches (batch, side, side, channels), written once.

The stress test's shifts (`trainer.shift.SHIFTS`), the test-time views (`trainer.tta.VIEWS`) and the augmentation's
random families (`trainer.augment`) are these transforms: the shifts and views at fixed parameters, the augmentation
at parameters drawn per image. A parameter given as a tensor of shape (batch, 1, 1, 1) (or (batch,) where said)
applies one value per image.
"""

import math

import tensorflow as tf


def gamma(images, exponent):
  """255 * (x / 255) ** exponent: above 1 darker, below 1 brighter. Clipped to [0, 255] first (pow of a negative)."""
  return 255 * tf.pow(tf.clip_by_value(images, 0, 255) / 255, exponent)


def contrast(images, factor):
  """(x - mean) * factor + mean, the mean of each image and channel: Keras's RandomContrast at a fixed factor."""
  mean = tf.reduce_mean(images, axis=[1, 2], keepdims=True)
  return (images - mean) * factor + mean


def zoom(images, scale):
  """Zoom about the centre: scale below 1 shows the whole image smaller inside a black border (a wider field of
  view); above 1 crops the centre and resizes it to the side."""
  side = images.shape[1]
  if scale < 1:
    inner = int(round(side * scale))
    small = tf.image.resize(images, [inner, inner], antialias=True)
    return tf.image.resize_with_crop_or_pad(small, side, side)
  return tf.image.resize(tf.image.central_crop(images, 1 / scale), [side, side])


def shift_horizontally(images, fraction):
  """Moves the image by `fraction` of its side (negative: left), filling black, as the augmentation's translation
  fills."""
  side = images.shape[1]
  pixels = int(round(side * abs(fraction)))
  if fraction < 0:
    return tf.pad(images[:, :, pixels:], [[0, 0], [0, 0], [0, pixels], [0, 0]])
  return tf.pad(images[:, :, :side - pixels], [[0, 0], [0, 0], [pixels, 0], [0, 0]])


def blur(images, sigma, radius):
  """Gaussian blur of one-channel images, sigma pixels for each image ((batch,)), over taps of +-radius pixels.

  Each image gets its own kernel: the batch is moved into the channels of one depthwise convolution per axis. The
  border is extended by reflection, so it makes no edge.
  """
  offsets = tf.range(-radius, radius + 1, dtype=tf.float32)[:, None]
  # sigma near 0: every tap but the centre underflows to 0, so the image passes unchanged.
  taps = tf.exp(-0.5 * tf.square(offsets / tf.maximum(sigma, 1e-3)))
  taps /= tf.reduce_sum(taps, axis=0, keepdims=True)  # (taps, batch)
  stacked = tf.transpose(images[..., 0], [1, 2, 0])[None]  # (1, h, w, batch)
  padded = tf.pad(stacked, [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode='SYMMETRIC')
  rows = tf.nn.depthwise_conv2d(padded, taps[:, None, :, None], [1, 1, 1, 1], 'VALID')
  blurred = tf.nn.depthwise_conv2d(rows, taps[None, :, :, None], [1, 1, 1, 1], 'VALID')
  return tf.transpose(blurred[0], [2, 0, 1])[..., None]


def blur_radius(sigma: float) -> int:
  """Taps to +-3 sigma, at least one: past that a Gaussian's weight is under 0.3%."""
  return max(1, int(math.ceil(3 * sigma)))


def noise(images, stddev, seed):
  """Adds Gaussian noise of `stddev` grey levels, drawn from the stateless stream `seed` (a shape [2] seed)."""
  return images + stddev * tf.random.stateless_normal(tf.shape(images), seed)


def jpeg(images, qualities):
  """Re-encodes each image as JPEG at its quality (qualities: (batch,) int32, 1 to 100); rounds to uint8 first."""
  pixels = tf.cast(tf.clip_by_value(tf.round(images), 0, 255), tf.uint8)
  encoded = tf.map_fn(lambda args: tf.image.adjust_jpeg_quality(args[0], args[1]), (pixels, qualities),
                      fn_output_signature=tf.TensorSpec(images.shape[1:], tf.uint8))
  return tf.cast(encoded, tf.float32)


def to_uint8(images):
  """Rounds float32 [0, 255] images back to uint8, clipping what a transform pushed outside."""
  return tf.cast(tf.clip_by_value(tf.round(images), 0, 255), tf.uint8)
