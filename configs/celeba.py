"""OpenGAN on CelebA with identities as classes, as in section 5.1 of the OpenGAN paper
(Ditria, Meyer and Drummond, 2020).

The 3,300 identities with the most images train the networks (97,262 images in that paper); the
other identities are novel. tfds's celeb_a (version 2.1.0) carries the identity of each image. It
is prepared offline from the original files in a folder of yours:

  python main.py --config=configs/celeba.py --workdir=/tmp/celeba \
    --config.dataset.manual_dir=DIR

DIR contains img_align_celeba.zip, identity_CelebA.txt, list_attr_celeba.txt,
list_eval_partition.txt and list_landmarks_align_celeba.txt, as published.
"""

from configs import default


def get_config():
  """Return the CelebA configuration."""
  config = default.get_config()
  config.dataset.source = 'tfds'
  config.dataset.name = 'celeb_a'
  config.dataset.num_train_classes = 3300
  config.model.norm = 'instance'  # The OpenGAN authors found instance statistics best on CelebA.
  config.extractor.learning_rate = 1e-3  # From scratch, as in configs/flowers.py.
  return config
