r"""Serving one exported model over HTTP: TF Serving's REST API, Grad-CAM overlays and a page to look at predictions.
The program, `python -m trainer.serve`, is trainer/serve/__main__.py; the HTTP routes are trainer/serve/app.py.

    python -m trainer.serve --model_dir=runs/ensemble                 # http://127.0.0.1:8501/
    curl -s localhost:8501/v1/models/cxr:predict -d "{\"instances\": [{\"b64\": \"$(base64 -w0 scan.jpeg)\"}]}"

`Service` is what the routes call: the model of a run or of `trainer.export`'s folder (an ensemble too), loaded with
`trainer.runs.load_run` (Keras's safe mode), at the threshold stored with it (`trainer.runs.operating_point`). Images
are decoded by `trainer.predict.decode_image_bytes`, the same decode as `trainer.predict`'s and the training
pipeline's; uploads stay in memory.

Concurrency: one lock around the model. TensorFlow already spreads one batch over every core (its intra-op
threads), so two batches at once only compete for the same cores and double the memory of the activations; the
lock also keeps the first calls, which trace the tf.functions, from tracing twice. A request of many images is one
batch. BENCHMARKS.md ("Serving") measures the throughput under concurrent clients.
"""

import base64
import binascii
from collections.abc import Sequence
import dataclasses
import json
import os
import threading

import numpy as np

from trainer import config as config_lib
from trainer import errors
from trainer import export
from trainer import gradcam as gradcam_lib
from trainer import inference
from trainer import predict
from trainer import runs as runs_lib

# The largest request body (a request of several images, base64 in JSON, is 4/3 of their bytes). A 4,300-pixel
# 16-bit DICOM radiograph is about 37 MB; the training JPEGs are tens of kB.
MAX_BODY_BYTES = 64 * 1024 * 1024
# Images per :predict request: each is decoded and held in memory at once.
MAX_INSTANCES = 64
# The model card's warnings (`trainer.export.model_card`), on the page beside every prediction.
NOT_A_DEVICE = 'Not a medical device: for research and teaching, not for diagnosing, triaging or treating anyone.'
POPULATION = ('Trained on paediatric (1 to 5 years) anterior-posterior chest X-rays of one hospital (Guangzhou); not '
              'tested on adults, lateral views, other hospitals\' machines or diseases other than pneumonia.')


class BadRequest(errors.InvalidValue):
  """A request the server answers with 400 and {"error": message}."""


@dataclasses.dataclass
class Service:
  """One served model at its threshold; thread-safe (see the module docstring).

  Attributes:
    model_dir: the run's or export's folder.
    run: its `trainer.runs.TrainedRun`.
    threshold: the stored decision threshold; threshold_rule the rule that chose it.
    version: the export's number (TF Serving's model version), 1 for a folder without numbered exports.
  """

  model_dir: str
  run: runs_lib.TrainedRun
  threshold: float
  threshold_rule: str
  version: int

  def __post_init__(self):
    self._lock = threading.Lock()
    self._predict = inference.make_predict(self.run.model)
    self._gradcam = gradcam_lib.make_ensemble_gradcam([(self.run.model, self.image_size)])
    # Traced now, before the first request: tracing takes seconds, and AutoGraph writes the Python it generates to
    # temporary files, which no request should do.
    blank = np.zeros([1, self.image_size, self.image_size, 1], np.uint8)
    self._predict(blank)
    self._gradcam({self.image_size: blank})

  @property
  def image_size(self) -> int:
    return self.run.image_size

  def decode(self, raw: bytes, *, index: int | None = None) -> np.ndarray:
    """One encoded image as the model takes it: uint8 (side, side, 1).

    Raises:
      BadRequest: not a readable JPEG, PNG or DICOM chest X-ray (naming instances[index] when given).
    """
    try:
      return predict.decode_image_bytes(raw, [self.image_size])[self.image_size]
    except predict.BadImageError as e:
      where = f'instances[{index}]: ' if index is not None else ''
      raise BadRequest(f'{where}{e}') from None

  def predict(self, images: Sequence[np.ndarray]) -> list[dict]:
    """TF Serving's predictions of the export's `serve` signature: [{'probability', 'pneumonia', 'threshold'}]."""
    with self._lock:
      probabilities = self._predict(np.stack(images)).numpy()
    return [{'probability': float(p), 'pneumonia': bool(p >= self.threshold), 'threshold': self.threshold}
            for p in probabilities]

  def gradcam_png(self, image: np.ndarray) -> bytes:
    """The Grad-CAM overlay of one image (of an ensemble: the mean of its members' maps), as PNG bytes."""
    with self._lock:
      heatmap = self._gradcam({self.image_size: image[None]})[0]
    return gradcam_lib.overlay_png(image, heatmap)

  def card(self) -> dict:
    """What the page shows beside every prediction: the model card's warnings and the operating point."""
    dataset = self.run.config.get('dataset')
    if data_warning := config_lib.data_warning(dataset):  # The synthetic images: no population, and it says so.
      warnings = [data_warning, NOT_A_DEVICE]
    elif str(dataset).startswith('chest_xray_pneumonia/'):
      warnings = [NOT_A_DEVICE, POPULATION]
    else:
      warnings = [NOT_A_DEVICE, f'Trained on {dataset}, not on the Kermany et al. chest X-rays: read its model card.']
    return {'warnings': warnings, 'threshold': self.threshold,
            'threshold_rule': self.threshold_rule, 'dataset': self.run.config.get('dataset'),
            'model': self.run.config.get('model'), 'image_size': self.image_size, 'version': self.version}

  def status(self) -> dict:
    """TF Serving's GetModelStatusResponse, as its REST API writes it."""
    return {'model_version_status': [{'version': str(self.version), 'state': 'AVAILABLE',
                                      'status': {'error_code': 'OK', 'error_message': ''}}]}

  def metadata(self, name: str) -> dict:
    """TF Serving's GetModelMetadataResponse: the SavedModel's signatures, as its REST API writes them."""
    return {'model_spec': {'name': name, 'signature_name': '', 'version': str(self.version)},
            'metadata': {'signature_def': {'signature_def': signature_defs(self.model_dir)}}}


