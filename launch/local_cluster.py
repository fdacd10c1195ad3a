#!/usr/bin/env python3
"""Runs a multi-worker training on this machine: N trainer processes, each with its own TF_CONFIG.

    python launch/local_cluster.py --workers=2 -- --model_dir=/tmp/cxr_2workers --epochs=1

Everything after `--` goes to `python -m trainer.main --strategy=multi_worker` unchanged. Worker 0 is the chief.
Each worker's output is printed with a `[worker i]` prefix. If a worker fails, the others are stopped (they would
otherwise wait forever in a collective) and the launcher exits with the failed worker's code; Ctrl-C (SIGINT) stops
them all too, even when the launcher was started with SIGINT ignored (`command &` in a script), and a second Ctrl-C
kills them at once instead of waiting for them to exit. SIGTERM (or SIGTERM/SIGUSR1 to one worker) preempts the job:
every worker saves a checkpoint at the same step and exits with 143, and so does the launcher; the same command
resumes from that step.

This exercises the MultiWorkerMirroredStrategy code path (TF_CONFIG, collectives, chief-only writes) without a
cluster. GPUs are hidden from the workers unless --gpus_per_worker says how to share them: N processes that each
see every GPU would each try to take all of their memory.
"""

import argparse
import contextlib
import ctypes
import errno
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

# Seconds a worker gets to exit after SIGTERM before it is killed: time to reach a step boundary and save there.
GRACE_SECONDS = 30
# Seconds to wait for a killed worker to be gone: SIGKILL acts at once, unless the process is stuck in the kernel.
KILL_WAIT_SECONDS = 5
# trainer.preemption.REQUEUE_EXIT_CODE: a worker stopped by SIGTERM or SIGUSR1 after saving its step (the launcher
# runs without importing the trainer).
REQUEUE_EXIT_CODE = 143

if sys.platform == 'linux':
  _LIBC = ctypes.CDLL(None, use_errno=True)  # loaded up front: the child must not load libraries after fork
  _PR_SET_PDEATHSIG = 1


def _die_with_parent():
  """Runs in each child before exec: the kernel sends it SIGTERM if the launcher dies, even by SIGKILL."""
  if sys.platform == 'linux':
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def free_ports(n: int) -> list[int]:
  """Asks the OS for `n` distinct free TCP ports on localhost.

  The sockets are held open together so the ports differ, then released for the workers to bind. Another program
  could take one in between; use --port_base to choose the ports yourself.

  Args:
    n: how many ports.

  Returns:
    `n` distinct port numbers.
  """
  with contextlib.ExitStack() as stack:
    sockets = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(n)]
    for s in sockets:
      s.bind(('localhost', 0))
    return [s.getsockname()[1] for s in sockets]


def check_ports_free(ports: list[int], host: str = 'localhost') -> None:
  """Raises a one-line ValueError if a port is taken, e.g. by another local cluster started with the same ports.

  Otherwise that worker fails after TensorFlow has started, with "Could not start gRPC server".
  """
  for port in ports:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
      try:
        s.bind((host, port))
      except OSError as e:
        if e.errno != errno.EADDRINUSE:
          raise
        raise ValueError(f'Port {port} on {host} is in use (another local cluster, or another program): choose '
                         'another --port_base, or leave it out to get free ports.') from None


def make_tf_configs(ports: list[int], host: str = 'localhost') -> list[dict]:
  """Builds one TF_CONFIG per worker of a cluster on `host`.

  Args:
    ports: one distinct port per worker; worker i listens on host:ports[i]. Worker 0 is the chief.
    host: the machine every worker runs on.

  Returns:
    A list of dicts {'cluster': {'worker': [...]}, 'task': {'type': 'worker', 'index': i}}, to be JSON-encoded.

  Raises:
    ValueError: if `ports` is empty, has duplicates, or holds a number outside 1..65535.
  """
  if not ports:
    raise ValueError('A cluster needs at least one worker port.')
  if len(set(ports)) != len(ports):
    raise ValueError(f'Worker ports must be distinct, got {list(ports)}.')
  bad = [p for p in ports if not 0 < p < 65536]
  if bad:
    raise ValueError(f'Ports must be in 1..65535, got {bad}.')
  cluster = {'worker': [f'{host}:{port}' for port in ports]}
  return [{'cluster': cluster, 'task': {'type': 'worker', 'index': i}} for i in range(len(ports))]


def worker_command(trainer_flags: list[str], python: str = sys.executable) -> list[str]:
  """The command line of one multi-worker trainer process.

  Raises:
    ValueError: if `trainer_flags` sets --strategy, which the launcher fixes to multi_worker.
  """
  if any(flag.split('=')[0] in ('--strategy', '-strategy') for flag in trainer_flags):
    raise ValueError('Do not pass --strategy after `--`: local_cluster.py always runs --strategy=multi_worker.')
  return [python, '-m', 'trainer.main', '--strategy=multi_worker', *trainer_flags]


