r"""Throughput of `python -m trainer.serve` under concurrent clients, on loopback.

    python -m benchmarks.serve --images=chest_xray/test --clients=1,4,16 --requests=256

Serves --model_dir (default: an untrained copy of the recipe's exported ensemble, made in a temporary folder: two
members of launch/recipe.sh's CNN, 128 pixels, 16 filters, depth 4, CLAHE; weights do not change the time) as its own
process on 127.0.0.1, then, for each number of clients, sends --requests :predict requests of --per_request images
each from that many threads, each client keeping one request in flight. Prints one JSON line per number of clients:
images per second, and the request latencies' median and 95th percentile.
"""

import argparse
import base64
import concurrent.futures
import json
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import numpy as np


def _ensemble(folder: pathlib.Path) -> pathlib.Path:
  """An untrained export of the recipe's ensemble (flat layout: model.keras, run.json, saved_model/1)."""
  import keras  # pylint: disable=import-outside-toplevel

  from trainer import export  # pylint: disable=import-outside-toplevel
  from trainer import models  # pylint: disable=import-outside-toplevel

  members = []
  for seed in (1, 2):
    keras.utils.set_random_seed(seed)
    members.append(models.build('cnn', image_size=128, cnn_filters=16, cnn_depth=4, equalize='clahe'))
  model = export.ensemble_model(members)
  export.save_keras(model, str(folder / 'model.keras'))
  export.export_saved_model(model, str(folder / 'saved_model' / '1'), image_size=128, threshold=0.5)
  config = {'model': 'cnn', 'dataset': 'chest_xray_pneumonia/224', 'image_size': 128}
  (folder / 'run.json').write_text(json.dumps({'config': config, 'image_size': 128, 'threshold': 0.5,
                                               'threshold_rule': 'youden'}))
  return folder


def _start(model_dir, port):
  process = subprocess.Popen([sys.executable, '-m', 'trainer.serve', f'--model_dir={model_dir}', f'--port={port}'],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  base = f'http://127.0.0.1:{port}'
  for _ in range(600):
    if process.poll() is not None:
      raise SystemExit('trainer.serve exited; run it by hand to see why.')
    try:
      if httpx.get(f'{base}/v1/models/cxr', timeout=5).status_code == 200:
        return process, base
    except httpx.TransportError:
      time.sleep(0.5)
  raise SystemExit('trainer.serve did not answer in 5 minutes.')


def _load(base, bodies, clients, requests):
  """Sends `requests` bodies from `clients` threads; returns (seconds, [latency of each request])."""
  def one(i):
    started = time.perf_counter()
    answer = client.post(f'{base}/v1/models/cxr:predict', content=bodies[i % len(bodies)],
                         headers={'Content-Type': 'application/json'}, timeout=300)
    answer.raise_for_status()
    return time.perf_counter() - started

  with httpx.Client(limits=httpx.Limits(max_connections=clients)) as client:
    for i in range(clients):  # Warm-up: a connection per client.
      one(i)
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
      latencies = list(pool.map(one, range(requests)))
    return time.perf_counter() - started, latencies


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--images', required=True, help='A folder of JPEG/PNG chest X-rays (searched recursively).')
  parser.add_argument('--model_dir', help='A run or export to serve (default: the untrained recipe ensemble).')
  parser.add_argument('--clients', default='1,4,16', help='Numbers of concurrent clients, comma-separated.')
  parser.add_argument('--requests', type=int, default=256, help='Requests per number of clients.')
  parser.add_argument('--per_request', type=int, default=1, help='Images per request.')
  args = parser.parse_args()
  files = sorted(p for p in pathlib.Path(args.images).rglob('*') if p.suffix.lower() in ('.jpeg', '.jpg', '.png'))
  if not files:
    raise SystemExit(f'--images={args.images}: no JPEG or PNG files.')
  images = [base64.b64encode(p.read_bytes()).decode() for p in files[:256]]
  bodies = [json.dumps({'instances': [{'b64': images[(i + k) % len(images)]} for k in range(args.per_request)]})
            for i in range(len(images))]
  with tempfile.TemporaryDirectory() as scratch:
    model_dir = args.model_dir or _ensemble(pathlib.Path(scratch))
    with socket.socket() as s:
      s.bind(('127.0.0.1', 0))
      port = s.getsockname()[1]
    process, base = _start(model_dir, port)
    try:
      for clients in (int(n) for n in args.clients.split(',')):
        seconds, latencies = _load(base, bodies, clients, args.requests)
        print(json.dumps({'name': 'serve_predict', 'clients': clients, 'requests': args.requests,
                          'images_per_request': args.per_request,
                          'images_per_s': round(args.requests * args.per_request / seconds, 1),
                          'latency_ms_p50': round(1000 * float(np.median(latencies)), 1),
                          'latency_ms_p95': round(1000 * float(np.percentile(latencies, 95)), 1),
                          'model_dir': 'untrained recipe ensemble' if not args.model_dir else os.path.basename(
                              os.path.normpath(args.model_dir))}), flush=True)
    finally:
      process.terminate()
      process.wait(timeout=60)


if __name__ == '__main__':
  main()
