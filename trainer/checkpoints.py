"""The run's checkpoints on disk: restore the newest readable one, repair what a kill or a damaged file leaves, the
preempted run's checkpoint, and save. Plain arguments only (no Config).

CheckpointManager commits a checkpoint by rewriting the `checkpoint` state file after the checkpoint's own files, so
a kill in the middle of a save leaves the previous checkpoint in charge. What is left to repair: a state file lost or
garbled (`restore` finds the checkpoints by their files, and `repair` rewrites it), a checkpoint damaged afterwards
(skipped, then moved aside), a preempted checkpoint older than the epoch committed after it (ignored).
"""

import glob
import os

from absl import logging
import keras
import tensorflow as tf

from trainer import errors


def seed_states(model: keras.Model) -> list:
  """The model's random-seed states: Keras counts them among `variables` but not `weights`."""
  weights = {id(weight) for weight in model.weights}
  return [variable for variable in model.variables if id(variable) not in weights]


def restore(checkpoint: tf.train.Checkpoint, directory: str, *, repair: bool = False) -> str | None:
  """Restores the newest checkpoint in `directory` that can be read; returns its path, or None for a new run.

  A file damaged after its checkpoint was committed (a disk error, a copy cut short) fails the bundle's checksums or
  lengths; that checkpoint is skipped, with a warning, for the one before it. The checkpoints are found by their
  files as well as by the state file: a state file lost or garbled would otherwise start the run over and overwrite
  checkpoints it never looked at.

  Args:
    checkpoint: the run's checkpoint object.
    directory: the chief's checkpoint folder.
    repair: once a checkpoint is restored, `repair` the folder (the chief's job: the others only read), so that
      CheckpointManager keeps and trims its checkpoints as usual.

  Returns:
    The path restored, or None when `directory` holds no checkpoint.

  Raises:
    ValueError: the checkpoints are of another model, or none of them can be read.
  """
  paths, state_ok = _checkpoint_paths(directory)
  if not paths:
    return None
  if not state_ok:
    logging.warning('The state file %s is missing, unreadable or incomplete; looking for a checkpoint among the '
                    'files found: %s',
                    os.path.join(directory, 'checkpoint'), ', '.join(os.path.basename(p) for p in paths))
  skipped = []
  for path in reversed(paths):
    try:
      checkpoint.restore(path).assert_existing_objects_matched()
    except (tf.errors.OpError, IndexError) as e:  # IndexError: TF's reader on a data file cut short.
      logging.warning('Skipping checkpoint %s, which cannot be read: %s', path, errors.error_reason(e))
      skipped.append(path)
      continue
    except (AssertionError, ValueError) as e:
      raise errors.InvalidValue(f'The checkpoint {path} is of another model ({str(e).splitlines()[0]}): give this run '
                                'a new --model_dir.') from e
    if repair:
      _repair(directory, kept=paths[:paths.index(path) + 1], skipped=skipped, state_ok=state_ok)
    return path
  raise errors.InvalidValue(f'No checkpoint in {directory} can be read (see the warnings above): move the folder away '
                            'to start over, or give this run a new --model_dir.')


def _repair(directory: str, *, kept: list[str], skipped: list[str], state_ok: bool) -> None:
  """Moves the unreadable checkpoints aside and rewrites the state file to list `kept`, the newest restored.

  Only once the run goes on from an older checkpoint: a run that stops changes nothing.
  """
  for unreadable in skipped:
    _move_aside(unreadable)
  if skipped or not state_ok:
    # Relative names, as CheckpointManager writes them, so that the folder can be moved. With their times: a
    # CheckpointManager counts a listed checkpoint without one as preserved for ever, and would never trim it.
    tf.compat.v1.train.update_checkpoint_state(
        directory, os.path.basename(kept[-1]), all_model_checkpoint_paths=[os.path.basename(p) for p in kept],
        all_model_checkpoint_timestamps=[_written_at(p) for p in kept], last_preserved_timestamp=0.0)


def _written_at(prefix: str) -> float:
  """When a checkpoint's .index file (written last) was written, in seconds since the epoch; 0 if it is gone."""
  try:
    return tf.io.gfile.stat(prefix + '.index').mtime_nsec / 1e9
  except tf.errors.NotFoundError:
    return 0.0


