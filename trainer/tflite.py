"""TensorFlow Lite for the edge: the export's model.tflite (float32) and model.int8.tflite (dynamic-range int8 weights),
and a runtime for them that `trainer.predict --runtime=tflite` uses.

The TFLite model takes what the Keras model takes, uint8 grayscale images (batch, side, side, 1), and returns the
pneumonia probability (batch, 1); the batch dimension is free (`TFLiteModel` resizes it per call). It is converted with
TFLite's built-in ops alone where they suffice; only when a layer needs an op TFLite lacks is the conversion redone with
SELECT_TF_OPS, and the TensorFlow ops it then carries (named `Flex<Op>` in the model) are recorded in run.json's
'tflite' entry and the model card. Measured: `--crop=content` needs `CropAndResize` (models.CropToContent's
crop-and-resize); the CNN, the equalizations (histogram, CLAHE) and the augmentation layers (inactive at inference)
need none. Only a runtime with TensorFlow's Flex delegate (an Android app with tensorflow-lite-select-tf-ops) runs a
model that lists Flex ops: TensorFlow's own pip package ships its Python interpreter without it (TF 2.21), so such a
model is written but neither checked against Keras nor quantized, and `trainer.predict --runtime=tflite` refuses it.

Dynamic-range quantization stores the weights as int8 and computes in float (no representative data needed); it is
kept only when it quantizes a weight (TFLite keeps tensors of under 1,024 values in float) and its probabilities stay
within `INT8_TOLERANCE` of the float model's on sample images of the run's data.
"""

import json
import os
import re

import numpy as np
import tensorflow as tf

from trainer import data
from trainer import errors
from trainer import files

FLOAT_FILE = 'model.tflite'
INT8_FILE = 'model.int8.tflite'
# The largest difference in probability the float32 TFLite model may show against Keras on the same images (measured:
# 4e-6 on real X-rays; the kernels differ, the arithmetic does not). The most the int8 weights may move a probability:
# a label then changes only for an image within 0.05 of the threshold (measured: 0.026 on real X-rays, for the
# recipe's CNN, tests/test_tflite.py).
FLOAT_TOLERANCE = 1e-4
INT8_TOLERANCE = 0.05


# TFLite's dynamic-range quantization keeps a weight tensor of fewer values in float (its default
# `min_elements_for_weights`).
_MIN_QUANTIZED_VALUES = 1024


def _traced(model, image_size: int):
  """The model's inference as one concrete function, which every conversion of it reads (a trace of a backbone takes
  seconds)."""
  signature = [tf.TensorSpec([None, image_size, image_size, 1], tf.uint8, name='image')]
  return tf.function(lambda images: model(images, training=False), input_signature=signature).get_concrete_function()


def _converter(function, select_tf_ops: bool, *, int8: bool):
  # Without the model as the trackable object: given it, the converter keeps the weights as resource variables that
  # the .tflite file never initializes (every probability NaN, measured with TF 2.21); without it, it freezes them.
  converter = tf.lite.TFLiteConverter.from_concrete_functions([function])
  converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS] + (
      [tf.lite.OpsSet.SELECT_TF_OPS] if select_tf_ops else [])
  if int8:
    converter.optimizations = [tf.lite.Optimize.DEFAULT]  # No representative dataset: dynamic-range int8.
  return converter


def convert(model, image_size: int, *, int8: bool = False) -> tuple[bytes, list[str]]:
  """Converts a uint8-in, probability-out Keras model to TFLite.

  Args:
    model: a model from `trainer.models.build_model` or `trainer.export.ensemble_model`.
    image_size: its input side.
    int8: dynamic-range quantization of the weights.

  Returns:
    (the .tflite bytes, the TensorFlow ops it needs from SELECT_TF_OPS, e.g. ['CropAndResize'], [] if none).
  """
  return _convert(_traced(model, image_size), int8=int8)


