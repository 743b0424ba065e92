"""Command line of the generation tools: each command restores a workdir and writes one PNG.

  python -m opengan_jax.generate one_shot --workdir=/tmp/flowers --sources a.jpg paintings/
  python -m opengan_jax.generate interpolate --workdir=/tmp/flowers --sources a.jpg b.jpg
  python -m opengan_jax.generate random --workdir=/tmp/flowers --stats_from=train

Outputs go to --output, or WORKDIR/generated/COMMAND.png. Invalid input stops the command with an
error that names the value, before anything is written.
"""

import argparse
import os
import pathlib
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from opengan_jax import cpu_backend  # noqa: E402

cpu_backend.add_xla_cpu_flags()

import numpy as np  # noqa: E402
from absl import logging  # noqa: E402

from opengan_jax.generate import api, attributes, figures  # noqa: E402

SUBSETS = ('train', 'novel')


def _common(parser: argparse.ArgumentParser) -> None:
  parser.add_argument(
    '--workdir', required=True, help='Trained workdir (config.json, checkpoints).'
  )
  parser.add_argument('--output', help='PNG to write; default WORKDIR/generated/COMMAND.png.')
  parser.add_argument('--seed', type=int, default=0, help='Seed of the latents and features.')
  parser.add_argument(
    '--batch_size',
    type=int,
    default=api.DEFAULT_BATCH_SIZE,
    help='Images per forward pass of G or F; lower it if memory runs out.',
  )


def _add_commands(subparsers) -> None:
  p = subparsers.add_parser('one_shot', help='Samples per source image, source first in a row.')
  p.add_argument('--sources', nargs='+', required=True, help='Image files or folders.')
  p.add_argument('--num_samples', type=int, default=8, help='Samples per source.')

  p = subparsers.add_parser('single_source', help='Many latents for one source image.')
  p.add_argument('--source', required=True, help='One image file.')
  p.add_argument('--num_samples', type=int, default=31, help='Samples of the source.')
  p.add_argument('--columns', type=int, default=8, help='Tiles per row.')

  p = subparsers.add_parser('intra_class', help='Sources of one class, a fixed latent per row.')
  p.add_argument('--sources', nargs='+', required=True, help='A class folder or image files.')
  p.add_argument('--num_latents', type=int, default=4, help='Rows of samples, one latent each.')
  p.add_argument('--max_sources', type=int, default=8, help='Columns: first images used.')

  p = subparsers.add_parser('interpolate', help='Latent (across) by feature (down) interpolation.')
  p.add_argument('--sources', nargs='+', required=True, help='Exactly two image files.')
  p.add_argument('--latent_steps', type=int, default=8, help='Columns, both latents included.')
  p.add_argument('--feature_steps', type=int, default=8, help='Rows, both features included.')
  p.add_argument('--method', choices=sorted(api.INTERPOLATIONS), default='linear')

  p = subparsers.add_parser('random', help='Random latents and features from fitted Gaussians.')
  p.add_argument(
    '--stats_from',
    nargs='+',
    default=['train'],
    help="'train' or 'novel' (the workdir's dataset), or class folders (or one root of them).",
  )
  p.add_argument(
    '--per_class',
    action='store_true',
    help='One Gaussian per class (mean and std per dimension) instead of one scalar mean and std.',
  )
  p.add_argument('--rows', type=int, default=4, help='Rows per Gaussian.')
  p.add_argument('--columns', type=int, default=8, help='Tiles per row.')
  p.add_argument('--max_per_class', type=int, default=None, help='Images used per class.')

  p = subparsers.add_parser('attributes', help='Traversals along attribute and pose directions.')
  p.add_argument('--labels', required=True, help='CSV: header file,ATTR,...; rows name,0,1,...')
  p.add_argument('--image_root', help='Folder of the CSV file names; default the CSV folder.')
  p.add_argument('--source', required=True, help='Image whose feature starts the traversal.')
  p.add_argument('--classifier', choices=attributes.CLASSIFIERS, default='resnet18')
  p.add_argument('--train_steps', type=int, default=500, help='Classifier training steps.')
  p.add_argument('--num_generated', type=int, default=512, help='Samples labelled per direction.')
  p.add_argument('--num_scales', type=int, default=7, help='Columns of each traversal.')
  p.add_argument(
    '--max_scale', type=float, default=1.5, help='Largest step, in units of the mean gap.'
  )

  for name, text in (
    ('tsne', 't-SNE of real features coloured by class.'),
    ('class_means', 't-SNE of real and generated per-class mean features.'),
  ):
    p = subparsers.add_parser(name, help=text)
    p.add_argument(
      '--classes',
      nargs='+',
      default=['novel'],
      help="'train' or 'novel' (the workdir's dataset), or class folders (or one root of them).",
    )
    p.add_argument('--max_per_class', type=int, default=None, help='Images used per class.')
    if name == 'class_means':
      p.add_argument('--samples_per_image', type=int, default=1, help='Samples per real image.')


