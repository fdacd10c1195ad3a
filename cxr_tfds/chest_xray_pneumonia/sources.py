"""Where the chest X-rays are: zip and folder forms, de-duplication, patient ids and the split rule.

A release is a tree `<root>/{train,val,test}/{NORMAL,PNEUMONIA}/<image>`. The manual dir may hold it
in any number of zips (any file name) or folders, at any depth: the Kaggle zip holds the tree twice
(`chest_xray/` and `chest_xray/chest_xray/`), plus `__MACOSX/` resource forks and `.DS_Store` files.
Every image is taken once, keyed by (pool, class, file name), where the pool merges `train` and `val`
(both go through the patient split) so the Kaggle and Mendeley layouts of one image count once.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Iterator
import contextlib
import dataclasses
import hashlib
import os
import pathlib
import re
import stat
import zipfile

from absl import logging

from cxr_tfds.chest_xray_pneumonia import imaging

LABELS = ('normal', 'pneumonia')
FINDINGS = ('normal', 'bacterial', 'viral')
SPLITS = ('train', 'validation', 'test')

# Folder name -> label, as in every release.
_CLASS_FOLDERS = {'NORMAL': 'normal', 'PNEUMONIA': 'pneumonia'}
_SPLIT_FOLDERS = ('train', 'val', 'test')

# The rest of each name numbers the image; a patient has several.
_PNEUMONIA_PATIENT = re.compile(r'(person\d+)_')
_NORMAL_PATIENT = re.compile(r'((?:NORMAL2-)?IM-\d+)-')

# One patient hash bucket in 10 goes to validation (~10% of the train + val images).
VALIDATION_BUCKETS = 10

# Per-folder image counts of the known releases (Kaggle moved 16 of Mendeley's train images to val).
RELEASES = {
    'kaggle': {
        'train/NORMAL': 1341, 'train/PNEUMONIA': 3875,
        'val/NORMAL': 8, 'val/PNEUMONIA': 8,
        'test/NORMAL': 234, 'test/PNEUMONIA': 390,
    },
    'mendeley': {
        'train/NORMAL': 1349, 'train/PNEUMONIA': 3883,
        'test/NORMAL': 234, 'test/PNEUMONIA': 390,
    },
}

# A chest X-ray JPEG is at most a few MB; JPEGs barely compress, so a high ratio is a zip bomb.
_MAX_MEMBER_BYTES = 256 << 20
# Archives that are not zips: not read, but named when nothing is found (a re-packed download).
_UNREAD_ARCHIVES = ('.tar', '.tar.gz', '.tgz', '.tar.bz2', '.tar.xz', '.7z', '.rar')
_MAX_RATIO = 100
_RATIO_CHECK_FROM_BYTES = 1 << 20

DOWNLOAD_INSTRUCTIONS = """\
Download "Chest X-Ray Images (Pneumonia)" (Kermany et al. 2018) in one of these forms:
  * Kaggle CLI: `kaggle datasets download -d paultimothymooney/chest-xray-pneumonia`
    (or the Download button on kaggle.com/datasets/paultimothymooney/chest-xray-pneumonia);
  * Mendeley Data: ChestXRay2017.zip from https://data.mendeley.com/datasets/rscbjbr9sj/2
    (doi:10.17632/rscbjbr9sj.2).
