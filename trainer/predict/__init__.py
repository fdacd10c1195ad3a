r"""Predictions on new chest X-rays: one JSON line per image, Grad-CAM overlays, ensembles. The program,
`python -m trainer.predict`, is trainer/predict/__main__.py:

    python -m trainer.predict --model_dir=runs/resnet50 scans/ more/IM-0001.jpeg
    python -m trainer.predict --model_dir=runs/resnet50 --gradcam_dir=/tmp/gradcam scans/
    python -m trainer.predict --model_dir=runs/ensemble scans/       # an export of trainer.export
    python -m trainer.predict --model_dir=runs/cnn,runs/resnet50 --ensemble_dir=runs/ensemble scans/

Each line is {"file", "label" ("normal" or "pneumonia"), "probability" (of pneumonia), "threshold",
"threshold_rule"}, the label being pneumonia when probability >= threshold, the threshold the one stored with the run
or export (chosen on validation by the rule named). A file that cannot be read gets a line {"file", "error"} of its
own, the others go on, and the exit code is 1 at the end.

JPEG and PNG files go through the training pipeline's own decode and resize (`trainer.data.decode_image`), so a model
sees the same pixels as in training and in the exported SavedModel, after their EXIF orientation is applied
(`trainer.data.upright`). DICOM files (the `dicom` extra, pydicom) get their
modality and VOI LUTs (the window the file asks for) and are then stretched to 0-255, as 8-bit exports like the
training JPEGs are, before the same resize.

Several runs (--model_dir=DIR1,DIR2) average their probabilities, each at its own input size, and need a threshold of
their own: `trainer.runs.operating_point` chooses it on the validation split by --threshold_rule (youden unless
given), as trainer.evaluate and trainer.shift do for the same runs. That costs one pass over the validation split (ten
with shifts), so with --ensemble_dir the threshold is kept in ENSEMBLE_DIR/ensemble.json, keyed by the rule and the
members' model.keras contents, and reused until a member changes; `python -m trainer.export` makes them one model
with the threshold stored once.

--gradcam_dir writes, for each image, the image as the model saw it (at its input size) under the Grad-CAM map of the
pneumonia score, as <path below the inputs' common folder>.gradcam.png. Each map is scaled to its own maximum, so the
weak evidence in a confidently normal image is drawn as hot as strong evidence: read a map with its probability. An
overlay that cannot be written (a full disk) is an "error" on its image's line, which keeps its label: no prediction
depends on an optional output. Of several runs (or an exported ensemble) the map is the mean of the members' maps,
at the largest member's input size (`trainer.gradcam.make_ensemble_gradcam`).
"""

import collections
from collections.abc import Iterable, Iterator, Sequence
import dataclasses
import hashlib
import io
import json
import os

from absl import logging
import numpy as np
from PIL import Image
import tensorflow as tf

from trainer import config as config_lib
from trainer import data
from trainer import errors
from trainer import export
from trainer import figures
from trainer import files as files_lib
from trainer import gradcam as gradcam_lib
from trainer import inference
from trainer import metrics
from trainer import runs as runs_lib

CLASS_NAMES = figures.CLASS_NAMES  # The printed labels, indexed by class id.
# Files a folder is searched for (case-insensitive). A file named on the command line is read whatever its name.
IMAGE_EXTENSIONS = ('.jpeg', '.jpg', '.png', '.dcm', '.dicom')
# The largest digital radiographs are about 4,300 pixels a side (18 Mpx). Anything far beyond is a corrupt header or
# a decompression bomb (a small file that decodes to gigabytes); it is refused before any pixel is decoded. Below
# PIL's own warning limit (89 Mpx), so PIL stays quiet.
MAX_SIDE = 20_000
MAX_PIXELS = 50_000_000
# A side under 16 pixels is an icon, a tracking pixel or a broken header, not a radiograph (the trainer's smallest
# input is 32 pixels: anything smaller is blown up from almost nothing).
MIN_SIDE = 16
ENSEMBLE_FILE = 'ensemble.json'
_DICOM_MAGIC = b'DICM'  # At byte 128 of a DICOM Part 10 file, after the preamble.
_OVERLAY = '.gradcam.png'  # --gradcam_dir's files: outputs of predict, never its inputs.



class BadImageError(errors.InvalidValue):
  """A file that cannot be read as a chest X-ray; its JSON line says why."""


