"""chest_xray_pneumonia: pediatric chest X-rays (Kermany et al. 2018), split by patient."""

from __future__ import annotations

import collections
import dataclasses
import math
import re

from absl import logging
import tensorflow_datasets.public_api as tfds
from tensorflow_datasets.core.utils import shard_utils

from cxr_tfds.chest_xray_pneumonia import imaging
from cxr_tfds.chest_xray_pneumonia import sources
from cxr_tfds.chest_xray_pneumonia import synthetic

# File-level sharding needs at least one file per reader. TFDS sizes shards by bytes (64 MiB minimum),
# which would write the 224 config's ~80 MB train split as one file. DownloadConfig's min_shard_size
# cannot lower that: TFDS 4.9.10 reads it from the ShardConfig class, not the instance.
MIN_SHARDS = 8
# The unusable files a build accepts by default: 1% of the release, and at least this many. More means a damaged
# download, not a few bad scans.
MIN_MAX_SKIPPED_FILES = 10
# TFDS's AssertionError for a missing or empty manual dir names the folder so.
_TFDS_MISSING_MANUAL_DIR = re.compile(r'Manual directory (.+?) does not exist or is empty')


@dataclasses.dataclass(eq=False)
class Config(tfds.core.BuilderConfig):
  """A resolution of the stored images.

  Attributes:
    image_size: the side of the stored square grayscale images; None keeps the source JPEG bytes.
  """

  image_size: int | None = None


