"""Keras' preprocess_input modes, grayscale tiling and ImageNet class names."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxtl import imagenet, preprocess


def test_preprocess_input_matches_keras(keras, images64):
  from keras.applications import vgg16 as kvgg16

  x = images64.astype(np.float32)
  want = kvgg16.preprocess_input(x.copy())
  np.testing.assert_allclose(
    preprocess.preprocess_input(jnp.asarray(x), "caffe"),
    want,
    rtol=0,
    atol=1e-4,
  )
  np.testing.assert_allclose(
    preprocess.preprocess_input(x, "caffe"), want, rtol=0, atol=1e-4
  )


def test_grayscale_is_tiled_to_rgb():
  gray = np.arange(2 * 40 * 40, dtype=np.uint8).reshape(2, 40, 40, 1)
  out = jax.jit(lambda x: preprocess.prepare_images(x, 40, mode="none"))(gray)
  assert out.shape == (2, 40, 40, 3)
  for c in range(3):
    np.testing.assert_array_equal(out[..., c], gray[..., 0].astype(np.float32))


def test_decode_predictions_offline():
  preds = np.zeros((2, 1000), np.float32)
  preds[0, 1] = 0.9  # goldfish
  preds[0, 281] = 0.1  # tabby
  preds[1, 999] = 1.0
  decoded = imagenet.decode_predictions(preds, top=2)
  assert decoded[0] == [
    ("n01443537", "goldfish", pytest.approx(0.9)),
    ("n02123045", "tabby", pytest.approx(0.1)),
  ]
  assert decoded[1][0][:2] == ("n15075141", "toilet_tissue")
  assert len({wnid for wnid, _ in imagenet.class_index()}) == 1000