def find_images(paths: Sequence[str], *, skip: str | None = None) -> list[str]:
  """The files to predict: files as given, and the image files in folders (recursively, sorted).

  In folders, a file is taken by its extension (IMAGE_EXTENSIONS), or, without one, when it is a DICOM file (as PACS
  exports name them: 'IM00001'); the others are counted in one log line, and each named under --verbosity=1. Hidden
  files and folders (names starting with '.'), macOS `__MACOSX` folders, the project's own Grad-CAM overlays
  ('*.gradcam.png') and the folder `skip` (the --gradcam_dir) are left out: they hold metadata or outputs, not X-rays.

  Args:
    paths: files and folders. A path that does not exist is kept, so that it gets an error line of its own.
    skip: a folder not to search (where the overlays go), if any.

  Returns:
    The file paths, in the order given, each folder's files sorted.

  Raises:
    ValueError: if no path is given, or the folders hold no image file and no file is named.
  """
  if not paths:
    raise errors.InvalidValue('Give the images to predict: files or folders after the flags.')
  files, skipped = [], []
  skip = os.path.realpath(skip) if skip else None
  for path in paths:
    if not os.path.isdir(path):
      files.append(path)
      continue
    # Symlinked folders are followed (a scan archive linked in), each real folder once, so a link loop ends.
    seen = {skip}
    for folder, subfolders, names in os.walk(path, followlinks=True):
      seen.add(os.path.realpath(folder))
      subfolders[:] = sorted(name for name in subfolders if not name.startswith('.') and name != '__MACOSX'
                             and os.path.realpath(os.path.join(folder, name)) not in seen)
      for name in sorted(name for name in names if not name.startswith('.') and not name.endswith(_OVERLAY)):
        (files if _is_image_file(os.path.join(folder, name)) else skipped).append(os.path.join(folder, name))
  if skipped:
    logging.info('Skipped %d files that are not JPEG, PNG or DICOM (by extension, or a DICOM without one) in %s%s.',
                 len(skipped), ', '.join(paths), '' if logging.vlog_is_on(1) else ' (--verbosity=1 names them)')
    for path in skipped:
      logging.debug('Skipped %s: not a JPEG, PNG or DICOM file.', path)
  if not files:
    raise errors.InvalidValue(f'No image files ({", ".join(IMAGE_EXTENSIONS)}, or DICOM) in {", ".join(paths)}.')
  return files


def _is_image_file(path: str) -> bool:
  if path.lower().endswith(IMAGE_EXTENSIONS):
    return True
  if os.path.splitext(path)[1]:
    return False
  try:
    with open(path, 'rb') as f:
      return f.read(132)[128:] == _DICOM_MAGIC
  except OSError:
    return True  # Unreadable: its line says why.


def read_image(path: str, image_sizes: Iterable[int]) -> dict[int, np.ndarray]:
  """Reads one JPEG, PNG or DICOM file as the models see it: grayscale uint8, squashed to each size.

  Args:
    path: the file.
    image_sizes: the input sides of the models that will see it.

  Returns:
    {size: uint8 array of shape (size, size, 1)}.

  Raises:
    BadImageError: if the file is empty, not a JPEG, PNG or DICOM image, a CMYK JPEG, truncated, too large
      (MAX_SIDE, MAX_PIXELS) or too small (MIN_SIDE), or, for DICOM, pydicom is missing.
    OSError: if the file cannot be read (missing, permissions).
  """
  with open(path, 'rb') as f:
    raw = f.read()
  return decode_image_bytes(raw, image_sizes, dicom=path.lower().endswith(('.dcm', '.dicom')))


