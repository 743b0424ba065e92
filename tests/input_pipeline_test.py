"""Tests for opengan_jax.input_pipeline on real images."""

import logging
import pathlib

import ml_collections
import numpy as np
import pytest
from PIL import Image

from opengan_jax import input_pipeline
from opengan_jax.data import decode
from opengan_jax.data import folder as folder_source

SUBSET_CLASSES = ('001', '003', '007', '021')  # 40 images each.


def dataset_config(**overrides) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(
    dict(
      source='folder',
      name='oxford_flowers102',
      data_dir=None,
      manual_dir=None,
      identity_file=None,
      image_dir=None,
      num_train_classes=3,
      cache_dir=None,
      random_flip=True,
    )
  )
  config.update(overrides)
  return config


def link_classes(flowers_dir: pathlib.Path, root: pathlib.Path, classes) -> pathlib.Path:
  """Make root/<class> symlinks to real flower class folders."""
  root.mkdir(parents=True)
  for name in classes:
    (root / name).symlink_to(flowers_dir / name, target_is_directory=True)
  return root


def copy_class(flowers_dir: pathlib.Path, class_name: str, target: pathlib.Path, count: int):
  """Copy `count` real images of a class into a writable folder; return their paths."""
  target.mkdir(parents=True)
  sources = sorted((flowers_dir / class_name).glob('*.jpg'))[:count]
  for source in sources:
    (target / source.name).write_bytes(source.read_bytes())
  return sorted(target.iterdir())


def count_images(folder: pathlib.Path) -> int:
  return len([p for p in folder.iterdir() if not p.name.startswith('.')])


def fail_if_decoding(*args, **kwargs):
  raise AssertionError('images were decoded although a cache exists')


def test_folder_subset_counts_and_cache(flowers_dir, tmp_path, monkeypatch):
  root = link_classes(flowers_dir, tmp_path / 'flowers', SUBSET_CLASSES)
  config = dataset_config(image_dir=str(root), num_train_classes=3)
  cache_dir = tmp_path / 'cache'

  split = input_pipeline.load_class_split(config, 24, str(cache_dir))

  expected_train = [count_images(root / name) for name in SUBSET_CLASSES[:3]]
  expected_novel = count_images(root / SUBSET_CLASSES[3])
  assert split.train_images.shape == (sum(expected_train), 24, 24, 3)
  assert split.novel_images.shape == (expected_novel, 24, 24, 3)
  assert split.train_images.dtype == np.uint8
  assert split.train_labels.dtype == np.int32
  assert split.novel_labels.dtype == np.int32
  assert np.bincount(split.train_labels).tolist() == expected_train
  assert set(split.novel_labels.tolist()) == {0}
  assert split.train_class_names == SUBSET_CLASSES[:3]
  assert split.novel_class_names == SUBSET_CLASSES[3:]
  assert split.num_skipped == 0
  assert split.train_images.std() > 20  # Real photographs, not blank arrays.
  assert len(list(cache_dir.glob('*.npz'))) == 1
  assert not list(cache_dir.glob('*.tmp'))

  monkeypatch.setattr(folder_source, 'load_folder', fail_if_decoding)
  cached = input_pipeline.load_class_split(config, 24, str(cache_dir))
  np.testing.assert_array_equal(cached.train_images, split.train_images)
  np.testing.assert_array_equal(cached.novel_labels, split.novel_labels)
  assert cached.train_class_names == split.train_class_names


def test_folder_center_crop_matches_pillow(flowers_dir, tmp_path):
  path = sorted((flowers_dir / '001').glob('*.jpg'))[0]
  with Image.open(path) as image:
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    expected = image.convert('RGB').crop((left, top, left + side, top + side))
    expected = np.asarray(expected.resize((32, 32), Image.Resampling.BICUBIC), np.float32)

  loaded = decode.load_image(str(path), 32).astype(np.float32)

  assert loaded.shape == (32, 32, 3)
  # JPEG DCT-domain downscaling makes small differences from a full-size decode.
  assert np.abs(loaded - expected).mean() < 6.0


