"""The embedded default: both stages on real handwritten digits, in minutes on a laptop CPU.

The images are the 1,797 8x8 digit scans that ship with scikit-learn (UCI ML hand-written digits,
BSD-3-Clause through scikit-learn), upsampled to 32 px. Digits 0-6 train the networks and digits
7-9 are the novel classes. Nothing is downloaded.

  python main.py --config=configs/demo.py --workdir=/tmp/opengan-demo

Expect, in the workdir: checkpoints of both stages, TensorBoard logs, sample grids in samples/
and the extractor's recall@1 on the novel digits in extractor_recall.json. Measured on 2 CPU
cores: 21 minutes with 10 extractor epochs and 1,500 GAN steps (another job shared the CPU for
the first 4 minutes). The defaults below train 6 epochs and 1,000 steps, an estimated 14 minutes.
With 7 training digits, G mostly draws training-like digits for novel sources: the demo shows the
pipeline, not the method's quality.
"""

from configs import default


def get_config():
  """Return the demo configuration."""
  config = default.get_config()
  config.dataset.source = 'digits'
  config.dataset.num_train_classes = 7
  config.dataset.random_flip = False  # Mirrored digits are not digits.
  config.resolution = 32
  config.batch_size = 32

  config.extractor.num_epochs = 6
  config.extractor.batch_size = 64
  config.extractor.learning_rate = 1e-3
  config.extractor.cache_refresh_epochs = 2

  config.model.ch = 16
  config.gan.num_steps = 1000
  config.log_every_steps = 50
  config.sample_every_steps = 500
  config.checkpoint_every_steps = 500
  config.num_sample_sources = 6
  config.samples_per_source = 6
  return config
