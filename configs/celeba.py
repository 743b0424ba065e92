"""OpenGAN on CelebA with identities as classes (paper, section 5.1).

The 3300 identities with the most images train the networks (97,262 images in the paper); the
other identities are novel. tfds's celeb_a holds no identity labels, so the identity file of the
original release is required:

  python main.py --config=configs/celeba.py --workdir=/tmp/celeba \
    --config.dataset.manual_dir=DIR --config.dataset.identity_file=DIR/identity_CelebA.txt
"""

from configs import default


def get_config():
  """Return the CelebA configuration."""
  config = default.get_config()
  config.dataset.source = 'tfds'
  config.dataset.name = 'celeb_a'
  config.dataset.num_train_classes = 3300
  config.model.norm = 'instance'  # The paper found instance statistics best on CelebA.
  config.extractor.learning_rate = 1e-4  # From scratch, as in configs/flowers.py.
  return config
