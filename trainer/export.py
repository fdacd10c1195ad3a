"""Saving and loading the trained model: a `.keras` file, and a SavedModel that TF Serving can serve from encoded
image bytes.

Every file is written beside its final name and renamed into place (`replacing`), so a kill or a full disk leaves the
previous file whole. Loading goes through `load_model`, which never runs code stored in a file.
"""

import contextlib
import os
import re
import shutil
import zipfile

import keras
import tensorflow as tf

from trainer import data
from trainer import models  # noqa: F401  (registers the custom layers that load_model meets in a .keras file)

SERVING_ENDPOINT = 'serve'
# TF wraps an I/O error's reason in the op's and the device's names: '{{function_node ...}} <path>; <reason> [Op:..]'.
_TF_OP_CONTEXT = re.compile(r'{{.*?}}|\[Op:.*?]')


def error_message(error: Exception) -> str:
  """An error's message on one line, without the op and device names TF wraps around it."""
  message = error.message if isinstance(error, tf.errors.OpError) else str(error)
  return _TF_OP_CONTEXT.sub('', message).strip().split('\n', 1)[0]


def error_reason(error: Exception) -> str:
  """What a user acts on in a failed write: 'No space left on device', without the temporary file's name."""
  if isinstance(error, OSError) and error.strerror:
    return error.strerror
  # TF's file errors read '<path>; <reason>'.
  return error_message(error).rsplit('; ', 1)[-1]


@contextlib.contextmanager
def replacing(path: str):
  """Yields a temporary path beside `path`, renamed to `path` when the block succeeds and deleted when it fails.

  So a kill or a full disk in the middle of a write leaves the previous file (or folder) whole, and no half-written
  one beside it. The temporary name keeps `path`'s extensions ('model.partial.keras'), which Keras checks.

  Args:
    path: the file or folder to write.

  Yields:
    The path to write to.

  Raises:
    OSError: the write failed (a full disk, a read-only folder), naming `path` and the reason on one line.
  """
  folder, name = os.path.split(path.rstrip('/'))
  stem, dot, extensions = name.partition('.')
  partial = os.path.join(folder, f'{stem}.partial{dot}{extensions}')
  try:
    yield partial
    if os.path.isdir(partial):
      # os.replace cannot replace a folder that has files; the old one goes first.
      shutil.rmtree(path, ignore_errors=True)
    os.replace(partial, path)
  except (OSError, tf.errors.OpError) as e:
    _remove(partial)
    raise OSError(f'Cannot write {path}: {error_reason(e)}. Its previous version, if any, is kept.') from e
  except BaseException:  # Also a kill (KeyboardInterrupt) during the rename: no partial is left behind.
    _remove(partial)
    raise


def _remove(path: str) -> None:
  if os.path.isdir(path):
    shutil.rmtree(path, ignore_errors=True)
  elif os.path.exists(path):
    os.remove(path)


def save_keras(model: keras.Model, path: str) -> str:
  """Saves the whole model as a `.keras` file (a kill or a full disk never leaves half a file)."""
  with replacing(path) as partial:
    model.save(partial)
  return path


def save_weights_from_keras(keras_path: str, path: str) -> str:
  """Writes the weights held in a `.keras` file as a `.weights.h5` file, for `model.load_weights`.

  A `.keras` file is a zip that holds its weights as `model.weights.h5`, the format `save_weights` writes. Copying
  that member, rather than calling `save_weights`, keeps HDF5 away from the disk: when a write fails (a full disk),
  h5py prints a traceback per block it could not write and the interpreter then dies of a segmentation fault
  (measured with h5py 3.14 / HDF5 1.14.6 on a full tmpfs and under RLIMIT_FSIZE), where a copy fails with one OSError.

  Args:
    keras_path: a `.keras` file written by `save_keras`.
    path: the `.weights.h5` file to write.

  Returns:
    path.
  """
  with replacing(path) as partial, zipfile.ZipFile(keras_path) as archive:
    with archive.open('model.weights.h5') as source, open(partial, 'wb') as target:
      shutil.copyfileobj(source, target)
  return path


def load_model(path: str) -> keras.Model:
  """Loads a `.keras` model without running any code stored in it.

  Keras's safe mode refuses a file whose config holds Python code (a Lambda layer's bytecode) or names a class
  outside Keras and the layers registered by `trainer.models`, so a model file from an untrusted source cannot run
  code when it is opened. Only the `.keras` format is accepted: legacy `.h5` and SavedModel files are loaded by other
  code paths that safe mode does not cover.

  Args:
    path: a `.keras` file, e.g. model_dir/model.keras.

  Returns:
    The model, uncompiled.

  Raises:
    FileNotFoundError: no such file.
    ValueError: not a `.keras` file, or one that safe mode refuses (the message says why).
  """
  if not path.endswith('.keras'):
    raise ValueError(f'{path} is not a .keras file; only .keras models are loaded (they load in Keras\'s safe mode).')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: no such model file.')
  return keras.saving.load_model(path, compile=False, safe_mode=True)


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
  with replacing(path) as partial:
    shutil.rmtree(partial, ignore_errors=True)  # Left by a kill in an earlier export.
    archive.write_out(partial, verbose=False)
  return path
