"""Benchmark one training step of the metric extractor F (stage 1, NCA loss).

  python benchmarks/extractor_step.py --resolution 32 --batch 64

The step is metric_learning.make_extractor_train_step over all local devices, with F the
ResNet18 of the config's default stem for the resolution ('cifar' up to 64 px). Its inputs are
synthetic: one fixed batch of uniform noise in [-1, 1] and num_centres random cached centres in
num_classes classes (the Flowers102 training split has 82 classes), so the NCA loss has the
size of a real run.

One JSON line goes to stdout; per-step times go to stderr.
"""

import argparse

import common
import jax
import jax.numpy as jnp
import numpy as np

from opengan_jax import config_checks, metric_learning, parallel
from opengan_jax.models import ResNet18

SEED = 0


def parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--resolution', type=int, default=32, help='side of F input in pixels')
  parser.add_argument('--num_centres', type=int, default=6000, help='cached kernel centres')
  parser.add_argument('--num_classes', type=int, default=82, help='classes of the centres')
  common.add_common_arguments(parser, default_batch=64)
  return parser.parse_args()


def main() -> None:
  args = parse_args()
  if args.num_centres < args.batch:
    raise SystemExit(f'--num_centres={args.num_centres} must be at least --batch={args.batch}')
  config = common.model_config(args.resolution, ch=32, batch=args.batch, dtype=args.dtype)
  config.extractor.batch_size = args.batch
  stem = config_checks.extractor_stem(config)
  model = ResNet18(stem=stem, dtype=jnp.dtype(args.dtype))
  mesh = parallel.make_mesh(jax.local_devices())
  parallel.check_batch_divisible(args.batch, mesh)

  shape = (args.resolution, args.resolution, 3)
  state = metric_learning.create_extractor_state(
    model, jax.random.PRNGKey(SEED), shape, config.extractor
  )
  rng = np.random.default_rng(SEED)
  centres = rng.standard_normal((args.num_centres, config.extractor.feature_dim), np.float32)
  centre_labels = rng.integers(0, args.num_classes, args.num_centres).astype(np.int32)
  indices = rng.choice(args.num_centres, args.batch, replace=False).astype(np.int32)
  batch = {
    'image': rng.uniform(-1, 1, (args.batch, *shape)).astype(np.float32),
    'label': centre_labels[indices],
    'index': indices,
  }

  state = parallel.replicate(state, mesh)
  centres, centre_labels = parallel.replicate((centres, centre_labels), mesh)
  batch = parallel.global_batch(batch, mesh)
  train_step = metric_learning.make_extractor_train_step(
    model, mesh, config.extractor.sigma, config.extractor.top_k
  )
  compiled, compile_s, flops = common.compile_timed(
    train_step, state, batch, centres, centre_labels
  )

  def run_step(step: int):
    nonlocal state
    state, metrics = compiled(state, batch, centres, centre_labels)
    jax.block_until_ready((state, metrics))

  runs = common.run_timed(run_step, args.warmup, args.steps, 'extractor')
  record = {
    'benchmark': 'extractor_step',
    'framework': 'jax',
    'resolution': args.resolution,
    'batch': args.batch,
    'dtype': args.dtype,
    'extractor_stem': stem,
    'num_centres': args.num_centres,
    'steps': args.steps,
    'warmup': args.warmup,
    'compile_s': compile_s,
    'xla_flops': flops,
  }
  record.update(common.throughput_figures(runs, args.batch, flops))
  common.add_machine_figures(record, args.matmul_size)
  common.emit(record)


if __name__ == '__main__':
  main()