def make_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog='python -m opengan_jax.generate', description=__doc__)
  subparsers = parser.add_subparsers(dest='command', required=True)
  _add_commands(subparsers)
  for subparser in subparsers.choices.values():
    _common(subparser)
  return parser


def labelled_features(model: api.OpenGan, sources: list[str], max_per_class, batch_size):
  """Return (features (N, D), labels (N,), class names) of a dataset subset or class folders."""
  if len(sources) == 1 and sources[0] in SUBSETS:
    images, labels, names = api.dataset_images(model, sources[0])
    if max_per_class is not None:
      keep = np.concatenate(
        [np.flatnonzero(labels == c)[:max_per_class] for c in range(len(names))]
      )
      images, labels = images[np.sort(keep)], labels[np.sort(keep)]
    return api.encode(model, images, batch_size), labels, names
  paths, labels, names = api.list_labelled_folders(sources, max_per_class)
  return api.encode_files(model, paths, batch_size), labels, names


def run(args: argparse.Namespace) -> pathlib.Path:
  """Run one parsed command and return the path of the PNG it wrote."""
  # Imported here so that --help and argument errors do not wait for matplotlib.
  from opengan_jax.generate import embeddings

  model = api.restore(args.workdir)
  output = args.output or pathlib.Path(args.workdir) / 'generated' / f'{args.command}.png'
  seed, batch = args.seed, args.batch_size

  if args.command == 'one_shot':
    tiles = figures.one_shot(model, args.sources, args.num_samples, seed, batch)
  elif args.command == 'single_source':
    tiles = figures.single_source(model, args.source, args.num_samples, args.columns, seed, batch)
  elif args.command == 'intra_class':
    tiles = figures.intra_class(
      model, args.sources, args.num_latents, args.max_sources, seed, batch
    )
  elif args.command == 'interpolate':
    tiles = figures.interpolation(
      model, args.sources, args.latent_steps, args.feature_steps, args.method, seed, batch
    )
  elif args.command == 'random':
    features, labels, _ = labelled_features(model, args.stats_from, args.max_per_class, batch)
    if args.per_class:
      gaussians = api.fit_per_class(features, labels)
    else:
      gaussians = [api.fit_global(features)]
    tiles = figures.random_features(model, gaussians, args.rows, args.columns, seed, batch)
  elif args.command == 'attributes':
    tiles = _attributes(model, args)
  elif args.command == 'tsne':
    features, labels, names = labelled_features(model, args.classes, args.max_per_class, batch)
    return embeddings.plot_classes(embeddings.tsne(features, seed), labels, names, output)
  else:
    features, labels, names = labelled_features(model, args.classes, args.max_per_class, batch)
    means = embeddings.class_means(
      model, features, labels, names, args.samples_per_image, seed, batch
    )
    logging.info('Real-to-generated mean distance per class: %s', means.distances().round(3))
    return embeddings.plot_class_means(means, output, seed)
  return figures.save_tiles(tiles, output)


def _attributes(model: api.OpenGan, args: argparse.Namespace) -> np.ndarray:
  labels = attributes.read_labels_csv(args.labels, args.image_root)
  start = api.encode(model, api.load_images([args.source], model.resolution))[0]
  classifier = attributes.train_classifier(
    model, labels, args.classifier, args.train_steps, seed=args.seed
  )
  real_features = api.encode_files(model, labels.paths, args.batch_size)
  directions = attributes.compute_directions(
    model, classifier, labels.names, real_features, args.num_generated, args.seed, args.batch_size
  )
  latent = api.sample_latents(model, 1, args.seed + 1)[0]
  scales = np.linspace(-args.max_scale, args.max_scale, args.num_scales)
  logging.info('Rows: per attribute of %s, a latent row then a feature row.', labels.names)
  return attributes.traversal(model, directions, latent, start, scales, args.batch_size)


def main(argv: list[str] | None = None) -> int:
  args = make_parser().parse_args(argv)
  logging.set_verbosity(logging.INFO)
  try:
    output = run(args)
  except (ValueError, FileNotFoundError) as error:
    sys.stderr.write(f'error: {error}\n')
    return 1
  logging.info('Wrote %s.', output)
  return 0


if __name__ == '__main__':
  sys.exit(main())
