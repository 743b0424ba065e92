"""Evaluate a trained GAN workdir in the feature space of a trained evaluator.

  python -m opengan_jax.evaluate --workdir=/tmp/flowers32 --evaluator_dir=/tmp/evaluator32
  python -m opengan_jax.evaluate --workdir=/tmp/flowers32 --evaluator_dir=/tmp/evaluator32 \
    --num_samples 5000 --batch_size 256 --seed 0 --step 2000

Writes WORKDIR/eval/report_<step>.json, TensorBoard scalars under 'eval/' in WORKDIR, and logs a
table of the figures. opengan_jax.evaluation.protocols describes the protocols and figures.
"""

import os
import pathlib

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from opengan_jax import cpu_backend  # noqa: E402

cpu_backend.add_xla_cpu_flags()

import jax  # noqa: E402
import ml_collections  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from clu import metric_writers  # noqa: E402

from opengan_jax import checkpointing, networks, sampling, train, train_extractor  # noqa: E402
from opengan_jax.evaluation import evaluator as evaluator_lib  # noqa: E402
from opengan_jax.evaluation import protocols  # noqa: E402


def _gan_steps(workdir: pathlib.Path) -> list[int]:
  directory = workdir / 'checkpoints' / train.STAGE
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def restore_generator_at(
  config: ml_collections.ConfigDict, workdir: str | pathlib.Path, step: int | None
):
  """Return (G, its variables, step) from the GAN checkpoint of `step` (None: the newest).

  Raises FileNotFoundError when the workdir has no GAN checkpoint, and ValueError when `step`
  is not one of its checkpoints.
  """
  workdir = pathlib.Path(workdir)
  steps = _gan_steps(workdir)
  if not steps:
    raise FileNotFoundError(
      f'no GAN checkpoint in {workdir / "checkpoints" / train.STAGE}: train the workdir first, '
      'or check --workdir.'
    )
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise ValueError(
      f'--step={step} has no GAN checkpoint in {workdir}; available steps: '
      f'{", ".join(map(str, steps))}.'
    )
  generator, discriminator = networks.make_networks(config, config.dataset.num_train_classes)
  target = checkpointing.on_first_device(
    jax.eval_shape(lambda: train.initial_gan_state(config, generator, discriminator))
  )
  manager = checkpointing.make_manager(workdir, train.STAGE, config.keep_checkpoints)
  state = manager.restore(step, args=ocp.args.StandardRestore(target))
  return generator, jax.device_get(state.generator.variables()), step


def restore_gan(
  workdir: str | pathlib.Path, step: int | None = None
) -> protocols.GanUnderEvaluation:
  """Restore G (and F for an OpenGAN workdir) and the real images of a trained workdir."""
  workdir = str(workdir)
  config = sampling.load_workdir_config(workdir)
  generator, generator_variables, step = restore_generator_at(config, workdir, step)
  extractor, extractor_variables = None, None
  if config.model.conditioning == 'feature':
    extractor, extractor_variables = train_extractor.restore_extractor(config, workdir)
  split = train.load_data(config, workdir, config.resolution)
  logging.info('Restored G of GAN step %d from %s.', step, workdir)
  return protocols.make_gan_under_evaluation(
    config, generator, generator_variables, step, split, extractor, extractor_variables
  )


def evaluate_workdir(
  workdir: str | pathlib.Path,
  evaluator_dir: str | pathlib.Path,
  options: protocols.EvaluationOptions | None = None,
  step: int | None = None,
) -> pathlib.Path:
  """Evaluate the GAN checkpoint of `step` (None: the newest); return the report's path.

  The evaluator is restored first, so a missing evaluator or one of another resolution fails
  before the GAN and its data are loaded.
  """
  options = protocols.EvaluationOptions() if options is None else options
  options.check()
  config = sampling.load_workdir_config(str(workdir))
  evaluator = evaluator_lib.restore_evaluator(evaluator_dir, expected_resolution=config.resolution)
  model = restore_gan(workdir, step)
  report = protocols.evaluate(model, evaluator, options)
  writer = metric_writers.create_default_writer(
    str(workdir), just_logging=jax.process_index() > 0, asynchronous=False
  )
  path = protocols.write_report(report, workdir, writer)
  writer.close()
  return path


def _parse_step(text: str) -> int | None:
  if text == 'latest':
    return None
  if not text.isdigit():
    raise app.UsageError(f"--step={text!r} is invalid: use 'latest' or a GAN step number.")
  return int(text)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  values = flags.FLAGS
  options = protocols.EvaluationOptions(
    num_samples=values.num_samples,
    batch_size=values.batch_size,
    seed=values.seed,
    covariance=values.covariance,
    grid_sources=values.grid_sources,
    grid_latents=values.grid_latents,
  )
  path = evaluate_workdir(values.workdir, values.evaluator_dir, options, _parse_step(values.step))
  logging.info('Wrote %s.', path)


def _define_flags() -> None:
  flags.DEFINE_string('workdir', None, 'Trained GAN workdir (config.json, checkpoints).')
  flags.DEFINE_string('evaluator_dir', None, 'Directory of a trained evaluator (train_evaluator).')
  flags.DEFINE_integer('num_samples', 5000, 'Maximum generated images per protocol.')
  flags.DEFINE_integer('batch_size', 256, 'Images per forward pass of G, F and the evaluator.')
  flags.DEFINE_integer('seed', 0, 'Seed of the real halves, latents, features and KID subsets.')
  flags.DEFINE_string('step', 'latest', "GAN checkpoint step to evaluate, or 'latest'.")
  flags.DEFINE_enum(
    'covariance', 'diagonal', list(protocols.COVARIANCES), 'Class Gaussians of T-SM and N-SM.'
  )
  flags.DEFINE_integer('grid_sources', 16, 'Sources S of the latent/feature split grid.')
  flags.DEFINE_integer('grid_latents', 16, 'Latents L of the latent/feature split grid.')
  flags.mark_flags_as_required(['workdir', 'evaluator_dir'])


if __name__ == '__main__':
  # Flags are defined only when run as a command, so importing this module defines none.
  _define_flags()
  jax.config.config_with_absl()
  app.run(main)
