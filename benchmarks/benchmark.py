r"""Throughput of the input pipeline against its peers, and whether training waits for its input.

  python -m benchmarks --manual_dir=~/cxr_manual/chest_xray
  python -m benchmarks --only=ours_warm,in_memory --steps=500

(from the repository root: benchmarks/ is not part of the installed package).

Prints one JSON line per measurement (name, images_per_s, images, seconds, cpu_ms_per_image, peak_rss_mb and context),
then a `targets` line: the ratios of ours over each peer, all from this run, and the checks of BENCHMARKS.md. Absolute
rates move from machine to machine; the ratios are what to compare.

What is measured, on the same images:
  build                        the TFDS build of --dataset from --manual_dir.
  ours_cold, ours_warm         trainer.data.train_dataset: the first pass from the TFRecords, then from its cache.
  ours_*_augmented             the same, then the model's 'augmentation' layer on each whole batch. In training that
                               layer runs inside the model, on the accelerator; here it runs on the host CPU.
  in_memory                    the warm bound: from_tensor_slices over the decoded uint8 images, shuffle, batch.
  raw_decode                   the cold bound: tf.data reads the JPEG files, decode_jpeg, resize when needed.
  peer_image_data_generator    the seed project's tf_keras ImageDataGenerator(...).flow_from_directory.
  peer_dataset_from_directory  keras.utils.image_dataset_from_directory, Keras augmentation layers in tf.data.map.
  decode_224/512/2048          one core's JPEG decode cost at each stored resolution (2048 stands for the originals).
  train_<model>                trainer.steps.make_train_step fed by the pipeline against one batch held in memory, for
                               the cnn and every backbone (head phase: the backbone frozen).
  train_step_recipe_model      launch/recipe.sh's model, one held batch: its step with Keras's old augmentation layers
                               against trainer/augment.py's, in float32 and mixed_bfloat16, and compiled with XLA.
  phase1_feature_cache         phase 1 of EfficientNet-Lite0 (ImageNet weights, frozen, no augmentation): an epoch of
                               the trainer's step from the images, the one-time feature pass (trainer.features), and
                               an epoch of the head from the cached features (benchmarks/feature_cache.py).
  train_loop_tiny              steps/s of trainer.train's loop at 32 steps a call (--steps_per_loop=32) against
                               Keras fit(steps_per_execution=32), on a tiny model where dispatch dominates.

Each pipeline is timed in several runs and the fastest is kept. A measurement and the bound or peer its target
compares it with (GROUPS) are timed in one process, their runs alternating, so that other processes on the machine
slow both alike and their ratio holds. Every other measurement, and every group, runs in a fresh spawned process (a
fork would inherit TF's thread pools): peak RSS is that process's own, and no pipeline's threads or caches linger into
the next. The cost is a few seconds of imports per process.
"""

import concurrent.futures
import contextlib
import dataclasses
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from benchmarks.feature_cache import phase1_feature_cache  # pylint: disable=g-importing-member
from cxr_tfds.chest_xray_pneumonia import imaging
from trainer import augment as augment_lib
from trainer import data
from trainer import errors
from trainer import layers
from trainer import models
from trainer import steps as steps_lib

AUTOTUNE = tf.data.AUTOTUNE

# The trainer's default (--shuffle_buffer); the in-memory bound shuffles with the same buffer.
SHUFFLE_BUFFER = 2048

# NVIDIA's TensorFlow ResNet50 (mixed precision, XLA) on one A100, images/s: the rate one GPU consumes.
A100_IMAGES_PER_S = 2400


# The side of train_loop_tiny's images: small enough that a step costs less than its dispatch.
TINY_SIDE = 8
# train_loop_tiny's calls of 32 steps per timed run: 2048 steps, about a second on two cores.
TINY_LOOPS = 64

# Source files sampled for the decode-cost measurements.
_DECODE_SAMPLE = 32


@dataclasses.dataclass(frozen=True)
class Setup:
  """What every measurement reads.

  Attributes:
    dataset: TFDS name with its config.
    data_dir: where the dataset is built (or already is).
    manual_dir: the Kaggle download, extracted: the peers read <manual_dir>/train/<class>/*.jpeg.
    image_size: side of the images the model takes.
    batch_size: images per batch, for every pipeline.
    steps: batches timed per pipeline measurement; None: each measurement's default (MEASUREMENTS).
    train_steps: training steps timed per input source (pipeline and in-memory), alternating.
    repeats: timed runs per pipeline measurement; the fastest is reported.
    seed: shuffles, augmentation and model initialisation.
    recipe_model: train_step_recipe_model's CNN in place of launch/recipe.sh's (RECIPE_MODEL), e.g.
      {'cnn_filters': 4, 'cnn_depth': 2}: for tests, which check the measurement's machinery on a model that
      compiles quickly. None (the command line's only value): the recipe's own model.
    loops: calls of the loop timed per run in train_loop_tiny, each of 32 steps (TINY_LOOPS by default).
  """

  dataset: str = 'chest_xray_pneumonia/224'
  data_dir: str | None = None
  manual_dir: str | None = None
  image_size: int = 224
  batch_size: int = 32
  steps: int | None = None
  train_steps: int = 10
  repeats: int = 3
  seed: int = 0
  recipe_model: dict | None = None
  loops: int | None = None


