r"""Saving and loading the trained model: a `.keras` file, and a SavedModel that TF Serving can serve from encoded
image bytes; `python -m trainer.export` (trainer/export/__main__.py) turns one run or several into one deployable
model.

The files that must agree (model.keras, best.weights.h5, run.json with the threshold, the report, the SavedModel and
the model card) are an export: they are written into a new folder, OUT/exports/N, and made current together by
renaming one symlink, OUT/current -> exports/N (`committing`). A kill or a full disk at any point leaves the previous
export current and whole, so a reader sees the old set or the new one, never a model with another model's threshold.
OUT/model.keras, OUT/run.json, ... are symlinks through OUT/current; `current_dir` resolves the export once, so a
reader that opens several of its files reads them from one export. The SavedModel is in TF Serving's layout,
OUT/saved_model/N/ (N the export's number, so a server watching OUT/saved_model loads each new export as a new version).

    python -m trainer.export --model_dir=runs/seed-1,runs/seed-2 --out_dir=runs/ensemble
    python -m trainer.export --model_dir=runs/seed-1,runs/seed-2 --out_dir=runs/ensemble \
        --threshold_rule=youden_with_shifts

Several runs become one Keras model that averages their probabilities (they must share the input size); its threshold
is chosen once, on the validation split of the runs' dataset, by the named rule, and stored in run.json; the test
report and the model card are written beside it. `trainer.predict`, `trainer.evaluate` and `trainer.shift` then take
OUT as they take a run's model_dir.

Every file is written beside its final name and renamed into place (`trainer.files`), so a kill or a full disk leaves
the previous file whole. Loading goes through `load_model`, which never runs code stored in a file.
"""

import contextlib
import json
import os
import platform
import re
import shutil
import zipfile

import keras
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from trainer import config as config_lib
from trainer import data
from trainer import errors
from trainer import files
from trainer import lock
from trainer import metrics
from trainer import models  # noqa: F401  (registers the custom layers that load_model meets in a .keras file)
from trainer import report as report_lib
from trainer import tflite
from trainer import version
from trainer.export.card import model_card

SERVING_ENDPOINT = 'serve'
CURRENT = 'current'  # OUT/current -> exports/N: the export in force.
EXPORTS = 'exports'
MODEL_CARD = 'model_card.md'
_MISSING_CLASS = re.compile(r"Could not locate class '([^']+)'")
_NUMBERED = re.compile(r'(\d+)(\.partial)?')


def save_keras(model: keras.Model, path: str) -> str:
  """Saves the whole model as a `.keras` file (a kill or a full disk never leaves half a file)."""
  with files.replacing(path) as partial:
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
  with files.replacing(path) as partial, zipfile.ZipFile(keras_path) as archive:
    with archive.open('model.weights.h5') as source, tf.io.gfile.GFile(partial, 'wb') as target:
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
    ValueError: not a `.keras` file, one cut short, or one that safe mode refuses (the message says why).
  """
  if not path.endswith('.keras'):
    raise errors.InvalidValue(f'{path} is not a .keras file; only .keras models are loaded (they load in '
                              'Keras\'s safe mode).')
  if not os.path.isfile(path):
    raise errors.MissingPath(f'{path}: no such model file.')
  # A .keras file is a zip archive; one cut short has no central directory, and Keras then says "File not found".
  if not zipfile.is_zipfile(path):
    raise errors.InvalidValue(f'{path} is damaged or cut short ({os.path.getsize(path)} bytes, not a whole .keras '
                              'archive): export it again, or copy it again from where it was made.')
  try:
    return keras.saving.load_model(path, compile=False, safe_mode=True)
  except ValueError as e:
    if 'safe_mode' not in str(e):
      raise
    # Safe mode did its job; its message is the user's to read, not a traceback.
    raise errors.InvalidValue(f'{path} holds Python code ({_code_kind(str(e))}), which is not run when a model is '
                              'loaded: a model file from another source could run anything. Export it again from its '
                              'training run with this trainer.') from None
  except TypeError as e:
    # Keras's message is the whole model config (thousands of characters), with the missing class near its end.
    if not (missing := _MISSING_CLASS.search(str(e))):
      raise
    raise errors.InvalidValue(f'{path} uses the layer {missing.group(1)}, which no imported module registers: load it '
                              'with trainer.export.load_model or trainer.predict.load (or `import trainer.models` '
                              'before keras.saving.load_model), from a version of the trainer that has it.') from None


def _code_kind(message: str) -> str:
  """'a Lambda layer' for Keras's 'Requested the deserialization of a `Lambda` layer ...'."""
  return f'a {match.group(1)} layer' if (match := re.search(r'`(\w+)` layer', message)) else 'code'


