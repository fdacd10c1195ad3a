"""The `synthetic` config: procedural chest X-rays that build in seconds, with no download.

Each image is a bright thorax with two dark lung fields, ribs, spine and heart, and noise. Pneumonia adds
opacities inside the lungs: bacterial is one lobar consolidation, viral is diffuse interstitial spots.
Anatomy is drawn per patient, position and exposure per image; every image is then rescaled to a random
mean brightness, so a model must find the opacities, not count bright pixels.

File names follow the real patterns, so patient ids and the train/validation split come from the same
code as for the real data: ~600 images in the `train` folder (~10% of patients go to validation) and 120
in `test`, 1:3 normal:pneumonia like the release, 1 to 4 images per patient, bacterial:viral 2:1.
Everything is seeded by file name: the same bytes on every build, in any order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
import contextlib
import hashlib
import io

import numpy as np
from PIL import Image

from cxr_tfds.chest_xray_pneumonia import imaging
from cxr_tfds.chest_xray_pneumonia import sources

IMAGE_SIZE = 128
# (folder, class) -> number of images.
_COUNTS = {
    ('train', 'NORMAL'): 150, ('train', 'PNEUMONIA'): 450,
    ('test', 'NORMAL'): 30, ('test', 'PNEUMONIA'): 90,
}
_SEED = 20180222  # Publication date of Kermany et al., Cell 172(5).


class Source:
  """The synthetic images, with the interface of sources.ManualSource.

  Attributes:
    images: every image, sorted by file name.
    locations: ['synthetic'].
  """

  def __init__(self):
    self.images = sorted(_file_names(), key=lambda image: image.file_name)
    self.locations = ['synthetic']

  @contextlib.contextmanager
  def open(self) -> Iterator[Callable[[sources.SourceImage], bytes]]:
    """Yields read(image) -> JPEG bytes of the rendered image."""
    yield render


def render(image: sources.SourceImage) -> bytes:
  """Returns the grayscale IMAGE_SIZE x IMAGE_SIZE JPEG of one synthetic image."""
  anatomy = np.random.default_rng(_seed(image.patient_id))
  rng = np.random.default_rng(_seed(image.file_name))
  pixels = _chest(anatomy, rng, image.finding)
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, format='JPEG', quality=imaging.JPEG_QUALITY)
  return out.getvalue()


def _file_names() -> Iterator[sources.SourceImage]:
  """Yields the images, named like the release: patients numbered on from one folder to the next."""
  rng = np.random.default_rng(_SEED)
  patient = image_number = 0
  for (folder, class_folder), count in _COUNTS.items():
    made = 0
    while made < count:
      patient += 1
      finding = 'bacteria' if rng.random() < 2 / 3 else 'virus'
      for _ in range(min(int(rng.integers(1, 5)), count - made)):
        image_number += 1
        made += 1
        if class_folder == 'PNEUMONIA':
          name = f'person{patient}_{finding}_{image_number}.jpeg'
        else:
          prefix = 'NORMAL2-' if patient % 2 else ''
          name = f'{prefix}IM-{patient:04d}-{image_number:04d}.jpeg'
        yield sources.SourceImage(f'{folder}/{class_folder}/{name}', None, name, 0)


def _seed(text: str) -> int:
  return int.from_bytes(hashlib.sha256(f'{_SEED}/{text}'.encode()).digest()[:8], 'little')


def _ellipse(y, x, cy, cx, ry, rx, softness=0.08):
  """A soft-edged ellipse mask in [0, 1]."""
  r = np.sqrt(((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2)
  return 1 / (1 + np.exp((r - 1) / softness))


def _smooth_noise(rng, cells, size=IMAGE_SIZE):
  """Low-frequency noise: a cells x cells random grid, bicubic-upsampled."""
  grid = Image.fromarray(rng.random((cells, cells), dtype=np.float32), mode='F')
  return np.asarray(grid.resize((size, size), Image.Resampling.BICUBIC))


def _blur(image, sigma):
  """A Gaussian blur (separable, zero padding) of a 2-D array."""
  radius = int(3 * sigma) + 1
  kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
  kernel /= kernel.sum()
  for axis in (0, 1):
    padded = np.pad(image, [(radius, radius) if a == axis else (0, 0) for a in (0, 1)])
    image = np.lib.stride_tricks.sliding_window_view(padded, len(kernel), axis=axis) @ kernel
  return image


def _chest(anatomy, rng, finding):
  """Returns one uint8 radiograph; `anatomy` draws the patient, `rng` this image."""
  n = IMAGE_SIZE
  y, x = np.mgrid[0:1:n * 1j, 0:1:n * 1j]
  # Patient: body size and lung shape.
  cx, cy = 0.5 + anatomy.normal(0, 0.02), 0.52 + anatomy.normal(0, 0.02)
  body_rx, body_ry = anatomy.uniform(0.38, 0.46), anatomy.uniform(0.42, 0.5)
  lung_rx, lung_ry = anatomy.uniform(0.11, 0.14), anatomy.uniform(0.26, 0.32)
  lung_dx = anatomy.uniform(0.16, 0.2)
  # Image: the patient moved a little.
  cx, cy = cx + rng.normal(0, 0.015), cy + rng.normal(0, 0.015)

  body = _ellipse(y, x, cy, cx, body_ry, body_rx, softness=0.04)
  lungs = [_ellipse(y, x, cy - 0.04, cx + side * lung_dx, lung_ry, lung_rx) for side in (-1, 1)]
  lung = np.maximum(*lungs)
  heart = _ellipse(y, x, cy + 0.2, cx + 0.04, 0.1, 0.11, softness=0.15)
  spine = np.exp(-((x - cx) / 0.035) ** 2) * body

  rib_phase = (y - cy) * anatomy.uniform(5.5, 7) - 6 * (x - cx) ** 2
  ribs = np.cos(2 * np.pi * rib_phase) ** 8 * body * (1 - 0.5 * spine)

  image = 0.08 + 0.55 * body - 0.35 * lung * (1 - heart) + 0.12 * heart + 0.2 * spine + 0.06 * ribs
  image += _opacities(rng, y, x, lungs, finding) * lung * (1 - heart)
  image += 0.06 * (_smooth_noise(rng, 6) - 0.5) + rng.normal(0, 0.025, image.shape)

  # Exposure: a gamma, then a random mean brightness, independent of the finding.
  image = np.clip(image, 0, 1) ** rng.uniform(0.8, 1.25)
  image *= rng.uniform(0.3, 0.5) / image.mean()
  return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def _opacities(rng, y, x, lungs, finding):
  """Returns the added brightness of pneumonia (zero for a normal image)."""
  if finding == 'bacterial':  # A patchy lobar consolidation, in one lung.
    lung = lungs[rng.integers(2)]
    ys, xs = np.nonzero(lung > 0.9)
    k = rng.integers(len(ys))
    lobe = _ellipse(y, x, ys[k] / IMAGE_SIZE, xs[k] / IMAGE_SIZE,
                    rng.uniform(0.12, 0.2), rng.uniform(0.08, 0.12), softness=0.2)
    return rng.uniform(0.25, 0.35) * lobe + rng.uniform(0.45, 0.55) * _spots(rng, lobe > 0.5, 40, 2.5)
  if finding == 'viral':  # Diffuse interstitial spots and haze, in both lungs.
    return (rng.uniform(0.5, 0.6) * _spots(rng, np.maximum(*lungs) > 0.5, 80, 1.8) +
            0.1 * _smooth_noise(rng, 16))
  return np.zeros_like(y)


def _spots(rng, mask, count, sigma):
  """Returns about `count` blurred random dots inside `mask`, peaking near 1."""
  ys, xs = np.nonzero(mask)
  picks = rng.integers(len(ys), size=int(count * rng.uniform(0.75, 1.25)))
  spots = np.zeros(mask.shape)
  spots[ys[picks], xs[picks]] = rng.uniform(0.5, 1, len(picks))
  spots = _blur(spots, sigma * rng.uniform(0.8, 1.2))
  return spots / spots.max()
