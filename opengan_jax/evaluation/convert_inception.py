"""Convert the PyTorch FID Inception weights to the .npz that `inception.load_inception_variables` reads.

  python -m opengan_jax.evaluation.convert_inception pt_inception-2015-12-05-6726825d.pth \
    inception_fid.npz

Reading a .pth file needs PyTorch, for this step only; it is read with `weights_only=True`, so
loading it runs no code. An .npz of the PyTorch state dict (same keys) is read without PyTorch.
"""

import argparse
import sys
from collections.abc import Sequence

import numpy as np
from absl import logging

from opengan_jax import pretrained
from opengan_jax.evaluation import inception


def read_torch_state_dict(path: str) -> dict[str, np.ndarray]:
  """Read a PyTorch state dict from a .pth (needs PyTorch) or an .npz of the same keys."""
  if path.endswith('.npz'):
    with np.load(path, allow_pickle=False) as data:
      return {key: data[key] for key in data.files}
  return pretrained.read_torch_state_dict(path)


def main(argv: Sequence[str] | None = None) -> None:
  """Run the command line: `IN.pth OUT.npz`."""
  parser = argparse.ArgumentParser(
    prog='python -m opengan_jax.evaluation.convert_inception', description=__doc__
  )
  parser.add_argument(
    'input', help=f'PyTorch FID Inception state dict ({inception.TORCH_WEIGHTS_FILE}).'
  )
  parser.add_argument('output', help='.npz file to write.')
  args = parser.parse_args(argv)

  logging.set_verbosity(logging.INFO)
  try:
    weights = inception.convert_torch_state_dict(read_torch_state_dict(args.input))
  except ValueError as error:
    raise SystemExit(f'cannot convert {args.input}: {error}') from error
  inception.save_inception_weights(args.output, weights)
  logging.info(
    'Wrote %d FID Inception arrays to %s; pass it to the evaluation or set %s.',
    len(weights),
    args.output,
    inception.WEIGHTS_ENV_VAR,
  )


if __name__ == '__main__':
  main(sys.argv[1:])
