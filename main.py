"""Train OpenGAN, or generate samples from a trained workdir.

  python main.py --config=configs/flowers.py --workdir=/tmp/flowers
  python main.py --config=configs/flowers.py --workdir=/tmp/flowers --config.batch_size=64
  python main.py --mode=extractor --config=configs/flowers.py --workdir=/tmp/flowers
  python main.py --mode=sample --workdir=/tmp/flowers --sources=a.jpg,b.jpg --output=out.png

--mode=extractor runs stage 1 (the metric extractor F) only; a later training run in the same
workdir reuses it. Rerunning a training command with the same workdir resumes from its last
checkpoint.
"""

import logging as logging_std
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from opengan_jax import cpu_backend  # noqa: E402

cpu_backend.add_xla_cpu_flags()

import jax  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from clu import platform  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from opengan_jax import sampling, train  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and samples.')
flags.DEFINE_enum(
  'mode',
  'train',
  ['train', 'extractor', 'sample'],
  'train: both stages; extractor: stage 1 (F) only; sample: sample from a trained workdir.',
)
flags.DEFINE_list('sources', [], 'mode=sample: source image files or folders.')
flags.DEFINE_string(
  'output', None, 'mode=sample: PNG file to write (default WORKDIR/samples/sampled.png).'
)
flags.DEFINE_integer('num_samples', 8, 'mode=sample: generated images per source image.')
flags.DEFINE_integer('sample_seed', 0, 'mode=sample: seed of the latents.')
config_flags.DEFINE_config_file('config', None, 'Training configuration file.', lock_config=True)
flags.mark_flags_as_required(['workdir'])


class _QuietOrbax(logging_std.Filter):
  """Drop orbax's per-save INFO lines (dozens per checkpoint); keep its warnings and errors."""

  def filter(self, record: logging_std.LogRecord) -> bool:
    return record.levelno >= logging_std.WARNING or '/orbax/' not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_QuietOrbax())
  # TensorFlow only feeds data here; hide accelerators from it so that JAX gets their memory.
  tf.config.experimental.set_visible_devices([], 'GPU')
  tf.config.experimental.set_visible_devices([], 'TPU')
  logging.info(
    'JAX process %d of %d; local devices: %s',
    jax.process_index(),
    jax.process_count(),
    jax.local_devices(),
  )
  platform.work_unit().set_task_status(f'process_index: {jax.process_index()}')

  if FLAGS.mode == 'sample':
    output = sampling.sample_from_workdir(
      FLAGS.workdir, FLAGS.sources, FLAGS.output, FLAGS.num_samples, FLAGS.sample_seed
    )
    logging.info('Wrote %s.', output)
    return
  if FLAGS.config is None:
    raise app.UsageError('--config is required for training, e.g. --config=configs/demo.py')
  if FLAGS.mode == 'extractor':
    train.train_extractor_only(FLAGS.config, FLAGS.workdir)
    return
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == '__main__':
  jax.config.config_with_absl()
  app.run(main)
