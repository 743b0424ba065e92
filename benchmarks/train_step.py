"""Benchmark one GAN training iteration (D step, then G step through the frozen F).

  python benchmarks/train_step.py --resolution 32 --ch 32 --batch 32
  python benchmarks/train_step.py --resolution 64 --ch 32 --batch 16 --input both \
    --image_dir ../shared/data/flowers102

The iteration is gan.make_train_step, as the training job runs it, over all local devices, with
F the ResNet18 of the config's default stem for the resolution ('cifar' up to 64 px). F's and
the GAN's weights are random: the step's cost does not depend on their values.

--input synthetic feeds one fixed batch of uniform noise in [-1, 1] that stays on the device.
--input real draws each step's batch with the project's BatchSampler from images decoded by the
folder pipeline, and the timed step includes making that batch on the host and copying it to the
devices. --input both times synthetic first, then real, and reports the overhead of real input.

One JSON line goes to stdout; per-step times go to stderr.
"""

import argparse
import time

import common
import jax
import jax.numpy as jnp
import numpy as np

from opengan_jax import config_checks, gan, input_pipeline, parallel

SEED = 0


def parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--resolution', type=int, default=32, choices=(32, 64, 128, 256))
  parser.add_argument('--ch', type=int, default=32, help='channel multiplier of G and D')
  common.add_common_arguments(parser, default_batch=32)
  parser.add_argument('--input', choices=('synthetic', 'real', 'both'), default='synthetic')
  parser.add_argument(
    '--image_dir',
    default=str(common.REPO_ROOT.parent / 'shared' / 'data' / 'flowers102'),
    help='class-per-folder image root for --input real or both',
  )
  parser.add_argument(
    '--num_train_classes', type=int, default=82, help='classes of image_dir used for training'
  )
  parser.add_argument(
    '--cache_dir',
    default='/tmp/opengan-bench-cache',
    help='folder for the decoded images (.npz), reused by later runs',
  )
  return parser.parse_args()


def synthetic_batch(batch: int, resolution: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(SEED)
  return {
    'image': rng.uniform(-1, 1, (batch, resolution, resolution, 3)).astype(np.float32),
    'label': rng.integers(0, 10, (batch,)).astype(np.int32),
    'index': np.arange(batch, dtype=np.int32),
  }


def real_sampler(args: argparse.Namespace, config) -> tuple[input_pipeline.BatchSampler, float]:
  """Return a BatchSampler over the training classes of image_dir, and the load time in s."""
  config.dataset.source = 'folder'
  config.dataset.image_dir = args.image_dir
  config.dataset.num_train_classes = args.num_train_classes
  start = time.perf_counter()
  split = input_pipeline.load_class_split(config.dataset, config.resolution, args.cache_dir)
  load_s = time.perf_counter() - start
  sampler = input_pipeline.BatchSampler(
    split.train_images,
    split.train_labels,
    global_batch_size=config.batch_size,
    seed=SEED,
    random_flip=config.dataset.random_flip,
  )
  return sampler, load_s


def main() -> None:
  args = parse_args()
  config = common.model_config(args.resolution, args.ch, args.batch, args.dtype)
  mesh = parallel.make_mesh(jax.local_devices())
  config_checks.validate_config(config, num_devices=mesh.devices.size)
  generator, discriminator, extractor = common.make_networks(config, num_classes=1)
  image_size = config_checks.extractor_image_size(config)

  g_tx = gan.make_optimizer(config.gan.g_learning_rate, config.gan.b1, config.gan.b2)
  d_tx = gan.make_optimizer(config.gan.d_learning_rate, config.gan.b1, config.gan.b2)
  state = gan.create_gan_state(
    jax.random.PRNGKey(SEED),
    generator,
    discriminator,
    g_tx,
    d_tx,
    resolution=config.resolution,
    z_dim=config.model.z_dim,
    conditioning=config.model.conditioning,
    feature_dim=config.extractor.feature_dim,
  )
  extractor_variables = jax.jit(extractor.init, static_argnames='train')(
    jax.random.PRNGKey(SEED + 1), jnp.zeros((1, image_size, image_size, 3)), train=False
  )
  state = parallel.replicate(state, mesh)
  extractor_variables = parallel.replicate(extractor_variables, mesh)
  train_step = gan.make_train_step(
    mesh,
    generator=generator,
    discriminator=discriminator,
    extractor=extractor,
    g_tx=g_tx,
    d_tx=d_tx,
    conditioning=config.model.conditioning,
    z_dim=config.model.z_dim,
    feature_loss_weight=config.gan.feature_loss_weight,
    extractor_image_size=image_size,
  )

  batch = parallel.global_batch(synthetic_batch(args.batch, args.resolution), mesh)
  rss_before_compile = common.peak_rss_mb()
  compiled, compile_s, flops = common.compile_timed(train_step, state, batch, extractor_variables)

  def run_step(step_batch):
    nonlocal state
    state, metrics = compiled(state, step_batch, extractor_variables)
    jax.block_until_ready((state, metrics))
    return metrics

  record = {
    'benchmark': 'train_step',
    'framework': 'jax',
    'resolution': args.resolution,
    'ch': args.ch,
    'batch': args.batch,
    'dtype': args.dtype,
    'input': args.input,
    'steps': args.steps,
    'warmup': args.warmup,
    'extractor_stem': config_checks.extractor_stem(config),
    'compile_s': compile_s,
    'xla_flops': flops,
    'peak_rss_mb_before_compile': rss_before_compile,
  }

  if args.input in ('synthetic', 'both'):
    runs = common.run_timed(lambda i: run_step(batch), args.warmup, args.steps, 'synthetic')
    record.update(common.throughput_figures(runs, args.batch, flops))
    record['peak_rss_mb_synthetic'] = common.peak_rss_mb()
  if args.input in ('real', 'both'):
    sampler, load_s = real_sampler(args, config)
    batch_times = common.TimedRuns()

    def run_real_step(step: int):
      host_batch = batch_times.measure(lambda: sampler.batch(step))
      return run_step(parallel.global_batch(host_batch, mesh))

    real = common.run_timed(run_real_step, args.warmup, args.steps, 'real')
    prefix = 'real_' if args.input == 'both' else ''
    record.update(common.throughput_figures(real, args.batch, flops, prefix))
    record.update(
      {
        'host_batch_s_median': float(np.median(batch_times.times[args.warmup :])),
        'image_load_s': load_s,
        'num_train_images': len(sampler.images),
      }
    )
    if args.input == 'both':
      record['input_overhead_fraction'] = real.median / record['step_s_median'] - 1.0

  common.add_machine_figures(record, args.matmul_size)
  common.emit(record)


if __name__ == '__main__':
  main()