def worker_envs(tf_configs: list[dict], gpus_per_worker: int = 0, base_env: dict | None = None) -> list[dict]:
  """The environment of each worker: `base_env` (default: this process's) plus its TF_CONFIG and GPU share.

  Args:
    tf_configs: from `make_tf_configs`.
    gpus_per_worker: 0 hides all GPUs; k > 0 gives worker i the GPUs i*k .. i*k+k-1.
    base_env: the environment to extend.

  Returns:
    One environment dict per worker.

  Raises:
    ValueError: if `gpus_per_worker` is negative.
  """
  if gpus_per_worker < 0:
    raise ValueError(f'--gpus_per_worker must be zero or more, got {gpus_per_worker}.')
  envs = []
  for i, tf_config in enumerate(tf_configs):
    env = dict(os.environ if base_env is None else base_env)
    env['TF_CONFIG'] = json.dumps(tf_config)
    env['CUDA_VISIBLE_DEVICES'] = ','.join(str(g) for g in range(i * gpus_per_worker, (i + 1) * gpus_per_worker))
    env['PYTHONUNBUFFERED'] = '1'  # so lines arrive as they are printed, not when a pipe buffer fills
    envs.append(env)
  return envs


class _StopSignals:
  """While entered, SIGINT and SIGTERM only note themselves; the supervisor acts on them at moments of its choosing.

  Python's own handling raises KeyboardInterrupt (or the SystemExit of a handler) at whichever bytecode runs when the
  signal arrives: inside Popen() (a started worker that no list holds), inside Thread.start() (the clean-up's join
  then raises RuntimeError), or between Popen.poll()'s acquire of its lock and the try that releases it (every later
  poll then says "running", and the stop waits out both of its grace periods for a worker long dead). And Python
  installs no KeyboardInterrupt at all when the process starts with SIGINT ignored, as a shell without job control
  starts `command &`: Ctrl-C then reached no one. These handlers replace an ignored SIGINT too. The install and restore
  are trainer.preemption.Watcher's; the launcher does not import it (the trainer's modules load TensorFlow).
  """

  def __init__(self):
    self.received = []
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():  # Python takes signals in the main thread only.
      for sig in (signal.SIGINT, signal.SIGTERM):
        self._previous[sig] = signal.signal(sig, self._note)
    return self

  def __exit__(self, *exc):
    for sig, previous in self._previous.items():
      if previous is not None:  # None: a handler installed outside Python, which cannot be put back.
        signal.signal(sig, previous)
    self._previous.clear()

  def _note(self, signum, frame):
    del frame
    self.received.append(signum)  # nothing that can block or raise: it may run inside any of the main thread's calls

  def check(self) -> None:
    """Acts on the first signal received: SIGINT raises KeyboardInterrupt, SIGTERM exits with 128 + its number."""
    if self.received:
      if self.received[0] == signal.SIGINT:
        raise KeyboardInterrupt
      sys.exit(128 + self.received[0])


