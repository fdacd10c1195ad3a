r"""Writes the dummy data of the tests: one tiny release, in the Kaggle zip form and a folder form.

    python cxr_tfds/chest_xray_pneumonia/dummy_data/make_dummy_data.py

kaggle/archive.zip copies the mess of the Kaggle download: the tree twice (`chest_xray/` and
`chest_xray/chest_xray/`), `__MACOSX/` resource forks, `.DS_Store` files and directory entries.
mendeley/ is the Mendeley layout extracted (no val folder: its images are in train), with macOS junk.
Both hold the same images: grayscale and RGB, several sizes, every file-name pattern, one truncated
JPEG and one pneumonia image without a subtype. Patient numbers are chosen so the patient split puts
a known set in validation. The output is deterministic.
"""

import io
import pathlib
import shutil
import zipfile

import numpy as np
from PIL import Image

from cxr_tfds.chest_xray_pneumonia import sources

_HERE = pathlib.Path(__file__).parent
_DATE = (2018, 1, 6, 0, 0, 0)  # Fixed zip timestamps keep the archive bytes reproducible.


def _patients(want: str, label: str, template: str, count: int) -> list[int]:
  """The first `count` patient numbers whose class-qualified ids fall in split `want`."""
  numbers, n = [], 0
  while len(numbers) < count:
    n += 1
    if sources.split_for_patient(f'{label}/{template.format(n)}') == want:
      numbers.append(n)
  return numbers


def _jpeg(rng, width, height, mode):
  gradient = np.linspace(40, 200, width)[None, :, None]
  noise = rng.normal(0, 20, (height, width, 3 if mode == 'RGB' else 1))
  pixels = np.clip(gradient + noise, 0, 255).astype(np.uint8)
  out = io.BytesIO()
  Image.fromarray(pixels.squeeze()).save(out, format='JPEG', quality=90)
  return out.getvalue()


def release_files() -> dict[str, bytes]:
  """Returns {path in the Kaggle layout: bytes}."""
  rng = np.random.default_rng(0)
  im = _patients('train', 'normal', 'IM-{:04d}', 2)
  [im2] = _patients('train', 'normal', 'NORMAL2-IM-{:04d}', 1)
  [im2_val] = _patients('validation', 'normal', 'NORMAL2-IM-{:04d}', 1)
  person = _patients('train', 'pneumonia', 'person{}', 3)
  [person_val] = _patients('validation', 'pneumonia', 'person{}', 1)
  files = {
      f'train/NORMAL/IM-{im[0]:04d}-0001.jpeg': _jpeg(rng, 40, 32, 'L'),
      f'train/NORMAL/IM-{im[0]:04d}-0002.jpeg': _jpeg(rng, 24, 30, 'RGB'),
      f'train/NORMAL/IM-{im[1]:04d}-0001-0001.jpeg': _jpeg(rng, 36, 36, 'L'),
      f'train/NORMAL/NORMAL2-IM-{im2:04d}-0001.jpeg': _jpeg(rng, 28, 40, 'L'),
      'train/NORMAL/scan_0005.jpeg': _jpeg(rng, 32, 32, 'L'),  # Matches no pattern: its own patient.
      'train/NORMAL/IM-0900-0001.jpeg': _jpeg(rng, 40, 40, 'L')[:300],  # Truncated.
      f'val/NORMAL/NORMAL2-IM-{im2_val:04d}-0001.jpeg': _jpeg(rng, 30, 30, 'RGB'),
      f'train/PNEUMONIA/person{person[0]}_bacteria_1.jpeg': _jpeg(rng, 40, 30, 'L'),
      f'train/PNEUMONIA/person{person[0]}_bacteria_2.jpeg': _jpeg(rng, 30, 40, 'RGB'),
      f'train/PNEUMONIA/person{person[1]}_virus_3.jpeg': _jpeg(rng, 48, 36, 'L'),
      f'train/PNEUMONIA/person{person[2]}_bacteria_4.jpeg': _jpeg(rng, 32, 32, 'RGB'),
      'train/PNEUMONIA/person900_5.jpeg': _jpeg(rng, 32, 32, 'L'),  # No subtype: skipped.
      f'train/PNEUMONIA/person{person_val}_virus_6.jpeg': _jpeg(rng, 36, 28, 'L'),
      f'val/PNEUMONIA/person{person_val}_virus_7.jpeg': _jpeg(rng, 28, 36, 'L'),
      'test/NORMAL/IM-0020-0001.jpeg': _jpeg(rng, 40, 32, 'L'),
      'test/NORMAL/NORMAL2-IM-0021-0001.jpeg': _jpeg(rng, 32, 40, 'RGB'),
      'test/PNEUMONIA/person20_bacteria_30.jpeg': _jpeg(rng, 44, 32, 'L'),
      'test/PNEUMONIA/person21_virus_31.jpeg': _jpeg(rng, 32, 44, 'L'),
  }
  return files


def write_kaggle_zip(files: dict[str, bytes], path: pathlib.Path) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  with zipfile.ZipFile(path, 'w', zipfile.ZIP_DEFLATED) as zf:
    for root in ('chest_xray/', 'chest_xray/chest_xray/'):
      zf.writestr(zipfile.ZipInfo(root, _DATE), b'')
      zf.writestr(zipfile.ZipInfo(root + '.DS_Store', _DATE), b'\0\0\0\1Bud1' + bytes(26))
      for name, data in sorted(files.items()):
        zf.writestr(zipfile.ZipInfo(root + name, _DATE), data)
    for name in sorted(files)[:3]:
      folder, file = name.rsplit('/', 1)
      zf.writestr(zipfile.ZipInfo(f'__MACOSX/chest_xray/{folder}/._{file}', _DATE), b'\0\5\26\7' + bytes(78))


def write_mendeley_folder(files: dict[str, bytes], root: pathlib.Path) -> None:
  shutil.rmtree(root, ignore_errors=True)
  for name, data in files.items():
    path = root / 'chest_xray' / name.replace('val/', 'train/', 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
  (root / 'chest_xray' / '.DS_Store').write_bytes(b'\0\0\0\1Bud1' + bytes(26))
  (root / '__MACOSX' / 'chest_xray').mkdir(parents=True)
  (root / '__MACOSX' / 'chest_xray' / '._train').write_bytes(b'\0\5\26\7' + bytes(78))


def main():
  files = release_files()
  write_kaggle_zip(files, _HERE / 'kaggle' / 'archive.zip')
  write_mendeley_folder(files, _HERE / 'mendeley')


if __name__ == '__main__':
  main()
