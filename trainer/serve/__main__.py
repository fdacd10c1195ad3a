r"""`python -m trainer.serve`: one exported model behind TF Serving's REST API, with a page at / (see
`trainer.serve`, trainer/serve/__init__.py, and its routes, trainer/serve/app.py).

    python -m trainer.serve --model_dir=runs/ensemble        # or: cxr-serve --model_dir=runs/ensemble
    python -m trainer.serve --model_dir=runs/resnet50 --port=8080 --model_name=pneumonia --host=0.0.0.0
"""

import os

from absl import app
from absl import flags
from absl import logging

from trainer import cli
from trainer import config

flags.DEFINE_string('model_dir', None, 'The --model_dir of a finished training run, or the --out_dir of '
                    'trainer.export (a run or an ensemble).', required=True)
cli.define_integer('port', 8501, 'The port (TF Serving\'s REST port by default).', config.Range(0, 65535))
flags.DEFINE_string('host', '127.0.0.1', 'The address to listen on: 127.0.0.1 answers this computer only; 0.0.0.0 '
                    'every network it is on (as in a container).')
flags.DEFINE_string('model_name', 'cxr', 'The model\'s name in the URLs: /v1/models/MODEL_NAME:predict.')

FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  # Imported once the flags are good: TensorFlow takes seconds to start.
  import uvicorn  # pylint: disable=import-outside-toplevel

  from trainer import serve  # pylint: disable=import-outside-toplevel
  from trainer.serve import app as app_lib  # pylint: disable=import-outside-toplevel

  service = serve.load(os.path.expanduser(FLAGS.model_dir))
  logging.info('Serving %s (version %d, threshold %.4f, %s) as %r on http://%s:%d/', service.model_dir,
               service.version, service.threshold, service.threshold_rule, FLAGS.model_name, FLAGS.host, FLAGS.port)
  uvicorn.run(app_lib.create_app(service, FLAGS.model_name), host=FLAGS.host, port=FLAGS.port, log_level='info')


def run():
  """The console script's entry point (setup.cfg), as `python -m` runs it."""
  cli.run(main)


if __name__ == '__main__':
  run()
