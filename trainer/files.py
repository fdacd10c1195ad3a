"""Writing a file or a folder beside its final name and renaming it into place, on `tf.io.gfile`.

A kill or a full disk in the middle of a write then leaves the previous file (or folder) whole, and no half-written
one beside it. Every output the project writes goes through here: reports, figures, config.json, exports' files,
the ensemble threshold cache and the shift test's JSON. `tf.io.gfile` takes local paths and the URLs of TF's other
filesystems (`ram://` in the tests). A run's model_dir is still a local or mounted folder, not gs://: the export
commit protocol, the checkpoint repair and the run lock need symlinks, fsync of folders and file locks.
"""

import contextlib
import os

import tensorflow as tf

from trainer import errors


def partial_name(path: str) -> str:
  """The temporary name beside `path`: 'model.partial.keras' for 'model.keras' (Keras checks the extension)."""
  folder, name = os.path.split(path.rstrip('/'))
  stem, dot, extensions = name.partition('.')
  return os.path.join(folder, f'{stem}.partial{dot}{extensions}')


@contextlib.contextmanager
def replacing(path: str, partial: str | None = None):
  """Yields a temporary path beside `path`, renamed to `path` when the block succeeds and deleted when it fails.

  Args:
    path: the file or folder to write.
    partial: the temporary path (default `partial_name(path)`); give one of the process's own when two processes
      may write `path` at once.

  Yields:
    The path to write to.

  Raises:
    OSError: the write failed (a full disk, a read-only folder), naming `path` and the reason on one line.
  """
  partial = partial or partial_name(path)
  try:
    yield partial
    if tf.io.gfile.isdir(partial):
      # A rename cannot replace a folder that has files; the old one goes first.
      if tf.io.gfile.isdir(path):
        tf.io.gfile.rmtree(path)
      tf.io.gfile.rename(partial, path)
    else:
      _sync(partial)
      tf.io.gfile.rename(partial, path, overwrite=True)
  except (OSError, tf.errors.OpError) as e:
    remove(partial)
    raise errors.WriteFailed(
        f'Cannot write {path}: {errors.error_reason(e)}. Its previous version, if any, is kept.') from e
  except BaseException:  # Also a kill (KeyboardInterrupt) during the rename: no partial is left behind.
    remove(partial)
    raise


def write_atomic(path: str, contents: bytes | str, partial: str | None = None) -> str:
  """Writes `contents` (str as UTF-8) to `path` through `replacing`, so a reader never sees half a file.

  Returns:
    path.
  """
  with replacing(path, partial) as temporary, tf.io.gfile.GFile(temporary, 'wb') as f:
    f.write(contents.encode() if isinstance(contents, str) else contents)
  return path


def remove(path: str) -> None:
  """Deletes a file, a folder or a symlink (the link, not what it points to), if it exists."""
  if os.path.islink(path):
    os.remove(path)
  elif tf.io.gfile.isdir(path):
    tf.io.gfile.rmtree(path)
  elif tf.io.gfile.exists(path):
    tf.io.gfile.remove(path)


def _sync(path: str) -> None:
  # GFile does not fsync a local file on close; without it a power cut can persist the rename before the data.
  if '://' not in path and os.path.isfile(path):
    descriptor = os.open(path, os.O_RDONLY)
    try:
      os.fsync(descriptor)
    finally:
      os.close(descriptor)
