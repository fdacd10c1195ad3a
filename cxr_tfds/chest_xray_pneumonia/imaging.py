"""Decodes every source image once at build time, and stores it at the config's size."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
import concurrent.futures
import io
from typing import TypeVar

from PIL import Image
from PIL import ImageOps

# High enough that the re-encoding adds no visible artefacts to 8-bit radiographs.
JPEG_QUALITY = 95
_ORIENTATION = 0x0112  # The EXIF tag.

# Images read ahead and resized in parallel: bounds memory for the `original` config (~1 GB of JPEGs).
_CHUNK = 256

T = TypeVar('T')


class BadImageError(Exception):
  """A source file that is not a usable image: the build skips it and records why."""


def to_jpeg(data: bytes, size: int | None) -> bytes:
  """Returns the JPEG stored for one source file.

  Args:
    data: the source file's bytes.
    size: None keeps `data` unchanged (it is still decoded, to check it), unless an EXIF Orientation tag says its
      pixels are stored turned: they are turned the way up and re-encoded at `JPEG_QUALITY`. An int squashes the
      image, the way up, to exactly `size` x `size` grayscale (aspect ratio not kept, nothing cropped) with an
      antialiased Lanczos filter, re-encoded at `JPEG_QUALITY`.

  Returns:
    The JPEG bytes to store.

  Raises:
    BadImageError: if `data` is empty, not a JPEG, truncated or otherwise undecodable.
  """
  if not data:
    raise BadImageError('empty file (0 bytes)')
  try:
    with Image.open(io.BytesIO(data)) as image:
      if image.format != 'JPEG':
        raise BadImageError(f'{image.format} image, not a JPEG')
      # A photo of a film (a phone's) may store its pixels on their side with an EXIF tag to turn them: TF's decoder,
      # which reads the stored JPEG, ignores the tag, so the pixels are turned here, once, and stored the way up.
      turned = image.getexif().get(_ORIENTATION, 1) not in (0, 1)
      stored_form = image.mode == 'L' and image.size == (size, size) and not turned  # Before `draft` changes them.
      if size is not None:
        # Lets libjpeg decode straight to grayscale at 1/2, 1/4 or 1/8 scale (never below `size`):
        # several times faster than a full decode of a 2,000-pixel radiograph.
        image.draft('L', (size, size))
      image.load()
      if (size is None and not turned) or stored_form:
        return data
      image = ImageOps.exif_transpose(image)
      if size is not None:
        image = image.convert('L').resize((size, size), Image.Resampling.LANCZOS)
  except BadImageError:
    raise
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    # PIL reports truncated and garbled files as OSError, some header errors as SyntaxError.
    raise BadImageError(f'cannot decode: {e}') from e
  out = io.BytesIO()
  image.save(out, format='JPEG', quality=JPEG_QUALITY)
  return out.getvalue()


def encode_all(
    images: Sequence[T], read: Callable[[T], bytes], size: int | None
) -> Iterator[tuple[T, bytes | BadImageError]]:
  """Reads `images` in order and encodes them with `to_jpeg` on a thread pool.

  Reading stays sequential (one stream through a zip); decoding and resizing run in parallel because
  PIL releases the GIL while it works.

  Args:
    images: what to encode, in the order to yield it.
    read: returns the source bytes of one image; raises BadImageError if it cannot.
    size: as in `to_jpeg`.

  Yields:
    (image, the stored JPEG bytes, or the BadImageError saying why the image is skipped), in order.
  """
  with concurrent.futures.ThreadPoolExecutor() as pool:
    for start in range(0, len(images), _CHUNK):
      chunk = images[start:start + _CHUNK]
      pending = [pool.submit(_encode_or_error, _read_or_error(read, image), size) for image in chunk]
      for image, result in zip(chunk, pending):
        yield image, result.result()


def _read_or_error(read: Callable[[T], bytes], image: T) -> bytes | BadImageError:
  try:
    return read(image)
  except BadImageError as e:
    return e


def _encode_or_error(data: bytes | BadImageError, size: int | None) -> bytes | BadImageError:
  if isinstance(data, BadImageError):
    return data
  try:
    return to_jpeg(data, size)
  except BadImageError as e:
    return e
