"""OpenGAN on Oxford Flowers102: 82 training classes and 20 novel classes.

The split and the settings follow section 5.1 of the OpenGAN paper (Ditria, Meyer and Drummond,
2020). Its run: 256 px, batch 48, 60,000 iterations, about 15 hours on four GTX 1080 Ti.

  python main.py --config=configs/flowers.py --workdir=/tmp/flowers

reads tfds's oxford_flowers102 (prepared offline from the original archives with
--config.dataset.manual_dir=DIR). A class-per-folder copy works too, with the classes in sorted
folder order (001-082 train, 083-102 novel):

  python main.py --config=configs/flowers.py --workdir=/tmp/flowers32 \
    --config.dataset.source=folder --config.dataset.image_dir=../shared/data/flowers102 \
    --config.resolution=32

Expect the extractor's leave-one-out recall@1 to be logged at every centre refresh (TensorBoard
tag extractor/recall_at_1_novel) and sample grids of training and novel classes in WORKDIR/samples.
Measured on 2 CPU cores, with the folder command above and --config.extractor.num_epochs=10:
F from scratch reached recall@1 0.29 on the training classes and 0.31 on the novel classes.
After 2,000 GAN steps (44 minutes) the samples of novel-class sources keep the source's colours,
with flower shapes that vary with z but are still blurry.
"""

from configs import default


def get_config():
  """Return the Flowers102 configuration."""
  config = default.get_config()
  config.dataset.source = 'tfds'
  config.dataset.name = 'oxford_flowers102'
  config.dataset.num_train_classes = 82
  config.model.norm = 'batch'  # The OpenGAN authors found batch statistics best here.
  # Deviation: the OpenGAN paper fine-tunes an ImageNet ResNet18 at lr 1e-5. No such weights can be loaded
  # here, so F trains from scratch, which needs a larger learning rate to move in a few epochs.
  config.extractor.learning_rate = 1e-3
  return config