Put the zip as downloaded (any file name), or the folder extracted from it, in the manual dir.
The zip is read directly: there is no need to extract it. See BUILD.md.
"""
# The same, on one line, for errors: the commands print a user's error as one line.
DOWNLOAD_HINT = ('Download the Kaggle zip (`kaggle datasets download -d paultimothymooney/chest-xray-pneumonia`, or '
                 'the Download button on kaggle.com) or Mendeley\'s ChestXRay2017.zip (doi:10.17632/rscbjbr9sj.2), '
                 'and put it as downloaded, or the folder extracted from it, in the manual dir (see BUILD.md).')
SYNTHETIC_HINT = 'To try the project without the download, use the config chest_xray_pneumonia/synthetic.'


@dataclasses.dataclass(frozen=True)
class SourceImage:
  """One image file of a release, and where to read it.

  Attributes:
    file_name: the path relative to the release root, e.g. 'train/NORMAL/IM-0115-0001.jpeg'.
    archive: the zip that holds it, or None for a file in a folder.
    path: the member name inside `archive`, or the file's path.
    size: the file size in bytes.
  """

  file_name: str
  archive: str | None
  path: str
  size: int

  @property
  def folder(self) -> str:
    """The release folder: 'train', 'val' or 'test'."""
    return self.file_name.split('/')[0]

  @property
  def pool(self) -> str:
    """'test' for the test folder, else 'train': train and val both go through the patient split."""
    return 'test' if self.folder == 'test' else 'train'

  @property
  def label(self) -> str:
    return _CLASS_FOLDERS[self.file_name.split('/')[1]]

  @property
  def name(self) -> str:
    return self.file_name.rsplit('/', 1)[1]

  @property
  def patient_id(self) -> str:
    return patient_id(self.label, self.name)

  @property
  def finding(self) -> str | None:
    """'normal', 'bacterial' or 'viral'; None for a pneumonia image whose name gives no subtype."""
    if self.label == 'normal':
      return 'normal'
    if '_bacteria_' in self.name:
      return 'bacterial'
    if '_virus_' in self.name:
      return 'viral'
    return None


def patient_id(label: str, name: str) -> str:
  """Returns the patient of an image, qualified by its class so it is unique within a split.

  Ids repeat across the class folders for different people ('IM-0001' is not 'person1'), so the class
  is part of the id. A name that matches no pattern is its own patient (the whole stem is the id): an
  unknown grouping must not put one patient's images in both train and validation, and a one-image
  patient cannot.

  Args:
    label: 'normal' or 'pneumonia'.
    name: the file name, e.g. 'person1000_bacteria_2931.jpeg', 'IM-0115-0001.jpeg' or
      'NORMAL2-IM-0123-0001.jpeg'.

  Returns:
    E.g. 'pneumonia/person1000', 'normal/IM-0115' or 'normal/NORMAL2-IM-0123'.
  """
  pattern = _PNEUMONIA_PATIENT if label == 'pneumonia' else _NORMAL_PATIENT
  match = pattern.match(name)
  return f'{label}/{match.group(1) if match else name.rsplit(".", 1)[0]}'


def split_for_patient(patient: str) -> str:
  """Returns 'validation' for ~1 patient in VALIDATION_BUCKETS (by a SHA-256 of the id), else 'train'.

  A hash, not a random draw: the rule is stable across rebuilds, machines, image sets and releases.
  """
  bucket = int(hashlib.sha256(patient.encode('utf-8')).hexdigest(), 16) % VALIDATION_BUCKETS
  return 'validation' if bucket == 0 else 'train'


def assign_splits(images: Iterable[SourceImage]) -> dict[str, list[SourceImage]]:
  """Returns {split: images}: `test` is the release's test folder; train + val split by patient."""
  splits = {split: [] for split in SPLITS}
  for image in images:
    split = 'test' if image.pool == 'test' else split_for_patient(image.patient_id)
    splits[split].append(image)
  return splits


def folder_counts(images: Iterable[SourceImage]) -> dict[str, int]:
  """Returns the number of images per release folder, e.g. {'train/NORMAL': 1341, ...}."""
  return dict(sorted(collections.Counter(image.file_name.rsplit('/', 1)[0] for image in images).items()))


def identify_release(images: Iterable[SourceImage]) -> str | None:
  """Compares the per-folder image counts with RELEASES, and logs the result.

  Counts that match no release are a loud warning, not an error: a partial download still builds.

  Args:
    images: the images found.

  Returns:
    The name of the matching release, or None.
  """
  counts = folder_counts(images)
  for release, expected in RELEASES.items():
    if counts == expected:
      logging.info('Image counts match the %s release: %s.', release, counts)
      return release

  def differences(expected):
    return {k: (counts.get(k, 0), expected.get(k, 0))
            for k in sorted(expected.keys() | counts.keys()) if counts.get(k, 0) != expected.get(k, 0)}

  closest = min(RELEASES, key=lambda release: sum(abs(a - b) for a, b in differences(RELEASES[release]).values()))
  logging.warning(
      'CHECK YOUR DOWNLOAD: the image counts match no known release. Closest is %s; differences: %s.',
      closest, ', '.join(f'{k} {a} (expected {b})' for k, (a, b) in differences(RELEASES[closest]).items()))
  return None


