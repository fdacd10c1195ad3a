#!/usr/bin/env python3
"""Entrypoint of an Indexed Job pod: sets TF_CONFIG from the pod's index, then runs the given command.

    python launch/kubernetes/tf_config_from_index.py -- python -m trainer.main --strategy=multi_worker ...

In an Indexed Job, Kubernetes numbers the pods 0..completions-1, puts the number in JOB_COMPLETION_INDEX and names
the pod's host <job name>-<index>. With `subdomain` set to a headless Service, worker i is then reachable at
<job name>-<i>.<service>:<port>, which is the whole cluster TF_CONFIG needs. Worker 0 is the chief.

Reads JOB_COMPLETION_INDEX (set by Kubernetes) and JOB_NAME, SERVICE_NAME, NUM_WORKERS, PORT (set in the manifest,
see indexed-job.yaml).
"""

import json
import os
import sys

REQUIRED_ENV = ('JOB_COMPLETION_INDEX', 'JOB_NAME', 'SERVICE_NAME', 'NUM_WORKERS', 'PORT')


def make_tf_config(index: int, num_workers: int, job_name: str, service: str, port: int) -> dict:
  """The TF_CONFIG of pod `index` of an Indexed Job of `num_workers` pods behind a headless Service.

  Args:
    index: the pod's JOB_COMPLETION_INDEX.
    num_workers: the Job's `completions` (= `parallelism`: every worker must run at once).
    job_name: the Job's metadata.name.
    service: the headless Service named in the pod template's `subdomain`.
    port: the port every worker listens on.

  Returns:
    {'cluster': {'worker': ['<job>-0.<service>:<port>', ...]}, 'task': {'type': 'worker', 'index': index}}.

  Raises:
    ValueError: if `index` is not in 0..num_workers-1.
  """
  if not 0 <= index < num_workers:
    raise ValueError(f'JOB_COMPLETION_INDEX={index} is not in 0..{num_workers - 1}: set NUM_WORKERS to the Job\'s '
                     'completions.')
  workers = [f'{job_name}-{i}.{service}:{port}' for i in range(num_workers)]
  return {'cluster': {'worker': workers}, 'task': {'type': 'worker', 'index': index}}


def main(argv: list[str]) -> None:
  command = argv[argv.index('--') + 1:] if '--' in argv else argv[1:]
  if not command:
    sys.exit(f'usage: {argv[0]} -- COMMAND [ARGS...]')
  missing = [name for name in REQUIRED_ENV if not os.environ.get(name)]
  if missing:
    sys.exit(f'{argv[0]}: {", ".join(missing)} not set; run it as the command of an Indexed Job pod '
             '(launch/kubernetes/indexed-job.yaml).')
  try:
    tf_config = make_tf_config(int(os.environ['JOB_COMPLETION_INDEX']), int(os.environ['NUM_WORKERS']),
                               os.environ['JOB_NAME'], os.environ['SERVICE_NAME'], int(os.environ['PORT']))
  except ValueError as e:
    sys.exit(f'{argv[0]}: {e}')
  os.environ['TF_CONFIG'] = json.dumps(tf_config)
  # exec, not a child process: the trainer becomes the container's main process and gets Kubernetes' SIGTERM.
  os.execvp(command[0], command)


if __name__ == '__main__':
  main(sys.argv)
