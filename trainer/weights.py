"""Reading published weights files: PyTorch's legacy checkpoint format, tensors only, without torch.

A `.pth` file written by `torch.save` before PyTorch 1.6 (not a zip) is a row of pickles followed by raw bytes:

    pickle  the magic number 0x1950a86a20f9469cfc6c
    pickle  the protocol version, 1001
    pickle  system info: {'protocol_version', 'little_endian', 'type_sizes'}
    pickle  the state dict; each storage in it is a persistent id
            ('storage', <torch.FloatStorage>, key, location, element count, view)
    pickle  the list of storage keys, in the order their bytes follow
    bytes   for each key: an int64 element count, then that many little-endian elements

A pickle runs whatever callable its REDUCE opcodes name, so `pickle.load` of a file from elsewhere is running its
author's code. `read_legacy_pth` unpickles through `_TensorUnpickler`, whose `find_class` hands out only the globals
that rebuild tensors (what `torch.load(weights_only=True)` allows for such a file) and refuses any other before it is
called. The tensors come back as numpy arrays.
"""

import collections
import hashlib
import io
import pickle
import struct

import numpy as np
import tensorflow as tf

from trainer import errors

_MAGIC_NUMBER = 0x1950a86a20f9469cfc6c
_PROTOCOL_VERSION = 1001
# torch's legacy storage types and their elements (little-endian, as the file's system info says).
_STORAGE_DTYPES = {
    'DoubleStorage': '<f8', 'FloatStorage': '<f4', 'HalfStorage': '<f2', 'LongStorage': '<i8', 'IntStorage': '<i4',
    'ShortStorage': '<i2', 'CharStorage': 'i1', 'ByteStorage': 'u1', 'BoolStorage': '?',
}


class WeightsFileError(errors.InvalidValue):
  """A weights file that is not what it claims to be: not a tensor checkpoint, truncated, or hostile."""


class _Storage:
  """A storage the state dict refers to; its bytes come after the pickles."""

  def __init__(self, dtype, count):
    self.dtype, self.count, self.array = np.dtype(dtype), count, None


class _Tensor:
  """A view of a storage, as `torch._utils._rebuild_tensor_v2` describes it; made an array once the bytes are read."""

  def __init__(self, storage, offset, shape, stride):
    self.storage, self.offset, self.shape, self.stride = storage, offset, tuple(shape), tuple(stride)

  def array(self):
    size = len(self.storage.array)
    last = self.offset + sum((n - 1) * s for n, s in zip(self.shape, self.stride))
    if self.offset < 0 or min(self.stride, default=0) < 0 or (0 not in self.shape and last >= size):
      raise ValueError('a tensor reaches outside its storage')
    strides = [s * self.storage.dtype.itemsize for s in self.stride]
    view = np.lib.stride_tricks.as_strided(self.storage.array[self.offset:], self.shape, strides, writeable=False)
    return np.array(view)


def _rebuild_tensor_v2(storage, offset, shape, stride, requires_grad=False, backward_hooks=None, metadata=None):
  del requires_grad, backward_hooks, metadata  # Training state, not weights.
  if not isinstance(storage, _Storage):
    raise ValueError('a tensor is rebuilt from something that is not a storage')
  return _Tensor(storage, offset, shape, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
  del requires_grad, backward_hooks
  return data


class _TensorUnpickler(pickle.Unpickler):
  """An unpickler that rebuilds tensors and refuses every other global (the module docstring)."""

  def __init__(self, file, path):
    super().__init__(file)
    self.path = path
    self.storages = {}

  def find_class(self, module, name):
    if (module, name) == ('collections', 'OrderedDict'):
      return collections.OrderedDict
    if (module, name) == ('torch._utils', '_rebuild_tensor_v2'):
      return _rebuild_tensor_v2
    if (module, name) == ('torch._utils', '_rebuild_parameter'):
      return _rebuild_parameter
    if module == 'torch' and name in _STORAGE_DTYPES:
      return _STORAGE_DTYPES[name]
    raise WeightsFileError(f'{self.path}: refused to unpickle {module}.{name}: a weights file may hold only tensors, '
                           'so this file is not a plain PyTorch checkpoint and was not loaded.')

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == 'storage' and pid[1] in _STORAGE_DTYPES.values()):
      raise ValueError(f'an unexpected persistent id {str(pid)[:80]}')
    _, dtype, key, _, count, view = pid
    if view is not None:
      raise ValueError('a storage view (written by PyTorch before 0.4) is not supported')
    if key not in self.storages:
      self.storages[key] = _Storage(dtype, count)
    return self.storages[key]


def read_legacy_pth(path):
  """The tensors of a PyTorch legacy-format checkpoint, read without torch and without running its code.

  Args:
    path: a `.pth` file written by `torch.save` before PyTorch 1.6 (any path tf.io.gfile reads).

  Returns:
    An OrderedDict, tensor name -> numpy array, in the file's order.

  Raises:
    errors.MissingPath: if there is no such file.
    WeightsFileError: if the file names any global other than the tensor-rebuilding ones (nothing in it is run), or
      is truncated, or is not a legacy PyTorch checkpoint of tensors.
  """
  if not tf.io.gfile.exists(path):
    raise errors.MissingPath(f'{path}: no such weights file.')
  with tf.io.gfile.GFile(path, 'rb') as f:
    data = f.read()
  stream = io.BytesIO(data)
  unpickler = _TensorUnpickler(stream, path)
  try:
    if unpickler.load() != _MAGIC_NUMBER or _TensorUnpickler(stream, path).load() != _PROTOCOL_VERSION:
      raise ValueError('it does not start with the legacy format\'s magic number and protocol 1001')
    info = _TensorUnpickler(stream, path).load()
    if not isinstance(info, dict) or not info.get('little_endian'):
      raise ValueError('its system info is not that of a little-endian writer')
    state = unpickler.load()  # The same unpickler: it collects the storages.
    keys = _TensorUnpickler(stream, path).load()
    _read_storages(stream, unpickler.storages, keys)
    if not isinstance(state, dict):
      raise ValueError('it holds no state dict')
    return collections.OrderedDict((name, _as_array(name, value)) for name, value in state.items())
  except WeightsFileError:
    raise
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
          struct.error, MemoryError) as error:
    raise WeightsFileError(f'{path}: not a readable legacy PyTorch checkpoint of tensors '
                           f'({errors.error_message(error)}).') from None


def _read_storages(stream, storages, keys):
  if not isinstance(keys, list) or sorted(map(str, keys)) != sorted(map(str, storages)):
    raise ValueError('its list of storage keys does not match the storages its tensors use')
  for key in keys:
    storage = storages[key]
    (count,) = struct.unpack('<q', stream.read(8))
    if count != storage.count:
      raise ValueError(f'storage {key} holds {count} elements where {storage.count} were announced')
    raw = stream.read(count * storage.dtype.itemsize)
    if len(raw) != count * storage.dtype.itemsize:
      raise EOFError(f'the file ends inside storage {key}')
    storage.array = np.frombuffer(raw, storage.dtype)


def _as_array(name, value):
  if not isinstance(value, _Tensor):
    raise ValueError(f'{name} is not a tensor')
  return value.array()


def sha256(path):
  """The hex SHA-256 of a file, read in chunks."""
  digest = hashlib.sha256()
  with tf.io.gfile.GFile(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()
