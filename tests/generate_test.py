"""Tests of the generation tools (opengan_jax.generate) on a tiny trained workdir."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tiny_runs
from PIL import Image

from opengan_jax.generate import __main__ as cli
from opengan_jax.generate import api, attributes, embeddings, figures

REPO = pathlib.Path(__file__).resolve().parents[1]
R = tiny_runs.RESOLUTION
PADDING = 2  # image_grid.make_grid's default padding in pixels.
BATCH = 8
TRAIN_CLASS, NOVEL_CLASS = tiny_runs.FLOWER_CLASSES[-2], tiny_runs.FLOWER_CLASSES[-1]


@pytest.fixture(scope='module')
def trained(tmp_path_factory, flowers_dir) -> pathlib.Path:
  return tiny_runs.trained_workdir(tmp_path_factory, flowers_dir)


@pytest.fixture(scope='module')
def model(trained) -> api.OpenGan:
  return api.restore(trained)


def _unseen(flowers_dir: pathlib.Path, name: str, count: int) -> list[pathlib.Path]:
  files = sorted((flowers_dir / name).glob('*.jpg'))
  return files[tiny_runs.IMAGES_PER_CLASS : tiny_runs.IMAGES_PER_CLASS + count]


def _class_folder(root: pathlib.Path, files: list[pathlib.Path]) -> pathlib.Path:
  root.mkdir(parents=True)
  for path in files:
    (root / path.name).symlink_to(path)
  return root


def _grid_side(tiles: int) -> int:
  return tiles * (R + PADDING) + PADDING


def test_restore_shapes(model):
  assert model.resolution == R
  assert model.step == tiny_runs.NUM_STEPS
  latents = api.sample_latents(model, 3, seed=0)
  assert latents.shape == (3, model.z_dim)
  features = np.zeros((3, model.feature_dim), np.float32)
  images = api.generate(model, latents, features, BATCH)
  assert images.shape == (3, R, R, 3)
  assert images.min() >= -1.0
  assert images.max() <= 1.0


def test_generate_batched_equals_unbatched(model):
  latents = api.sample_latents(model, 5, seed=1)
  features = np.random.default_rng(0).normal(size=(5, model.feature_dim)).astype(np.float32)
  whole = api.generate(model, latents, features, batch_size=8)
  batched = api.generate(model, latents, features, batch_size=2)
  np.testing.assert_allclose(batched, whole, atol=1e-5)


def test_encode_uint8_matches_float(model, flowers_dir):
  images = api.load_images(_unseen(flowers_dir, NOVEL_CLASS, 3), R)
  as_uint8 = np.rint((images + 1.0) * 127.5).astype(np.uint8)
  np.testing.assert_allclose(
    api.encode(model, as_uint8, 2), api.encode(model, images, 4), rtol=1e-4, atol=1e-4
  )


def test_one_shot_rows(model, flowers_dir, tmp_path):
  files = _unseen(flowers_dir, NOVEL_CLASS, 2)
  sources = [str(files[0]), str(files[1]), str(files[0])]
  tiles = figures.one_shot(model, sources, num_samples=3, seed=2, batch_size=BATCH)

  assert tiles.shape == (3, 4, R, R, 3)
  np.testing.assert_array_equal(tiles[0], tiles[2])
  assert not np.allclose(tiles[0, 1:], tiles[1, 1:]), 'two sources gave the same samples'
  np.testing.assert_array_equal(tiles[:, 0], api.load_images([files[0], files[1], files[0]], R))
  path = figures.save_tiles(tiles, tmp_path / 'one_shot.png')
  with Image.open(path) as image:
    assert image.size == (_grid_side(4), _grid_side(3))


def test_single_source_layout(model, flowers_dir):
  source = _unseen(flowers_dir, NOVEL_CLASS, 1)[0]
  tiles = figures.single_source(model, str(source), num_samples=4, columns=3, seed=0)

  assert tiles.shape == (2, 3, R, R, 3)
  np.testing.assert_array_equal(tiles[0, 0], api.load_images([source], R)[0])
  np.testing.assert_array_equal(tiles[1, 2], np.full((R, R, 3), figures.BLANK))
  assert not np.allclose(tiles[0, 1], tiles[0, 2]), 'two latents gave the same image'


def test_intra_class_fixed_latent_rows(model, flowers_dir, tmp_path):
  files = _unseen(flowers_dir, NOVEL_CLASS, 3)
  folder = _class_folder(tmp_path / 'class', files)
  tiles = figures.intra_class(model, [str(folder)], num_latents=2, seed=4, batch_size=BATCH)

  assert tiles.shape == (3, 3, R, R, 3)
  images = api.load_images(sorted(folder.iterdir()), R)
  np.testing.assert_array_equal(tiles[0], images)
  latents = api.sample_latents(model, 2, seed=4)
  features = api.encode(model, images, BATCH)
  expected = api.generate(model, np.repeat(latents[1:], 3, axis=0), features, BATCH)
  np.testing.assert_allclose(tiles[2], expected, atol=1e-5)


@pytest.mark.parametrize('method', ['linear', 'slerp'])
def test_interpolation_corners(model, flowers_dir, method):
  files = _unseen(flowers_dir, NOVEL_CLASS, 1) + _unseen(flowers_dir, TRAIN_CLASS, 1)
  tiles = figures.interpolation(
    model, [str(f) for f in files], latent_steps=3, feature_steps=4, method=method, seed=3
  )

  assert tiles.shape == (4, 3, R, R, 3)
  latents = api.sample_latents(model, 2, seed=3)
  features = api.encode(model, api.load_images(files, R))
  corners = api.generate(model, latents[[0, 1, 0, 1]], features[[0, 0, 1, 1]], batch_size=BATCH)
  np.testing.assert_allclose(tiles[0, 0], corners[0], atol=1e-5)
  np.testing.assert_allclose(tiles[0, -1], corners[1], atol=1e-5)
  np.testing.assert_allclose(tiles[-1, 0], corners[2], atol=1e-5)
  np.testing.assert_allclose(tiles[-1, -1], corners[3], atol=1e-5)


def test_slerp_endpoints_and_arc():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=16).astype(np.float32), rng.normal(size=16).astype(np.float32)
  np.testing.assert_array_equal(api.slerp(a, b, 0.0), a)
  np.testing.assert_array_equal(api.slerp(a, b, 1.0), b)
  x, y = np.eye(2, dtype=np.float32)
  np.testing.assert_allclose(api.slerp(x, y, 0.5), np.full(2, np.sqrt(0.5)), rtol=1e-6)
  np.testing.assert_allclose(api.lerp(x, y, 0.5), [0.5, 0.5])
  steps = api.interpolate(a, b, 5, 'slerp')
  assert steps.shape == (5, 16)
  np.testing.assert_array_equal(steps[0], a)
  np.testing.assert_array_equal(steps[-1], b)
  with pytest.raises(ValueError, match="'cubic'"):
    api.interpolate(a, b, 3, 'cubic')


def test_fit_global_one_mean_and_std():
  rng = np.random.default_rng(1)
  features = rng.normal(loc=np.arange(8.0), scale=0.5, size=(400, 8))
  gaussian = api.fit_global(features)
  np.testing.assert_allclose(gaussian.mean, np.full(8, features.mean()), rtol=1e-6)
  np.testing.assert_allclose(gaussian.std, np.full(8, features.std()), rtol=1e-6)

  samples = gaussian.sample(20_000, seed=0)
  assert samples.shape == (20_000, 8)
  np.testing.assert_allclose(samples.mean(), features.mean(), atol=0.05)
  np.testing.assert_allclose(samples.std(), features.std(), rtol=0.02)
  np.testing.assert_allclose(samples.mean(0), features.mean(), atol=0.1)  # Same in every dim.


def test_fit_per_class_statistics():
  rng = np.random.default_rng(2)
  labels = np.repeat([0, 1], 300)
  centres = np.where(labels[:, None] == 0, -2.0, 3.0)
  features = centres + rng.normal(scale=[[0.5, 1.0, 2.0]], size=(600, 3))
  gaussians = api.fit_per_class(features, labels)

  assert len(gaussians) == 2
  np.testing.assert_allclose(gaussians[0].mean, features[:300].mean(0), rtol=1e-5)
  np.testing.assert_allclose(gaussians[1].std, features[300:].std(0), rtol=1e-5)
  samples = gaussians[1].sample(20_000, seed=1)
  np.testing.assert_allclose(samples.mean(0), gaussians[1].mean, atol=0.05)
  np.testing.assert_allclose(samples.std(0), gaussians[1].std, rtol=0.03)
  with pytest.raises(ValueError, match='class 1 has 1 images'):
    api.fit_per_class(features[:3], np.array([0, 0, 1]))


def test_random_features_from_training_data(model):
  features, labels, names = cli.labelled_features(model, ['train'], 4, BATCH)
  assert names == list(tiny_runs.FLOWER_CLASSES[: tiny_runs.NUM_TRAIN_CLASSES])
  assert features.shape == (4 * len(names), model.feature_dim)
  gaussians = [api.fit_global(features)] + api.fit_per_class(features, labels)
  tiles = figures.random_features(model, gaussians, rows_per_gaussian=1, columns=2, seed=0)

  assert tiles.shape == (1 + len(names), 2, R, R, 3)
  assert not np.allclose(tiles[0, 0], tiles[0, 1]), 'two random draws gave the same image'


def _write_labels(path: pathlib.Path, rows: list[tuple[str, int]]) -> pathlib.Path:
  lines = ['file,is_novel'] + [f'{name},{label}' for name, label in rows]
  path.write_text('\n'.join(lines) + '\n')
  return path


@pytest.fixture(scope='module')
def labelled(flowers_dir, tmp_path_factory) -> attributes.AttributeLabels:
  root = tmp_path_factory.mktemp('labelled')
  rows = []
  for name, label in ((TRAIN_CLASS, 0), (NOVEL_CLASS, 1)):
    for path in _unseen(flowers_dir, name, 8):
      (root / f'{name}_{path.name}').symlink_to(path)
      rows.append((f'{name}_{path.name}', label))
  return attributes.read_labels_csv(_write_labels(root / 'labels.csv', rows))


def test_read_labels_csv(labelled):
  assert labelled.names == ['is_novel']
  assert labelled.labels.shape == (16, 1)
  assert labelled.labels.sum() == 8
  assert all(path.is_file() for path in labelled.paths)


def test_linear_probe_fits_labels(model, labelled):
  classifier = attributes.train_classifier(model, labelled, 'linear', num_steps=300, seed=0)
  images = api.load_images(labelled.paths, R)
  predicted = classifier.probabilities(model, images, BATCH) >= 0.5

  assert predicted.shape == (16, 1)
  assert np.mean(predicted == labelled.labels.astype(bool)) >= 0.9
  assert np.isfinite(classifier.final_loss)


def test_resnet18_classifier_trains(model, labelled):
  classifier = attributes.train_classifier(model, labelled, 'resnet18', num_steps=2, batch_size=4)
  probabilities = classifier.probabilities(model, api.load_images(labelled.paths[:2], R), BATCH)

  assert np.isfinite(classifier.final_loss)
  assert probabilities.shape == (2, 1)
  assert np.all((probabilities >= 0) & (probabilities <= 1))


def _median_probe(model: api.OpenGan, latents, features) -> attributes.AttributeClassifier:
  """A linear probe that splits the given generated samples at the median of one feature axis."""
  generated = api.encode(model, api.generate(model, latents, features, BATCH), BATCH)
  axis = np.argmax(generated.std(0))
  kernel = np.zeros((model.feature_dim, 1), np.float32)
  kernel[axis, 0] = 1.0
  bias = np.array([-np.median(generated[:, axis])], np.float32)
  module = attributes.FeatureClassifier(1)
  return attributes.AttributeClassifier(
    'linear', module, {'params': {'Dense_0': {'kernel': kernel, 'bias': bias}}}, 0.0
  )


def test_directions_and_traversal(model, labelled):
  real = api.encode(model, api.load_images(labelled.paths, R), BATCH)
  num = 12
  latents = api.sample_latents(model, num, seed=5)
  conditions = real[np.arange(num) % len(real)]
  classifier = _median_probe(model, latents, conditions)
  directions = attributes.compute_directions(
    model, classifier, ['axis'], real, num, seed=5, batch_size=BATCH
  )

  images = api.generate(model, latents, conditions, BATCH)
  positive = classifier.probabilities(model, images, BATCH)[:, 0] >= 0.5
  assert directions.num_positive[0] == positive.sum()
  np.testing.assert_allclose(directions.latent_positive[0], latents[positive].mean(0), rtol=1e-5)
  np.testing.assert_allclose(
    directions.feature_negative[0], conditions[~positive].mean(0), rtol=1e-5
  )
  np.testing.assert_allclose(np.linalg.norm(directions.unit('latent'), axis=1), 1.0, rtol=1e-5)

  start = real[0]
  tiles = attributes.traversal(model, directions, latents[0], start, [-1.0, 0.0, 1.0], BATCH)
  assert tiles.shape == (2, 3, R, R, 3)
  centre = api.generate(model, latents[:1], start[None], BATCH)[0]
  np.testing.assert_allclose(tiles[0, 1], centre, atol=1e-5)
  np.testing.assert_allclose(tiles[1, 1], centre, atol=1e-5)
  moved = api.generate(model, latents[:1] + directions.difference('latent'), start[None], BATCH)[0]
  np.testing.assert_allclose(tiles[0, 2], moved, atol=1e-5)


def test_directions_reject_empty_group(model, labelled):
  real = api.encode(model, api.load_images(labelled.paths[:2], R), BATCH)
  module = attributes.FeatureClassifier(1)
  always = {
    'params': {
      'Dense_0': {
        'kernel': np.zeros((model.feature_dim, 1), np.float32),
        'bias': np.ones(1, np.float32),
      }
    }
  }
  classifier = attributes.AttributeClassifier('linear', module, always, 0.0)
  with pytest.raises(ValueError, match="labelled negative for attribute 'a'"):
    attributes.compute_directions(model, classifier, ['a'], real, 4, batch_size=BATCH)


def test_embedding_plots(model, flowers_dir, tmp_path):
  root = tmp_path / 'classes'
  for name in (TRAIN_CLASS, NOVEL_CLASS):
    _class_folder(root / name, _unseen(flowers_dir, name, 5))
  paths, labels, names = api.list_labelled_folders([str(root)])
  assert names == [TRAIN_CLASS, NOVEL_CLASS]
  features = api.encode_files(model, paths, BATCH)

  path = embeddings.plot_classes(embeddings.tsne(features), labels, names, tmp_path / 'tsne.png')
  with Image.open(path) as image:
    assert image.format == 'PNG'
  means = embeddings.class_means(model, features, labels, names, samples_per_image=1)
  np.testing.assert_allclose(means.real[1], features[labels == 1].mean(0), rtol=1e-5)
  assert means.generated.shape == (2, model.feature_dim)
  assert means.distances().shape == (2,)
  path = embeddings.plot_class_means(means, tmp_path / 'means.png')
  with Image.open(path) as image:
    assert image.format == 'PNG'
  with pytest.raises(ValueError, match='at least 3 points'):
    embeddings.tsne(features[:2])


def test_unreadable_source_rejected(model, flowers_dir, tmp_path):
  fake = tmp_path / 'fake.jpg'
  fake.write_text('this is text, not a JPEG')
  output = tmp_path / 'out.png'
  args = ['one_shot', f'--workdir={model.workdir}', f'--output={output}', '--sources']
  args += [str(_unseen(flowers_dir, NOVEL_CLASS, 1)[0]), str(fake)]

  assert cli.main(args) == 1
  assert not output.exists()
  with pytest.raises(ValueError, match='fake.jpg is not a readable image'):
    figures.one_shot(model, [str(fake)], 2)


def test_workdir_without_checkpoint(trained, tmp_path):
  empty = tmp_path / 'untrained'
  empty.mkdir()
  shutil.copy(trained / 'config.json', empty / 'config.json')
  with pytest.raises(FileNotFoundError, match='has not been trained yet'):
    api.restore(empty)
  assert not (empty / 'checkpoints').exists()
  with pytest.raises(FileNotFoundError, match='not a training workdir'):
    api.restore(tmp_path / 'missing')


def test_checkpoint_from_other_resolution(trained, tmp_path):
  copy = tmp_path / 'copy'
  shutil.copytree(trained / 'checkpoints', copy / 'checkpoints', symlinks=True)
  config = json.loads((trained / 'config.json').read_text())
  config['resolution'] = 64
  (copy / 'config.json').write_text(json.dumps(config))
  with pytest.raises(ValueError, match=r'does not match .*resolution=64'):
    api.restore(copy)


def test_labels_csv_naming_missing_files(tmp_path):
  image = tmp_path / 'present.png'
  Image.new('RGB', (8, 8)).save(image)
  csv_path = _write_labels(tmp_path / 'labels.csv', [('present.png', 1), ('absent.jpg', 0)])
  with pytest.raises(FileNotFoundError, match='absent.jpg'):
    attributes.read_labels_csv(csv_path)
  bad_value = _write_labels(tmp_path / 'bad.csv', [('present.png', 2)])
  with pytest.raises(ValueError, match="value '2'"):
    attributes.read_labels_csv(bad_value)


def test_cli_interpolate_subprocess(trained, flowers_dir, tmp_path):
  files = _unseen(flowers_dir, NOVEL_CLASS, 2)
  output = tmp_path / 'interp.png'
  command = [sys.executable, '-m', 'opengan_jax.generate', 'interpolate', f'--workdir={trained}']
  command += ['--sources', str(files[0]), str(files[1]), '--latent_steps=3', '--feature_steps=2']
  command += ['--method=slerp', f'--output={output}', '--batch_size=4']
  # One device, while the workdir was trained on the 4 test devices: restoring must not care.
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)

  assert result.returncode == 0, result.stderr[-3000:]
  with Image.open(output) as image:
    assert image.size == (_grid_side(3), _grid_side(2))