def export_saved_model(model: keras.Model, path: str, *, image_size: int, threshold: float) -> str:
  """Exports a SavedModel whose `serve` signature takes encoded JPEG/PNG bytes.

  The signature decodes and resizes with the training pipeline's own functions, so a served model sees the same
  pixels as the trained one. It returns the pneumonia probability and the label at the validation threshold.

  EXIF orientation is not applied: TensorFlow has no op that reads EXIF, so the signature reads the pixels as stored,
  and a photo stored on its side with an Orientation tag (as phones write them) is scored on its side. A caller that
  takes such files turns them first, with `trainer.data.upright` (as trainer.predict does); the model card says so.

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

  # Not archive.track(model): add_endpoint already saves the variables the signature reads, and `track` (meant for
  # lookup tables, which this model has none of) made write_out trace the whole model twice more and store every
  # weight a second time (measured on DenseNet121 at 32 px: 32 s and 58 MB, against 13 s and 30 MB without it).
  archive = keras.export.ExportArchive()
  archive.add_endpoint(name=SERVING_ENDPOINT, fn=serve,
                       input_signature=[tf.TensorSpec([None], tf.string, name='image_bytes')])
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with files.replacing(path) as partial:
    files.remove(partial)  # Left by a kill in an earlier export.
    archive.write_out(partial, verbose=False)
  return path


# An export: the files that must agree, made current together.


@contextlib.contextmanager
def committing(out_dir: str):
  """Yields a new, empty export folder; makes it OUT/current in one rename when the block succeeds.

  The block writes every file of the export into the folder. Then `current` is pointed at it by renaming a new
  symlink over the old one (atomic on POSIX), the top-level names are pointed through `current`, and older exports
  are deleted. If the block fails or the process dies before that rename, the previous export stays current and
  whole; the unfinished folder is deleted now or by the next export.

  Args:
    out_dir: the run's model_dir or an export's folder; created if missing.

  Yields:
    (folder, number): where to write, and the export's number (its SavedModel's version).

  Raises:
    OSError: a write failed (a full disk), on one line naming out_dir and the reason.
    trainer.lock.LockedError: another process writes out_dir (a training run, another export).
  """
  os.makedirs(out_dir, exist_ok=True)
  # Unless this process holds it already (a training run's own final export), the export takes out_dir's lock: two
  # writers would each delete the other's unfinished exports/N.partial after their commit.
  with contextlib.nullcontext() if lock.held(out_dir) else lock.hold(out_dir, what='export', flag='--out_dir'):
    with _committing(out_dir) as folder_and_number:
      yield folder_and_number


@contextlib.contextmanager
def _committing(out_dir: str):
  """`committing`, under out_dir's lock."""
  exports = os.path.join(out_dir, EXPORTS)
  os.makedirs(exports, exist_ok=True)
  # Numbers are never reused, an unfinished one's included, so TF Serving sees each export as a new version.
  numbers = [int(match.group(1)) for name in os.listdir(exports) if (match := _NUMBERED.fullmatch(name))]
  current = current_dir(out_dir)
  if _NUMBERED.fullmatch(os.path.basename(current)):
    numbers.append(int(os.path.basename(current)))
  number = max(numbers, default=0) + 1
  folder, partial = os.path.join(exports, str(number)), os.path.join(exports, f'{number}.partial')
  try:
    os.makedirs(partial)
    yield partial, number
    _sync(partial)
    os.replace(partial, folder)
    _point(os.path.join(out_dir, CURRENT), os.path.join(EXPORTS, str(number)))  # The commit.
    _sync_folder(out_dir)
  except (OSError, tf.errors.OpError) as e:
    files.remove(partial)
    cause = e.__cause__ if isinstance(e.__cause__, (OSError, tf.errors.OpError)) else e
    raise errors.WriteFailed(f'Cannot write an export in {out_dir}: {errors.error_reason(cause)}. The previous '
                             'export, if any, is kept.') from e
  except BaseException:
    files.remove(partial)
    raise
  # After the commit, nothing here can mix two exports: readers resolve `current` once (current_dir).
  for name in os.listdir(folder):
    _point(os.path.join(out_dir, name), os.path.join(CURRENT, name))
  for name in os.listdir(exports):
    if name != str(number):
      files.remove(os.path.join(exports, name))


def _sync(folder: str) -> None:
  """Flushes an export's files and folders to the disk before it is made current: after a power cut, `current` must
  not point at files whose data never reached the disk (a rename can be persisted before the data it names)."""
  for root, _, names in os.walk(folder):
    for name in names:
      descriptor = os.open(os.path.join(root, name), os.O_RDONLY)
      try:
        os.fsync(descriptor)
      finally:
        os.close(descriptor)
    _sync_folder(root)


def _sync_folder(folder: str) -> None:
  descriptor = os.open(folder, os.O_RDONLY)
  try:
    os.fsync(descriptor)
  finally:
    os.close(descriptor)


def _point(link: str, target: str) -> None:
  """Makes `link` a symlink to `target` (relative to link's folder) in one rename, whatever was there before."""
  temporary = f'{link}.partial-link'
  files.remove(temporary)
  os.symlink(target, temporary)
  if os.path.isdir(link) and not os.path.islink(link):
    shutil.rmtree(link)  # A folder of the flat layout of earlier versions: rename cannot replace it.
  os.replace(temporary, link)