@dataclasses.dataclass
class _Timed:
  """A pipeline ready to be timed.

  Attributes:
    run: does the timed work on prepare()'s result and returns the number of images it produced.
    prepare: untimed work before each run (e.g. a new dataset, with an empty cache).
    fields: context for the JSON line.
  """

  run: Callable[[Any], int]
  prepare: Callable[[], Any] = lambda: None
  fields: dict = dataclasses.field(default_factory=dict)


def _batches(start, batches: int, *, warmup: int, **fields) -> _Timed:
  """Times `batches` batches of images from next_images = start(), after `warmup` untimed ones, in each run.

  Every run starts anew: an iterator left alive between runs would go on prefetching in the background, during
  the other pipeline's turn, and then hand its stock to its own timer.
  """

  def prepare():
    next_images = start()
    for _ in range(warmup):
      next_images()
    return next_images

  return _Timed(lambda next_images: sum(int(next_images().shape[0]) for _ in range(batches)), prepare, fields)


def _images_of(ds: tf.data.Dataset, pick=lambda batch: batch):
  """A `start` for _batches: each call makes a new iterator over `ds` and returns its next-images function."""

  def start():
    iterator = iter(ds)
    return lambda: pick(next(iterator))

  return start


def _rates(images: int, wall: float, cpu: float) -> dict:
  # process_time counts every thread of this process (tf.data's workers too) and no other process: cpu_ms_per_image
  # is the host's cost per image, and cores_busy (CPU over wall time) how much of the machine the pipeline used.
  return {'images': images, 'seconds': round(wall, 6), 'images_per_s': round(images / wall, 1),
          'cpu_ms_per_image': round(1000 * cpu / images, 4), 'cores_busy': round(cpu / wall, 2)}


def _time_alternately(timed: dict[str, _Timed], repeats: int) -> dict[str, dict]:
  """Times each pipeline `repeats` times, taking turns, and keeps each one's fastest run.

  The fastest run is the one other processes disturbed least, as timeit's documentation reasons; images_per_s_runs
  shows the spread. Taking turns spreads every pipeline's runs over the same stretch of time.
  """
  runs = {name: [] for name in timed}
  for _ in range(repeats):
    for name, pipeline in timed.items():
      state = pipeline.prepare()
      wall, cpu = time.perf_counter(), time.process_time()
      images = pipeline.run(state)
      runs[name].append((images, time.perf_counter() - wall, time.process_time() - cpu))
      del state  # Stops its iterator before the next pipeline's turn.
  return {name: {**_rates(*max(runs[name], key=lambda r: r[0] / r[1])),
                 'images_per_s_runs': [round(i / w, 1) for i, w, _ in runs[name]], **timed[name].fields}
          for name in timed}


def _builder(setup: Setup) -> tfds.core.DatasetBuilder:
  return data.prepare(setup.dataset, data_dir=setup.data_dir, manual_dir=setup.manual_dir)


def _train_folder(setup: Setup) -> str:
  """The Kaggle train folder the peers read; it must hold NORMAL/ and PNEUMONIA/."""
  folder = os.path.join(setup.manual_dir or '', 'train')
  if setup.manual_dir is None or not all(os.path.isdir(os.path.join(folder, c)) for c in ('NORMAL', 'PNEUMONIA')):
    raise FileNotFoundError(
        f'--manual_dir={setup.manual_dir}: the peers and the decode measurements read the extracted Kaggle folder, '
        f'<manual_dir>/train/{{NORMAL,PNEUMONIA}}/*.jpeg, which is not there. Unzip the download and pass the folder '
        f'that holds train/.')
  return folder


def _train_files(setup: Setup) -> list[str]:
  files = sorted(tf.io.gfile.glob(os.path.join(_train_folder(setup), '*', '*.jpeg')))
  if not files:
    raise FileNotFoundError(f'No *.jpeg files in {_train_folder(setup)}/<class>/.')
  return files


def _augmentation_layer(setup: Setup) -> keras.layers.Layer:
  """The model's own 'augmentation' block (trainer.models): the same for every model."""
  return models.build('cnn', image_size=setup.image_size, seed=setup.seed).get_layer('augmentation')


def _augment(setup: Setup):
  """The model's augmentation, as a tf.function on whole uint8 batches, traced before it is timed."""
  layer = _augmentation_layer(setup)
  augment = tf.function(lambda images: layer(images, training=True))
  augment(tf.zeros([setup.batch_size, setup.image_size, setup.image_size, 1], tf.uint8))
  return augment


def _epoch(builder: tfds.core.DatasetBuilder, setup: Setup) -> int:
  """Full batches in one pass over the training split."""
  return builder.info.splits['train'].num_examples // setup.batch_size


