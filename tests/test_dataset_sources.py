"""Finding images (zips, folders, duplicates, hostile archives), patient ids, the split rule, decoding."""

import io
import logging
import pathlib
import re
import zipfile

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from cxr_tfds.chest_xray_pneumonia import imaging
from cxr_tfds.chest_xray_pneumonia import sources


def _jpeg(size=(20, 16), mode='L', fmt='JPEG'):
  out = io.BytesIO()
  Image.new(mode, size, 'white' if mode == 'RGB' else 200).save(out, format=fmt)
  return out.getvalue()


def _minimal_release(root: pathlib.Path):
  """One image per (folder, class): the least that builds."""
  for name in ('train/NORMAL/IM-0001-0001.jpeg', 'train/PNEUMONIA/person1_virus_1.jpeg',
               'test/NORMAL/IM-0002-0001.jpeg', 'test/PNEUMONIA/person2_bacteria_2.jpeg'):
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_bytes(_jpeg())


@pytest.mark.parametrize('label, name, patient', [
    ('pneumonia', 'person1000_bacteria_2931.jpeg', 'pneumonia/person1000'),
    ('pneumonia', 'person1000_virus_1681.jpeg', 'pneumonia/person1000'),
    ('normal', 'IM-0115-0001.jpeg', 'normal/IM-0115'),
    ('normal', 'IM-0429-0001-0002.jpeg', 'normal/IM-0429'),
    ('normal', 'NORMAL2-IM-0123-0001.jpeg', 'normal/NORMAL2-IM-0123'),
    ('normal', 'scan 7.jpeg', 'normal/scan 7'),  # No pattern: the stem is the patient.
    ('pneumonia', 'IM-0001-0001.jpeg', 'pneumonia/IM-0001-0001'),  # A normal pattern in the other class.
])
def test_patient_id(label, name, patient):
  assert sources.patient_id(label, name) == patient


def test_split_rule_is_a_fixed_hash_with_about_10_percent_validation():
  ids = [f'pneumonia/person{n}' for n in range(5000)]
  splits = [sources.split_for_patient(i) for i in ids]
  assert 0.08 < splits.count('validation') / len(ids) < 0.12
  # Pinned values: a change of the rule would silently move patients between splits.
  assert [sources.split_for_patient(f'pneumonia/person{n}') for n in (1, 2, 3)] == ['train', 'train', 'validation']
  # The class is part of the id: the same number in the other class is another patient.
  assert {sources.split_for_patient(f'normal/IM-{n:04d}') for n in range(50)} == {'train', 'validation'}


def test_assign_splits_keeps_test_folder_and_patients_whole():
  images = [sources.SourceImage(f'{folder}/PNEUMONIA/person{p}_virus_{i}.jpeg', None, '', 1)
            for p in range(200) for i, folder in enumerate(('train', 'val', 'test'))]
  splits = sources.assign_splits(images)
  assert all(image.folder == 'test' for image in splits['test']) and len(splits['test']) == 200
  patients = {split: {image.patient_id for image in images} for split, images in splits.items()}
  assert patients['validation'] and not patients['train'] & patients['validation']
  # A patient's train/ and val/ images stay together.
  assert all(len([i for i in splits['validation'] if i.patient_id == p]) == 2 for p in patients['validation'])


def test_finding_from_file_name():
  image = lambda name: sources.SourceImage(name, None, '', 1)
  assert image('train/PNEUMONIA/person1_bacteria_1.jpeg').finding == 'bacterial'
  assert image('train/PNEUMONIA/person1_virus_1.jpeg').finding == 'viral'
  assert image('train/NORMAL/IM-0001-0001.jpeg').finding == 'normal'
  assert image('train/PNEUMONIA/person1_1.jpeg').finding is None


def test_find_deduplicates_nested_copies_and_ignores_macos_junk(tmp_path):
  _minimal_release(tmp_path / 'chest_xray')
  _minimal_release(tmp_path / 'chest_xray' / 'chest_xray')
  (tmp_path / '__MACOSX' / 'chest_xray' / 'train' / 'NORMAL').mkdir(parents=True)
  (tmp_path / '__MACOSX' / 'chest_xray' / 'train' / 'NORMAL' / '._IM-0001-0001.jpeg').write_bytes(b'junk')
  (tmp_path / 'chest_xray' / 'train' / 'NORMAL' / '.DS_Store').write_bytes(b'junk')
  (tmp_path / 'chest_xray' / 'README.txt').write_bytes(b'not in a class folder')
  source = sources.ManualSource.find(tmp_path)
  assert [image.file_name for image in source.images] == [
      'test/NORMAL/IM-0002-0001.jpeg', 'test/PNEUMONIA/person2_bacteria_2.jpeg',
      'train/NORMAL/IM-0001-0001.jpeg', 'train/PNEUMONIA/person1_virus_1.jpeg']
  assert source.locations == [str(tmp_path / 'chest_xray')]  # The shallower copy.


