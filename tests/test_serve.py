"""Tests for trainer.serve in process: TF Serving's REST API (shapes, the stored threshold, errors), Grad-CAM
overlays of a run and of an ensemble, uploads kept in memory, concurrent clients."""

import asyncio
import base64
import dataclasses
import io
import json
import tempfile

import httpx
import numpy as np
from PIL import Image
import pytest

from trainer import export
from trainer import gradcam
from trainer import predict
from trainer import serve
from trainer.serve import app as app_lib

SIZE = 32


@pytest.fixture(scope='module')
def services(untrained_exports):
  return {name: serve.load(str(folder)) for name, folder in untrained_exports.items()}


@pytest.fixture(scope='module')
def clients(services):
  """{'run', 'ensemble'}: an async HTTP client of each served model, in process (no socket)."""
  return {name: app_lib.create_app(service, 'cxr') for name, service in services.items()}


def _request(app, method, url, **kwargs):
  async def call():
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url='http://serve') as client:
      return await client.request(method, url, **kwargs)
  return asyncio.run(call())


def _instances(images):
  return {'instances': [{'b64': base64.b64encode(raw).decode()} for raw in images]}


def _pixels(images):
  return np.stack([predict.decode_image_bytes(raw, [SIZE])[SIZE] for raw in images])


def test_status_and_metadata_have_tf_servings_shape(clients):
  status = _request(clients['run'], 'GET', '/v1/models/cxr')
  assert status.status_code == 200
  assert status.json() == {'model_version_status': [
      {'version': '1', 'state': 'AVAILABLE', 'status': {'error_code': 'OK', 'error_message': ''}}]}
  metadata = _request(clients['run'], 'GET', '/v1/models/cxr/metadata').json()
  assert metadata['model_spec'] == {'name': 'cxr', 'signature_name': '', 'version': '1'}
  signature = metadata['metadata']['signature_def']['signature_def'][export.SERVING_ENDPOINT]
  assert signature['inputs']['image_bytes']['dtype'] == 'DT_STRING'
  assert {name: output['dtype'] for name, output in signature['outputs'].items()} == {
      'probability': 'DT_FLOAT', 'pneumonia': 'DT_BOOL', 'threshold': 'DT_FLOAT'}
  missing = _request(clients['run'], 'GET', '/v1/models/other')
  assert missing.status_code == 404 and missing.json() == {'error': 'Servable not found for request: Latest(other)'}


@pytest.mark.parametrize('name', ['run', 'ensemble'])
def test_predict_answers_at_the_stored_threshold(clients, untrained_exports, synthetic_test_images, name):
  threshold = json.loads((untrained_exports[name] / 'run.json').read_text())['threshold']
  model = export.load_model(str(untrained_exports[name] / 'model.keras'))
  expected = model.predict(_pixels(synthetic_test_images), verbose=0)[:, 0]
  response = _request(clients[name], 'POST', '/v1/models/cxr:predict', json=_instances(synthetic_test_images))
  assert response.status_code == 200, response.text
  predictions = response.json()['predictions']
  assert [set(p) for p in predictions] == [{'probability', 'pneumonia', 'threshold'}] * len(expected)
  np.testing.assert_allclose([p['probability'] for p in predictions], expected, atol=1e-6)
  assert [p['pneumonia'] for p in predictions] == [bool(p >= threshold) for p in expected]
  assert {p['threshold'] for p in predictions} == {threshold}
  assert 0 < sum(p['pneumonia'] for p in predictions) < len(predictions)  # The median threshold: both labels.
  # The SavedModel's `serve` signature (what TF Serving would run) answers the same.
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  signature = tf.saved_model.load(export.saved_model_path(str(untrained_exports[name]))).signatures['serve']
  served = signature(image_bytes=tf.constant(synthetic_test_images))
  np.testing.assert_allclose(served['probability'].numpy(), expected, atol=1e-5)
  # An instance may name the signature's input, as TF Serving allows.
  named = {'instances': [{'image_bytes': instance} for instance in _instances(synthetic_test_images[:2])['instances']]}
  again = _request(clients[name], 'POST', '/v1/models/cxr:predict', json=named).json()['predictions']
  np.testing.assert_allclose([p['probability'] for p in again], expected[:2], atol=1e-6)


def _gif():
  out = io.BytesIO()
  Image.new('L', (64, 64)).save(out, format='GIF')
  return out.getvalue()


@pytest.mark.parametrize('body, status, message', [
    (b'not json', 400, 'the body is not JSON'),
    (b'{"inputs": []}', 400, 'the body must be {"instances"'),
    (b'{"instances": [{"b64": "%%%"}]}', 400, 'instances[0]: bad base64'),
    (b'{"instances": ["x"]}', 400, 'instances[0]: not {"b64"'),
])
def test_a_bad_request_is_one_json_error(clients, body, status, message):
  response = _request(clients['run'], 'POST', '/v1/models/cxr:predict', content=body)
  assert response.status_code == status and list(response.json()) == ['error']
  assert response.json()['error'].startswith(message), response.json()