def test_full_flowers_split_and_cache(flowers_dir, tmp_path, monkeypatch):
  config = dataset_config(image_dir=str(flowers_dir), num_train_classes=82)

  split = input_pipeline.load_class_split(config, 32, str(tmp_path))

  assert split.train_images.shape == (6433, 32, 32, 3)
  assert split.novel_images.shape == (1756, 32, 32, 3)
  assert len(split.train_class_names) == 82
  assert len(split.novel_class_names) == 20
  assert split.train_class_names[0] == '001'
  assert split.novel_class_names[0] == '083'
  assert split.num_skipped == 0
  assert np.unique(split.train_labels).tolist() == list(range(82))
  assert np.unique(split.novel_labels).tolist() == list(range(20))
  assert (
    np.bincount(split.novel_labels)
    == [count_images(flowers_dir / name) for name in split.novel_class_names]
  ).all()

  monkeypatch.setattr(folder_source, 'load_folder', fail_if_decoding)
  cached = input_pipeline.load_class_split(config, 32, str(tmp_path))
  np.testing.assert_array_equal(cached.novel_images, split.novel_images)


def test_tfds_image_folder_pipeline(flowers_dir, tmp_path):
  classes = ('001', '003', '007')
  root = tmp_path / 'image_folder'
  link_classes(flowers_dir, root / 'train', classes)
  config = dataset_config(source='tfds_image_folder', image_dir=str(root), num_train_classes=2)

  split = input_pipeline.load_class_split(config, 32, str(tmp_path / 'cache'))

  assert split.train_images.shape == (80, 32, 32, 3)
  assert split.novel_images.shape == (40, 32, 32, 3)
  assert split.train_images.dtype == np.uint8
  assert split.train_class_names == classes[:2]
  assert split.novel_class_names == classes[2:]
  assert np.bincount(split.train_labels).tolist() == [40, 40]

  # The tf.image path must give nearly the same pictures as the Pillow path.
  folder_split = input_pipeline.load_class_split(
    dataset_config(image_dir=str(root / 'train'), num_train_classes=2), 32, None
  )
  tfds_mean = np.sort(split.novel_images.reshape(40, -1).mean(axis=1))
  folder_mean = np.sort(folder_split.novel_images.reshape(40, -1).mean(axis=1))
  assert np.abs(tfds_mean - folder_mean).max() < 3.0


def test_tfds_manual_dir_missing_files(tmp_path):
  manual_dir = tmp_path / 'manual'
  manual_dir.mkdir()
  (manual_dir / 'setid.mat').write_bytes(b'placeholder')
  config = dataset_config(
    source='tfds', data_dir=str(tmp_path / 'tfds'), manual_dir=str(manual_dir)
  )

  with pytest.raises(ValueError) as raised:
    input_pipeline.load_class_split(config, 32, None)

  message = str(raised.value)
  assert str(manual_dir) in message
  assert '102flowers.tgz' in message
  assert 'imagelabels.mat' in message
  assert 'setid.mat' not in message


def test_digits_counts():
  from sklearn import datasets

  targets = datasets.load_digits().target
  config = dataset_config(source='digits', num_train_classes=6)

  split = input_pipeline.load_class_split(config, 16, None)

  assert split.train_images.shape == ((targets < 6).sum(), 16, 16, 3)
  assert split.novel_images.shape == ((targets >= 6).sum(), 16, 16, 3)
  assert len(split.train_images) + len(split.novel_images) == 1797
  assert split.train_class_names == ('0', '1', '2', '3', '4', '5')
  assert split.novel_class_names == ('6', '7', '8', '9')
  assert split.novel_labels.max() == 3
  assert split.train_images.max() == 255
  np.testing.assert_array_equal(split.train_images[..., 0], split.train_images[..., 2])


def test_unreadable_files_skipped(flowers_dir, tmp_path, caplog):
  root = tmp_path / 'flowers'
  good = copy_class(flowers_dir, '001', root / 'a', 5)
  copy_class(flowers_dir, '003', root / 'b', 4)
  (root / 'a' / 'corrupt.jpg').write_bytes(good[0].read_bytes()[:200])
  (root / 'a' / 'notes.txt').write_text('not an image')
  (root / 'a' / '.DS_Store').write_bytes(b'\0\1\2')
  config = dataset_config(image_dir=str(root), num_train_classes=1)

  with caplog.at_level(logging.WARNING):
    split = input_pipeline.load_class_split(config, 16, None)

  assert split.num_skipped == 2
  assert len(split.train_images) == 5
  assert len(split.novel_images) == 4
  assert 'corrupt.jpg' in caplog.text
  assert 'notes.txt' in caplog.text
  assert '.DS_Store' not in caplog.text


def test_folder_of_only_bad_files_is_error(flowers_dir, tmp_path):
  root = tmp_path / 'flowers'
  copy_class(flowers_dir, '001', root / 'a', 3)
  (root / 'broken').mkdir()
  (root / 'broken' / 'x.jpg').write_bytes(b'\xff\xd8 truncated')
  (root / 'broken' / 'readme.txt').write_text('text')
  config = dataset_config(image_dir=str(root), num_train_classes=1)

  with pytest.raises(ValueError, match='broken.*no readable images'):
    input_pipeline.load_class_split(config, 16, None)


