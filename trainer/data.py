"""The input pipeline: TFDS split -> decode -> resize -> cache -> shuffle -> batch -> prefetch.

Images stay uint8 until they reach the model: augmentation and normalisation live in the model, so on a GPU they
run on the GPU, and a cached uint8 image costs a quarter of a float32 one in host memory.
"""

import fcntl
import glob
import io
import os

from absl import logging
import numpy as np
from PIL import Image
from PIL import ImageOps
import tensorflow as tf
import tensorflow_datasets as tfds

import cxr_tfds  # noqa: F401  (registers chest_xray_pneumonia)
from trainer import errors

AUTOTUNE = tf.data.AUTOTUNE
# Cache files this process may be filling -> the open file whose flock says so. The OS drops the lock when the
# process ends, however it ends.
_CACHE_OWNERS = {}
_ORIENTATION = 0x0112  # The EXIF tag.
# `upright` turns images up to this size (trainer.predict.MAX_PIXELS refuses larger ones as decompression bombs).
_MAX_TURNED_PIXELS = 50_000_000


def prepare(dataset: str, *, data_dir: str | None, manual_dir: str | None) -> tfds.core.DatasetBuilder:
  """Returns the dataset's builder, building the TFRecords first if they are not there yet.

  Args:
    dataset: a TFDS name with its config, e.g. 'chest_xray_pneumonia/224'.
    data_dir: where TFDS keeps built datasets (None: TFDS's default, ~/tensorflow_datasets).
    manual_dir: where the downloaded Kaggle or Mendeley data is, for configs that need it.

  Raises:
    errors.InvalidValue: an unknown dataset or config, or manual data the builder refuses (damaged, hostile).
    errors.MissingPath: manual data missing; the message says what to download.
  """
  try:
    builder = tfds.builder(dataset, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise errors.InvalidValue(f'--dataset={dataset}: {str(e).splitlines()[0]}') from None
  except ValueError as e:  # An unknown config: TFDS lists the nearest names over many lines.
    raise errors.InvalidValue(f'--dataset={dataset}: no such config; {dataset.split("/")[0]} has '
                              f'{", ".join(_config_names(dataset))}.') from e
  if not builder.is_prepared():
    logging.info('Building %s into %s (once).', dataset, builder.data_dir)
    try:
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    except (FileNotFoundError, ValueError) as e:
      # The builder's errors are about the download it was given (missing, incomplete, hostile or damaged): the
      # user's to fix. cxr_tfds is a TFDS package of its own and does not import the trainer, so they become the
      # trainer's UserError here, at the boundary; --verbosity=1 still shows where they came from.
      raise (errors.MissingPath if isinstance(e, FileNotFoundError) else errors.InvalidValue)(str(e)) from e
    except (OSError, RuntimeError, tf.errors.OpError) as e:
      if not (reason := _disk_reason(e)):
        raise
      raise errors.WriteFailed(f'Cannot build {dataset} in {builder.data_dir}: {reason}. Free some space there, or '
                               'give another --data_dir; the next build starts over.') from e
  # TFDS builds into an `incomplete.*` folder beside the version folder and renames it when done. A build that was
  # killed leaves its folder behind: harmless (the next build starts a new one), but as large as the data it wrote.
  leftovers = glob.glob(os.path.join(glob.escape(os.path.dirname(os.fspath(builder.data_dir))), 'incomplete.*'))
  if leftovers:
    logging.warning('Unused, left by an interrupted build of %s: %s. Delete them to free the space, unless a build '
                    'is running now.', dataset, ', '.join(sorted(leftovers)))
  return builder


# What a full or read-only disk says, however deep in TFDS's writer (which wraps TF's error in a RuntimeError).
_DISK_REASONS = ('No space left on device', 'Disk quota exceeded', 'Read-only file system', 'Permission denied')


def _disk_reason(error: BaseException) -> str | None:
  """The disk's reason for a failed build, if that is what failed it."""
  while error is not None:
    if reason := next((r for r in _DISK_REASONS if r in str(error)), None):
      return reason
    error = error.__cause__ or error.__context__
  return None


def _config_names(dataset: str) -> list[str]:
  builder_cls = tfds.builder_cls(dataset.split('/')[0])
  return [config.name for config in builder_cls.BUILDER_CONFIGS]


def stored_image_size(builder: tfds.core.DatasetBuilder) -> int | None:
  """The side of the stored square images, or None when the config keeps the source sizes."""
  height, width, _ = builder.info.features['image'].shape
  return height if height is not None and height == width else None


def class_counts(builder: tfds.core.DatasetBuilder, split: str) -> np.ndarray:
  """Images per class in a split, read from the labels alone (the images are not decoded)."""
  labels = builder.as_dataset(split, decoders={'image': tfds.decode.SkipDecoding()}).map(
      lambda ex: ex['label'], num_parallel_calls=AUTOTUNE)
  num_classes = builder.info.features['label'].num_classes
  return labels.reduce(tf.zeros([num_classes], tf.int64),
                       lambda counts, y: counts + tf.one_hot(y, num_classes, dtype=tf.int64)).numpy()


def resize_uint8(image: tf.Tensor, image_size: int) -> tf.Tensor:
  """Squashes a uint8 image to image_size x image_size, as the dataset's resized configs do.

  The same function serves training, the exported model and prediction, so a model sees the same pixels everywhere.
  """
  image = tf.image.resize(image, [image_size, image_size], antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def decode_image(image_bytes: tf.Tensor, image_size: int) -> tf.Tensor:
  """Encoded JPEG or PNG bytes -> a grayscale uint8 image of the model's size.

  TensorFlow's decoders read the pixels as stored and ignore an EXIF Orientation tag: give bytes through `upright`.
  """
  image = tf.io.decode_image(image_bytes, channels=1, expand_animations=False)
  return resize_uint8(image, image_size)


def upright(raw: bytes) -> bytes:
  """Encoded image bytes with their EXIF orientation applied: what predict, the dataset build and a server do to bytes
  before `decode_image` (or the SavedModel's bytes-in signature), which cannot read EXIF.

  Phones and some viewers store a photo's pixels as the sensor read them, with an EXIF Orientation tag that says how
  to turn them; a radiograph read without it is lying on its side, and is scored differently. With a tag other than
  1, the image is turned by Pillow's `ImageOps.exif_transpose` and returned as PNG (lossless); otherwise, or for bytes
  that are not an image Pillow reads (the decoder says why later), `raw` itself is returned.

  Args:
    raw: the bytes of a JPEG or PNG file (anything else is returned as given).

  Returns:
    Bytes to decode.
  """
  try:
    with Image.open(io.BytesIO(raw)) as image:  # Reads the header only.
      if image.getexif().get(_ORIENTATION, 1) in (1, 0) or image.width * image.height > _MAX_TURNED_PIXELS:
        return raw
      turned = ImageOps.exif_transpose(image)
      out = io.BytesIO()
      turned.save(out, format='PNG')
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
    return raw
  return out.getvalue()


def _read(builder, split, *, image_size, shuffle_files, seed, input_context):
  """Reads one split, decoded and resized to `image_size`, as dicts of image, label and patient_id."""
  shards = builder.info.splits[split].num_shards
  pipelines = input_context.num_input_pipelines if input_context else 1
  # TFDS shards by file when it can; a split with fewer files than readers is sharded by example instead.
  by_file = input_context if pipelines > 1 and shards >= pipelines else None
  read_config = tfds.ReadConfig(shuffle_seed=seed, input_context=by_file, try_autocache=False)
  ds = builder.as_dataset(split, shuffle_files=shuffle_files, read_config=read_config)
  if pipelines > 1 and by_file is None:
    ds = ds.shard(pipelines, input_context.input_pipeline_id)

  resize = image_size != stored_image_size(builder)

  def select(ex):
    image = resize_uint8(ex['image'], image_size) if resize else ex['image']
    return {'image': tf.ensure_shape(image, [image_size, image_size, 1]), 'label': ex['label'],
            'patient_id': ex['patient_id']}

  return ds.map(select, num_parallel_calls=AUTOTUNE)


def _cache(ds, cache_dir, name):
  if cache_dir is None:
    return ds.cache()
  os.makedirs(cache_dir, exist_ok=True)
  prefix = os.path.join(cache_dir, name)
  _clear_unfinished_cache(prefix)
  return ds.cache(prefix)


def _clear_unfinished_cache(prefix: str) -> None:
  """Deletes what a killed run left of an unfinished file cache, which would make every later run fail.

  tf.data writes `<prefix>.index` when a pass over the data has completed. Until then it keeps a
  `<prefix>_<n>.lockfile` and a `.tempstate` data file; a run killed in its first epoch leaves both behind, and the
  next run fails with AlreadyExistsError ("There appears to be a concurrent caching iterator running"). Such a
  lockfile is stale unless a live process is filling the cache: the one holding an flock on `<prefix>.owner`.

  Raises:
    FileExistsError: another running process is filling this cache now.
  """
  if prefix in _CACHE_OWNERS or os.path.exists(prefix + '.index'):
    return
  owner = open(prefix + '.owner', 'w')
  try:
    fcntl.flock(owner, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    owner.close()
    raise errors.InUse(f'Another running process is filling the cache {prefix} (--cache_dir): let it finish its '
                       'first epoch, or give this run another --cache_dir.') from None
  _CACHE_OWNERS[prefix] = owner
  for leftover in glob.glob(glob.escape(prefix) + '_*.lockfile') + glob.glob(glob.escape(prefix) + '_*.tempstate*'):
    logging.warning('Deleting %s, left by a run that stopped while filling the cache.', leftover)
    os.remove(leftover)


def train_examples(builder: tfds.core.DatasetBuilder, *, image_size: int, seed: int | None = None,
                   input_context: tf.distribute.InputContext | None = None,
                   shuffle_files: bool = True) -> tf.data.Dataset:
  """The training split once, as (uint8 image, int label) pairs, in the order `train_dataset` caches them.

  With a seed the order is the same at every call, so that features computed from it line up with the images a run
  without the feature cache reads (`trainer.features`); `shuffle_files=False` keeps the files' own order.
  """
  ds = _read(builder, 'train', image_size=image_size, shuffle_files=shuffle_files, seed=seed,
             input_context=input_context)
  return ds.map(lambda ex: (ex['image'], ex['label']), num_parallel_calls=AUTOTUNE)


def train_dataset(builder: tfds.core.DatasetBuilder, *, image_size: int, global_batch: int,
                  seed: int | None = None, cache_dir: str | None = None, shuffle_buffer: int = 2048,
                  input_context: tf.distribute.InputContext | None = None, skip_steps: int = 0,
                  balanced: bool = False) -> tf.data.Dataset:
  """The training split, repeated forever, as (uint8 images, int labels) batches for one replica.

  The caller runs a fixed number of steps per epoch, so that every worker of a multi-worker job runs the same
  number of steps whatever its share of the files.

  Args:
    builder: from `prepare`.
    image_size: the side the model takes.
    global_batch: the batch across all replicas; each replica gets its share.
    seed: fixes the file order and the shuffle, for reproducible runs.
    cache_dir: None to cache decoded images in memory, or a folder for a cache file (data larger than RAM).
    shuffle_buffer: examples in the shuffle buffer.
    input_context: from `strategy.distribute_datasets_from_function`, or None for a single pipeline.
    skip_steps: global training steps already taken (a resumed run). With a seed, the run then reads exactly the
      batches an uninterrupted run would read next, so a preempted run ends with the same model.
    balanced: draw each class with probability 1/2 (`tf.data.Dataset.sample_from_datasets` over one shuffled,
      repeated stream per class) instead of in the split's proportions: the alternative to class weights.
  """
  pipeline = input_context.input_pipeline_id if input_context else 0
  ds = train_examples(builder, image_size=image_size, seed=seed, input_context=input_context)
  ds = _cache(ds, cache_dir, f'{builder.info.full_name.replace("/", "_")}_train_{image_size}px_{pipeline}')
  num_classes = builder.info.features['label'].num_classes
  return training_batches(ds, global_batch=global_batch, seed=seed, shuffle_buffer=shuffle_buffer,
                          input_context=input_context, skip_steps=skip_steps,
                          num_classes=num_classes if balanced else None)


def training_batches(ds: tf.data.Dataset, *, global_batch: int, seed: int | None, shuffle_buffer: int,
                     input_context: tf.distribute.InputContext | None, skip_steps: int,
                     num_classes: int | None) -> tf.data.Dataset:
  """Cached (input, label) pairs -> shuffled, repeated batches for one replica (`train_dataset`'s Args).

  Shared by the images and by a frozen backbone's cached features (`trainer.features`), so that with one seed both
  read the examples in the same order. `num_classes`: draw the classes equally often (`balanced`); None: as they
  come.
  """
  batch = input_context.get_per_replica_batch_size(global_batch) if input_context else global_batch
  if num_classes:
    # One stream per class, each filtered from the same cache: a pass over the cache costs twice the reads, which
    # the cached pipeline can spare (BENCHMARKS.md). Each stream repeats on its own, so the minority class's images
    # come round more often rather than the majority's less.
    streams = [ds.filter(lambda image, label, c=c: label == c)
               .shuffle(shuffle_buffer, seed=None if seed is None else seed + c, reshuffle_each_iteration=True)
               .repeat() for c in range(num_classes)]
    ds = tf.data.Dataset.sample_from_datasets(streams, weights=[1 / num_classes] * num_classes, seed=seed)
  else:
    ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True).repeat()
  # Skipped before batching, so that no batch is assembled only to be dropped: a resumed run pays one pass of the
  # shuffle over the cached images per epoch done, a fraction of a second each.
  pipelines = input_context.num_input_pipelines if input_context else 1
  ds = ds.skip(skip_steps * (global_batch // pipelines))
  options = tf.data.Options()
  # The decode-and-resize map and the projection to (image, label) run as one map: 0-18% less CPU per image on the
  # first, uncached pass, in five profiles (BENCHMARKS.md).
  options.experimental_optimization.map_fusion = True
  return ds.batch(batch, drop_remainder=True).prefetch(AUTOTUNE).with_options(options)


def eval_dataset(builder: tfds.core.DatasetBuilder, split: str, *, image_size: int, batch_size: int,
                 cache: bool = True) -> tf.data.Dataset:
  """A whole split in file order, once, as batches of dicts (image, label, patient_id).

  Every worker reads every image. Under several replicas the training loop shares the batches out and gathers the
  predictions (`steps.distributed_split`), so that each worker still computes the same validation metric and takes
  the same best-checkpoint decision.
  """
  ds = _read(builder, split, image_size=image_size, shuffle_files=False, seed=None, input_context=None)
  if cache:
    ds = ds.cache()
  return ds.batch(batch_size).prefetch(AUTOTUNE)
