"""Tests of the evaluator network, the evaluation protocols and the evaluate command."""

import dataclasses
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tiny_runs

from configs import default
from opengan_jax import config_checks, evaluate, networks, sampling, train
from opengan_jax.evaluation import evaluator as evaluator_lib
from opengan_jax.evaluation import protocols, train_evaluator

REPO = pathlib.Path(__file__).resolve().parents[1]
WIDTHS = (8, 16)
OPTIONS = protocols.EvaluationOptions(
  num_samples=16, batch_size=8, seed=1, grid_sources=3, grid_latents=2
)


@pytest.fixture(scope='module')
def trained(tmp_path_factory, flowers_dir) -> pathlib.Path:
  return tiny_runs.trained_workdir(tmp_path_factory, flowers_dir)


@pytest.fixture(scope='module')
def eval_dir(tmp_path_factory, flowers_dir) -> pathlib.Path:
  """An evaluator trained for a few steps on the tiny run's four flower classes."""
  config = tiny_runs.shared_config(tmp_path_factory, flowers_dir)
  config.evaluator.widths = WIDTHS
  config.evaluator.num_epochs = 2
  config.evaluator.batch_size = 16
  config.evaluator.eval_batch_size = 32
  directory = tmp_path_factory.mktemp('evaluator')
  train_evaluator.train_evaluator(config, str(directory))
  return directory


@pytest.fixture(scope='module')
def evaluator(eval_dir) -> evaluator_lib.Evaluator:
  return evaluator_lib.restore_evaluator(eval_dir, expected_resolution=tiny_runs.RESOLUTION)


@pytest.fixture(scope='module')
def report_path(trained, eval_dir, tmp_path_factory) -> pathlib.Path:
  workdir = tmp_path_factory.mktemp('evaluated') / 'workdir'
  shutil.copytree(trained, workdir)
  return evaluate.evaluate_workdir(workdir, eval_dir, OPTIONS)


@pytest.fixture(scope='module')
def report(report_path) -> dict:
  return json.loads(report_path.read_text())


def test_held_out_split_per_class():
  labels = np.repeat(np.arange(3), [20, 10, 1])
  train_rows, held_rows = train_evaluator.held_out_split(labels, 0.1, seed=3)

  assert np.bincount(labels[held_rows], minlength=3).tolist() == [2, 1, 0]
  assert not set(train_rows) & set(held_rows)
  assert len(train_rows) + len(held_rows) == len(labels)
  again, _ = train_evaluator.held_out_split(labels, 0.1, seed=3)
  np.testing.assert_array_equal(again, train_rows)
  other, _ = train_evaluator.held_out_split(labels, 0.1, seed=4)
  assert not np.array_equal(other, train_rows), 'the seed does not change the split'


def test_evaluator_info(evaluator):
  info = evaluator.info
  assert info['resolution'] == tiny_runs.RESOLUTION
  assert info['feature_dim'] == WIDTHS[-1]
  assert info['class_names'] == list(tiny_runs.FLOWER_CLASSES)
  assert info['num_train_classes'] == tiny_runs.NUM_TRAIN_CLASSES
  assert info['num_held_out_images'] == len(tiny_runs.FLOWER_CLASSES)  # One of 12 per class.
  assert 0.0 <= info['held_out_accuracy'] <= 1.0
  assert evaluator.feature_space == f'evaluator-{tiny_runs.RESOLUTION}px-{WIDTHS[-1]}d'


def test_evaluator_batched_outputs(evaluator):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (5, tiny_runs.RESOLUTION, tiny_runs.RESOLUTION, 3), np.uint8)
  features = evaluator.features(images, batch_size=8)
  assert features.shape == (5, WIDTHS[-1])
  assert features.dtype == np.float32
  as_float = images.astype(np.float32) / 127.5 - 1.0
  np.testing.assert_allclose(evaluator.features(as_float, batch_size=2), features, atol=1e-4)
  predictions = evaluator.predict(images)
  assert predictions.shape == (5,)
  assert predictions.min() >= 0
  assert predictions.max() < len(tiny_runs.FLOWER_CLASSES)


def test_evaluator_rejects_wrong_image_size(evaluator):
  with pytest.raises(ValueError, match='takes images of shape'):
    evaluator.features(np.zeros((2, 16, 16, 3), np.uint8))


def test_restore_evaluator_missing_dir(tmp_path):
  with pytest.raises(FileNotFoundError, match='no trained evaluator'):
    evaluator_lib.restore_evaluator(tmp_path / 'missing')


def test_restore_evaluator_resolution_mismatch(eval_dir):
  with pytest.raises(ValueError, match='trained at 32 px, but the GAN generates 64 px'):
    evaluator_lib.restore_evaluator(eval_dir, expected_resolution=64)


