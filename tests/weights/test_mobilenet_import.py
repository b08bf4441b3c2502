"""Keras MobileNetV2 / V3 files of every layout -> flaxtl -> Keras' outputs."""

import shutil

import h5py
import jax
import numpy as np
import pytest

from flaxtl import models, weights
from flaxtl.errors import UserError
from flaxtl.preprocess import preprocess_input
from flaxtl.weights import convert, keras_file
from flaxtl.weights.mappings import mobilenet as mapping
from tests.weights import mobile_oracle as oracle

SIZE = 32  # The smallest input Keras accepts.
# One representative per version: (Keras builder, options).
REPS = {
  "mobilenetv2": ("MobileNetV2", {"alpha": 0.35}),
  "mobilenetv3small": ("MobileNetV3Small", {}),
}


def _alpha(arch):
  return REPS[arch][1].get("alpha", 1.0)


@pytest.fixture(scope="module")
def refs(keras, tmp_path_factory):
  built = {}

  def get(arch):
    if arch not in built:
      name, options = REPS[arch]
      spec = models.get(arch)
      model = oracle.build(
        keras,
        getattr(keras.applications, name),
        SIZE,
        classifier_activation=None,
        **options,
      )
      oracle.perturb(model)
      x = oracle.images(SIZE)
      x = np.asarray(preprocess_input(x, spec.preprocess))
      tmp = tmp_path_factory.mktemp(arch)
      built[arch] = oracle.Reference(keras, model, spec.feature_layer, x, tmp)
    return built[arch]

  return get


@pytest.fixture(scope="module")
def forward():
  """One jitted apply per model: every layout reuses its compilation."""
  fns = {}

  def get(arch, top):
    if (arch, top) not in fns:
      model = models.create(arch, include_top=top, alpha=_alpha(arch))
      fns[(arch, top)] = jax.jit(lambda v, x: model.apply(v, x, train=False))
    return fns[(arch, top)]

  return get


@pytest.mark.parametrize("layout", oracle.LAYOUTS)
@pytest.mark.parametrize("top", [True, False], ids=["top", "notop"])
@pytest.mark.parametrize("arch", list(REPS))
def test_parity_with_keras(refs, forward, record_property, arch, top, layout):
  ref = refs(arch)
  converted, prov = weights.load_file(ref.files[(top, layout)])
  # Architecture, top and alpha all come from the file.
  assert (prov["arch"], prov["include_top"]) == (arch, top)
  assert prov["layout"] == layout
  assert prov["options"] == {"alpha": _alpha(arch)}
  assert prov["mapping"] == "by_name"
  got = forward(arch, top)(converted.variables, ref.x)
  rel = oracle.max_rel_diff(got, ref.want[top])
  record_property("max_rel_diff", rel)
  assert rel <= oracle.TOL

  # Arrays arrive bit-identical, BN statistics in batch_stats.
  dw = "expanded_conv_depthwise"
  bn = "bn_Conv1" if arch == "mobilenetv2" else "conv_bn"
  p, s = converted.variables["params"], converted.variables["batch_stats"]
  np.testing.assert_array_equal(p[dw]["depthwise_kernel"], ref.arrays(dw)[0])
  gamma, beta, mean, var = ref.arrays(bn)
  np.testing.assert_array_equal(p[bn]["scale"], gamma)
  np.testing.assert_array_equal(p[bn]["bias"], beta)
  np.testing.assert_array_equal(s[bn]["mean"], mean)
  np.testing.assert_array_equal(s[bn]["var"], var)


@pytest.mark.parametrize("arch", list(REPS))
def test_checkpoint_round_trip(refs, forward, tmp_path, arch):
  """convert -> orbax -> restore_variables, then the same outputs."""
  ref = refs(arch)
  out = weights.convert_file(
    ref.files[(False, "keras_archive")], tmp_path / "c"
  )
  prov = weights.read_provenance(out)
  assert prov["options"] == {"alpha": _alpha(arch)}
  variables = weights.restore_variables(out)
  assert set(variables) == {"params", "batch_stats"}
  got = forward(arch, False)(variables, ref.x)
  assert oracle.max_rel_diff(got, ref.want[False]) <= oracle.TOL


def test_keras3_file_without_names_maps_by_class_keys(refs, tmp_path):
  """Older Keras 3 `.weights.h5` record no layer names: keys name them.

  Text order puts every conv2d_N before the first depthwise_conv2d, so
  position alone would hand depthwise kernels to 1x1 convolutions.
  """
  ref = refs("mobilenetv2")
  src = ref.files[(True, "keras3_weights_h5")]
  stripped = tmp_path / "noname.weights.h5"
  shutil.copy(src, stripped)
  with h5py.File(stripped, "r+") as f:
    f.visititems(
      lambda n, o: o.attrs.__delitem__("name") if "name" in o.attrs else None
    )
  raw = keras_file.read(stripped)
  assert all(layer.name is None for layer in raw.layers)
  assert mapping.detect(raw) == "mobilenetv2"
  got = mapping.from_keras(raw, "mobilenetv2")
  want = mapping.from_keras(keras_file.read(src), "mobilenetv2")
  assert got.options == {"alpha": 0.35}
  for c in ("params", "batch_stats"):
    a, b = jax.tree.leaves(got.variables[c]), jax.tree.leaves(want.variables[c])
    assert len(a) == len(b)
    for x, y in zip(a, b):
      np.testing.assert_array_equal(x, y)


def test_explicit_notop_from_a_top_file(refs):
  ref = refs("mobilenetv3small")
  converted, _ = weights.load_file(
    ref.files[(True, "legacy_weights_h5")], include_top=False
  )
  assert not converted.include_top
  assert "logits" not in converted.variables["params"]
  assert "conv_2" not in converted.variables["params"]
  assert any("logits" in s for s in converted.skipped)


def test_alpha_is_inferred_from_shapes(refs):
  """Only the alphas whose shapes fit are tried; a wrong --arch is refused."""
  raw = keras_file.read(refs("mobilenetv2").files[(False, "legacy_model_h5")])
  assert mapping.alpha_candidates(raw, "mobilenetv2", False) == [0.35]
  with pytest.raises(UserError, match="holds a mobilenetv2"):
    convert.to_variables(raw, "efficientnetb0")
  with pytest.raises(UserError, match=r"Conv1|conv"):
    convert.to_variables(raw, "mobilenetv3small")


def test_imagenet_file_table_matches_keras_names():
  files = mapping.IMAGENET_FILES
  rel, digest = files[("mobilenetv2", False)]
  assert rel.endswith(
    "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
  )
  assert digest is None  # Keras' mobilenet_v2.py verifies no hash.
  rel, digest = files[("mobilenetv3large", True)]
  assert rel == "mobilenet_v3/weights_mobilenet_v3_large_224_1.0_float.h5"
  assert digest == "59e551e166be033d707958cf9e29a6a7"
  assert set(models.names("mobilenet")) == {a for a, _ in files}
  alpha_files = mapping.IMAGENET_ALPHA_FILES
  assert ("mobilenetv2", True, 0.35) in alpha_files
  assert alpha_files[("mobilenetv2", True, 0.35)][0].endswith("_0.35_224.h5")
