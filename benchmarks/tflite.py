r"""Size and latency of the export's TFLite models on one CPU core, beside the Keras model's.

    taskset -c 0 python -m benchmarks.tflite --images=chest_xray/test

The model is launch/recipe.sh's CNN (128 pixels, 16 filters, depth 4, CLAHE), untrained (weights do not change the
time), converted by `trainer.tflite.convert`. Each runtime classifies one image at a time (as on a device), the TFLite
interpreter with one thread and TensorFlow with one intra-op and one inter-op thread; after 10 untimed calls, the
median of --repeats calls is reported. Prints one JSON line per runtime.
"""

import argparse
import json
import pathlib
import time

import numpy as np


def _median_ms(function, images, repeats):
  for image in images[:10]:
    function(image[None])
  times = []
  for i in range(repeats):
    started = time.perf_counter()
    function(images[i % len(images)][None])
    times.append(time.perf_counter() - started)
  return round(1000 * float(np.median(times)), 3)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--images', required=True, help='A folder of JPEG/PNG chest X-rays (searched recursively).')
  parser.add_argument('--repeats', type=int, default=200)
  args = parser.parse_args()
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  tf.config.threading.set_intra_op_parallelism_threads(1)
  tf.config.threading.set_inter_op_parallelism_threads(1)
  import keras  # pylint: disable=import-outside-toplevel

  from trainer import inference  # pylint: disable=import-outside-toplevel
  from trainer import models  # pylint: disable=import-outside-toplevel
  from trainer import predict  # pylint: disable=import-outside-toplevel
  from trainer import tflite  # pylint: disable=import-outside-toplevel

  files = sorted(p for p in pathlib.Path(args.images).rglob('*') if p.suffix.lower() in ('.jpeg', '.jpg', '.png'))
  images = np.stack([predict.read_image(str(f), [128])[128] for f in files[:64]])
  keras.utils.set_random_seed(1)
  model = models.build('cnn', image_size=128, cnn_filters=16, cnn_depth=4, equalize='clahe')
  keras_predict = inference.make_predict(model)
  print(json.dumps({'name': 'latency_keras', 'ms_per_image': _median_ms(keras_predict, images, args.repeats),
                    'bytes': int(sum(np.prod(w.shape) * 4 for w in model.weights)), 'note': 'bytes: float32 weights',
                    'threads': 1}), flush=True)
  expected = keras_predict(images).numpy()
  for int8 in (False, True):
    content, ops = tflite.convert(model, 128, int8=int8)
    runtime = tflite.TFLiteModel(content, threads=1)
    print(json.dumps({'name': 'latency_tflite_int8' if int8 else 'latency_tflite_float32',
                      'ms_per_image': _median_ms(runtime, images, args.repeats), 'bytes': len(content),
                      'select_tf_ops': ops, 'threads': 1,
                      'max_difference_from_keras': float(np.max(np.abs(runtime(images) - expected)))}), flush=True)


if __name__ == '__main__':
  main()