def _move_aside(prefix: str) -> None:
  """Moves an unreadable checkpoint's files into checkpoints/unreadable/: the epoch trained again would save under
  the same name, and a file a disk error damaged may still hold what someone wants to recover."""
  folder = os.path.join(os.path.dirname(prefix), 'unreadable')
  tf.io.gfile.makedirs(folder)
  for name in tf.io.gfile.glob(glob.escape(prefix) + '.*'):
    tf.io.gfile.rename(name, os.path.join(folder, os.path.basename(name)), overwrite=True)
  logging.warning('Moved the files of %s to %s.', os.path.basename(prefix), folder)


def _checkpoint_paths(directory: str) -> tuple[list[str], bool]:
  """The checkpoint prefixes in `directory`, oldest first, and whether the state file lists every one of them.

  A prefix counts when its .index file exists (TF writes it last); the state file's own list is kept too, so that a
  listed checkpoint whose files are gone is reported as unreadable rather than ignored.
  """
  try:
    state = tf.train.get_checkpoint_state(directory)
  except ValueError:  # An empty or truncated state file: TF's parser rejects it.
    state = None
  listed = list(state.all_model_checkpoint_paths) if state else []
  found = [path[:-len('.index')] for path in tf.io.gfile.glob(os.path.join(directory, 'ckpt-*.index'))]
  listed_names = {os.path.basename(p) for p in listed}
  paths = listed + [p for p in found if os.path.basename(p) not in listed_names]

  def number(path):
    tail = os.path.basename(path).rsplit('-', 1)[-1]
    return int(tail) if tail.isdigit() else -1

  return sorted(paths, key=number), state is not None and {os.path.basename(p) for p in found} <= listed_names


def restore_preempted(checkpoint: tf.train.Checkpoint, directories: list[str], *, epoch: int, fallback) -> bool:
  """Restores a preempted run's checkpoint if it is newer than the epoch checkpoint restored; True if it did.

  Args:
    checkpoint: the preempted-checkpoint object (the run's checkpoint as its `run` child).
    directories: the folders of preempted checkpoints to try in turn (this worker's own, then the chief's).
    epoch: the epochs the restored epoch checkpoint has done.
    fallback: (the run's checkpoint, the path restored or None), restored again when every preempted one is torn.

  Raises:
    ValueError: a preempted checkpoint exists, none can be read, and there is no epoch checkpoint to go back to.
  """
  paths = [path for path in map(tf.train.latest_checkpoint, directories) if path]
  for path in paths:
    try:
      if int(tf.train.load_checkpoint(path).get_tensor('run/epoch/.ATTRIBUTES/VARIABLE_VALUE')) < epoch:
        return False  # Left by a kill between the next epoch's commit and its removal.
      checkpoint.restore(path).assert_existing_objects_matched()
      return True
    except (tf.errors.OpError, IndexError, AssertionError, ValueError) as e:
      logging.warning('Skipping the preempted run\'s checkpoint %s, which cannot be read: %s', path,
                      errors.error_reason(e) if isinstance(e, tf.errors.OpError) else e)
  if not paths:
    return False
  run_checkpoint, restored = fallback
  if not restored:  # Nothing to restore over what a failed restore may have assigned.
    raise errors.InvalidValue(f'The preempted run\'s checkpoint {paths[-1]} cannot be read (see the warnings above): '
                              'move it away to start over, or give this run a new --model_dir.')
  run_checkpoint.restore(restored).assert_existing_objects_matched()
  return False


def save(manager: tf.train.CheckpointManager, epoch: int) -> None:
  """Saves a checkpoint named after the epoch; a failed write (a full disk) becomes a one-line OSError.

  Raises:
    OSError: the checkpoint could not be written. The previous one stays in charge.
  """
  try:
    manager.save(checkpoint_number=epoch)
  except tf.errors.OpError as e:
    # TF writes a checkpoint into '<prefix>_temp' before renaming it into place.
    for partial in tf.io.gfile.glob(os.path.join(manager.directory, '*_temp')):
      tf.io.gfile.rmtree(partial)
    raise errors.WriteFailed(f'Cannot write a checkpoint in {manager.directory}: {errors.error_reason(e)}. The '
                             'previous one is kept: make room and run the same command again to resume.') from e


def restore_best(model: keras.Model, best_manager: tf.train.CheckpointManager, model_dir: str) -> None:
  """Loads the best epoch so far into `model`: the worker's own copy, which it has finished writing, else the
  chief's (a worker that joined a resumed run has none of its own)."""
  path = best_manager.latest_checkpoint or tf.train.latest_checkpoint(os.path.join(model_dir, 'best'))
  if path:
    logging.info('The next phase starts from the best epoch so far, %s.', path)
    tf.train.Checkpoint(model=model).restore(path).assert_existing_objects_matched()
