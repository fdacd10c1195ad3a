"""Saving the trained model: a `.keras` file, and a SavedModel that TF Serving can serve from encoded image bytes."""

import os
import shutil

import keras
import tensorflow as tf

from trainer import data

SERVING_ENDPOINT = 'serve'


def save_keras(model: keras.Model, path: str) -> str:
  """Saves the whole model as a `.keras` file, written aside and renamed so a kill never leaves half a file."""
  partial = path + '.partial.keras'
  model.save(partial)
  os.replace(partial, path)
  return path


def export_saved_model(model: keras.Model, path: str, *, image_size: int, threshold: float) -> str:
  """Exports a SavedModel whose `serve` signature takes encoded JPEG/PNG bytes.

  The signature decodes and resizes with the training pipeline's own functions, so a served model sees the same
  pixels as the trained one. It returns the pneumonia probability and the label at the validation threshold.

  Args:
    model: the trained Keras model (uint8 grayscale input).
    path: the SavedModel folder; replaced if it exists.
    image_size: the side the model takes.
    threshold: the decision threshold chosen on validation.

  Returns:
    path.
  """
  def serve(image_bytes):
    images = tf.map_fn(lambda b: data.decode_image(b, image_size), image_bytes,
                       fn_output_signature=tf.TensorSpec([image_size, image_size, 1], tf.uint8))
    probability = tf.reshape(tf.cast(model(images, training=False), tf.float32), [-1])
    return {'probability': probability,
            'pneumonia': probability >= threshold,
            'threshold': tf.fill(tf.shape(probability), tf.constant(threshold, tf.float32))}

  archive = keras.export.ExportArchive()
  archive.track(model)
  archive.add_endpoint(name=SERVING_ENDPOINT, fn=serve,
                       input_signature=[tf.TensorSpec([None], tf.string, name='image_bytes')])
  partial = path.rstrip('/') + '.partial'
  shutil.rmtree(partial, ignore_errors=True)
  archive.write_out(partial, verbose=False)
  shutil.rmtree(path, ignore_errors=True)
  os.replace(partial, path)
  return path