def current_dir(model_dir: str) -> str:
  """The folder of the export in force in `model_dir`: its OUT/current resolved once, or model_dir itself for a
  run written before exports had folders of their own (model.keras, run.json and saved_model/ side by side)."""
  current = os.path.join(model_dir, CURRENT)
  return os.path.realpath(current) if os.path.isdir(current) else model_dir


def saved_model_path(model_dir: str) -> str:
  """The SavedModel of the export in force: MODEL_DIR/saved_model/N (TF Serving's version folder).

  Raises:
    FileNotFoundError: model_dir holds no SavedModel.
  """
  folder = os.path.join(current_dir(model_dir), 'saved_model')
  if os.path.isfile(os.path.join(folder, 'saved_model.pb')):  # The layout before version folders.
    return folder
  versions = sorted(int(name) for name in (os.listdir(folder) if os.path.isdir(folder) else []) if name.isdigit())
  if not versions:
    raise errors.MissingPath(f'{folder}: no SavedModel version folder (saved_model/N/saved_model.pb).')
  return os.path.join(folder, str(versions[-1]))


def ensemble_model(members: list[keras.Model]) -> keras.Model:
  """One Keras model that averages its members' pneumonia probabilities (they see the same uint8 input).

  Raises:
    ValueError: the members take different input sizes.
  """
  shapes = sorted({tuple(member.inputs[0].shape[1:]) for member in members})
  if len(shapes) != 1:
    raise errors.InvalidValue(f'The runs take different input sizes ({", ".join(str(s[0]) for s in shapes)}); an '
                              'exported ensemble feeds one image to all of them, so export runs of one --image_size.')
  inputs = keras.Input(shapes[0], dtype='uint8', name='image')
  outputs = []
  for i, member in enumerate(members, 1):
    member.name = f'member_{i}'  # Runs of one model share a name, which a functional model refuses twice.
    outputs.append(member(inputs))
  return keras.Model(inputs, keras.layers.Average(name='probability')(outputs), name='ensemble')


def write_export(out_dir: str, model: keras.Model, *, image_size: int, threshold: float, threshold_rule: str,
                 test_predictions: dict, run_info: dict, extra: dict, n_resamples: int = 1000,
                 tensorboard_dir: str | None = None, stress: dict | None = None,
                 sample_images: np.ndarray | None = None) -> dict:
  """Writes a model's export (`committing`): its test report, model.keras, best.weights.h5, SavedModel, TFLite models
  (`trainer.tflite`), run.json and model card, all at one threshold.

  Args:
    out_dir: a run's model_dir, or the folder of an export of several runs.
    model: the model (uint8 grayscale input, pneumonia probability out).
    image_size: its input side.
    threshold: the decision threshold, chosen on validation.
    threshold_rule: the name of the rule that chose it (trainer.metrics.RULES).
    test_predictions: the model's predictions on the test split, as `trainer.inference.predict_split` returns them.
    run_info: run.json's other entries ('config', and e.g. 'best', 'members', 'command').
    extra: the report's other entries (model, dataset, image_size), as in `trainer.report.build_report`.
    n_resamples: bootstrap resamples of the report's intervals.
    tensorboard_dir: if given, the report's figures go there too.
    stress: a `trainer.shift.stress` result on validation, for the model card.
    sample_images: uint8 images of the run's data (`trainer.tflite.sample_images`) that the TFLite models are checked
      on; without them the int8 variant is not kept.

  Returns:
    The test report.
  """
  with committing(out_dir) as (folder, number):
    report = report_lib.report_predictions(
        test_predictions, threshold=threshold, out_dir=folder, tensorboard_dir=tensorboard_dir, n_resamples=n_resamples,
        threshold_rule=metrics.threshold_rule(threshold_rule).text,
        extra={**extra, 'operating_point': {'threshold': threshold, 'threshold_rule': threshold_rule}})
    keras_path = save_keras(model, os.path.join(folder, 'model.keras'))
    save_weights_from_keras(keras_path, os.path.join(folder, 'best.weights.h5'))
    export_saved_model(model, os.path.join(folder, 'saved_model', str(number)), image_size=image_size,
                       threshold=threshold)
    run = {**run_info, 'image_size': image_size, 'threshold': threshold, 'threshold_rule': threshold_rule,
           'cxr_trainer': version.provenance(), 'versions': versions(),
           'tflite': tflite.write(folder, model, image_size, sample_images)}
    if warning := config_lib.data_warning(extra.get('dataset')):
      run['warning'] = warning
    files.write_atomic(os.path.join(folder, 'run.json'), json.dumps(run, indent=2))
    files.write_atomic(os.path.join(folder, MODEL_CARD), model_card(report, run, stress=stress))
  return report


def versions() -> dict:
  """The versions a model was made with, for run.json and the model card."""
  return {'python': platform.python_version(), 'tensorflow': tf.__version__, 'keras': keras.__version__,
          'tensorflow_datasets': tfds.__version__, 'numpy': np.__version__}
