"""The independent judge: it learns the shapes labels, is deterministic and cached; the Fréchet distance
against closed forms."""

from __future__ import annotations

import numpy as np
import pytest

from jaxsd.data import input_pipeline, shapes
from jaxsd.training import evaluate
from jaxsd.training import judge as judge_lib

ATTRS = tuple(shapes.JUDGED)


@pytest.fixture(scope="module")
def split_loader(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  name, _ = shapes.prepare_shapes(data_dir, "32x32", num_train=1500, num_test=300, seed=3)

  def load(split):
    ds = input_pipeline.make_dataset(name, global_batch_size=500, data_dir=data_dir, split=split, train=False,
                                     label_keys=ATTRS, drop_remainder=False, num_threads=1)
    arrays = evaluate.load_arrays(iter(ds), ("image",) + ATTRS)
    return arrays["image"], arrays

  return name, load


def test_judge_learns_the_labels_and_is_cached(split_loader, tmp_path):
  name, load = split_loader
  judge = judge_lib.load_or_train(str(tmp_path / "judge"), name, load, ATTRS, shapes.JUDGED, steps=250)
  acc = judge.meta["test_accuracy"]
  # Chance: shape 1/3, colour 1/6, size 1/2, position 1/5. 250 steps on 1,500 images already see colour,
  # size and position (measured: shape 0.63, colour 0.99, size 0.97, position 1.00; 150 steps: 0.56, 0.96,
  # 0.97, 1.00); the default (1,000 steps on 20,000 images) reaches >= 0.996 on all four.
  assert acc["color"] > 0.95 and acc["position"] > 0.95 and acc["size"] > 0.9 and acc["shape"] > 0.5, acc
  images, labels = load("test")
  np.testing.assert_allclose(judge.accuracy(images, labels)["color"], acc["color"])

  def must_not_load(split):
    raise AssertionError("a cached judge must not read the data again")

  cached = judge_lib.load_or_train(str(tmp_path / "judge"), name, must_not_load, ATTRS, shapes.JUDGED, steps=250)
  np.testing.assert_array_equal(cached.features(images[:50]), judge.features(images[:50]))
  assert cached.meta == judge.meta
  with pytest.raises(AssertionError, match="must not read"):  # another dataset: trained anew
    judge_lib.load_or_train(str(tmp_path / "judge"), "shapes/other", must_not_load, ATTRS, shapes.JUDGED)
  for other in (dict(steps=400), dict(steps=250, seed=1), dict(steps=250, train_examples=256)):
    with pytest.raises(AssertionError, match="must not read"):  # other settings: trained anew (was reused)
      judge_lib.load_or_train(str(tmp_path / "judge"), name, must_not_load, ATTRS, shapes.JUDGED, **other)


def test_judge_training_is_deterministic(split_loader):
  _, load = split_loader
  images, labels = load("test")
  runs = [
      judge_lib.train_classifier(images, [labels[a]
                                          for a in ATTRS], [len(shapes.JUDGED[a])
                                                            for a in ATTRS], steps=5, batch_size=32, seed=1)[1]
      for _ in range(2)
  ]
  for a, b in zip(*(jax_leaves(r) for r in runs)):
    np.testing.assert_array_equal(a, b)


def jax_leaves(tree):
  import jax

  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_frechet_distance_closed_forms():
  rng = np.random.default_rng(0)
  a = rng.standard_normal((4000, 6)) @ rng.standard_normal((6, 6))
  shift = rng.standard_normal(6)
  # Same covariance: only the means differ, FD = |shift|^2.
  np.testing.assert_allclose(judge_lib.frechet_distance(a, a + shift), np.square(shift).sum(), rtol=1e-6)
  assert abs(judge_lib.frechet_distance(a, a)) < 1e-6
  # b = 2a: cov 4S, (S 4S)^(1/2) = 2S, so FD = |mu|^2 + tr(S + 4S - 4S) = |mu|^2 + tr(S).
  mu, cov = a.mean(0), np.cov(a, rowvar=False)
  np.testing.assert_allclose(judge_lib.frechet_distance(a, 2 * a), np.square(mu).sum() + np.trace(cov), rtol=1e-6)