def test_evaluate_rejects_other_resolution(trained, evaluator):
  model = evaluate.restore_gan(trained)
  with pytest.raises(ValueError, match='trained at 32 px'):
    protocols.evaluate(dataclasses.replace(model, resolution=64), evaluator, OPTIONS)


def test_report_layout(report, report_path):
  assert report_path.name == f'report_{tiny_runs.NUM_STEPS}.json'
  assert report_path.parent.name == 'eval'
  assert report['step'] == tiny_runs.NUM_STEPS
  assert report['conditioning'] == 'feature'
  assert report['feature_space'] == f'evaluator-{tiny_runs.RESOLUTION}px-{WIDTHS[-1]}d'
  assert set(report['protocols']) == set(protocols.PROTOCOLS)
  assert not report['protocols']['T']['applicable']
  assert report['options']['seed'] == OPTIONS.seed
  assert report['wall_time_s'] > 0
  assert 'fid' not in json.dumps(report).lower()


def test_report_sample_counts(report):
  num_train = tiny_runs.NUM_TRAIN_CLASSES * tiny_runs.IMAGES_PER_CLASS
  num_novel = tiny_runs.IMAGES_PER_CLASS
  expected = {
    'T-SM': min(OPTIONS.num_samples, num_train // 2),
    'N-SM': min(OPTIONS.num_samples, num_novel // 2),
    'N-RF': min(OPTIONS.num_samples, num_novel // 2),
  }
  for name, count in expected.items():
    entry = report['protocols'][name]
    assert entry['applicable'], name
    assert entry['num_generated'] == count, name
    assert entry['num_real'] == count, name
    assert entry['reference']['num_real_b'] == count, name


def test_report_figures_in_range(report):
  for name in ('T-SM', 'N-SM', 'N-RF'):
    entry = report['protocols'][name]
    for figures in (entry, entry['reference']):
      assert math.isfinite(figures['frechet_distance']), name
      assert figures['frechet_distance'] >= 0, name
      assert figures['intra_class_frechet_distance'] >= 0, name
      assert math.isfinite(figures['kid_mean']), name
      assert figures['kid_std'] >= 0, name
      assert 0.0 <= figures['precision'] <= 1.0, name
      assert 0.0 <= figures['recall'] <= 1.0, name
  assert report['protocols']['T-SM']['intra_class_num_classes'] == tiny_runs.NUM_TRAIN_CLASSES


def test_report_open_set(report):
  open_set = report['open_set']
  one_shot = open_set['one_shot']
  for key in ('accuracy_all', 'accuracy_novel'):
    assert 0.0 <= one_shot[key] <= 1.0
    assert 0.0 <= one_shot['real_sources'][key] <= 1.0
  # The tiny run has one novel class, so an argmax over the novel classes is always right.
  assert one_shot['accuracy_novel'] == 1.0
  for subset in ('train', 'novel'):
    consistency = open_set['consistency'][subset]
    assert -1.0 <= consistency['cosine_similarity'] <= 1.0
    assert consistency['squared_distance'] >= 0
    split = open_set['latent_feature_split'][subset]
    assert (split['num_sources'], split['num_latents']) == (3, 2)
    assert split['latent_variance'] >= 0
    assert split['feature_variance'] > 0


def test_report_scalars_written(report, report_path):
  workdir = report_path.parents[1]
  assert list(workdir.glob('events.out.tfevents.*')), 'no TensorBoard event file'
  scalars = protocols.report_scalars(report)
  space = report['feature_space']
  assert f'eval/{space}/N-RF/frechet_distance' in scalars
  assert f'eval/{space}/N-RF/reference_frechet_distance' in scalars
  assert f'eval/{space}/one_shot_accuracy_all' in scalars
  assert all(tag.startswith('eval/') for tag in scalars)
  assert 'N/A' in protocols.format_table(report)  # Protocol T of the baselines.


def test_restore_generator_steps(trained):
  config = sampling.load_workdir_config(str(trained))
  _, _, step = evaluate.restore_generator_at(config, trained, 2)
  assert step == 2
  with pytest.raises(ValueError, match='available steps: 2, 4'):
    evaluate.restore_generator_at(config, trained, 3)


@pytest.mark.parametrize('conditioning', ['class', 'none'])
def test_baseline_protocol_t(conditioning, evaluator, tmp_path_factory, flowers_dir):
  config = tiny_runs.shared_config(tmp_path_factory, flowers_dir)
  config.model.conditioning = conditioning
  split = train.load_data(config, config.dataset.cache_dir, config.resolution)
  generator, discriminator = networks.make_networks(config, len(split.train_class_names))
  state = train.initial_gan_state(config, generator, discriminator)
  model = protocols.make_gan_under_evaluation(
    config, generator, state.generator.variables(), 0, split
  )

  report = protocols.evaluate(model, evaluator, OPTIONS)

  entry = report['protocols']['T']
  assert entry['applicable']
  assert entry['num_generated'] == OPTIONS.num_samples
  assert entry['frechet_distance'] >= 0
  assert entry['reference']['frechet_distance'] >= 0
  for name in ('T-SM', 'N-SM', 'N-RF'):
    assert not report['protocols'][name]['applicable'], name
  assert report['open_set'] is None
  if conditioning == 'class':
    assert entry['intra_class_frechet_distance'] >= 0
    assert entry['reference']['intra_class_frechet_distance'] >= 0
  else:
    assert entry['intra_class_frechet_distance'] is None
    assert entry['reference']['intra_class_frechet_distance'] is None


def test_feature_consistency_by_hand():
  features = np.array([[3.0, 4.0], [1.0, 0.0]])
  same = protocols.feature_consistency(features, features)
  assert same['cosine_similarity'] == pytest.approx(1.0)
  assert same['squared_distance'] == 0.0

  sources = np.array([[4.0, 3.0], [0.0, 2.0]])
  result = protocols.feature_consistency(features, sources)
  # Row 0: cos = 24 / 25, distance 1 + 1 = 2. Row 1: cos = 0, distance 1 + 4 = 5.
  assert result['cosine_similarity'] == pytest.approx((24 / 25 + 0.0) / 2)
  assert result['squared_distance'] == pytest.approx((2.0 + 5.0) / 2)


@pytest.mark.parametrize('covariance', protocols.COVARIANCES)
def test_class_gaussian_sampler_moments(covariance):
  rng = np.random.default_rng(0)
  class_means = np.array([[5.0, -2.0, 0.0], [-3.0, 1.0, 4.0]])
  labels = np.repeat([0, 1], 50)
  features = class_means[labels] + rng.normal(size=(100, 3)) * np.array([1.0, 2.0, 0.5])
  sample_labels = np.repeat([0, 1], 20000)

  samples = protocols.sample_class_features(features, labels, sample_labels, covariance, seed=0)

  assert samples.shape == (40000, 3)
  for label in (0, 1):
    rows = features[labels == label]
    drawn = samples[sample_labels == label]
    # Five standard errors of the mean of 20000 draws.
    tolerance = 5 * rows.std(axis=0, ddof=1) / np.sqrt(len(drawn))
    np.testing.assert_array_less(np.abs(drawn.mean(axis=0) - rows.mean(axis=0)), tolerance)
    np.testing.assert_allclose(drawn.std(axis=0), rows.std(axis=0, ddof=1), rtol=0.05)


def test_latent_feature_split_by_hand():
  # E[s, l] = a_s + b_l in one dimension: Var_l = var(b), Var_s = var(a).
  a = np.array([0.0, 2.0, 4.0])
  b = np.array([0.0, 1.0])
  grid = (a[:, None] + b[None, :])[..., None]
  result = protocols.latent_feature_split(grid)
  assert result['latent_variance'] == pytest.approx(np.var(b, ddof=1))
  assert result['feature_variance'] == pytest.approx(np.var(a, ddof=1))
  assert result['latent_feature_variance_ratio'] == pytest.approx(0.5 / 4.0)


def test_one_shot_accuracy_by_hand():
  logits = np.array([[5.0, 1.0, 2.0], [0.0, 3.0, 1.0], [9.0, 0.0, 4.0]])
  targets = np.array([2, 1, 2])
  result = protocols.one_shot_accuracy(logits, targets, candidates=[1, 2])
  assert result['accuracy_all'] == pytest.approx(1 / 3)
  assert result['accuracy_novel'] == pytest.approx(1.0)


def test_config_requires_evaluator_dir():
  config = default.get_config()
  config.eval_every_steps = 100
  with pytest.raises(ValueError, match='evaluator_dir'):
    config_checks.validate_config(config, num_devices=1)


def test_training_hook_writes_report(trained, eval_dir, tmp_path, tmp_path_factory, flowers_dir):
  workdir = tmp_path / 'resumed'
  shutil.copytree(trained, workdir)
  config = tiny_runs.shared_config(tmp_path_factory, flowers_dir)
  config.gan.num_steps = tiny_runs.NUM_STEPS + 1
  config.eval_every_steps = tiny_runs.NUM_STEPS + 1
  config.evaluator_dir = str(eval_dir)
  config.eval_num_samples = 8
  train.train_and_evaluate(config, str(workdir))

  path = workdir / 'eval' / f'report_{tiny_runs.NUM_STEPS + 1}.json'
  report = json.loads(path.read_text())
  assert report['step'] == tiny_runs.NUM_STEPS + 1
  assert report['protocols']['T-SM']['num_generated'] == 8


def test_command_missing_evaluator(trained, tmp_path):
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'opengan_jax.evaluate',
      f'--workdir={trained}',
      f'--evaluator_dir={tmp_path / "none"}',
      '--num_samples',
      '8',
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
    timeout=120,
  )
  assert result.returncode != 0
  assert 'no trained evaluator' in result.stderr