def _convert(function, *, int8: bool) -> tuple[bytes, list[str]]:
  try:
    return _converter(function, False, int8=int8).convert(), []
  except Exception:  # pylint: disable=broad-except  # The converter raises ConverterError, or others by version.
    content = _converter(function, True, int8=int8).convert()
  ops = sorted({op['op_name'] for op in _interpreter(content)._get_ops_details()})  # pylint: disable=protected-access
  return content, [op[len('Flex'):] for op in ops if op.startswith('Flex')]


def _interpreter(content: bytes):
  return tf.lite.Interpreter(model_content=content)


def has_int8_weights(content: bytes) -> bool:
  """Whether a .tflite model holds any int8 tensor (dynamic-range quantization stores the weights it quantized so)."""
  return any(t['dtype'] == np.int8 for t in _interpreter(content).get_tensor_details())


class TFLiteModel:
  """A .tflite model from `convert` as a function: uint8 images (batch, side, side, 1) -> probabilities (batch,).

  Not thread-safe (one interpreter, resized per batch size); one thread, or one instance per thread.
  """

  def __init__(self, content: bytes, *, threads: int | None = None):
    self._interpreter = tf.lite.Interpreter(model_content=content, num_threads=threads)
    self._input = self._interpreter.get_input_details()[0]
    self._output = self._interpreter.get_output_details()[0]
    self._batch = None
    self.image_size = int(self._input['shape'][1])

  def __call__(self, images: np.ndarray) -> np.ndarray:
    images = np.asarray(images, np.uint8)
    if images.shape[0] != self._batch:
      self._interpreter.resize_tensor_input(self._input['index'], images.shape)
      self._interpreter.allocate_tensors()
      self._batch = images.shape[0]
    self._interpreter.set_tensor(self._input['index'], images)
    self._interpreter.invoke()
    return self._interpreter.get_tensor(self._output['index'])[:, 0].astype(np.float32)


def load(path: str, **kwargs) -> TFLiteModel:
  """Reads a .tflite file as a `TFLiteModel` (kwargs: threads)."""
  with tf.io.gfile.GFile(path, 'rb') as f:
    return TFLiteModel(f.read(), **kwargs)


def load_export(folder: str, *, int8: bool = False, **kwargs) -> TFLiteModel:
  """The TFLite model of an export (its folder: `trainer.export.current_dir`), as `write` left it.

  Raises:
    errors.MissingPath: the export has no such model (made before TFLite, or int8 not kept: run.json says why).
    errors.InvalidValue: the model needs TensorFlow ops (Flex) that this Python's TFLite interpreter does not run.
  """
  name = INT8_FILE if int8 else FLOAT_FILE
  path = os.path.join(folder, name)
  with tf.io.gfile.GFile(os.path.join(folder, 'run.json')) as f:
    entry = json.load(f).get('tflite')
  if not entry or not tf.io.gfile.exists(path):
    why = (f' ({entry["error"]})' if entry and 'error' in entry else
           f' ({entry["int8"]["why"]})' if entry and int8 and 'why' in entry['int8'] else '')
    raise errors.MissingPath(f'{path}: no such file{why}; export the model again with trainer.export, or predict with '
                             '--runtime=keras.')
  if entry['float32']['select_tf_ops']:
    raise errors.InvalidValue(f'{path} needs the TensorFlow ops {", ".join(entry["float32"]["select_tf_ops"])} (Flex), '
                              'which TensorFlow\'s Python TFLite interpreter does not run: predict with '
                              '--runtime=keras.')
  return load(path, **kwargs)