def supervise(commands: list[list[str]], envs: list[dict], *, out=None) -> int:
  """Starts one process per command, prefixes and forwards their output, and waits for all of them.

  If one fails, or SIGINT or SIGTERM arrives, every process still running is stopped: SIGTERM to its process group,
  then SIGKILL after GRACE_SECONDS, or at once on a SIGINT during the wait (a second Ctrl-C). The signals are taken
  only between the supervisor's steps; once every process is stopped, SIGINT raises KeyboardInterrupt and SIGTERM
  SystemExit(143) (128 + SIGTERM), as a scheduler's preemption expects.

  Args:
    commands: one command line per worker.
    envs: one environment per worker.
    out: where the prefixed output goes (default: sys.stdout).

  Returns:
    0 if every process succeeded, else the exit status of the first that failed (128 + signal number if a signal
    killed it).
  """
  out = out or sys.stdout
  lock = threading.Lock()
  # Once a worker has failed, the others' lines are its consequences (each collective's 60-line UnavailableError):
  # only the failed worker's own are still shown, with one line naming it.
  shown = set(range(len(commands)))

  def emit(line, worker=None):
    with lock:
      if worker is None or worker in shown:
        out.write(line)
        out.flush()

  procs = []
  threads = []
  with _StopSignals() as signals:
    try:
      # All processes start before any reader thread: forking while threads run can deadlock the child.
      for i, (command, env) in enumerate(zip(commands, envs)):
        signals.check()  # no further worker after a Ctrl-C
        procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      errors='replace', start_new_session=True, preexec_fn=_die_with_parent))
        emit(f'[local_cluster] worker {i}: pid {procs[-1].pid}\n')
      for i, proc in enumerate(procs):
        threads.append(threading.Thread(target=_forward, args=(proc.stdout, f'[worker {i}] ',
                                                               functools.partial(emit, worker=i)), daemon=True))
        threads[-1].start()
      requeue_deadline = None
      while True:
        signals.check()
        codes = [proc.poll() for proc in procs]
        failed = [(i, code) for i, code in enumerate(codes) if code not in (None, 0)]
        if failed and failed[0][1] == REQUEUE_EXIT_CODE:
          # Preempted: every worker saves at the same step and exits so; their lines say where.
          if requeue_deadline is None:
            emit(f'[local_cluster] worker {failed[0][0]} stopped for a requeue (exit code {REQUEUE_EXIT_CODE}); '
                 'waiting for the others to save.\n')
            requeue_deadline = time.monotonic() + GRACE_SECONDS
          if all(code is not None for code in codes) or time.monotonic() > requeue_deadline:
            emit('[local_cluster] stopped at a checkpoint: run the same command again to resume.\n')
            return REQUEUE_EXIT_CODE
          time.sleep(0.2)
          continue
        if failed:
          i, code = failed[0]
          with lock:
            shown.intersection_update({i})
          threads[i].join(timeout=5)  # its last lines, usually the error, come before the verdict
          how = f' (killed by {signal.Signals(-code).name})' if code < 0 else ''
          emit(f'[local_cluster] worker {i} failed with exit code {code}{how}; stopping the others (their output is '
               'not shown from here on).\n')
          return code if code > 0 else 128 - code
        if all(code == 0 for code in codes):
          emit(f'[local_cluster] all {len(procs)} workers finished.\n')
          return 0
        time.sleep(0.2)
    finally:
      sigints = signals.received.count(signal.SIGINT)
      _stop(procs, hurry=lambda: signals.received.count(signal.SIGINT) > sigints)
      for thread in threads:
        thread.join(timeout=5)


def _forward(stream, prefix: str, emit) -> None:
  for line in stream:
    emit(prefix + line if line.endswith('\n') else prefix + line + '\n')


def _stop(procs: list[subprocess.Popen], hurry=lambda: False) -> None:
  """Stops every running process and its children: SIGTERM, then SIGKILL after GRACE_SECONDS or once `hurry()`.

  Returns after KILL_WAIT_SECONDS more even if a killed process is still there (stuck in the kernel, where nothing
  can end it sooner).
  """
  running = [proc for proc in procs if proc.poll() is None]
  for sig, wait in ((signal.SIGTERM, GRACE_SECONDS), (signal.SIGKILL, KILL_WAIT_SECONDS)):
    for proc in running:
      with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)  # start_new_session made each worker the leader of its own group
    deadline = time.monotonic() + wait
    while running and time.monotonic() < deadline and not (sig == signal.SIGTERM and hurry()):
      time.sleep(0.05)
      running = [proc for proc in running if proc.poll() is None]
    if not running:
      return


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  ours, trainer_flags = (argv[:argv.index('--')], argv[argv.index('--') + 1:]) if '--' in argv else (argv, [])
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                   usage='%(prog)s --workers=N [options] -- [trainer flags]')
  parser.add_argument('--workers', type=int, required=True, help='number of worker processes (>= 1)')
  parser.add_argument('--port_base', type=int, default=None,
                      help='worker i listens on localhost:port_base+i (default: free ports chosen by the OS)')
  parser.add_argument('--gpus_per_worker', type=int, default=0,
                      help='GPUs given to each worker, in order; 0 (default) hides all GPUs')
  args = parser.parse_args(ours)
  if args.workers < 1:
    parser.error(f'--workers must be 1 or more, got {args.workers}.')
  try:
    ports = (free_ports(args.workers) if args.port_base is None
             else list(range(args.port_base, args.port_base + args.workers)))
    command = worker_command(trainer_flags)
    envs = worker_envs(make_tf_configs(ports), args.gpus_per_worker)
    if args.port_base is not None:
      check_ports_free(ports)
  except ValueError as e:
    parser.error(str(e))

  # SIGTERM (e.g. from a scheduler or `timeout`) unwinds like Ctrl-C, through supervise's clean-up, as SystemExit(143).
  try:
    return supervise([command] * args.workers, envs)
  except KeyboardInterrupt:
    print('[local_cluster] interrupted; all workers stopped.', file=sys.stderr)
    return 130


if __name__ == '__main__':
  sys.exit(main())
