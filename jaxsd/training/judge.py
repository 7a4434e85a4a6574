"""An independent judge of generated images: a small CNN trained on a dataset's class labels.

The model's own CLIP cannot grade the model's own images fairly (what it cannot see, it cannot
fault), so the U-Net stage is judged by a classifier that shares nothing with the trained model:
one head per labelled attribute (for `shapes`: shape, colour, size, position), trained on the real
training split. Like MLPerf ships its Inception network, it is trained once per dataset, cached
in the workdir and deterministic (fixed seed, fixed data order). Its penultimate features give a
Fréchet distance between generated and real images (a "shapes-FID", Heusel et al. 2017).

    judge = load_or_train(os.path.join(workdir, "judge"), dataset_name, load_split)
    judge.accuracy(images, labels)      # {"shape": 0.99, ...} for images in [-1, 1]
    frechet_distance(judge.features(a), judge.features(b))
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import warnings
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.linalg
from flax import serialization

from jaxsd.config import write_json_object
from jaxsd.files import written_whole

log = logging.getLogger(__name__)

_PARAMS = "judge.msgpack"
_META = "judge.json"


class AttributeClassifier(nn.Module):
  """Three (conv, conv, pool) stages, a dense feature layer, one linear head per attribute.

  Flattening (not global pooling) keeps where things are: position is one of the attributes.
  """
  num_classes: tuple[int, ...]
  widths: tuple[int, ...] = (8, 16, 32)
  feature_dim: int = 64

  @nn.compact
  def __call__(self, x):
    for w in self.widths:
      x = nn.relu(nn.Conv(w, (3, 3))(x))
      x = nn.relu(nn.Conv(w, (3, 3))(x))
      x = nn.avg_pool(x, (2, 2), (2, 2))
    features = nn.relu(nn.Dense(self.feature_dim)(x.reshape(x.shape[0], -1)))
    return [nn.Dense(n)(features) for n in self.num_classes], features


@dataclasses.dataclass
class Judge:
  """A trained classifier with the names of its attributes and classes."""

  model: AttributeClassifier
  params: dict
  attributes: tuple[str, ...]
  class_names: dict  # attribute -> tuple of class names
  meta: dict  # how it was made and how well it does on real test images

  def __post_init__(self):
    self._apply = jax.jit(lambda p, x: self.model.apply({"params": p}, x))

  @property
  def image_hw(self) -> tuple[int, int] | None:
    """(height, width) of the images it was trained on, the only size it takes (its flattened features fix it)."""
    shape = self.meta.get("input_shape") if isinstance(self.meta, dict) else None
    return (int(shape[1]), int(shape[2])) if shape else None

  def _run(self, images: np.ndarray, batch: int = 500):
    logits, feats = [], []
    for i in range(0, len(images), batch):
      lg, f = self._apply(self.params, jnp.asarray(images[i:i + batch], jnp.float32))
      logits.append([np.asarray(x) for x in lg])
      feats.append(np.asarray(f))
    per_attr = [np.concatenate([lg[k] for lg in logits]) for k in range(len(self.attributes))]
    return per_attr, np.concatenate(feats)

  def predict(self, images: np.ndarray) -> dict[str, np.ndarray]:
    """Class indices per attribute for images in [-1, 1], NHWC."""
    logits, _ = self._run(images)
    return {a: lg.argmax(-1) for a, lg in zip(self.attributes, logits)}

  def features(self, images: np.ndarray) -> np.ndarray:
    """Penultimate features (N, feature_dim), for the Fréchet distance."""
    return self._run(images)[1]

  def correct(self, images: np.ndarray, labels: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per attribute (and "all"), a boolean per image: did the judge see the labelled class?"""
    return self.compare(self.predict(images), labels)

  def compare(self, predicted: dict[str, np.ndarray], labels: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`correct` for classes already predicted (`predict`), so one pass over the images serves both."""
    ok = {a: predicted[a] == np.asarray(labels[a]) for a in self.attributes}
    ok["all"] = np.logical_and.reduce([ok[a] for a in self.attributes])
    return ok

  def accuracy(self, images: np.ndarray, labels: dict[str, np.ndarray]) -> dict[str, float]:
    return {k: float(v.mean()) for k, v in self.correct(images, labels).items()}


def train_classifier(images: np.ndarray, labels: Sequence[np.ndarray], num_classes: Sequence[int], *, steps: int = 1500,
                     batch_size: int = 128, lr: float = 3e-3, noise_std: float = 0.05, max_blur: float = 1.0,
                     seed: int = 0) -> tuple[AttributeClassifier, dict]:
  """Adam with a cosine schedule on the summed cross-entropies. Augmented with light pixel noise and a
  random amount (up to `max_blur`) of a 1-pixel Gaussian blur, so that a slightly soft image of the right
  thing is still recognised as it: softness is not the attribute being judged. Deterministic given `seed`."""
  model = AttributeClassifier(tuple(int(n) for n in num_classes))
  rng = np.random.default_rng(seed)
  params = model.init(jax.random.key(seed), jnp.zeros((1,) + images.shape[1:], jnp.float32))["params"]
  tx = optax.adam(optax.cosine_decay_schedule(lr, steps, alpha=0.05))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, x, ys, key):
    k_noise, k_blur = jax.random.split(key)
    amount = max_blur * jax.random.uniform(k_blur, (x.shape[0], 1, 1, 1))
    x = x + amount * (_blur(x) - x) + noise_std * jax.random.normal(k_noise, x.shape)

    def loss_fn(p):
      logits, _ = model.apply({"params": p}, x)
      return sum(optax.softmax_cross_entropy_with_integer_labels(lg, y).mean() for lg, y in zip(logits, ys))

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  key = jax.random.key(seed + 1)
  order = np.empty(0, np.int64)
  for i in range(steps):
    if len(order) < batch_size:
      order = np.concatenate([order, rng.permutation(len(images))])
    idx, order = order[:batch_size], order[batch_size:]
    params, opt_state, loss = step(params, opt_state, jnp.asarray(images[idx]), [jnp.asarray(l[idx]) for l in labels],
                                   jax.random.fold_in(key, i))
    if (i + 1) % 500 == 0:
      log.info("judge step %d: loss %.4f", i + 1, float(loss))
  return model, jax.device_get(params)


def _blur(x: jax.Array, sigma: float = 1.0) -> jax.Array:
  """Separable 5-tap Gaussian blur of NHWC images, edges replicated."""
  k = np.exp(-0.5 * (np.arange(-2, 3) / sigma)**2)
  k = jnp.asarray(k / k.sum(), x.dtype)
  x = jnp.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="edge")
  h, w = x.shape[1] - 4, x.shape[2] - 4
  x = sum(k[i] * x[:, i:i + h] for i in range(5))
  return sum(k[i] * x[:, :, i:i + w] for i in range(5))


def load_or_train(cache_dir: str, dataset: str, load_split: Callable[[str], tuple[np.ndarray,
                                                                                  dict]], attributes: Sequence[str],
                  class_names: dict, *, steps: int = 1500, seed: int = 0, train_examples: int | None = None) -> Judge:
  """The judge of `dataset`, from `cache_dir` when it was trained there for the same dataset, attributes,
  steps, seed and requested `train_examples` (what `load_split("train")` is asked for), else trained now (on
  `load_split("train")`), scored on `load_split("test")` and cached.

  `load_split(split) -> (images in [-1, 1] NHWC, {attribute: int labels})`.
  """
  attributes = tuple(attributes)
  meta_path = os.path.join(cache_dir, _META)
  if os.path.exists(meta_path):
    with open(meta_path) as f:
      meta = json.load(f)
    same = (meta.get("dataset") == dataset and tuple(meta.get("attributes",
                                                              ())) == attributes and meta.get("steps") == steps and
            meta.get("seed") == seed and meta.get("requested_train_examples") == train_examples)
    if same:
      model = AttributeClassifier(tuple(len(class_names[a]) for a in attributes))
      template = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(meta["input_shape"]))["params"])
      with open(os.path.join(cache_dir, _PARAMS), "rb") as f:
        params = serialization.from_bytes(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), template), f.read())
      return Judge(model, params, attributes, {a: tuple(class_names[a]) for a in attributes}, meta)
    log.info("judge in %s was trained with other settings (%s, %s steps, seed %s); training a new one.", cache_dir,
             meta.get("dataset"), meta.get("steps"), meta.get("seed"))
  t0 = time.time()
  images, labels = load_split("train")
  model, params = train_classifier(images, [labels[a] for a in attributes], [len(class_names[a]) for a in attributes],
                                   steps=steps, seed=seed)
  train_seconds = time.time() - t0
  judge = Judge(model, params, attributes, {a: tuple(class_names[a]) for a in attributes}, {})
  test_images, test_labels = load_split("test")
  judge.meta = dict(dataset=dataset, attributes=list(attributes), input_shape=[1, *images.shape[1:]],
                    train_examples=len(images), requested_train_examples=train_examples, steps=steps, seed=seed,
                    train_seconds=round(train_seconds, 1), test_examples=len(test_images),
                    test_accuracy=judge.accuracy(test_images, test_labels))
  os.makedirs(cache_dir, exist_ok=True)
  with written_whole(os.path.join(cache_dir, _PARAMS)) as tmp, open(tmp, "wb") as f:  # each file whole or not at
    f.write(serialization.to_bytes(params))  # all, the meta (what says the cache is complete) last
  write_json_object(meta_path, judge.meta, indent=2)
  log.info("judge trained in %.1f s; real test accuracy %s", train_seconds, judge.meta["test_accuracy"])
  return judge


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
  """Fréchet distance between Gaussians fitted to two feature sets (Heusel et al. 2017, FID):
  |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  mu_a, mu_b = a.mean(0), b.mean(0)
  s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  with warnings.catch_warnings():  # dead ReLU features make both covariances singular: expected, harmless
    warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
    covmean = scipy.linalg.sqrtm(s_a @ s_b)
  if not np.isfinite(covmean).all():  # near-singular product: regularise as the reference FID code does
    eps = np.eye(len(s_a)) * 1e-6
    covmean = scipy.linalg.sqrtm((s_a + eps) @ (s_b + eps))
  covmean = covmean.real
  return float(np.square(mu_a - mu_b).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(covmean))