class ManualSource:
  """The images found in a manual dir, and a reader for them.

  Attributes:
    images: every image once, sorted by file name.
    locations: the zips and folders they came from.
  """

  def __init__(self, images: list[SourceImage], locations: list[str]):
    self.images = images
    self.locations = locations

  @classmethod
  def find(cls, manual_dir: str | os.PathLike[str]) -> ManualSource:
    """Finds the release images in the zips and folders of `manual_dir`.

    Args:
      manual_dir: the directory holding the download (zip or extracted folder).

    Returns:
      A ManualSource.

    Raises:
      FileNotFoundError: if the images of some (train/val or test, class) are missing.
      ValueError: for an unreadable zip, or an unsafe zip member or symlink (named in the message).
    """
    manual_dir = pathlib.Path(manual_dir)
    candidates = []  # (path inside the zip or manual dir, image).
    for path in _walk(manual_dir):
      if path.suffix.lower() == '.zip':
        candidates.extend((image.path, image) for image in _zip_images(path))
      else:
        relative = path.relative_to(manual_dir).as_posix()
        if image := _as_image(relative, None, str(path), path.stat().st_size):
          candidates.append((relative, image))
    images, locations = _deduplicate(candidates)
    _check_complete(images, manual_dir, unread=[path.name for path in _walk(manual_dir)
                                                if path.name.lower().endswith(_UNREAD_ARCHIVES)])
    logging.info('Found %d images in %s.', len(images), ', '.join(locations))
    return cls(images, locations)

  @contextlib.contextmanager
  def open(self) -> Iterator[Callable[[SourceImage], bytes]]:
    """Yields read(image) -> bytes, raising imaging.BadImageError for an unreadable file."""
    with contextlib.ExitStack() as stack:
      archives = {}

      def read(image: SourceImage) -> bytes:
        try:
          if image.archive is None:
            return pathlib.Path(image.path).read_bytes()
          if image.archive not in archives:
            archives[image.archive] = stack.enter_context(zipfile.ZipFile(image.archive))
          return archives[image.archive].read(image.path)
        except (OSError, EOFError, zipfile.BadZipFile) as e:  # Bad CRC, truncated member, I/O error.
          raise imaging.BadImageError(f'cannot read: {e}') from e

      yield read


def _walk(root: pathlib.Path) -> Iterator[pathlib.Path]:
  """Yields the files under `root`, sorted; refuses symlinks, skips macOS metadata.

  A symlink to a zip at the top of `root` is read: `ln -s ~/Downloads/archive.zip` is the user's own choice of a
  file, and its members are checked like any zip's. A link anywhere else may lead out of the tree, and is refused.
  """
  for directory, dirs, files in os.walk(root):
    dirs[:] = sorted(d for d in dirs if d != '__MACOSX' and not d.startswith('.'))
    for name in sorted(dirs + files):
      path = pathlib.Path(directory, name)
      top_zip = pathlib.Path(directory) == root and name.lower().endswith('.zip') and path.is_file()
      if path.is_symlink() and not top_zip:
        raise ValueError(f'Refusing symlink {path} in the manual dir: put the real files there instead.')
    for name in sorted(files):
      if not name.startswith('.'):  # .DS_Store, AppleDouble `._*` files.
        yield pathlib.Path(directory, name)


def _zip_images(archive: pathlib.Path) -> list[SourceImage]:
  """Returns the release images in a zip, after checking every member is safe to read."""
  try:
    with zipfile.ZipFile(archive) as zf:
      infos = zf.infolist()
  except (zipfile.BadZipFile, OSError) as e:
    raise ValueError(f'{archive} is not a readable zip ({e}): download it again.') from e
  images = []
  for info in infos:
    _check_member(archive, info)
    if not info.is_dir() and (image := _as_image(info.filename, str(archive), info.filename, info.file_size)):
      images.append(image)
  return images


