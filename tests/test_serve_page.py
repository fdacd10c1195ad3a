"""`python -m trainer.serve` as a process on loopback: TF Serving's REST calls over a socket, and its page in a real
browser (Debian's chromium, driven by Playwright)."""

import base64
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import httpx
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
CHROMIUM = '/usr/bin/chromium'
CHROMIUM_ARGS = ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update',
                 '--no-first-run']


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.fixture(scope='module')
def server(untrained_exports, tmp_path_factory):
  """The served ensemble export: (base URL, its run.json)."""
  port = _free_port()
  log = tmp_path_factory.mktemp('serve') / 'server.log'
  with open(log, 'w') as out:
    process = subprocess.Popen([sys.executable, '-m', 'trainer.serve', f'--model_dir={untrained_exports["ensemble"]}',
                                f'--port={port}'], cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
  base = f'http://127.0.0.1:{port}'
  try:
    deadline = time.monotonic() + 300
    while True:
      assert process.poll() is None, log.read_text()[-3000:]
      try:
        if httpx.get(f'{base}/v1/models/cxr', timeout=5).status_code == 200:
          break
      except httpx.TransportError:
        pass
      assert time.monotonic() < deadline, log.read_text()[-3000:]
      time.sleep(1)
    yield base, json.loads((untrained_exports['ensemble'] / 'run.json').read_text())
  finally:
    process.terminate()
    process.wait(timeout=60)


def test_the_program_answers_tf_servings_predict_at_the_stored_threshold(server, synthetic_test_images):
  base, run = server
  instances = [{'b64': base64.b64encode(raw).decode()} for raw in synthetic_test_images[:4]]
  answer = httpx.post(f'{base}/v1/models/cxr:predict', json={'instances': instances}, timeout=60)
  assert answer.status_code == 200, answer.text
  predictions = answer.json()['predictions']
  assert len(predictions) == 4
  assert all(p['threshold'] == run['threshold'] and p['pneumonia'] == (p['probability'] >= run['threshold'])
             for p in predictions)
  bad = httpx.post(f'{base}/v1/models/cxr:predict', json={'instances': [*instances[:1], {'b64': 'AAAA'}]}, timeout=60)
  assert bad.status_code == 400
  assert bad.json() == {'error': 'instances[1]: not a JPEG, PNG or DICOM image'}


@pytest.fixture
def page(tmp_path, request):
  """A headless chromium page; its screenshot is kept in tmp_path when the test fails."""
  if not os.path.exists(CHROMIUM):
    pytest.skip(f'no {CHROMIUM}: apt-get install chromium (.ci/run installs it where apt exists)')
  from playwright.sync_api import sync_playwright  # pylint: disable=import-outside-toplevel
  with sync_playwright() as playwright:
    browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
    try:
      tab = browser.new_page()
      failed = request.session.testsfailed
      yield tab
      if request.session.testsfailed > failed:  # The test's call has been reported by now.
        tab.screenshot(path=str(tmp_path / 'page.png'), full_page=True)
        print(f'screenshot of the failed page: {tmp_path / "page.png"}')
    finally:
      browser.close()


def test_the_page_shows_the_label_the_probability_the_overlay_and_the_warnings(server, page, synthetic_test_images,
                                                                                tmp_path):
  base, run = server
  scan, broken = tmp_path / 'scan.png', tmp_path / 'broken.png'
  scan.write_bytes(synthetic_test_images[0])
  broken.write_bytes(synthetic_test_images[0][:200])
  page.goto(base + '/')
  page.wait_for_selector('#model-warnings li')
  page.set_input_files('#files', [str(scan), str(broken)])
  result = page.locator('.result[data-file="scan.png"]')
  label = result.locator('[data-testid=label]')
  label.wait_for(timeout=60_000)
  expected = httpx.post(f'{base}/v1/models/cxr:predict', timeout=60,
                        json={'instances': [{'b64': base64.b64encode(synthetic_test_images[0]).decode()}]})
  prediction = expected.json()['predictions'][0]
  assert label.text_content() == ('pneumonia' if prediction['pneumonia'] else 'normal')
  probability = result.locator('[data-testid=probability]').text_content()
  assert f'{prediction["probability"]:.3f}' in probability and f'threshold {run["threshold"]:.3f}' in probability
  overlay = result.locator('img[data-testid=overlay]')
  overlay.wait_for(timeout=60_000)
  page.wait_for_function('img => img.complete && img.naturalWidth > 0', arg=overlay.element_handle())
  assert overlay.evaluate('img => [img.naturalWidth, img.naturalHeight]') == [32, 32]
  warnings = result.locator('.warnings').text_content()
  assert 'procedural images, not chest X-rays' in warnings and 'Not a medical device' in warnings
  error = page.locator('.result[data-file="broken.png"] [data-testid=error]')
  error.wait_for(timeout=60_000)
  assert error.text_content().startswith('instances[0]: ')
