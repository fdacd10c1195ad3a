"""The HTTP routes of `python -m trainer.serve` (FastAPI), over a `trainer.serve.Service`.

TF Serving's REST API (its paths, bodies and {"error": message} answers), so a client written for TF Serving works
unchanged:

    GET  /v1/models/NAME               the model's status (GetModelStatusResponse)
    GET  /v1/models/NAME/metadata      its signatures (GetModelMetadataResponse)
    POST /v1/models/NAME:predict       {"instances": [{"b64": ...}, ...]} -> {"predictions": [{"probability",
                                       "pneumonia", "threshold"}, ...]}, as the export's SavedModel answers

TF Serving answers a request with one bad instance with an error for the whole request; so does this server, and
its message names the instance (`instances[2]: not a JPEG, PNG or DICOM image`). Beyond TF Serving's API:

    POST /v1/models/NAME:gradcam       one image (the body's bytes, or a multipart/form-data file) -> its Grad-CAM
                                       overlay, a PNG
    GET  /v1/models/NAME/card          the model card's warnings and the operating point, for the page
    GET  /                             the page (trainer/serve/page.html)

Uploads are read into memory, up to `MAX_BODY_BYTES` (a larger body is refused with 413 as soon as its length is
known): multipart bodies are parsed in memory with python-multipart's streaming parser, not Starlette's form parser,
which spools files over 1 MB to a temporary file on disk.
"""

import importlib.resources

import fastapi
from fastapi import responses
import python_multipart
from python_multipart import multipart as multipart_lib
from starlette import concurrency
from starlette import exceptions as starlette_exceptions

from trainer import serve


class _TooLarge(Exception):
  pass


def _error(status: int, message: str) -> responses.JSONResponse:
  return responses.JSONResponse({'error': message}, status_code=status)


async def _body(request: fastapi.Request) -> bytes:
  """The request's body, refused past MAX_BODY_BYTES (before reading it when Content-Length says so)."""
  limit = serve.MAX_BODY_BYTES
  if int(request.headers.get('content-length') or 0) > limit:
    raise _TooLarge()
  chunks, size = [], 0
  async for chunk in request.stream():
    size += len(chunk)
    if size > limit:
      raise _TooLarge()
    chunks.append(chunk)
  return b''.join(chunks)


def _multipart_file(body: bytes, content_type: str) -> bytes:
  """The first file of a multipart/form-data body, parsed in memory.

  Raises:
    serve.BadRequest: no boundary, or no part with a filename.
  """
  _, options = multipart_lib.parse_options_header(content_type)
  if b'boundary' not in options:
    raise serve.BadRequest('a multipart/form-data body without a boundary')
  parts = []  # [header bytes, data] of each part.

  def extend(index):
    return lambda data, start, end: parts[-1][index].extend(data[start:end])

  callbacks = {'on_part_begin': lambda: parts.append((bytearray(), bytearray())),
               'on_header_field': extend(0), 'on_header_value': extend(0),
               'on_header_end': lambda: parts[-1][0].extend(b'\n'), 'on_part_data': extend(1)}
  parser = python_multipart.MultipartParser(options[b'boundary'], callbacks)
  parser.write(body)
  parser.finalize()
  for headers, data in parts:
    if b'filename=' in headers:
      return bytes(data)
  raise serve.BadRequest('a multipart/form-data body without a file (send the image as a file field)')


def create_app(service: serve.Service, model_name: str = 'cxr') -> fastapi.FastAPI:
  """The ASGI app serving `service` under /v1/models/{model_name}."""
  app = fastapi.FastAPI(title='cxr-trainer', docs_url=None, redoc_url=None, openapi_url=None)
  page = importlib.resources.files('trainer.serve').joinpath('page.html').read_text(encoding='utf-8')
  page = page.replace('{{MODEL_NAME}}', model_name)

  def check(name: str):
    if name != model_name:  # TF Serving's words for a model it does not serve.
      raise starlette_exceptions.HTTPException(404, f'Servable not found for request: Latest({name})')

  @app.exception_handler(serve.BadRequest)
  async def bad_request(request, error):  # pylint: disable=unused-argument
    return _error(400, str(error))

  @app.exception_handler(_TooLarge)
  async def too_large(request, error):  # pylint: disable=unused-argument
    return _error(413, f'the request body is over {serve.MAX_BODY_BYTES // (1024 * 1024)} MB')

  @app.exception_handler(starlette_exceptions.HTTPException)
  async def http_error(request, error):  # pylint: disable=unused-argument
    return _error(error.status_code, str(error.detail))

  @app.get('/', response_class=responses.HTMLResponse)
  async def index():
    return page

  @app.get('/v1/models/{name}')
  async def status(name: str):
    check(name)
    return service.status()

  @app.get('/v1/models/{name}/metadata')
  async def metadata(name: str):
    check(name)
    return await concurrency.run_in_threadpool(service.metadata, name)

  @app.get('/v1/models/{name}/card')
  async def card(name: str):
    check(name)
    return service.card()

  @app.post('/v1/models/{name}:predict')
  async def predict(name: str, request: fastapi.Request):
    check(name)
    encoded = serve.instances_bytes(await _body(request))

    def run():
      return service.predict([service.decode(raw, index=i) for i, raw in enumerate(encoded)])

    return {'predictions': await concurrency.run_in_threadpool(run)}

  @app.post('/v1/models/{name}:gradcam')
  async def gradcam(name: str, request: fastapi.Request):
    check(name)
    body, content_type = await _body(request), request.headers.get('content-type', '')
    if content_type.startswith('multipart/form-data'):
      body = _multipart_file(body, content_type)
    png = await concurrency.run_in_threadpool(lambda: service.gradcam_png(service.decode(body)))
    return responses.Response(png, media_type='image/png')

  return app
