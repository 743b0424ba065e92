"""OpenGAN on Oxford Flowers102: 82 training classes and 20 novel classes.

The split and the settings follow section 5.1 of the OpenGAN paper (Ditria, Meyer and Drummond,
2020). Its run: 256 px, batch 48, 60,000 iterations, about 15 hours on four GTX 1080 Ti.

  python main.py --config=configs/flowers.py --workdir=/tmp/flowers

reads tfds's oxford_flowers102 (prepared offline from the original archives with
--config.dataset.manual_dir=DIR). A class-per-folder copy works too, with the classes in sorted
folder order (001-082 train, 083-102 novel):

  python main.py --config=configs/flowers.py --workdir=/tmp/flowers32 \
    --config.dataset.source=folder --config.dataset.image_dir=../shared/data/flowers102 \
    --config.resolution=32 --config.extractor.image_size=32

F is an ImageNet EfficientNet-Lite0 fine-tuned with NCA (see the README's deviations). Its input
is 224 px unless extractor.image_size says otherwise; on a CPU, 32 px keeps stage 1 short. The
paper's ResNet18 is `--config=configs/flowers.py:paper`.

Expect the extractor's leave-one-out recall@1 to be logged at every centre refresh (TensorBoard
tag extractor/recall_at_1_novel) and sample grids of training and novel classes in WORKDIR/samples.
Measured on 2 CPU cores with the folder command above (docs/results.md): the Lite0 reached
recall@1 0.63 on the training classes and 0.46 on the novel classes after 5 epochs, the paper's
ResNet18 from scratch 0.29 and 0.31 after 10 epochs.
"""

from configs import default


def get_config(variant: str = ''):
  """Return the Flowers102 configuration.

  Args:
    variant: '' for the project's default F, an ImageNet EfficientNet-Lite0 fine-tuned with NCA;
      'paper' for the paper's ResNet18 (`--config=configs/flowers.py:paper`), trained from
      scratch here because no ImageNet ResNet18 weights can be loaded offline.
  """
  config = default.get_config()
  config.dataset.source = 'tfds'
  config.dataset.name = 'oxford_flowers102'
  config.dataset.num_train_classes = 82
  config.model.norm = 'batch'  # The OpenGAN authors found batch statistics best here.
  if variant == 'paper':
    # Deviation: the OpenGAN paper fine-tunes an ImageNet ResNet18 at lr 1e-5. No such weights
    # can be loaded here, so F trains from scratch, which needs a larger learning rate.
    config.extractor.learning_rate = 1e-3
  elif variant == '':
    # Deviation: F is EfficientNet-Lite0 from its ImageNet weights (pip package), fine-tuned
    # with NCA and frozen BatchNorm. On Flowers102 at 32 px it separates the novel classes better
    # than the ResNet18 trained from scratch (docs/results.md).
    config.extractor.arch = 'efficientnet_lite0'
    config.extractor.pretrained = True
    config.extractor.feature_dim = 1280
    config.extractor.learning_rate = 1e-4
    config.extractor.num_epochs = 10
  else:
    raise ValueError(f"invalid variant {variant!r} of configs/flowers.py: use '' or 'paper'.")
  return config
