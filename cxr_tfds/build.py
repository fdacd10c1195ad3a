r"""Builds chest_xray_pneumonia with the project's own dependencies (no Apache Beam, unlike `tfds build`).

    python -m cxr_tfds.build --config 224 --manual_dir ~/Downloads/chest_xray \
        --data_dir ~/tensorflow_datasets

Prints the build log, the examples per split and class, and the build rate in images/s.
"""

from __future__ import annotations

import os
import sys
import time

from absl import app
from absl import flags
from absl import logging
import tensorflow_datasets as tfds

import cxr_tfds  # pylint: disable=unused-import  # Registers the dataset.
from cxr_tfds.chest_xray_pneumonia import chest_xray_pneumonia_dataset_builder as builder_lib

_NAME = 'chest_xray_pneumonia'

FLAGS = flags.FLAGS


def _define_flags():
  # Defined only when this module runs as the program, so that importing `build` defines no flag that could clash
  # with the trainer's --data_dir and --manual_dir.
  flags.DEFINE_enum('config', None, [config.name for config in builder_lib.Builder.BUILDER_CONFIGS],
                    'Config to build: `synthetic` needs no download.', required=True)
  flags.DEFINE_string('data_dir', None, 'Where to write the dataset; TFDS default (~/tensorflow_datasets) if unset.')
  flags.DEFINE_string('manual_dir', None, 'Folder holding the Kaggle or Mendeley zip, or the folder extracted from '
                      'it (see BUILD.md); TFDS default (<data_dir>/downloads/manual) if unset.')
  flags.DEFINE_integer('max_skipped_files', None, 'Stop when more files than this cannot be used (undecodable, '
                       'unlabelled); default: 1% of the release, and at least '
                       f'{builder_lib.MIN_MAX_SKIPPED_FILES}.', lower_bound=0)


def build(config: str, data_dir: str | None = None, manual_dir: str | None = None, *,
          max_skipped_files: int | None = None) -> tfds.core.DatasetBuilder:
  """Builds one config of chest_xray_pneumonia, unless it is built already.

  Args:
    config: a config name: 'original', '224', '512' or 'synthetic'.
    data_dir: where to write the dataset; None for the TFDS default.
    manual_dir: where the downloaded data is; None for the TFDS default.
    max_skipped_files: how many unusable files the build accepts; None for the builder's default.

  Returns:
    The builder, prepared.

  Raises:
    ValueError: for an unknown config.
    FileNotFoundError: if the manual dir holds no complete release (the message says what to download).
    ValueError: more files are unusable than `max_skipped_files`, or a split would have no image of a class.
  """
  names = [c.name for c in builder_lib.Builder.BUILDER_CONFIGS]
  if config not in names:
    raise ValueError(f'Unknown config {config!r}: use one of {names}.')
  builder = tfds.builder(f'{_NAME}/{config}', data_dir=data_dir, max_skipped_files=max_skipped_files)
  if builder.is_prepared():
    logging.info('Already built: %s', builder.data_dir)
    return builder
  start = time.perf_counter()
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  seconds = time.perf_counter() - start
  num_images = builder.info.splits.total_num_examples + len(builder.info.metadata['skipped_files'])
  logging.info('Built %d images in %.1f s: %.0f images/s.', num_images, seconds, num_images / seconds)
  return builder


def summary(builder: tfds.core.DatasetBuilder) -> str:
  """Returns a table of examples per split and finding, shards, and skipped files."""
  metadata = builder.info.metadata
  lines = [f'{builder.info.full_name} in {builder.data_dir}',
           f'release: {metadata["release"] or "no known release matched"}; sources: {metadata["sources"]}']
  for split, info in builder.info.splits.items():
    counts = ', '.join(f'{finding} {n}' for finding, n in metadata['counts'][split].items())
    lines.append(f'  {split:<10} {info.num_examples:>5} examples in {info.num_shards:>2} shards ({counts})')
  skipped = metadata['skipped_files']
  lines.append(f'skipped {len(skipped)} files' + ''.join(f'\n  {name}: {why}' for name, why in skipped.items()))
  return '\n'.join(lines)


def main(argv):
  del argv  # Unused.
  logging.set_verbosity(logging.INFO)
  data_dir, manual_dir = (os.path.expanduser(d) if d else None for d in (FLAGS.data_dir, FLAGS.manual_dir))
  print(summary(build(FLAGS.config, data_dir, manual_dir, max_skipped_files=FLAGS.max_skipped_files)))


def run():
  """`python -m cxr_tfds.build`, and the console script `cxr-build` (setup.cfg)."""
  _define_flags()
  try:
    app.run(main)
  except (ValueError, OSError, AssertionError) as e:
    # Missing or hostile data is the user's to fix: one line, not a traceback (TFDS raises AssertionError for a
    # missing manual dir). --verbosity=1 logs the traceback.
    logging.debug('Traceback of the error below:', exc_info=True)
    print(f'error: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  run()