@pytest.mark.parametrize(
  'mode, file_name',
  [
    ('CMYK', 'cmyk.jpg'),
    ('RGBA', 'rgba.png'),
    ('LA', 'la.png'),
    ('P', 'palette.png'),
    ('L', 'gray.png'),
    ('1', 'bilevel.png'),
    ('I;16', 'gray16.png'),
    ('I', 'int32.tif'),
    ('F', 'float.tif'),
  ],
)
def test_image_modes_load_as_rgb(flowers_dir, tmp_path, mode, file_name):
  source = sorted((flowers_dir / '001').glob('*.jpg'))[0]
  with Image.open(source) as image:
    rgb = image.convert('RGB')
  gray = np.asarray(rgb.convert('L'))
  if mode == 'I;16':
    converted = Image.fromarray(gray.astype(np.uint16) * 257)
  elif mode == 'I':
    converted = Image.fromarray(gray.astype(np.int32) * 257)
  elif mode == 'F':
    converted = Image.fromarray(gray.astype(np.float32) / 255.0)
  elif mode == 'P':
    converted = rgb.convert('P', palette=Image.Palette.ADAPTIVE)
  else:
    converted = rgb.convert(mode)
  path = tmp_path / file_name
  converted.save(path)

  loaded = decode.load_image(str(path), 40)

  assert loaded.shape == (40, 40, 3)
  assert loaded.dtype == np.uint8
  reference = decode.load_image(str(source), 40).astype(np.float32)
  if mode in ('I;16', 'I', 'F', 'L', 'LA'):
    reference_gray = decode.center_crop_resize(rgb.convert('L').convert('RGB'), 40)
    assert np.abs(loaded.astype(np.float32) - reference_gray).mean() < 3.0
  elif mode != '1':
    assert np.abs(loaded.astype(np.float32) - reference).mean() < 12.0


def test_transparent_pixels_become_white(tmp_path):
  image = Image.new('RGBA', (30, 20), (10, 200, 30, 0))
  path = tmp_path / 'transparent.png'
  image.save(path)

  loaded = decode.load_image(str(path), 8)

  assert (loaded == 255).all()


def test_missing_image_dir(tmp_path):
  a_file = tmp_path / 'file.txt'
  a_file.write_text('x')
  cases = [
    (None, 'not set'),
    (str(tmp_path / 'absent'), 'not found'),
    (str(a_file), 'not a directory'),
  ]
  for image_dir, expected in cases:
    with pytest.raises(ValueError, match=expected):
      input_pipeline.load_class_split(dataset_config(image_dir=image_dir), 16, None)


def test_bad_num_train_classes():
  for num_train_classes in (0, 10, 12):
    config = dataset_config(source='digits', num_train_classes=num_train_classes)
    with pytest.raises(ValueError) as raised:
      input_pipeline.load_class_split(config, 8, None)
    assert f'num_train_classes={num_train_classes}' in str(raised.value)
    assert '10 classes' in str(raised.value)


def test_bad_resolution_and_source():
  with pytest.raises(ValueError, match='resolution=0'):
    input_pipeline.load_class_split(dataset_config(source='digits'), 0, None)
  with pytest.raises(ValueError, match="source='imagenet'"):
    input_pipeline.load_class_split(dataset_config(source='imagenet'), 8, None)


def make_sampler(num_images=50, batch=8, seed=3, **kwargs) -> input_pipeline.BatchSampler:
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (num_images, 4, 5, 3), dtype=np.uint8)
  labels = np.arange(num_images, dtype=np.int32) % 7
  kwargs.setdefault('process_index', 0)
  kwargs.setdefault('process_count', 1)
  return input_pipeline.BatchSampler(images, labels, batch, seed, random_flip=True, **kwargs)


def test_sampler_deterministic():
  sampler = make_sampler()
  first = sampler.batch(9)
  sampler.batch(2)  # Another epoch in between must not change step 9.
  again = make_sampler().batch(9)

  for key in ('image', 'label', 'index'):
    np.testing.assert_array_equal(sampler.batch(9)[key], first[key])
    np.testing.assert_array_equal(again[key], first[key])
  assert not np.array_equal(sampler.batch(10)['index'], first['index'])
  assert not np.array_equal(make_sampler(seed=4).batch(9)['index'], first['index'])


