"""Benchmark generation: N images from G in batches, as uint8 arrays on the host.

  python benchmarks/sampling.py --resolution 64 --ch 32 --num_samples 20000 --batch 256

G is the config's generator with random initial weights, run by gan.make_generate_fn (evaluation
mode, one jitted call per batch) on the first local device. Latents and conditions are drawn on
the host. Each batch is copied back and converted to uint8, as a tool that writes the images
would. All N images are kept, so peak_rss_mb includes N * R * R * 3 bytes of output.

One JSON line goes to stdout; per-batch times go to stderr.
"""

import argparse
import time

import common
import jax
import jax.numpy as jnp
import numpy as np

from opengan_jax import gan

SEED = 0


def parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--resolution', type=int, default=64, choices=(32, 64, 128, 256))
  parser.add_argument('--ch', type=int, default=32, help='channel multiplier of G')
  parser.add_argument('--num_samples', type=int, default=20_000, help='images to generate')
  common.add_common_arguments(parser, default_batch=256)
  return parser.parse_args()


def to_uint8(images: np.ndarray) -> np.ndarray:
  """Map float images in [-1, 1] to uint8 [0, 255], rounding to the nearest level."""
  return np.clip(np.rint((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def main() -> None:
  args = parse_args()
  if args.num_samples < 1 or args.batch < 1:
    raise SystemExit('--num_samples and --batch must be at least 1')
  config = common.model_config(args.resolution, args.ch, args.batch, args.dtype)
  generator, _, _ = common.make_networks(config, num_classes=1)
  z_dim, feature_dim = config.model.z_dim, config.extractor.feature_dim
  variables = jax.jit(generator.init, static_argnames='train')(
    jax.random.PRNGKey(SEED),
    jnp.zeros((1, z_dim)),
    gan.example_condition(config.model.conditioning, 1, feature_dim),
    train=False,
  )
  generate = gan.make_generate_fn(generator)

  rng = np.random.default_rng(SEED)

  def inputs(size: int) -> tuple[np.ndarray, np.ndarray]:
    z = rng.standard_normal((size, z_dim), dtype=np.float32)
    features = rng.standard_normal((size, feature_dim), dtype=np.float32)
    return z, features

  compiled, compile_s, flops = common.compile_timed(generate, variables, *inputs(args.batch))
  for i in range(args.warmup):
    start = time.perf_counter()
    np.asarray(compiled(variables, *inputs(args.batch)))
    common.log(f'warmup {i}: {time.perf_counter() - start:.3f} s')

  output = np.empty((args.num_samples, args.resolution, args.resolution, 3), np.uint8)
  runs = common.TimedRuns()
  total_start = time.perf_counter()
  for start in range(0, args.num_samples, args.batch):
    size = min(args.batch, args.num_samples - start)

    def generate_batch(size=size):
      z, features = inputs(args.batch)  # The last batch is computed in full and cut.
      return to_uint8(np.asarray(compiled(variables, z, features))[:size])

    output[start : start + size] = runs.measure(generate_batch)
    if len(runs.times) % 10 == 1:
      common.log(f'batch {len(runs.times)}: {runs.times[-1]:.3f} s')
  total_s = time.perf_counter() - total_start

  record = {
    'benchmark': 'sampling',
    'framework': 'jax',
    'resolution': args.resolution,
    'ch': args.ch,
    'batch': args.batch,
    'dtype': args.dtype,
    'num_samples': args.num_samples,
    'num_batches': len(runs.times),
    'compile_s': compile_s,
    'xla_flops': flops,
    'total_s': total_s,
    'img_per_s': args.num_samples / total_s,
    'batch_s_median': runs.median,
    'batch_s_min': runs.minimum,
    'other_load_max': runs.other_load_max,
    'other_load_mean': runs.other_load_mean,
    'output_mb': output.nbytes / 2**20,
  }
  if flops is not None:
    record['flops_per_s'] = flops / runs.median
  common.add_machine_figures(record, args.matmul_size)
  common.emit(record)


if __name__ == '__main__':
  main()