def decode_image_bytes(raw: bytes, image_sizes: Iterable[int], *, dicom: bool = False) -> dict[int, np.ndarray]:
  """`read_image` of a file's bytes already in memory (an upload to trainer.serve).

  Args:
    raw: the encoded JPEG, PNG or DICOM file.
    image_sizes: the input sides of the models that will see it.
    dicom: read it as DICOM even without the DICM marker (a file named .dcm).

  Returns:
    {size: uint8 array of shape (size, size, 1)}.

  Raises:
    BadImageError: as `read_image`.
  """
  if not raw:
    raise BadImageError('empty file (0 bytes)')
  if raw[128:132] == _DICOM_MAGIC or dicom:
    pixels = _dicom_pixels(raw)
    return {size: data.resize_uint8(pixels, size).numpy() for size in image_sizes}
  try:
    with Image.open(io.BytesIO(raw)) as image:  # Reads the header only.
      image_format, mode, (width, height) = image.format, image.mode, image.size
  except Image.UnidentifiedImageError:
    raise BadImageError('not a JPEG, PNG or DICOM image') from None
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise BadImageError(f'unreadable image header: {e}') from None
  if image_format not in ('JPEG', 'PNG'):
    raise BadImageError(f'a {image_format} image; JPEG, PNG and DICOM are read')
  if mode == 'CMYK':  # TensorFlow's JPEG decoder, the training pipeline's, has no CMYK.
    raise BadImageError('a CMYK JPEG (a print colour space); save it as grayscale or RGB')
  _check_size(width, height)
  raw = data.upright(raw)  # TF's decoder ignores EXIF: a phone's photo would lie on its side.
  try:
    return {size: data.decode_image(raw, size).numpy() for size in image_sizes}
  except tf.errors.InvalidArgumentError as e:
    reason = errors.error_message(e)
    raise BadImageError(f'cannot decode ({reason}); the file may be truncated') from None


def _check_size(width, height):
  if max(width, height) > MAX_SIDE or width * height > MAX_PIXELS:
    raise BadImageError(f'{width}x{height} pixels is beyond what is read ({MAX_SIDE} a side, '
                        f'{MAX_PIXELS // 1_000_000} Mpx): a corrupt header or a decompression bomb')
  if min(width, height) < MIN_SIDE:
    raise BadImageError(f'{width}x{height} pixels is too small for a chest X-ray (at least {MIN_SIDE} a side)')


def _dicom_pixels(raw: bytes) -> tf.Tensor:
  """A monochrome DICOM image as uint8 (height, width, 1), through its modality and VOI LUTs, stretched to 0-255."""
  try:
    import pydicom  # pylint: disable=import-outside-toplevel  # An optional extra.
  except ImportError:
    raise BadImageError('a DICOM file, and pydicom is not installed: pip install .[dicom]') from None
  try:
    from pydicom import pixels as dicom_pixels  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise BadImageError(f'a DICOM file, and pydicom {pydicom.__version__} is too old (pydicom.pixels is new in 3.0): '
                        'pip install "pydicom>=3"') from None
  try:
    dataset = pydicom.dcmread(io.BytesIO(raw), force=True)
    _check_size(int(dataset.Columns), int(dataset.Rows))
    if int(dataset.get('SamplesPerPixel', 1)) != 1 or int(dataset.get('NumberOfFrames', 1)) != 1:
      raise BadImageError(f'a DICOM of {dataset.get("SamplesPerPixel")} samples per pixel and '
                          f'{dataset.get("NumberOfFrames", 1)} frames; one monochrome frame is read')
    values = dicom_pixels.apply_voi_lut(dicom_pixels.apply_modality_lut(dataset.pixel_array, dataset), dataset)
  except BadImageError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # pydicom raises many types for one bad file.
    raise BadImageError(f'unreadable DICOM: {type(e).__name__}: {e}') from None
  values = values.astype(np.float64)
  # MONOCHROME1 displays its lowest value as white; the training images are MONOCHROME2-like (bone bright).
  if dataset.get('PhotometricInterpretation') == 'MONOCHROME1':
    values = values.max() + values.min() - values
  low, high = values.min(), values.max()
  scaled = np.round(255 * (values - low) / (high - low)) if high > low else np.zeros_like(values)
  return tf.constant(scaled.astype(np.uint8)[..., None])


# Grad-CAM moved to trainer.gradcam; the old names stay for callers of trainer.predict.
make_gradcam = gradcam_lib.make_gradcam
overlay_png = gradcam_lib.overlay_png