def write(folder: str, model, image_size: int, sample_images: np.ndarray | None) -> dict:
  """Writes folder/model.tflite, and folder/model.int8.tflite if it quantizes a weight and stays within INT8_TOLERANCE
  on sample_images.

  Args:
    folder: the export's folder.
    model: the exported Keras model.
    image_size: its input side.
    sample_images: uint8 (n, side, side, 1) images of the run's data to check the TFLite models on (None: no check,
      no int8).

  Returns:
    run.json's 'tflite' entry: {'float32': {'file', 'bytes', 'select_tf_ops', 'max_difference'}, 'int8': the same,
    or {'kept': False, 'why'}}.

  Raises:
    RuntimeError: the float32 model disagrees with Keras beyond FLOAT_TOLERANCE on sample_images (a converter bug).
  """
  try:
    function = _traced(model, image_size)
    content, ops = _convert(function, int8=False)
  except Exception as e:  # pylint: disable=broad-except  # ConverterError, or others by TF version.
    # TFLite is an extra output: a model it cannot convert (TTA's antialiased zoom needs ScaleAndTranslate, neither a
    # built-in nor a Flex op) is exported without it, and run.json and the model card say why.
    custom = re.findall(r'Custom ops: ([\w, ]+)', str(e))
    return {'error': 'not convertible to TFLite' + (f': it needs {custom[0].strip()}, which TFLite has neither as a '
                                                     'built-in nor as a Flex op' if custom else '')}
  files.write_atomic(os.path.join(folder, FLOAT_FILE), content)
  entry = {'float32': {'file': FLOAT_FILE, 'bytes': len(content), 'select_tf_ops': ops}}
  if ops:
    # TensorFlow's pip package ships TFLite's interpreter without the Flex delegate (measured with TF 2.21), so no
    # Python here can run it: an Android app with tensorflow-lite-select-tf-ops can.
    entry['int8'] = {'kept': False, 'why': f'not checked: it needs the TensorFlow ops {", ".join(ops)} (Flex), '
                                           'which the Python TFLite interpreter does not run'}
    return entry
  if sample_images is None or not len(sample_images):
    entry['int8'] = {'kept': False, 'why': 'no sample images to check it on'}
    return entry
  # A plain call, not Keras's predict: under a multi-worker strategy that would wait on the other workers, which the
  # chief's export outlives.
  expected = np.asarray(model(sample_images, training=False))[:, 0]
  float_difference = float(np.max(np.abs(TFLiteModel(content)(sample_images) - expected)))
  if not float_difference <= FLOAT_TOLERANCE:  # NaN too.
    raise RuntimeError(f'The float32 TFLite model differs from Keras by {float_difference:.2g} in probability.')
  entry['float32']['max_difference'] = float_difference
  # Not converted when no weight could be quantized: the int8 model would hold the float one's weights (a test checks
  # it). Such a model differs from the float one in its conversion metadata alone, so its int8 tensors are counted.
  quantized = (None if max((np.prod(w.shape) for w in model.weights), default=0) < _MIN_QUANTIZED_VALUES
               else _convert(function, int8=True)[0])
  if quantized is None or not has_int8_weights(quantized):
    entry['int8'] = {'kept': False, 'why': 'no weight tensor large enough to quantize (TFLite keeps tensors of under '
                                           f'{_MIN_QUANTIZED_VALUES:,} values in float)'}
    return entry
  difference = float(np.max(np.abs(TFLiteModel(quantized)(sample_images) - expected)))
  if not difference <= INT8_TOLERANCE:
    entry['int8'] = {'kept': False, 'max_difference': difference,
                     'why': f'a probability moved by {difference:.3f} (> {INT8_TOLERANCE}) on {len(sample_images)} '
                            'sample images'}
    return entry
  files.write_atomic(os.path.join(folder, INT8_FILE), quantized)
  entry['int8'] = {'file': INT8_FILE, 'bytes': len(quantized), 'select_tf_ops': [], 'max_difference': difference,
                   'sample_images': len(sample_images)}
  return entry


def sample_images(builder, image_size: int, count: int = 64) -> np.ndarray:
  """The first `count` validation images of a run's dataset at its input side: what `write` checks the TFLite models
  on."""
  dataset = data.eval_dataset(builder, 'validation', image_size=image_size, batch_size=count, cache=False)
  return next(iter(dataset))['image'].numpy()