def test_sampler_batch_contents():
  sampler = make_sampler()
  batch = sampler.batch(5)

  assert batch['image'].dtype == np.float32
  assert batch['label'].dtype == np.int32
  assert batch['index'].dtype == np.int32
  assert batch['image'].shape == (8, 4, 5, 3)
  assert batch['image'].min() >= -1.0
  assert batch['image'].max() <= 1.0
  np.testing.assert_array_equal(batch['label'], sampler.labels[batch['index']])
  originals = input_pipeline.to_float(sampler.images[batch['index']])
  flipped = np.all(batch['image'] == originals[:, :, ::-1], axis=(1, 2, 3))
  unflipped = np.all(batch['image'] == originals, axis=(1, 2, 3))
  assert (flipped | unflipped).all()
  all_flips = np.concatenate([sampler.global_flips(step) for step in range(20)])
  assert 0.3 < all_flips.mean() < 0.7


def test_sampler_epoch_coverage():
  sampler = make_sampler(num_images=50, batch=8)
  assert sampler.steps_per_epoch == 6

  for epoch in range(2):
    steps = range(epoch * 6, (epoch + 1) * 6)
    indices = np.concatenate([sampler.batch(step)['index'] for step in steps])
    assert len(indices) == 48
    assert len(np.unique(indices)) == 48
  epoch_0 = np.concatenate([sampler.batch(step)['index'] for step in range(6)])
  epoch_1 = np.concatenate([sampler.batch(step)['index'] for step in range(6, 12)])
  assert not np.array_equal(epoch_0, epoch_1)


def test_sampler_process_slices():
  whole = make_sampler(batch=8, process_index=0, process_count=1)
  parts = [make_sampler(batch=8, process_index=i, process_count=2) for i in range(2)]

  for step in (0, 7):
    local = [part.batch(step) for part in parts]
    assert local[0]['image'].shape[0] == 4
    for key in ('image', 'label', 'index'):
      joined = np.concatenate([batch[key] for batch in local])
      np.testing.assert_array_equal(joined, whole.batch(step)[key])


def test_sampler_bad_global_batch():
  with pytest.raises(ValueError, match='global batch size 64 exceeds.*50'):
    make_sampler(num_images=50, batch=64)
  with pytest.raises(ValueError, match='9 is not divisible by the process count 2'):
    make_sampler(batch=9, process_count=2)


def test_prefetch_matches_batch():
  sampler = make_sampler()
  prefetched = list(input_pipeline.prefetch_batches(sampler, start_step=4, num_steps=5))

  assert [step for step, _ in prefetched] == [4, 5, 6, 7, 8]
  for step, batch in prefetched:
    np.testing.assert_array_equal(batch['image'], sampler.batch(step)['image'])

  endless = input_pipeline.prefetch_batches(sampler, start_step=0)
  assert next(endless)[0] == 0
  endless.close()  # Stops the background thread.


def test_sample_sources_distinct_classes():
  sampler = make_sampler()
  chosen = input_pipeline.sample_sources(sampler.images, sampler.labels, 7, seed=1)

  assert len(set(chosen['label'].tolist())) == 7
  np.testing.assert_array_equal(chosen['label'], sampler.labels[chosen['index']])
  again = input_pipeline.sample_sources(sampler.images, sampler.labels, 7, seed=1)
  np.testing.assert_array_equal(again['index'], chosen['index'])
  more = input_pipeline.sample_sources(sampler.images, sampler.labels, 10, seed=1)
  assert len(set(more['index'].tolist())) == 10
  assert chosen['image'].dtype == np.float32


def test_folder_with_identity_file(faces_dir, tmp_path):
  identities = ('07201', '07203', '07204')  # 26, 26 and 14 images.
  flat = tmp_path / 'img_align_celeba'
  flat.mkdir()
  lines = []
  for identity in identities:
    for image in sorted((faces_dir / identity).glob('*.jpg')):
      (flat / image.name).symlink_to(image)
      lines.append(f'{image.name} {int(identity)}')
  lines.append('999999.jpg 1')  # Listed but absent: ignored.
  identity_file = tmp_path / 'identity_CelebA.txt'
  identity_file.write_text('\n'.join(lines) + '\n')
  config = dataset_config(
    image_dir=str(flat), identity_file=str(identity_file), num_train_classes=2
  )

  split = input_pipeline.load_class_split(config, 16, None)

  counts = {identity: count_images(faces_dir / identity) for identity in identities}
  assert split.train_class_names == ('7201', '7203')
  assert split.novel_class_names == ('7204',)
  assert len(split.train_images) == counts['07201'] + counts['07203']
  assert len(split.novel_images) == counts['07204']
  assert split.num_skipped == 0
