r"""Builds chest_xray_pneumonia with the project's own dependencies (no Apache Beam, unlike `tfds build`).

    python -m cxr_tfds.build --config 224 --manual_dir ~/Downloads/chest_xray \
        --data_dir ~/tensorflow_datasets

Prints the build log, the examples per split and class, and the build rate in images/s.
"""

from __future__ import annotations

import os
import time

from absl import app
from absl import flags
from absl import logging
import tensorflow_datasets as tfds

import cxr_tfds  # pylint: disable=unused-import  # Registers the dataset.
from cxr_tfds.chest_xray_pneumonia import chest_xray_pneumonia_dataset_builder as builder_lib

_NAME = 'chest_xray_pneumonia'

_CONFIG = flags.DEFINE_enum(
    'config', None, [config.name for config in builder_lib.Builder.BUILDER_CONFIGS],
    'Config to build: `synthetic` needs no download.')
_DATA_DIR = flags.DEFINE_string(
    'data_dir', None, 'Where to write the dataset; TFDS default (~/tensorflow_datasets) if unset.')
_MANUAL_DIR = flags.DEFINE_string(
    'manual_dir', None, 'Folder holding the Kaggle or Mendeley zip, or the folder extracted from it '
    '(see BUILD.md); TFDS default (<data_dir>/downloads/manual) if unset.')


def build(config: str, data_dir: str | None = None, manual_dir: str | None = None) -> tfds.core.DatasetBuilder:
  """Builds one config of chest_xray_pneumonia, unless it is built already.

  Args:
    config: a config name: 'original', '224', '512' or 'synthetic'.
    data_dir: where to write the dataset; None for the TFDS default.
    manual_dir: where the downloaded data is; None for the TFDS default.

  Returns:
    The builder, prepared.

  Raises:
    ValueError: for an unknown config.
    FileNotFoundError: if the manual dir holds no complete release (the message says what to download).
  """
  names = [c.name for c in builder_lib.Builder.BUILDER_CONFIGS]
  if config not in names:
    raise ValueError(f'Unknown config {config!r}: use one of {names}.')
  builder = tfds.builder(f'{_NAME}/{config}', data_dir=data_dir)
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
  data_dir, manual_dir = (os.path.expanduser(d) if d else None for d in (_DATA_DIR.value, _MANUAL_DIR.value))
  print(summary(build(_CONFIG.value, data_dir, manual_dir)))


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  app.run(main)