def cached_ensemble_threshold(runs: Sequence[runs_lib.TrainedRun], ensemble_dir: str, rule: str | None = None,
                              **kwargs) -> dict:
  """`trainer.runs.operating_point` of several runs, kept in ensemble_dir/ensemble.json while the rule and the
  members' model.keras stay.

  Args:
    runs: the members, from `trainer.runs.load_run`.
    ensemble_dir: the folder of ensemble.json; created if missing.
    rule: the threshold rule (None: youden).
    **kwargs: passed to `trainer.runs.operating_point` when it runs.

  Returns:
    As `trainer.runs.operating_point`, plus 'fingerprints' (the rule, the test-time views if any, and SHA-256 of each
    member's model.keras).
  """
  views = [f'tta {runs[0].tta_views}'] if runs[0].tta_views > 1 else []
  fingerprints = [rule or metrics.TRAINING_RULE, *views] + [
      _sha256(os.path.join(export.current_dir(run.model_dir), 'model.keras')) for run in runs]
  path = os.path.join(ensemble_dir, ENSEMBLE_FILE)
  if os.path.exists(path):
    with open(path) as f:
      cached = json.load(f)
    if cached.get('fingerprints') == fingerprints:
      logging.info('Ensemble threshold %.4f from %s.', cached['threshold'], path)
      return cached
    logging.info('%s is for other members or other weights; choosing the threshold again.', path)
  result = {**runs_lib.operating_point(runs, rule, **kwargs), 'fingerprints': fingerprints}
  os.makedirs(ensemble_dir, exist_ok=True)
  # A temporary name of this process's own: two predict processes may share ensemble_dir.
  files_lib.write_atomic(path, json.dumps(result, indent=2), partial=f'{path}.{os.getpid()}.partial')
  return result


def _sha256(path):
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def predict_files(files: Sequence[str | np.ndarray], runs: Sequence[runs_lib.TrainedRun], *, threshold: float,
                  gradcam_dir: str | None = None, batch_size: int = 32,
                  threshold_rule: str | None = None, predicts=None) -> Iterator[dict]:
  """Predicts files (or images already in memory) in batches, and yields one result per file, in order.

  Args:
    files: from `find_images`; or uint8 grayscale arrays (height, width) or (height, width, 1), as `Classifier`
      takes them (their result's 'file' is their index, '<array N>').
    runs: one model, or the members of an ensemble (their probabilities are averaged).
    threshold: the decision threshold: from `trainer.runs.operating_point`.
    gradcam_dir: if given, a Grad-CAM overlay of each image is written there, as <path relative to the inputs'
      common folder>.gradcam.png (of an ensemble: the mean of its members' maps, `trainer.gradcam`).
    batch_size: images per batch.
    threshold_rule: the name of the rule that chose the threshold, for the results (left out if None).
    predicts: a function of each run, uint8 images -> probabilities (made here with `trainer.inference.make_predict`
      if None): `trainer.inference.make_predict` for a caller that predicts many times, or a
      `trainer.tflite.TFLiteModel`.

  Yields:
    {'file', 'label', 'probability', 'threshold', 'threshold_rule'} (and 'gradcam', the overlay's path, and for an
    ensemble 'member_probabilities'), or {'file', 'error'} for a file that cannot be read.

  """
  predicts = predicts or [inference.make_predict(run.model) for run in runs]
  gradcam = (gradcam_lib.make_ensemble_gradcam([(run.model, run.image_size) for run in runs])
             if gradcam_dir is not None else None)
  # Overlays keep the inputs' folder structure below their common folder (of the files that exist: a wrong path
  # must not move the others' overlays).
  root = os.path.commonpath([os.path.dirname(os.path.abspath(path)) for path in files
                             if isinstance(path, str) and os.path.isfile(path)] or [os.getcwd()])
  sizes = sorted({run.image_size for run in runs})
  warning = next(filter(None, (config_lib.data_warning(run.config.get('dataset')) for run in runs)), None)
  for start in range(0, len(files), batch_size):
    chunk, results, images = files[start:start + batch_size], {}, collections.defaultdict(list)
    for i, path in enumerate(chunk):
      in_memory = not isinstance(path, str)
      name = f'<array {start + i}>' if in_memory else printable(path)
      try:
        for size, image in (_array_inputs(path, sizes) if in_memory else read_image(path, sizes)).items():
          images[size].append(image)
        results[i] = {'file': name}
      except BadImageError as e:
        results[i] = {'file': name, 'error': str(e)}
      except OSError as e:
        results[i] = {'file': name, 'error': f'cannot read: {e.strerror or e}'}
    good = [i for i in sorted(results) if 'error' not in results[i]]
    if good:
      batches = {size: np.stack(stack) for size, stack in images.items()}
      member_probs = np.stack([np.asarray(predict(batches[run.image_size])) for predict, run in zip(predicts, runs)])
      probs = member_probs.mean(axis=0)
      maps = gradcam(batches) if gradcam else None
      for j, i in enumerate(good):
        result = results[i]
        result.update(label=CLASS_NAMES[int(probs[j] >= threshold)], probability=float(probs[j]),
                      threshold=float(threshold))
        if threshold_rule:
          result['threshold_rule'] = threshold_rule
        if warning:
          result['warning'] = warning
        if len(runs) > 1:
          result['member_probabilities'] = member_probs[:, j].tolist()
        if gradcam:
          source = chunk[i] if isinstance(chunk[i], str) else result['file']
          out = os.path.join(gradcam_dir, os.path.relpath(os.path.abspath(source), root) + _OVERLAY)
          _write_overlay(result, out, overlay_png(batches[sizes[-1]][j], maps[j]))
    for i in sorted(results):
      yield results[i]