def build(setup: Setup, batches: int) -> dict:
  """Builds the dataset from the manual dir, once; into a temporary data_dir if it is already built in setup's."""
  del batches  # A build is all of the images.
  with contextlib.ExitStack() as stack:
    data_dir = setup.data_dir
    if tfds.builder(setup.dataset, data_dir=data_dir).is_prepared():
      data_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix='cxr_benchmark_build_'))
    wall, cpu = time.perf_counter(), time.process_time()
    builder = data.prepare(setup.dataset, data_dir=data_dir, manual_dir=setup.manual_dir)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
  splits = {name: split.num_examples for name, split in builder.info.splits.items()}
  return {**_rates(sum(splits.values()), wall, cpu), 'splits': splits}


def _ours(setup: Setup, batches: int, *, warm: bool, augment: bool) -> _Timed:
  builder = _builder(setup)
  epoch = _epoch(builder, setup)
  augment_batch = _augment(setup) if augment else (lambda images: images)
  fields = {'pass': 'warm: from the cache' if warm else 'cold: first pass, from the TFRecords'}
  if augment:
    fields['augmentation'] = "the model's layer on whole batches, on the host CPU (in training: the accelerator)"

  def pipeline():
    return data.train_dataset(builder, image_size=setup.image_size, global_batch=setup.batch_size, seed=setup.seed,
                              shuffle_buffer=SHUFFLE_BUFFER)

  if warm:
    ds = pipeline()
    # The cache is complete once the shuffle has drawn the whole first pass, and later iterators share it.
    iterator = iter(ds)
    for _ in range(epoch + 2):
      next(iterator)
    del iterator
    # Each run's warm-up refills the shuffle buffer from the cache.
    return _batches(_images_of(ds, lambda batch: augment_batch(batch[0])), batches,
                    warmup=SHUFFLE_BUFFER // setup.batch_size + 2, **fields)
  batches = min(batches, epoch)  # Beyond one pass it is no longer cold.

  def first_pass(ds):
    iterator = iter(ds)
    return sum(int(augment_batch(next(iterator)[0]).shape[0]) for _ in range(batches))

  # A new dataset for each run: a new, empty cache.
  return _Timed(first_pass, prepare=pipeline, fields=fields)


def ours_cold(setup: Setup, batches: int) -> _Timed:
  return _ours(setup, batches, warm=False, augment=False)


def ours_warm(setup: Setup, batches: int) -> _Timed:
  return _ours(setup, batches, warm=True, augment=False)


def ours_cold_augmented(setup: Setup, batches: int) -> _Timed:
  return _ours(setup, batches, warm=False, augment=True)


def ours_warm_augmented(setup: Setup, batches: int) -> _Timed:
  return _ours(setup, batches, warm=True, augment=True)


def in_memory(setup: Setup, batches: int) -> _Timed:
  """The warm bound: the training split's decoded uint8 images in one array, shuffled and batched."""
  builder = _builder(setup)
  split = data.eval_dataset(builder, 'train', image_size=setup.image_size, batch_size=256, cache=False)
  examples = list(tfds.as_numpy(split))
  images = np.concatenate([ex['image'] for ex in examples])
  labels = np.concatenate([ex['label'] for ex in examples])
  ds = tf.data.Dataset.from_tensor_slices((images, labels)).shuffle(SHUFFLE_BUFFER, seed=setup.seed).repeat()
  ds = ds.batch(setup.batch_size, drop_remainder=True).prefetch(AUTOTUNE)
  return _batches(_images_of(ds, lambda batch: batch[0]), batches, warmup=SHUFFLE_BUFFER // setup.batch_size + 2,
                  array_mb=round(images.nbytes / 2**20, 1))


def raw_decode(setup: Setup, batches: int) -> _Timed:
  """The cold bound: read the JPEG files, decode to one channel, resize only images not at the model's size."""
  files = _train_files(setup)
  size = setup.image_size

  def decode(path):
    image = tf.io.decode_jpeg(tf.io.read_file(path), channels=1)
    # The trainer resizes only what is not stored at the model's size (trainer.data._read), and so does the bound.
    image = tf.cond(tf.reduce_all(tf.shape(image)[:2] == size), lambda: image,
                    lambda: data.resize_uint8(image, size))
    return tf.ensure_shape(image, [size, size, 1])

  ds = tf.data.Dataset.from_tensor_slices(files).shuffle(len(files), seed=setup.seed).repeat()
  ds = ds.map(decode, num_parallel_calls=AUTOTUNE).batch(setup.batch_size, drop_remainder=True).prefetch(AUTOTUNE)
  return _batches(_images_of(ds), batches, warmup=2, files=len(files))


def peer_image_data_generator(setup: Setup, batches: int) -> _Timed | dict:
  """The seed project's pipeline: Keras 2's ImageDataGenerator, whose random transforms are scipy's."""
  try:
    import scipy  # noqa: F401  (the generator's random transforms)  pylint: disable=import-outside-toplevel
    import tf_keras  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    return {'skipped': f'{e.name} is not installed: pip install -e .[bench]'}
  # The same ranges as the model's augmentation layers (trainer.models): 10 degrees, 10% zoom, 5% shifts.
  generator = tf_keras.preprocessing.image.ImageDataGenerator(
      rescale=1 / 255, rotation_range=10, zoom_range=0.1, width_shift_range=0.05, height_shift_range=0.05)
  flow = generator.flow_from_directory(_train_folder(setup), target_size=(setup.image_size, setup.image_size),
                                       color_mode='grayscale', class_mode='binary', batch_size=setup.batch_size,
                                       seed=setup.seed)
  # A plain Python iterator: it does nothing between calls, so one serves every run.
  return _batches(lambda: lambda: next(flow)[0], batches, warmup=2, files=flow.samples)


def peer_dataset_from_directory(setup: Setup, batches: int) -> _Timed:
  """keras.io's recipe: image_dataset_from_directory, then Keras augmentation layers in tf.data.map."""
  layer = _augmentation_layer(setup)
  ds = keras.utils.image_dataset_from_directory(
      _train_folder(setup), image_size=(setup.image_size, setup.image_size), batch_size=setup.batch_size,
      color_mode='grayscale', seed=setup.seed, verbose=False)
  ds = ds.repeat().map(lambda images, labels: (layer(images, training=True), labels), num_parallel_calls=AUTOTUNE)
  return _batches(_images_of(ds.prefetch(AUTOTUNE), lambda batch: batch[0]), batches, warmup=2,
                  augmentation="the model's layers, in tf.data.map, on whole batches")


def _decode(setup: Setup, batches: int, *, size: int, resize: bool) -> _Timed:
  """One core's cost to decode a JPEG stored at `size` (encoded as the builder stores it: imaging.to_jpeg).

  With `resize`, the image is then resized to the model's size, as the trainer does for the original config.
  """
  files = _train_files(setup)
  sample = files[::max(1, len(files) // _DECODE_SAMPLE)][:_DECODE_SAMPLE]
  jpegs = [imaging.to_jpeg(tf.io.gfile.GFile(f, 'rb').read(), size) for f in sample]

  def decode(jpeg):
    image = tf.io.decode_jpeg(jpeg, channels=1)
    return data.resize_uint8(image, setup.image_size) if resize else image

  # One thread for the whole pipeline, so that the rate is one core's: tf.data parallelizes even a plain map itself.
  options = tf.data.Options()
  options.threading.private_threadpool_size = 1
  options.threading.max_intra_op_parallelism = 1
  ds = tf.data.Dataset.from_tensor_slices(jpegs).repeat().map(decode).batch(setup.batch_size).with_options(options)
  return _batches(_images_of(ds), batches, warmup=1, stored_side=size,
                  resized_to=setup.image_size if resize else None,
                  jpeg_kb=round(sum(map(len, jpegs)) / len(jpegs) / 1024, 1), sample_files=len(jpegs))


def _train(setup: Setup, *, model_name: str) -> dict:
  """Times the trainer's own step on one device, fed by the pipeline and by one batch held in memory, alternately."""
  builder = _builder(setup)
  strategy = tf.distribute.OneDeviceStrategy('/cpu:0')
  keras.utils.set_random_seed(setup.seed)
  with strategy.scope():
    # Built as the trainer builds it: a backbone comes back in phase 'head', frozen.
    model = models.build(model_name, image_size=setup.image_size, seed=setup.seed)
    optimizer = steps_lib.make_optimizer('adam', 1e-3, loss_scale=False)
    # Its slots made now, as the trainer makes them: created in the step's first call, they make tf.function trace
    # the step a second time.
    optimizer.build(model.trainable_variables)
    metrics = steps_lib.train_metrics()
  step = steps_lib.make_train_step(model, optimizer, metrics, strategy, class_weights=[1.0, 1.0],
                               global_batch=setup.batch_size)

  def pipeline(input_context):
    return data.train_dataset(builder, image_size=setup.image_size, global_batch=setup.batch_size, seed=setup.seed,
                              shuffle_buffer=SHUFFLE_BUFFER, input_context=input_context)

  # The in-memory source: one batch of the same images, repeated.
  held = next(iter(data.eval_dataset(builder, 'train', image_size=setup.image_size, batch_size=setup.batch_size,
                                     cache=False)))
  held = (held['image'], held['label'])
  iterators = {
      'pipeline': iter(strategy.distribute_datasets_from_function(pipeline)),
      'in_memory': iter(strategy.distribute_datasets_from_function(
          lambda _: tf.data.Dataset.from_tensors(held).repeat())),
  }
  for iterator in iterators.values():  # Traces the step, and fills the pipeline's shuffle buffer.
    step(iterator)
  seconds = {source: [] for source in iterators}
  # Alternating single steps, so that a change in the machine's load hits both steps of a pair alike; the median
  # pair ignores the pairs that a burst of another process split.
  for _ in range(setup.train_steps):
    for source, iterator in iterators.items():
      start = time.perf_counter()
      step(iterator)
      metrics['loss'].result().numpy()  # Waits for the step.
      seconds[source].append(time.perf_counter() - start)
  step_s = {source: float(np.median(s)) for source, s in seconds.items()}
  ratio = float(np.median(np.divide(seconds['in_memory'], seconds['pipeline'])))
  return {'images': setup.train_steps * setup.batch_size, 'seconds': round(sum(seconds['pipeline']), 6),
          'images_per_s': round(setup.batch_size / step_s['pipeline'], 1),
          'in_memory_images_per_s': round(setup.batch_size / step_s['in_memory'], 1),
          'step_ms_pipeline': round(1000 * step_s['pipeline'], 1),
          'step_ms_in_memory': round(1000 * step_s['in_memory'], 1),
          'ratio': round(ratio, 3),
          'trainable': 'head only (backbone frozen)' if model_name != 'cnn' else 'all layers',
          'device': 'host CPU, float32', 'pipeline_pass': 'cold: the first steps of the first pass'}


def keras_layers_augmentation(strength: float, seed: int | None) -> keras.Sequential:
  """The augmentation block as it was before trainer/augment.py: Keras's three geometric layers, each resampling.

  Kept for the old-against-new step measurement below and tests/test_augment.py's comparison of their
  distributions, nowhere else.
  """
  seeds = iter(range(seed, seed + 8)) if seed is not None else iter([None] * 8)
  geometric = dict(fill_mode='constant', dtype='float32')
  return keras.Sequential([
      keras.layers.RandomRotation(strength * 10 / 360, seed=next(seeds), name='rotation', **geometric),
      keras.layers.RandomZoom(strength * 0.1, seed=next(seeds), name='zoom', **geometric),
      keras.layers.RandomTranslation(strength * 0.05, strength * 0.05, seed=next(seeds), name='translation',
                                     **geometric),
      keras.layers.RandomContrast((strength * 0.1, strength * 0.1), seed=next(seeds), dtype='float32',
                                  name='contrast'),
      keras.layers.RandomBrightness(strength * 0.1, seed=next(seeds), dtype='float32', name='brightness'),
      augment_lib.PixelNoise(strength * 4, seed=next(seeds), dtype='float32', name='noise'),
  ], name='augmentation')


# launch/recipe.sh's model: the cnn from scratch at 128 pixels, 16 filters, 4 blocks, CLAHE.
RECIPE_MODEL = dict(image_size=128, cnn_filters=16, cnn_depth=4, equalize='clahe')


def _recipe_model(augmentation: str, seed: int, image_size: int, **changes) -> keras.Model:
  """RECIPE_MODEL at `image_size`, with `changes` to its other settings, and its old, its fused or no augmentation."""
  model = models.build('cnn', seed=seed, **{**RECIPE_MODEL, **changes, 'image_size': image_size})
  if augmentation == 'fused':
    return model
  if augmentation == 'none':  # The floor no augmentation, however fast, can go below.
    return keras.models.clone_model(model, clone_function=lambda layer: (
        keras.layers.Identity(name=layer.name) if layer.name == 'augmentation'
        else layer.__class__.from_config(layer.get_config())))

  # The same model as before: the old block in place of the new one, and CLAHE uncompiled.
  def old(layer):
    if layer.name == 'augmentation':
      return keras_layers_augmentation(1.0, seed)
    clone = layer.__class__.from_config(layer.get_config())
    if isinstance(clone, layers.Equalize):
      clone._compiled = clone._equalize  # pylint: disable=protected-access
    return clone

  return keras.models.clone_model(model, clone_function=old)


def train_step_recipe_model(setup: Setup, batches: int) -> dict:
  """The recipe's model: trainer.steps.make_train_step with the old augmentation against the fused one, in float32
  and mixed_bfloat16, and the fused model's step compiled with XLA (jit_compile); one held batch, the
  variants taking turns step by step. At the recipe's 128 pixels, or --image_size if smaller (the tests' tiny
  images); the recipe's CNN, or setup.recipe_model's (the tests' tiny one)."""
  del batches
  size, batch = min(RECIPE_MODEL['image_size'], setup.image_size), setup.batch_size
  changes = setup.recipe_model or {}
  images = tf.constant(np.random.default_rng(setup.seed).integers(0, 256, (batch, size, size, 1), np.uint8))
  labels = tf.constant(np.arange(batch) % 2, tf.int64)
  strategy = tf.distribute.OneDeviceStrategy('/cpu:0')
  variants = {}
  # XLA: the same step as the trainer's, compiled (steps.make_train_step's jit_compile).
  for augmentation, policy, xla in (('keras_layers', 'float32', False), ('fused', 'float32', False),
                                    ('keras_layers', 'mixed_bfloat16', False), ('fused', 'mixed_bfloat16', False),
                                    ('none', 'float32', False), ('fused', 'float32', True)):
    keras.mixed_precision.set_global_policy(policy)
    try:
      with strategy.scope():
        model = _recipe_model(augmentation, setup.seed, size, **changes)
        optimizer = steps_lib.make_optimizer('adam', 1e-3, loss_scale=False)
        optimizer.build(model.trainable_variables)  # As _train's: one trace of the step, not two.
        metrics = steps_lib.train_metrics()
    finally:
      keras.mixed_precision.set_global_policy('float32')
    step = steps_lib.make_train_step(model, optimizer, metrics, strategy, class_weights=[1.0, 1.0], global_batch=batch,
                                 jit_compile=xla)
    iterator = iter(strategy.distribute_datasets_from_function(
        lambda _: tf.data.Dataset.from_tensors((images, labels)).repeat()))
    variants[f'{augmentation}_{policy}' + ('_xla' if xla else '')] = (
        lambda step=step, iterator=iterator, metrics=metrics: (step(iterator), metrics['loss'].result().numpy()))
  for run in variants.values():  # Traces (and compiles) each.
    run()
  seconds = {name: [] for name in variants}
  for _ in range(setup.train_steps):
    for name, run in variants.items():
      start = time.perf_counter()
      run()
      seconds[name].append(time.perf_counter() - start)
  step_ms = {name: round(1000 * float(np.median(s)), 1) for name, s in seconds.items()}
  best = min((name for name in step_ms if name.startswith('fused')), key=step_ms.get)
  return {'images': setup.train_steps * batch, 'seconds': round(sum(seconds['fused_float32']), 6),
          'images_per_s': round(1000 * batch / step_ms['fused_float32'], 1), 'step_ms': step_ms,
          'fastest': best, 'ratio': round(step_ms['keras_layers_float32'] / step_ms[best], 3),
          'float32_ceiling': round(step_ms['keras_layers_float32'] / step_ms['none_float32'], 3),
          'model': {'name': 'cnn', **RECIPE_MODEL, **changes, 'image_size': size, 'batch_size': batch},
          'device': 'host CPU',
          'note': 'ratio: the old layers in float32 (the trainer before) over the fastest fused variant; '
                  'float32_ceiling: the old layers over no augmentation at all, the most a faster augmentation '
                  'alone can win in float32'}


def train_cnn(setup: Setup, batches: int) -> dict:
  del batches  # Steps come from setup.train_steps.
  return _train(setup, model_name='cnn')


def train_resnet50(setup: Setup, batches: int) -> dict:
  del batches
  return _train(setup, model_name='resnet50')


def train_efficientnetb0(setup: Setup, batches: int) -> dict:
  del batches
  return _train(setup, model_name='efficientnetb0')


def train_densenet121(setup: Setup, batches: int) -> dict:
  del batches
  return _train(setup, model_name='densenet121')


def _tiny_model(seed: int) -> keras.Model:
  keras.utils.set_random_seed(seed)
  return keras.Sequential([keras.Input((TINY_SIDE, TINY_SIDE, 1)), keras.layers.Flatten(),
                           keras.layers.Dense(1, activation='sigmoid')])


def train_loop_tiny(setup: Setup, batches: int) -> dict:
  """Steps per second of the trainer's loop at --steps_per_loop=32 against Keras's fit(steps_per_execution=32), on a
  model so small that the host's dispatch of each call is what is timed: the same model, optimizer, metrics, class
  weights and batches held in memory, timed in turns."""
  del batches
  per_loop, loops = 32, setup.loops or TINY_LOOPS
  rng = np.random.default_rng(setup.seed)
  images = rng.uniform(0, 255, (8 * setup.batch_size, TINY_SIDE, TINY_SIDE, 1)).astype(np.float32)
  labels = rng.integers(0, 2, len(images)).astype(np.int32)
  dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(setup.batch_size, drop_remainder=True).cache()
  dataset = dataset.repeat()

  strategy = tf.distribute.OneDeviceStrategy('/cpu:0')
  with strategy.scope():
    ours_model = _tiny_model(setup.seed)
    optimizer = steps_lib.make_optimizer('adam', 1e-3, loss_scale=False)
    optimizer.build(ours_model.trainable_variables)
    metrics = steps_lib.train_metrics()
  step = steps_lib.make_train_step(ours_model, optimizer, metrics, strategy, class_weights=[1.0, 1.0],
                               global_batch=setup.batch_size)
  iterator = steps_lib.training_iterator(strategy, lambda input_context: dataset)
  steps = tf.constant(per_loop)

  def ours():
    for _ in range(loops):
      step(iterator, steps)
    metrics['loss'].result().numpy()  # Waits for the steps.

  keras_model = _tiny_model(setup.seed)
  keras_model.compile(optimizer=keras.optimizers.Adam(1e-3), loss='binary_crossentropy',
                      metrics=[metric for name, metric in steps_lib.train_metrics().items() if name != 'loss'],
                      steps_per_execution=per_loop)

  def keras_fit():
    keras_model.fit(dataset, steps_per_epoch=per_loop * loops, epochs=1, verbose=0, class_weight={0: 1.0, 1: 1.0})

  seconds = {'ours': [], 'keras_fit': []}
  for timed in (ours, keras_fit):  # Traces, and warms the cache.
    timed()
  for _ in range(setup.repeats):
    for name, timed in (('ours', ours), ('keras_fit', keras_fit)):
      start = time.perf_counter()
      timed()
      seconds[name].append(time.perf_counter() - start)
  steps_per_s = {name: per_loop * loops / min(s) for name, s in seconds.items()}
  return {'images': per_loop * loops * setup.batch_size, 'seconds': round(min(seconds['ours']), 6),
          'images_per_s': round(steps_per_s['ours'] * setup.batch_size, 1),
          'steps_per_s': round(steps_per_s['ours'], 1), 'keras_fit_steps_per_s': round(steps_per_s['keras_fit'], 1),
          'ratio': round(steps_per_s['ours'] / steps_per_s['keras_fit'], 3), 'steps_per_loop': per_loop,
          'model': f'Flatten + Dense(1) on {TINY_SIDE}x{TINY_SIDE}x1, Adam, the trainer\'s six metrics',
          'device': 'host CPU, float32'}


def decode_224(setup: Setup, batches: int) -> _Timed:
  return _decode(setup, batches, size=224, resize=False)


def decode_512(setup: Setup, batches: int) -> _Timed:
  """A model trained on the 512 config takes 512-pixel images: decode only."""
  return _decode(setup, batches, size=512, resize=False)


def decode_2048(setup: Setup, batches: int) -> _Timed:
  """Stands for the original config: 2048-pixel JPEGs (upscaled), decoded and resized to the model's size."""
  return _decode(setup, batches, size=2048, resize=True)


# name -> (function, batches per timed run by default: about a second on two cores). In run order: the build first,
# so that the rest read what it built. A function returns a _Timed pipeline, or a finished line (build, training).
MEASUREMENTS = {
    'build': (build, None),
    'ours_cold': (ours_cold, 10**6),  # Capped at one pass.
    'raw_decode': (raw_decode, 150),
    'ours_warm': (ours_warm, 1500),
    'in_memory': (in_memory, 1500),
    'ours_warm_augmented': (ours_warm_augmented, 20),
    'peer_dataset_from_directory': (peer_dataset_from_directory, 20),
    'ours_cold_augmented': (ours_cold_augmented, 40),
    'peer_image_data_generator': (peer_image_data_generator, 8),
    'decode_224': (decode_224, 60),
    'decode_512': (decode_512, 20),
    'decode_2048': (decode_2048, 4),
    'train_cnn': (train_cnn, None),
    'train_resnet50': (train_resnet50, None),
    'train_efficientnetb0': (train_efficientnetb0, None),
    'train_densenet121': (train_densenet121, None),
    'train_step_recipe_model': (train_step_recipe_model, None),
    'phase1_feature_cache': (phase1_feature_cache, None),  # None: whole epochs.
    'train_loop_tiny': (train_loop_tiny, None),
}

# Timed together, in one process, taking turns: each target's two sides (TARGETS).
GROUPS = (('ours_cold', 'raw_decode'), ('ours_warm', 'in_memory'),
          ('ours_warm_augmented', 'peer_dataset_from_directory'))

# Measurements that read <manual_dir>/train directly.
_READ_FILES = ('raw_decode', 'peer_image_data_generator', 'peer_dataset_from_directory', 'decode_224', 'decode_512',
               'decode_2048')

# (numerator, denominator): ours over each peer.
RATIOS = (
    ('ours_warm', 'in_memory'),
    ('ours_cold', 'raw_decode'),
    ('ours_warm', 'peer_image_data_generator'),
    ('ours_warm', 'peer_dataset_from_directory'),
    ('ours_cold', 'peer_dataset_from_directory'),
    ('ours_warm_augmented', 'peer_image_data_generator'),
    ('ours_warm_augmented', 'peer_dataset_from_directory'),
)

# (what, numerator, denominator or None for the line's own 'ratio', target minimum, note or None).
TARGETS = (
    ('warm pipeline / in-memory pipeline', 'ours_warm', 'in_memory', 0.8, None),
    ('cold pipeline / raw decode bound', 'ours_cold', 'raw_decode', 0.8,
     'the cold pass also fills the cache and the shuffle buffer; the bound does neither'),
    ('cnn step throughput, pipeline-fed / in-memory-fed', 'train_cnn', None, 0.95, None),
    ('resnet50 step throughput, pipeline-fed / in-memory-fed', 'train_resnet50', None, 0.95, None),
    ("the recipe's model: step with the old augmentation layers / the fastest new step", 'train_step_recipe_model',
     None, 1.5, None),
    ('steps/s at --steps_per_loop=32 / Keras fit(steps_per_execution=32), tiny model', 'train_loop_tiny', None, 1.0,
     'a model this small times the host\'s dispatch per call, which many steps per call amortise'),
    ('phase-1 epoch time, from the images / from cached features (EfficientNet-Lite0, frozen)',
     'phase1_feature_cache', None, 50.0, 'after the one-time feature pass (its line\'s feature_pass)'),
    ('augmentation (host CPU, batched) / Keras layers in tf.data', 'ours_warm_augmented',
     'peer_dataset_from_directory', 10.0,
     'ours runs in the model, so on an accelerator the host does none; here the same Keras layers run on the host'),
)


def validate(setup: Setup, names: list[str]) -> None:
  """Checks the arguments before anything is measured.

  Raises:
    ValueError: an unknown measurement or dataset, or a size or count below 1.
    FileNotFoundError: a selected measurement reads the Kaggle folder and --manual_dir does not hold it.
  """
  unknown = [name for name in names if name not in MEASUREMENTS]
  if unknown or not names:
    raise errors.InvalidValue(f'--only={",".join(names)}: unknown measurement(s) {unknown}; choose from '
                              f'{list(MEASUREMENTS)}.')
  for name, value in (('image_size', setup.image_size), ('batch_size', setup.batch_size), ('steps', setup.steps),
                      ('train_steps', setup.train_steps), ('repeats', setup.repeats)):
    if value is not None and value < 1:
      raise errors.InvalidValue(f'--{name}={value} must be at least 1.')
  try:
    tfds.builder(setup.dataset, data_dir=setup.data_dir)
  # An unknown name raises DatasetNotFoundError; an unknown config of a known name, ValueError.
  except (tfds.core.registered.DatasetNotFoundError, ValueError) as e:
    raise errors.InvalidValue(f'--dataset={setup.dataset}: {str(e).splitlines()[0]}') from None
  if any(name in _READ_FILES for name in names):
    try:
      _train_folder(setup)
    except FileNotFoundError as e:  # A measurement's error line names it so; here it is the command line's.
      raise errors.MissingPath(str(e)) from None


def groups(names: list[str]) -> list[tuple[str, ...]]:
  """Splits `names` into the groups timed together (GROUPS), in the order of MEASUREMENTS."""
  ordered = [name for name in MEASUREMENTS if name in names]
  together = {name: tuple(n for n in group if n in names) for group in GROUPS for name in group}
  result = []
  for name in ordered:
    group = together.get(name, (name,))
    if group not in result:
      result.append(group)
  return result


def measure(names: tuple[str, ...], setup: Setup) -> list[dict]:
  """Runs measurements in this process, their timed runs taking turns, and returns their JSON lines as dicts.

  Args:
    names: names from MEASUREMENTS.
    setup: the run's arguments.

  Returns:
    One dict per name: {'name', 'images_per_s' (None when skipped), ..., 'peak_rss_mb'}; a skipped peer has
    'skipped' with the reason.
  """
  lines, timed = {}, {}
  # Peers print progress ("Found N images"); stdout carries JSON lines only.
  with contextlib.redirect_stdout(sys.stderr):
    for name in names:
      function, default_batches = MEASUREMENTS[name]
      result = function(setup, setup.steps or default_batches)
      if isinstance(result, _Timed):
        timed[name] = result
      else:
        lines[name] = result
    lines.update(_time_alternately(timed, setup.repeats))
  # ru_maxrss is in KiB on Linux, and is the peak of the whole process so far.
  rss = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
  return [{'name': name, 'images_per_s': None, **lines[name], 'peak_rss_mb': rss} for name in names]


def _child_stdout_to_stderr():
  # C++ and library prints of a child would land between the parent's JSON lines.
  os.dup2(sys.stderr.fileno(), sys.stdout.fileno())


def run(names: list[str], setup: Setup, *, isolate: bool = True):
  """Runs the measurements, group by group (`groups`), each group in a fresh spawned process if `isolate`.

  Args:
    names: measurement names, from MEASUREMENTS.
    setup: the run's arguments.
    isolate: one process per group; False runs them all in this process, so that peak_rss_mb is the run's so far.

  Yields:
    One dict per measurement, as `measure` returns it, with 'rss' saying whose peak it is and 'wall_s' the time its
    process took (start and imports included; shared by a group). A group that fails yields one
    {'name', 'images_per_s': None, 'error'} per measurement in it, and the run goes on.
  """
  for group in groups(names):
    start = time.perf_counter()
    try:
      if isolate:
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context('spawn'),
                                                    initializer=_child_stdout_to_stderr) as pool:
          lines = pool.submit(measure, group, setup).result()
      else:
        lines = measure(group, setup)
    except Exception as e:  # pylint: disable=broad-except
      for name in group:
        yield {'name': name, 'images_per_s': None, 'error': f'{type(e).__name__}: {e}'}
      continue
    rss = f'this process\'s ({", ".join(group)}), imports included' if isolate else 'the run so far'
    for line in lines:
      yield {**line, 'rss': rss, 'wall_s': round(time.perf_counter() - start, 1)}


def targets(lines: list[dict]) -> dict:
  """The final JSON line: the ratios of ours over each peer, and the target checks, from `lines` of one run."""
  by_name = {line['name']: line for line in lines}
  rate = {name: line.get('images_per_s') for name, line in by_name.items()}

  def ratio(numerator, denominator):
    if denominator is None:
      return by_name.get(numerator, {}).get('ratio')
    if rate.get(numerator) and rate.get(denominator):
      return round(rate[numerator] / rate[denominator], 3)
    return None

  checks = []
  for what, numerator, denominator, minimum, note in TARGETS:
    value = ratio(numerator, denominator)
    check = {'check': what, 'ratio': value, 'target': f'>= {minimum}',
             'met': None if value is None else value >= minimum}
    cpu = [by_name.get(name, {}).get('cpu_ms_per_image') for name in (numerator, denominator)]
    if all(cpu):
      # CPU time per image does not depend on how many cores other processes left us, as the rates do.
      check['cpu_ms_per_image_ratio'] = round(cpu[0] / cpu[1], 3)
    if note:
      check['note'] = note
    checks.append(check)
  return {'name': 'targets', 'ratios': {f'{a} / {b}': ratio(a, b) for a, b in RATIOS}, 'checks': checks,
          'all_met': all(check['met'] for check in checks)}