def test_one_bad_image_fails_the_request_naming_it(clients, synthetic_test_images):
  good = synthetic_test_images[0]
  for bad, reason in ((good[:len(good) // 2], 'cannot decode'), (_gif(), 'a GIF image'),
                      (b'plain text', 'not a JPEG, PNG or DICOM image')):
    response = _request(clients['run'], 'POST', '/v1/models/cxr:predict', json=_instances([good, bad, good]))
    assert response.status_code == 400 and list(response.json()) == ['error'], response.text
    assert response.json()['error'].startswith('instances[1]: ') and reason in response.json()['error']
  cam = _request(clients['run'], 'POST', '/v1/models/cxr:gradcam', content=_gif())
  assert cam.status_code == 400 and 'a GIF image' in cam.json()['error']


def test_an_oversized_upload_is_refused_with_413(clients, synthetic_test_images, monkeypatch):
  monkeypatch.setattr(serve, 'MAX_BODY_BYTES', 1000)
  big = json.dumps(_instances(synthetic_test_images[:8])).encode()
  assert len(big) > 1000
  response = _request(clients['run'], 'POST', '/v1/models/cxr:predict', content=big)
  assert response.status_code == 413 and response.json() == {'error': 'the request body is over 0 MB'}

  async def chunks():  # No Content-Length: the limit holds while the body streams in.
    yield big[:600]
    yield big[600:]

  response = _request(clients['run'], 'POST', '/v1/models/cxr:gradcam', content=chunks())
  assert response.status_code == 413


def _noise_png(side):
  out = io.BytesIO()
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side), dtype=np.uint8)).save(out, format='PNG')
  return out.getvalue()


@pytest.mark.parametrize('name', ['run', 'ensemble'])
def test_gradcam_is_the_overlay_of_the_mean_map(clients, services, synthetic_test_images, name):
  members = gradcam.members(services[name].run.model)
  assert len(members) == (2 if name == 'ensemble' else 1)
  images = _pixels(synthetic_test_images)
  maps = np.mean([gradcam.make_gradcam(member, SIZE)(images).numpy() for member in members], axis=0)
  drawn = [i for i in range(len(images)) if maps[i].max() > 0][:3]
  assert drawn, 'no image with evidence to draw'
  for i in drawn:
    response = _request(clients[name], 'POST', '/v1/models/cxr:gradcam', content=synthetic_test_images[i])
    assert response.status_code == 200 and response.headers['content-type'] == 'image/png', response.text
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(response.content))),
                          np.asarray(Image.open(io.BytesIO(gradcam.overlay_png(images[i], maps[i])))))


def test_uploads_stay_in_memory(clients, tmp_path, monkeypatch):
  raw = _noise_png(1100)  # Over 1 MB: where Starlette's form parser would spool to a temporary file.
  assert len(raw) > 1024 * 1024
  monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path))
  for function in ('SpooledTemporaryFile', 'TemporaryFile', 'NamedTemporaryFile', 'mkstemp'):
    monkeypatch.setattr(tempfile, function, lambda *a, function=function, **k: pytest.fail(f'{function} called'))
  plain = _request(clients['ensemble'], 'POST', '/v1/models/cxr:gradcam', content=raw,
                   headers={'Content-Type': 'application/octet-stream'})
  form = _request(clients['ensemble'], 'POST', '/v1/models/cxr:gradcam',
                  files={'file': ('scan.png', raw, 'image/png')}, data={'note': 'a field before the file'})
  predicted = _request(clients['ensemble'], 'POST', '/v1/models/cxr:predict', json=_instances([raw]))
  assert plain.status_code == 200 and plain.content.startswith(b'\x89PNG'), plain.text
  assert form.content == plain.content and predicted.status_code == 200
  assert list(tmp_path.iterdir()) == []
  no_file = _request(clients['ensemble'], 'POST', '/v1/models/cxr:gradcam', data={'note': 'no file'},
                     files={'x': (None, b'field')})
  assert no_file.status_code == 400 and 'without a file' in no_file.json()['error']


def test_concurrent_clients_get_each_their_own_answer(clients, synthetic_test_images):
  app = clients['ensemble']
  alone = [_request(app, 'POST', '/v1/models/cxr:predict', json=_instances([raw])).json()['predictions'][0]
           for raw in synthetic_test_images]

  async def together():
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url='http://serve') as client:
      calls = [client.post('/v1/models/cxr:predict', json=_instances([raw])) for raw in synthetic_test_images * 3]
      calls += [client.post('/v1/models/cxr:gradcam', content=raw) for raw in synthetic_test_images[:4]]
      return await asyncio.gather(*calls)

  responses = asyncio.run(together())
  assert all(r.status_code == 200 for r in responses)
  assert [r.json()['predictions'][0] for r in responses[:-4]] == alone * 3
  assert all(r.content.startswith(b'\x89PNG') for r in responses[-4:])


def test_the_page_and_the_card(clients, services, untrained_exports):
  page = _request(clients['run'], 'GET', '/')
  assert page.status_code == 200 and page.headers['content-type'].startswith('text/html')
  assert "const MODEL = 'cxr';" in page.text
  card = _request(clients['run'], 'GET', '/v1/models/cxr/card').json()
  assert card['threshold'] == json.loads((untrained_exports['run'] / 'run.json').read_text())['threshold']
  assert card['warnings'][0].startswith('trained on chest_xray_pneumonia/synthetic')
  assert card['warnings'][1] == serve.NOT_A_DEVICE and len(card['warnings']) == 2
  real = dataclasses.replace(services['run'], run=dataclasses.replace(
      services['run'].run, config={**services['run'].run.config, 'dataset': 'chest_xray_pneumonia/224'}))
  assert real.card()['warnings'] == [serve.NOT_A_DEVICE, serve.POPULATION]