def test_a_zip_of_any_name_reads_like_its_folder(tmp_path):
  _minimal_release(tmp_path / 'folder' / 'chest_xray')
  (tmp_path / 'zip').mkdir()
  with zipfile.ZipFile(tmp_path / 'zip' / 'whatever name.ZIP', 'w') as zf:
    for path in sorted((tmp_path / 'folder').rglob('*.jpeg')):
      zf.write(path, path.relative_to(tmp_path / 'folder').as_posix())
  from_folder, from_zip = (sources.ManualSource.find(tmp_path / form) for form in ('folder', 'zip'))
  assert [i.file_name for i in from_zip.images] == [i.file_name for i in from_folder.images]
  with from_zip.open() as read_zip, from_folder.open() as read_folder:
    assert [read_zip(i) for i in from_zip.images] == [read_folder(i) for i in from_folder.images]


def test_missing_data_says_what_to_download_and_where(tmp_path):
  (tmp_path / 'notes.txt').write_text('not the data')
  with pytest.raises(FileNotFoundError) as error:
    sources.ManualSource.find(tmp_path)
  message = str(error.value)
  assert str(tmp_path) in message and 'train/val/NORMAL' in message and 'test/PNEUMONIA' in message
  assert 'kaggle datasets download -d paultimothymooney/chest-xray-pneumonia' in message
  assert 'ChestXRay2017.zip' in message and '10.17632/rscbjbr9sj.2' in message


def test_incomplete_data_names_what_is_missing(tmp_path):
  _minimal_release(tmp_path)
  for path in (tmp_path / 'test').rglob('*.jpeg'):
    path.unlink()
  with pytest.raises(FileNotFoundError, match=r'none found for test/NORMAL, test/PNEUMONIA \(found: '):
    sources.ManualSource.find(tmp_path)


def test_builder_with_empty_manual_dir_fails_with_instructions(tmp_path):
  (tmp_path / 'manual').mkdir()
  builder = tfds.builder('chest_xray_pneumonia/224', data_dir=str(tmp_path / 'data'))
  with pytest.raises(FileNotFoundError, match='does not exist or is empty.*paultimothymooney/chest-xray-pneumonia'):
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path / 'manual')))


def test_a_missing_manual_dir_is_named_in_the_error(tmp_path):
  # The builder reads the folder's name from TFDS's AssertionError (TFDS has no public error type for it).
  builder = tfds.builder('chest_xray_pneumonia/224', data_dir=str(tmp_path / 'data'))
  missing = tmp_path / 'no such folder'
  with pytest.raises(FileNotFoundError, match=f'^The manual dir {missing} does not exist or is empty'):
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(missing)))


def _zip_with(path, info, data=b'x', compress_type=zipfile.ZIP_STORED):
  with zipfile.ZipFile(path, 'w') as zf:
    zf.writestr(info, data, compress_type=compress_type)


@pytest.mark.parametrize('member', ['../evil.jpeg', 'chest_xray/../../evil.jpeg', '/etc/evil.jpeg',
                                    'C:/evil.jpeg', '..\\evil.jpeg'])
def test_refuses_members_outside_the_root(tmp_path, member):
  _zip_with(tmp_path / 'a.zip', zipfile.ZipInfo(member))
  with pytest.raises(ValueError, match='member .* has a path outside the archive root') as error:
    sources.ManualSource.find(tmp_path)
  assert repr(member) in str(error.value)


def test_refuses_symlink_members(tmp_path):
  info = zipfile.ZipInfo('chest_xray/train/NORMAL/IM-0001-0001.jpeg')
  info.external_attr = (0o120777 << 16)  # S_IFLNK: what `zip --symlinks` writes.
  _zip_with(tmp_path / 'a.zip', info, b'/etc/passwd')
  with pytest.raises(ValueError, match="member 'chest_xray/train/NORMAL/IM-0001-0001.jpeg' is a symlink"):
    sources.ManualSource.find(tmp_path)


