"""One writer per folder: the lock a training run holds on its --model_dir while it runs, and `trainer.export` and
`trainer.evaluate` on the folder they write.

Two runs writing one model dir interleave their checkpoints (one run's ckpt-2 beside the other's ckpt-3) and lose a
report; two exports into one folder delete each other's unfinished export. An export (`trainer.export.committing`)
takes the lock itself unless its process holds it already (`held`): a training run's own final export.

The lock is an flock on `model_dir/.lock` where the filesystem has one: the kernel releases it when its
process dies, however it dies, so a lock left by a killed run is never in the way. Where flock is not supported (some
network and FUSE filesystems), `model_dir/.lock.lease` is a lease instead: created exclusively, naming its owner's
host and pid, and refreshed every LEASE_REFRESH_SECONDS. A lease is stale when its owner is a dead process on this
host, or when it has not been refreshed for LEASE_STALE_SECONDS (an owner on another host that died); a stale lease
is taken over with a warning.

Only the chief of a multi-worker job takes the lock: the other workers write nothing in model_dir itself.
"""

import contextlib
import errno
import fcntl
import json
import os
import socket
import threading
import time

from absl import logging

from trainer import errors

LOCK_NAME = '.lock'
LEASE_REFRESH_SECONDS = 60
LEASE_STALE_SECONDS = 300
# What flock raises where the filesystem has no locks (NFS without lockd, some FUSE mounts).
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
_HELD = set()  # The folders this process holds: their real paths.


class LockedError(errors.InvalidValue):
  """Another live run holds the model dir: the commands print it on one line."""


def held(model_dir: str) -> bool:
  """Whether this process holds the lock on `model_dir` (a training run, during its final export)."""
  return os.path.realpath(model_dir) in _HELD


@contextlib.contextmanager
def hold(model_dir: str, *, what: str = 'training run', flag: str = '--model_dir'):
  """Holds the lock on `model_dir` for the block.

  Args:
    model_dir: the folder to write.
    what: what this process is, for the refusal another writer gets ('training run', 'export', 'evaluation').
    flag: the flag that named `model_dir`, for the refusal this process gets.

  Raises:
    LockedError: another live writer holds it (another process, or this one in another block); the message names
      what it is, its host and pid.
  """
  path = os.path.join(model_dir, LOCK_NAME)
  try:
    fd = _flock(path)
  except OSError as e:
    if e.errno not in _NO_FLOCK:
      raise
    with _lease(model_dir, path + '.lease', what, flag), _holding(model_dir):
      yield
    return
  if fd is None:
    raise LockedError(_refusal(model_dir, _read_owner(path), flag))
  try:
    owner = _read_owner(path)
    if owner:
      logging.warning('Taking over the lock %s of a run that ended without releasing it (%s).', path, owner)
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(_me(what)).encode())
    with _holding(model_dir):
      yield
  finally:
    # Unlinked before it is unlocked; `_flock` checks that the file it locked is still the one at `path`.
    with contextlib.suppress(FileNotFoundError):
      os.remove(path)
    os.close(fd)


def _flock(path: str) -> int | None:
  """An fd holding an flock on the file at `path`, or None when another process holds it."""
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      return None
    except BaseException:
      os.close(fd)
      raise
    try:
      if os.fstat(fd).st_ino == os.stat(path).st_ino:
        return fd
    except FileNotFoundError:
      pass
    os.close(fd)  # Its owner removed it between our open and our flock: lock the new one.


@contextlib.contextmanager
def _holding(model_dir: str):
  _HELD.add(os.path.realpath(model_dir))
  try:
    yield
  finally:
    _HELD.discard(os.path.realpath(model_dir))


def _me(what: str) -> dict:
  return {'host': socket.gethostname(), 'pid': os.getpid(), 'what': what}


def _read_owner(path: str) -> dict:
  try:
    with open(path) as f:
      owner = json.load(f)
    return owner if isinstance(owner, dict) else {}
  except (OSError, ValueError):
    return {}


def _refusal(model_dir: str, owner: dict, flag: str) -> str:
  # Locks written before they named their owner were all training runs'.
  who = f'{owner.get("what", "training run")} (pid {owner.get("pid", "?")} on {owner.get("host", "?")})'
  return (f'{flag}={model_dir} is in use by another {who}: wait for it to finish, stop it, or give this one '
          f'another {flag}.')


def _stale(path: str, owner: dict) -> bool:
  if owner.get('host') == socket.gethostname() and isinstance(owner.get('pid'), int):
    try:
      os.kill(owner['pid'], 0)
    except ProcessLookupError:
      return True
    except PermissionError:  # Alive, under another user.
      return False
    return False
  try:
    return time.time() - os.path.getmtime(path) > LEASE_STALE_SECONDS
  except FileNotFoundError:
    return True


@contextlib.contextmanager
def _lease(model_dir: str, path: str, what: str, flag: str):
  """The lock as a lease file at `path`, for filesystems without flock."""
  for attempt in range(2):
    try:
      fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
      break
    except FileExistsError:
      owner = _read_owner(path)
      if attempt or not _stale(path, owner):
        raise LockedError(_refusal(model_dir, owner, flag)) from None
      logging.warning('Taking over the stale lock %s of a run that is gone (%s).', path, owner)
      with contextlib.suppress(FileNotFoundError):
        os.remove(path)
  with os.fdopen(fd, 'w') as f:
    json.dump(_me(what), f)
  stop = threading.Event()

  def refresh():
    while not stop.wait(LEASE_REFRESH_SECONDS):
      with contextlib.suppress(OSError):
        os.utime(path)

  thread = threading.Thread(target=refresh, daemon=True)
  thread.start()
  try:
    yield
  finally:
    stop.set()
    thread.join()
    with contextlib.suppress(FileNotFoundError):
      os.remove(path)