def _write_overlay(result: dict, out: str, png: bytes) -> None:
  """Writes an overlay; one that cannot be written (a full disk, a read-only --gradcam_dir) is an error on its
  image's line, which keeps its label: no prediction depends on an optional output."""
  try:
    os.makedirs(os.path.dirname(out), exist_ok=True)
    files_lib.write_atomic(out, png)
  except OSError as e:
    reason = str(e) if isinstance(e, errors.UserError) else f'Cannot write {out}: {e.strerror or e}.'
    result['error'] = f'Grad-CAM overlay not written: {reason}'
    return
  result['gradcam'] = printable(out)


def printable(path: str) -> str:
  """A path for a JSON line, valid UTF-8 whatever the file system holds: the bytes of a name that is not UTF-8 (which
  Python decodes to lone surrogates, invalid in JSON for strict parsers) as Python's escapes, e.g. 'scan-\\xff.png'."""
  return os.fsencode(path).decode('utf-8', 'backslashreplace')


def _array_inputs(image, sizes) -> dict[int, np.ndarray]:
  """A uint8 grayscale array as the models see it: squashed to each size (Classifier's input contract)."""
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] != 1):
    raise errors.InvalidValue(f'An image array must be uint8 grayscale, (height, width) or (height, width, 1); got '
                     f'{image.dtype} of shape {image.shape}.')
  image = image.reshape(image.shape[:2] + (1,))
  return {size: data.resize_uint8(image, size).numpy() for size in sizes}


@dataclasses.dataclass
class Classifier:
  """A run, an export or an ensemble of runs, at its one threshold: `load(...)` makes it, `classify` uses it.

  Input contract: chest X-ray files (JPEG, PNG, DICOM) or uint8 grayscale arrays, (height, width) or (height, width,
  1), of any size; each is squashed to the model's input side (run.json's image_size), as in training.
  """

  runs: list
  threshold: float
  threshold_rule: str

  def __post_init__(self):
    self._predicts = [inference.make_predict(run.model) for run in self.runs]

  def classify(self, images: Sequence, *, batch_size: int = 32) -> list[dict]:
    """{'file', 'label', 'probability', 'threshold', 'threshold_rule'} per image, in order; or {'file', 'error'}
    for a file that cannot be read.

    Raises:
      ValueError: an array that is not uint8 grayscale.
    """
    if isinstance(images, (str, np.ndarray)):
      images = [images]
    return list(predict_files(list(images), self.runs, threshold=self.threshold, batch_size=batch_size,
                              threshold_rule=self.threshold_rule, predicts=self._predicts))


def load(model_dir: str | Sequence[str], *, threshold_rule: str | None = None, **kwargs) -> Classifier:
  """Loads a run, an export of `trainer.export`, or several runs (their ensemble) at their threshold.

  Args:
    model_dir: a run's --model_dir or an export's folder; or several runs' (their threshold is chosen on validation).
    threshold_rule: None for the stored threshold, or a rule to choose it again (trainer.metrics.RULES).
    **kwargs: for `trainer.runs.Runs` (data_dir, manual_dir, batch_size), for several runs.

  Returns:
    A Classifier.
  """
  dirs = [model_dir] if isinstance(model_dir, (str, os.PathLike)) else list(model_dir)
  runs = runs_lib.Runs.load([str(d) for d in dirs], **kwargs)
  point = runs.operating_point(threshold_rule)
  return Classifier(runs=runs.members, threshold=point['threshold'], threshold_rule=point['threshold_rule'])
