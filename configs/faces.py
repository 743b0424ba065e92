"""OpenGAN on a class-per-folder face set, such as CelebA crops with one folder per identity.

  python main.py --config=configs/faces.py --workdir=/tmp/faces \
    --config.dataset.image_dir=../shared/data/faces

The first `dataset.num_train_classes` identities in sorted folder order train the networks and
the rest are novel identities.
"""

from configs import default


def get_config():
  """Return the face-folder configuration."""
  config = default.get_config()
  config.dataset.source = 'folder'
  # Set with --config.dataset.image_dir=DIR.
  config.dataset.num_train_classes = 180
  config.model.norm = 'instance'  # The OpenGAN authors found instance statistics best on CelebA.
  config.extractor.learning_rate = 1e-3  # From scratch, as in configs/flowers.py.
  config.resolution = 64
  return config
