"""Test-time augmentation: a model's mean probability over fixed views of each image.

The views are mild, deterministic versions of the acquisition differences the training augmentation simulates (field
of view, exposure, position), so averaging over them smooths the model's response to those differences instead of
adding new ones. `with_tta(model, n)` is a Keras model like any other: evaluate, predict and the export take it in
place of the model, and its threshold is chosen on validation with the same views (a threshold chosen on single-view
probabilities does not carry over to their mean).
"""

import keras
import tensorflow as tf

from trainer import ops

# In the order `--tta=N` takes them: the first N. Each maps float32 [0, 255] batches (batch, side, side, 1).
VIEWS = ('identity', 'zoom in x1.1', 'zoom out x0.9 (black border)', 'gamma 0.8', 'gamma 1.25', 'shift left 4%',
         'shift right 4%', 'contrast x0.85')
MAX_VIEWS = len(VIEWS)


_TRANSFORMS = {
    'identity': lambda x: x,
    'zoom in x1.1': lambda x: ops.zoom(x, 1.1),
    'zoom out x0.9 (black border)': lambda x: ops.zoom(x, 0.9),
    'gamma 0.8': lambda x: ops.gamma(x, 0.8),
    'gamma 1.25': lambda x: ops.gamma(x, 1.25),
    'shift left 4%': lambda x: ops.shift_horizontally(x, -0.04),
    'shift right 4%': lambda x: ops.shift_horizontally(x, 0.04),
    'contrast x0.85': lambda x: ops.contrast(x, 0.85),
}


def _check_views(views):
  if isinstance(views, bool) or not isinstance(views, int) or not 1 <= views <= MAX_VIEWS:
    raise ValueError(f'Test-time augmentation takes 1 to {MAX_VIEWS} views ({", ".join(VIEWS)}), got {views!r}.')


@keras.saving.register_keras_serializable(package='cxr')
class TestTimeViews(keras.layers.Layer):
  """uint8 (batch, side, side, 1) -> the first `views` VIEWS of every image, stacked view-major:
  (views * batch, ...)."""

  def __init__(self, views, **kwargs):
    super().__init__(**kwargs)
    _check_views(views)
    self.views = views

  def call(self, images):
    x = tf.cast(images, tf.float32)
    stacked = tf.concat([_TRANSFORMS[name](x) for name in VIEWS[:self.views]], axis=0)
    return ops.to_uint8(stacked)

  def compute_output_shape(self, input_shape):
    return (None, *input_shape[1:])

  def get_config(self):
    return {**super().get_config(), 'views': self.views}


@keras.saving.register_keras_serializable(package='cxr')
class ViewMean(keras.layers.Layer):
  """(views * batch, 1) probabilities, view-major -> (batch, 1), the mean over each image's views."""

  def __init__(self, views, **kwargs):
    super().__init__(**kwargs)
    _check_views(views)
    self.views = views

  def call(self, probabilities):
    return tf.reduce_mean(tf.reshape(probabilities, [self.views, -1, probabilities.shape[-1]]), axis=0)

  def compute_output_shape(self, input_shape):
    return (None, input_shape[-1])

  def get_config(self):
    return {**super().get_config(), 'views': self.views}


def with_tta(model: keras.Model, views: int) -> keras.Model:
  """`model` averaged over its first `views` VIEWS; `model` itself when views is 1.

  The views go through the model as one batch `views` times larger, so one call scores them all.

  Raises:
    ValueError: views is not in 1..MAX_VIEWS.
  """
  _check_views(views)
  if views == 1:
    return model
  images = keras.Input(model.inputs[0].shape[1:], dtype='uint8', name='image')
  probabilities = ViewMean(views, dtype='float32', name='probability')(
      model(TestTimeViews(views, name='views')(images)))
  return keras.Model(images, probabilities, name=f'{model.name}_tta{views}')