def load(model_dir: str) -> Service:
  """Loads a run's or an export's model at its stored threshold.

  Raises:
    errors.MissingPath, errors.InvalidValue: as `trainer.runs.load_run`.
  """
  run = runs_lib.load_run(os.path.expanduser(model_dir))
  point = runs_lib.operating_point([run])
  number = os.path.basename(export.current_dir(run.model_dir))
  return Service(model_dir=run.model_dir, run=run, threshold=float(point['threshold']),
                 threshold_rule=point['threshold_rule'], version=int(number) if number.isdigit() else 1)


def signature_defs(model_dir: str) -> dict:
  """The SavedModel's SignatureDefs as JSON ({name: {inputs, outputs, method_name}}), read from saved_model.pb."""
  from google.protobuf import json_format  # pylint: disable=import-outside-toplevel
  from tensorflow.core.protobuf import saved_model_pb2  # pylint: disable=import-outside-toplevel

  path = os.path.join(export.saved_model_path(model_dir), 'saved_model.pb')
  with open(path, 'rb') as f:
    saved = saved_model_pb2.SavedModel.FromString(f.read())
  signatures = saved.meta_graphs[0].signature_def
  return {name: json_format.MessageToDict(signatures[name], preserving_proto_field_name=True)
          for name in sorted(signatures) if not name.startswith('__')}


def instances_bytes(body: bytes) -> list[bytes]:
  """The images of a TF Serving :predict request in the row format: {"instances": [{"b64": ...}, ...]}, or each
  instance named by the signature's input, {"image_bytes": {"b64": ...}}.

  Raises:
    BadRequest: not such a request (the message says what is wrong, and which instance).
  """
  try:
    request = json.loads(body)
  except (ValueError, UnicodeDecodeError) as e:
    raise BadRequest(f'the body is not JSON ({e})') from None
  instances = request.get('instances') if isinstance(request, dict) else None
  if not isinstance(instances, list) or not instances:
    raise BadRequest('the body must be {"instances": [{"b64": "<base64 of a JPEG, PNG or DICOM file>"}, ...]}')
  if len(instances) > MAX_INSTANCES:
    raise BadRequest(f'{len(instances)} instances; at most {MAX_INSTANCES} a request')
  images = []
  for i, instance in enumerate(instances):
    if isinstance(instance, dict) and set(instance) == {'image_bytes'}:
      instance = instance['image_bytes']
    if not (isinstance(instance, dict) and set(instance) == {'b64'} and isinstance(instance['b64'], str)):
      raise BadRequest(f'instances[{i}]: not {{"b64": "<base64 of the file>"}} (images are sent as base64 strings)')
    try:
      images.append(base64.b64decode(instance['b64'], validate=True))
    except (binascii.Error, ValueError) as e:
      raise BadRequest(f'instances[{i}]: bad base64 ({e})') from None
  return images