class Builder(tfds.core.GeneratorBasedBuilder):
  """Chest X-Ray Images (Pneumonia), with a patient-level validation split."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = sources.DOWNLOAD_INSTRUCTIONS
  BUILDER_CONFIGS = [
      Config(name='original', description='The source JPEG bytes, unchanged (decode them with 1 channel).'),
      Config(name='224', image_size=224, description='Grayscale JPEGs squashed to 224x224.'),
      Config(name='512', image_size=512, description='Grayscale JPEGs squashed to 512x512.'),
      Config(name='synthetic', image_size=synthetic.IMAGE_SIZE,
             description='Procedural 128x128 chest X-rays for tests and demos: no download.'),
  ]
  # A bare `tfds.load('chest_xray_pneumonia')` means the real images, as for TFDS's other manual-download datasets;
  # without the download it fails, naming the manual dir and the synthetic config.
  DEFAULT_BUILDER_CONFIG_NAME = '224'

  def __init__(self, *, max_skipped_files: int | None = None, **kwargs):
    """As every TFDS builder, plus:

    Args:
      max_skipped_files: how many unusable files (undecodable, unlabelled) a build accepts before it stops; None
        for 1% of the release's files, and at least MIN_MAX_SKIPPED_FILES.
      **kwargs: for tfds.core.GeneratorBasedBuilder.
    """
    super().__init__(**kwargs)
    if max_skipped_files is not None and max_skipped_files < 0:
      raise ValueError(f'max_skipped_files must be zero or more, got {max_skipped_files}.')
    self._max_skipped_files = max_skipped_files

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(size, size, 1), encoding_format='jpeg'),
            'label': tfds.features.ClassLabel(names=sources.LABELS),
            'finding': tfds.features.ClassLabel(names=sources.FINDINGS),
            'patient_id': tfds.features.Text(),  # E.g. 'pneumonia/person1000'.
            'file_name': tfds.features.Text(),  # E.g. 'train/NORMAL/IM-0115-0001.jpeg'.
        }),
        supervised_keys=('image', 'label'),
        homepage='https://data.mendeley.com/datasets/rscbjbr9sj/2',
        license='CC BY 4.0',
        # Filled while generating: skipped files, per-split counts, which release was found.
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    if self.builder_config.name == 'synthetic':
      source, release = synthetic.Source(), None
    else:
      try:
        manual_dir = dl_manager.manual_dir
      except AssertionError as e:
        # TFDS has no public error type for a missing or empty manual dir: it raises AssertionError, naming the
        # folder, followed by the instructions (tests/test_dataset_sources.py checks both on this TFDS).
        folder = _TFDS_MISSING_MANUAL_DIR.search(str(e))
        raise FileNotFoundError(f'The manual dir {folder.group(1) if folder else "(see --manual_dir)"} does not '
                                f'exist or is empty. {sources.DOWNLOAD_HINT} {sources.SYNTHETIC_HINT}') from None
      source = sources.ManualSource.find(manual_dir)
      release = sources.identify_release(source.images)
    self.info.metadata.update(
        sources=source.locations, source_counts=sources.folder_counts(source.images), release=release,
        skipped_files={}, counts={})
    self._skip_limit = (self._max_skipped_files if self._max_skipped_files is not None
                        else max(MIN_MAX_SKIPPED_FILES, math.ceil(0.01 * len(source.images))))
    splits = sources.assign_splits(source.images)
    return {split: self._generate_examples(source, split, images) for split, images in splits.items()}

  def _generate_examples(
      self, source: sources.ManualSource | synthetic.Source, split: str, images: list[sources.SourceImage]):
    """Yields (file name, example); skips unusable files, naming them in the log and the metadata.

    Raises:
      ValueError: more files were skipped than the build accepts, or the split ends with a class empty.
    """
    labelled = []
    for image in images:
      if image.finding:
        labelled.append(image)
      else:
        self._skip(image, 'a pneumonia image whose name has neither _bacteria_ nor _virus_')
    findings, labels = collections.Counter(), collections.Counter()
    with source.open() as read:
      for image, jpeg in imaging.encode_all(labelled, read, self.builder_config.image_size):
        if isinstance(jpeg, imaging.BadImageError):
          self._skip(image, str(jpeg))
          continue
        findings[image.finding] += 1
        labels[image.label] += 1
        yield image.file_name, {
            'image': jpeg,
            'label': image.label,
            'finding': image.finding,
            'patient_id': image.patient_id,
            'file_name': image.file_name,
        }
    self.info.metadata['counts'][split] = dict(sorted(findings.items()))
    # A split without one class builds, then fails a training an epoch in (class weights [inf, ...], no ROC).
    for label in sources.LABELS:
      if not labels[label]:
        skipped = sum(i.label == label and i.file_name in self.info.metadata['skipped_files'] for i in images)
        raise ValueError(f'The {split} split has no {label} image: {skipped} of its {label} files could not be used '
                         '(see the warnings above), so nothing can train or be evaluated on it. Check or download '
                         'the data again.')
    logging.info('%s: %d examples, %s.', split, sum(findings.values()), dict(sorted(findings.items())))

  def _skip(self, image: sources.SourceImage, reason: str) -> None:
    logging.warning('Skipping %s: %s', image.file_name, reason)
    self.info.metadata['skipped_files'][image.file_name] = reason
    if len(self.info.metadata['skipped_files']) > self._skip_limit:
      raise ValueError(f'More than {self._skip_limit} files could not be used (the last: {image.file_name}: '
                       f'{reason}): the data looks damaged. Check or download it again, or allow more with '
                       '--max_skipped_files.')

  def download_and_prepare(self, *, download_config: tfds.download.DownloadConfig | None = None, **kwargs) -> None:
    """TFDS's `download_and_prepare`, writing at least MIN_SHARDS shards per split; the files skipped are logged.

    Here, in the builder, so it holds for every way of building: `tfds.load`, `tfds build` and
    `python -m cxr_tfds.build`.
    """
    built = self.is_prepared()
    super().download_and_prepare(
        download_config=_MinShardsDownloadConfig.of(download_config or tfds.download.DownloadConfig()), **kwargs)
    if not built and (skipped := self.info.metadata.get('skipped_files')):
      logging.warning('Skipped %d unusable files (listed in metadata.json of the dataset): %s',
                      len(skipped), ', '.join(skipped))


# TFDS has no public way to ask for a minimum shard count (MIN_SHARDS says why DownloadConfig's sizes cannot, and its
# num_shards fixes one count for every split), so the count is raised in TFDS's ShardConfig, which tfds.core does not
# export; tests/test_dataset_builder.py and test_dataset_synthetic.py check the counts it gives on this TFDS.
@dataclasses.dataclass(frozen=True)
class _MinShardsShardConfig(shard_utils.ShardConfig):
  """TFDS's shard count, raised to MIN_SHARDS (or one example per shard for a tinier split)."""

  def get_number_shards(self, total_size: int, num_examples: int, uses_precise_sharding: bool = True) -> int:
    num_shards = super().get_number_shards(total_size, num_examples, uses_precise_sharding)
    return min(max(num_shards, MIN_SHARDS), num_examples)


@dataclasses.dataclass
class _MinShardsDownloadConfig(tfds.download.DownloadConfig):
  """The caller's DownloadConfig, writing at least MIN_SHARDS shards per split."""

  @classmethod
  def of(cls, config: tfds.download.DownloadConfig) -> _MinShardsDownloadConfig:
    return cls(**{field.name: getattr(config, field.name) for field in dataclasses.fields(config)})

  def get_shard_config(self) -> shard_utils.ShardConfig:
    return _MinShardsShardConfig(
        num_shards=self.num_shards, min_shard_size=self.min_shard_size, max_shard_size=self.max_shard_size)
