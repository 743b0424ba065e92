"""Benchmark the evaluation's feature extraction and distances on N samples.

  python benchmarks/evaluation.py --evaluator_dir /tmp/eval32 --num_samples 10000 \
    --image_dir ../shared/data/flowers102

The images are N real images of a class-per-folder dataset at the evaluator's resolution,
repeated to N when there are fewer. The script times the evaluator's batched features over all
local devices. It then times the Frechet distance, KID and precision/recall of those features
against themselves shifted by one image. Only the cost of those distances is measured, because
their values are meaningless here.

One JSON line goes to stdout.
"""

import argparse
import time

import common
import numpy as np

from configs import default
from opengan_jax import input_pipeline
from opengan_jax.evaluation import distances, evaluator


def parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--evaluator_dir', required=True, help='directory of a trained evaluator')
  parser.add_argument('--num_samples', type=int, default=10_000, help='images to evaluate')
  parser.add_argument('--batch', type=int, default=256, help='images per forward pass')
  parser.add_argument(
    '--image_dir',
    default=str(common.REPO_ROOT.parent / 'shared' / 'data' / 'flowers102'),
    help='class-per-folder image root',
  )
  parser.add_argument(
    '--cache_dir',
    default='/tmp/opengan-bench-cache',
    help='folder for the decoded images (.npz), reused by later runs',
  )
  return parser.parse_args()


def main() -> None:
  args = parse_args()
  model = evaluator.restore_evaluator(args.evaluator_dir)
  dataset = default.get_config().dataset
  dataset.source = 'folder'
  dataset.image_dir = args.image_dir
  split = input_pipeline.load_class_split(dataset, model.resolution, args.cache_dir)
  images = np.concatenate([split.train_images, split.novel_images])
  images = np.resize(images, (args.num_samples, *images.shape[1:]))

  model.features(images[: args.batch], args.batch)  # Compiles.
  start = time.perf_counter()
  features = model.features(images, args.batch)
  features_s = time.perf_counter() - start
  shifted = np.roll(features, 1, axis=0)

  timings = {}
  for name, call in (
    ('frechet_s', lambda: distances.frechet_distance(features, shifted)),
    ('kid_s', lambda: distances.kernel_distance(features, shifted)),
    ('precision_recall_s', lambda: distances.precision_recall(features, shifted)),
  ):
    start = time.perf_counter()
    call()
    timings[name] = time.perf_counter() - start

  record = {
    'num_samples': args.num_samples,
    'feature_space': model.feature_space,
    'features_s': features_s,
    'features_img_per_s': args.num_samples / features_s,
    **timings,
    'peak_rss_mb': common.peak_rss_mb(),
    **common.environment(),
  }
  common.emit(record)


if __name__ == '__main__':
  main()