def _check_member(archive: pathlib.Path, info: zipfile.ZipInfo) -> None:
  """Raises ValueError for a member that is a symlink, escapes the root, or expands absurdly."""
  name = info.filename
  parts = re.split(r'[\\/]', name)
  if name.startswith(('/', '\\')) or re.match(r'[A-Za-z]:', name) or '..' in parts:
    raise ValueError(f'Refusing {archive}: member {name!r} has a path outside the archive root.')
  if stat.S_ISLNK(info.external_attr >> 16):
    raise ValueError(f'Refusing {archive}: member {name!r} is a symlink.')
  too_big = info.file_size > _MAX_MEMBER_BYTES
  too_compressed = (info.file_size > _RATIO_CHECK_FROM_BYTES and
                    info.file_size > _MAX_RATIO * max(info.compress_size, 1))
  if too_big or too_compressed:
    raise ValueError(
        f'Refusing {archive}: member {name!r} would expand from {info.compress_size} to {info.file_size} '
        f'bytes (a zip bomb?); images are at most {_MAX_MEMBER_BYTES} bytes, compressed < {_MAX_RATIO}x.')


def _as_image(rel_path: str, archive: str | None, path: str, size: int) -> SourceImage | None:
  """Returns the image at `rel_path` if it lies in a release tree, else None (README, macOS junk...)."""
  parts = rel_path.split('/')
  if (len(parts) < 3 or '__MACOSX' in parts or parts[-1].startswith('.') or
      parts[-3] not in _SPLIT_FOLDERS or parts[-2] not in _CLASS_FOLDERS):
    return None
  return SourceImage('/'.join(parts[-3:]), archive, path, size)


def _deduplicate(candidates: list[tuple[str, SourceImage]]) -> tuple[list[SourceImage], list[str]]:
  """Keeps one copy per (pool, class, name): the shallowest in its zip or folder, then by path.

  Args:
    candidates: (path inside its zip or the manual dir, image) pairs.

  Returns:
    (the images sorted by file name, the zips and folders they came from).
  """
  chosen = {}
  mismatched = []
  for _, image in sorted(candidates, key=lambda c: (c[0].count('/'), c[1].archive or '', c[1].path)):
    key = image.pool, image.label, image.name
    if key not in chosen:
      chosen[key] = image
    elif chosen[key].size != image.size:
      mismatched.append(image)
  if mismatched:
    logging.warning(
        '%d images have copies of different sizes under the same name (e.g. %s in %s); '
        'kept the first copy of each. Is an older or resized download mixed into the manual dir?',
        len(mismatched), mismatched[0].file_name, mismatched[0].archive or mismatched[0].path)
  if len(candidates) > len(chosen):
    logging.info('Dropped %d duplicate copies of images.', len(candidates) - len(chosen))
  images = sorted(chosen.values(), key=lambda i: i.file_name)
  locations = sorted({i.archive or i.path[:-len(i.file_name) - 1] for i in images})
  return images, locations


def _check_complete(images: list[SourceImage], manual_dir: pathlib.Path, unread: list[str]) -> None:
  """Raises FileNotFoundError, saying what to download, unless every (pool, class) has images; names the archives
  of other kinds (`unread`) that may hold them."""
  present = {(i.pool, i.label) for i in images}
  missing = [f'{"train/val" if pool == "train" else pool}/{label.upper()}'
             for pool in ('train', 'test') for label in LABELS if (pool, label) not in present]
  if not missing:
    return
  found = folder_counts(images) or 'nothing'
  if unread:
    found = (f'{found}; {", ".join(unread)} {"is" if len(unread) == 1 else "are"} not read: extract '
             f'{"it" if len(unread) == 1 else "them"} into the manual dir, or give the zip')
  raise FileNotFoundError(
      f'Chest X-ray images missing in {manual_dir}: none found for {", ".join(missing)} '
      f'(found: {found}). {DOWNLOAD_HINT}')