def test_refuses_zip_bombs(tmp_path):
  _zip_with(tmp_path / 'a.zip', zipfile.ZipInfo('chest_xray/train/NORMAL/IM-0001-0001.jpeg'),
            bytes(8 << 20), zipfile.ZIP_DEFLATED)  # 8 MiB of zeros deflate ~1000x.
  with pytest.raises(ValueError, match=r"member 'chest_xray/train/NORMAL/IM-0001-0001.jpeg' would expand from "
                                       r'\d+ to 8388608 bytes \(a zip bomb\?\)'):
    sources.ManualSource.find(tmp_path)


def test_refuses_symlinks_in_folders(tmp_path):
  _minimal_release(tmp_path / 'real')
  (tmp_path / 'manual').mkdir()
  (tmp_path / 'manual' / 'chest_xray').symlink_to(tmp_path / 'real')
  with pytest.raises(ValueError, match=re.escape(f'Refusing symlink {tmp_path / "manual" / "chest_xray"}')):
    sources.ManualSource.find(tmp_path / 'manual')


def test_unreadable_zip_is_a_clear_error(tmp_path):
  (tmp_path / 'archive.zip').write_bytes(b'PK\x03\x04 truncated download')
  with pytest.raises(ValueError, match='archive.zip is not a readable zip .*download it again'):
    sources.ManualSource.find(tmp_path)


def _images_with_counts(counts):
  return [sources.SourceImage(f'{folder}/x{i}.jpeg', None, '', 1)
          for folder, n in counts.items() for i in range(n)]


def test_identify_release(caplog):
  # On absl's logger itself: an absl program run earlier in this process (the CLI tests) leaves its level at WARNING.
  caplog.set_level(logging.INFO, logger='absl')
  for release, counts in sources.RELEASES.items():
    assert sources.identify_release(_images_with_counts(counts)) == release
  assert 'match the mendeley release' in caplog.text
  partial = dict(sources.RELEASES['kaggle'], **{'train/NORMAL': 1205})
  assert sources.identify_release(_images_with_counts(partial)) is None
  assert 'CHECK YOUR DOWNLOAD' in caplog.text and 'train/NORMAL 1205 (expected 1341)' in caplog.text


@pytest.mark.parametrize('data, reason', [
    (b'', 'empty file'),
    (_jpeg()[:100], 'cannot decode'),
    (b'just some text', 'cannot decode'),
    (_jpeg(fmt='PNG'), 'PNG image, not a JPEG'),
])
def test_bad_images_are_rejected_with_a_reason(data, reason):
  with pytest.raises(imaging.BadImageError, match=reason):
    imaging.to_jpeg(data, 224)
  with pytest.raises(imaging.BadImageError, match=reason):
    imaging.to_jpeg(data, None)


def test_to_jpeg_squashes_to_grayscale_square_and_keeps_original_bytes():
  rgb = _jpeg((300, 200), 'RGB')
  assert imaging.to_jpeg(rgb, None) is rgb
  with Image.open(io.BytesIO(imaging.to_jpeg(rgb, 64))) as image:
    assert (image.format, image.mode, image.size) == ('JPEG', 'L', (64, 64))
    assert abs(np.asarray(image).astype(int).mean() - 255) < 3  # White stays white: no crop, no border.
  gray = imaging.to_jpeg(rgb, 64)
  assert imaging.to_jpeg(gray, 64) is gray  # Already the stored form: not re-encoded.
  rgb_64 = _jpeg((64, 64), 'RGB')
  with Image.open(io.BytesIO(imaging.to_jpeg(rgb_64, 64))) as image:
    assert (image.mode, image.size) == ('L', (64, 64))  # The right size, but RGB: re-encoded.


def test_encode_all_keeps_order_and_reports_failures():
  def read(name):
    if name == 'unreadable':
      raise imaging.BadImageError('cannot read: bad CRC')
    return {'good': _jpeg(), 'bad': b''}[name]
  names = ['good', 'bad', 'unreadable'] * 200  # Several chunks.
  results = list(imaging.encode_all(names, read, 32))
  assert [name for name, _ in results] == names
  assert [type(r).__name__ for _, r in results[:3]] == ['bytes', 'BadImageError', 'BadImageError']
  assert 'bad CRC' in str(results[2][1])
