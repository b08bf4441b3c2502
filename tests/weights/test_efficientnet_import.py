"""Keras EfficientNet / V2 files of every layout -> flaxtl -> Keras' outputs."""

import shutil

import h5py
import jax
import numpy as np
import pytest

from configs import base
from flaxtl import models, weights
from flaxtl.models import efficientnet
from flaxtl.train import run_spec, setup
from flaxtl.weights import keras_file, sources
from flaxtl.weights.mappings import efficientnet as mapping
from tests import keras_oracle as oracle

SIZE = 32  # The smallest input Keras accepts.
REPS = {
  "efficientnetb0": "EfficientNetB0",
  "efficientnetv2b0": "EfficientNetV2B0",
}


@pytest.fixture(scope="module")
def refs(keras, module_tmp):
  built = {}

  def get(arch):
    if arch not in built:
      builder = getattr(keras.applications, REPS[arch])
      model = oracle.keras_model(keras, builder, True, SIZE, 1)
      oracle.perturb(model)
      x = oracle.images(SIZE)  # 0..255: the model normalises.
      feature = models.get(arch).feature_layer
      tmp = module_tmp(arch)
      built[arch] = oracle.Reference(keras, model, feature, x, tmp)
    return built[arch]

  return get


@pytest.fixture(scope="module")
def forward():
  """One jitted apply per model: every layout reuses its compilation."""
  fns = {}

  def get(arch, top, **options):
    key = (arch, top, tuple(sorted(options.items())))
    if key not in fns:
      model = models.create(arch, include_top=top, **options)
      fns[key] = jax.jit(lambda v, x: model.apply(v, x, train=False))
    return fns[key]

  return get


@pytest.mark.parametrize("layout", oracle.LAYOUTS)
@pytest.mark.parametrize("top", [True, False], ids=["top", "notop"])
@pytest.mark.parametrize("arch", list(REPS))
def test_parity_with_keras(refs, forward, record_property, arch, top, layout):
  ref = refs(arch)
  converted, prov = weights.load_file(ref.files[(top, layout)])
  assert (prov["arch"], prov["include_top"]) == (arch, top)
  assert prov["layout"] == layout and prov["mapping"] == "by_name"
  v1 = arch in efficientnet.V1_ARCHS
  assert prov["options"] == ({"imagenet_rescaling": False} if v1 else {})
  got = forward(arch, top)(converted.variables, ref.x)
  rel = oracle.rel_diff(got, ref.want[top])
  record_property("max_rel_diff", float(rel))
  assert rel <= oracle.TOL

  p, s = converted.variables["params"], converted.variables["batch_stats"]
  dw = "block2a_dwconv" if v1 else "block4a_dwconv2"
  np.testing.assert_array_equal(p[dw]["depthwise_kernel"], ref.arrays(dw)[0])
  gamma, beta, mean, var = ref.arrays("stem_bn")
  np.testing.assert_array_equal(p["stem_bn"]["scale"], gamma)
  np.testing.assert_array_equal(p["stem_bn"]["bias"], beta)
  np.testing.assert_array_equal(s["stem_bn"]["mean"], mean)
  np.testing.assert_array_equal(s["stem_bn"]["var"], var)
  if v1:  # Normalization's statistics sit beside BN's, imported as they are.
    mean, var, count = ref.arrays("normalization")
    np.testing.assert_array_equal(s["normalization"]["mean"], mean)
    np.testing.assert_array_equal(s["normalization"]["var"], var)
    assert int(s["normalization"]["count"]) == int(count) == 1234
  else:
    assert "normalization" not in s  # V2's is a constant layer.


OUTPUT_LAYERS = {
  "efficientnetb0": [
    "normalization",
    "stem_conv_pad",
    "block1a_se_reshape",
    "block2b_drop",
    "top_dropout",
  ],
  "efficientnetv2b0": [
    "normalization",
    "block1a_project_activation",
    "block2b_drop",
    "block4a_se_excite",
  ],
}


@pytest.mark.parametrize("arch", list(REPS))
def test_any_layer_is_an_output_layer(keras, refs, arch):
  ref = refs(arch)
  names = OUTPUT_LAYERS[arch]
  outputs = [ref.model.get_layer(n).output for n in names]
  want = keras.Model(ref.model.inputs, outputs)(ref.x)
  converted, _ = weights.load_file(ref.files[(True, "keras_archive")])
  for name, w in zip(names, want):
    model = models.create(arch, output_layer=name)
    got = jax.jit(model.apply)(converted.variables, ref.x)
    assert oracle.rel_diff(got, w) <= oracle.TOL, name


def test_checkpoint_round_trip(refs, forward, tmp_path):
  ref = refs("efficientnetb0")
  out = weights.convert_file(ref.files[(True, "keras_archive")], tmp_path / "c")
  variables = weights.restore_variables(out)
  assert variables["batch_stats"]["normalization"]["count"].dtype == np.int32
  got = forward("efficientnetb0", True)(variables, ref.x)
  assert oracle.rel_diff(got, ref.want[True]) <= oracle.TOL


def _text(names) -> list[str]:
  return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def _rename_layer(path, old, new):
  """What Keras writes when the layer got a session-suffixed auto name."""
  with h5py.File(path, "r+") as f:
    f.move(old, new)
    g = f[new]
    for n in list(g.keys()):
      g.move(n, n.replace(old, new, 1))
    g.attrs["weight_names"] = np.array(
      [n.replace(old, new, 1).encode() for n in _text(g.attrs["weight_names"])]
    )
    f.attrs["layer_names"] = np.array(
      [(new if n == old else n).encode() for n in _text(f.attrs["layer_names"])]
    )


def test_auto_suffixed_normalization_name(refs, tmp_path):
  src = refs("efficientnetb0").files[(False, "legacy_weights_h5")]
  dst = tmp_path / "suffixed.h5"
  shutil.copy(src, dst)
  _rename_layer(dst, "normalization", "normalization_3")
  raw = keras_file.read(dst)
  assert "normalization_3" in {layer.name for layer in raw.layers}
  converted, prov = weights.load_file(dst)
  assert prov["arch"] == "efficientnetb0" and prov["mapping"] == "by_name"
  want = refs("efficientnetb0").arrays("normalization")[0]
  np.testing.assert_array_equal(
    converted.variables["batch_stats"]["normalization"]["mean"], want
  )


def test_keras3_file_without_names_maps_by_class_keys(refs, tmp_path):
  src = refs("efficientnetv2b0").files[(False, "keras3_weights_h5")]
  stripped = tmp_path / "noname.weights.h5"
  shutil.copy(src, stripped)
  with h5py.File(stripped, "r+") as f:
    f.visititems(
      lambda n, o: o.attrs.__delitem__("name") if "name" in o.attrs else None
    )
  raw = keras_file.read(stripped)
  assert all(layer.name is None for layer in raw.layers)
  assert mapping.detect(raw) == "efficientnetv2b0"
  got = mapping.from_keras(raw, "efficientnetv2b0")
  want = mapping.from_keras(keras_file.read(src), "efficientnetv2b0")
  for c in ("params", "batch_stats"):
    a, b = jax.tree.leaves(got.variables[c]), jax.tree.leaves(want.variables[c])
    assert len(a) == len(b)
    for x, y in zip(a, b):
      np.testing.assert_array_equal(x, y)


def test_keras_imagenet_model_with_its_extra_rescaling(
  keras, refs, forward, monkeypatch, record_property, tmp_path
):
  """Keras' weights='imagenet' EfficientNet has a third input layer.

  The official files hold the ImageNet stddev as the Normalization variance
  and Keras adds Rescaling(1/sqrt(stddev)) ('rescaling_1'). Keras builds that
  model here from a local file standing in for the download; flaxtl finds
  the option from the variance (weights-only file) or the config (.keras).
  """
  src = refs("efficientnetb0").files[(False, "legacy_weights_h5")]
  official = tmp_path / "efficientnetb0_notop.h5"
  shutil.copy(src, official)
  with h5py.File(official, "r+") as f:
    g = f["normalization"]
    names = _text(g.attrs["weight_names"])
    g[names[0]][...] = efficientnet.IMAGENET_MEAN_RGB
    g[names[1]][...] = efficientnet.IMAGENET_STDDEV_RGB
  monkeypatch.setattr(
    keras.src.applications.efficientnet.file_utils,
    "get_file",
    lambda *a, **k: str(official),
  )
  keras.backend.clear_session()
  model = keras.applications.EfficientNetB0(
    weights="imagenet", include_top=False, input_shape=(SIZE, SIZE, 3)
  )
  names = [layer.name for layer in model.layers]
  assert names[1:4] == ["rescaling", "normalization", "rescaling_1"]
  ours = models.keras_layer_names(
    "efficientnetb0", include_top=False, imagenet_rescaling=True
  )
  assert ours[1:] == names[1:]
  x = refs("efficientnetb0").x
  want = np.asarray(model(x))

  converted, prov = weights.load_file(official)
  assert prov["options"] == {"imagenet_rescaling": True}
  got = forward("efficientnetb0", False, imagenet_rescaling=True)(
    converted.variables, x
  )
  rel = oracle.rel_diff(got, want)
  record_property("max_rel_diff", float(rel))
  assert rel <= oracle.TOL

  # freeze.first_layers=k is Keras' model.layers[:k] of this model (the
  # rescaling layer counts) when the run's options come from the weights.
  config = base.get_base()
  config.model.arch, config.model.head = "efficientnetb0", "linear"
  spec = run_spec.resolve(config, prov)
  net = setup.build_model(config, 10, spec=spec)
  params = setup.abstract_variables(net, SIZE, jax.random.PRNGKey(0))["params"]
  # One layer off (the rescaling layer not counted) would freeze se_reduce.
  k = names.index("block1a_se_reduce")
  plan = setup.freeze_plan(config, params, k, log_matches=False, spec=spec)
  trained = {
    layer.name for layer in model.layers[:k] if layer.trainable_weights
  }
  assert {"stem_conv", "block1a_dwconv"} <= trained
  assert {f"backbone/{n}" for n in trained} == {
    p for p in plan.frozen_layers() if p.startswith("backbone/")
  }

  archive = tmp_path / "imagenet.keras"
  model.save(archive)
  assert mapping.imagenet_rescaling(keras_file.read(archive))
  plain = refs("efficientnetb0").files[(False, "keras_archive")]
  assert not mapping.imagenet_rescaling(keras_file.read(plain))


def test_imagenet_file_table_matches_keras_sources(keras):
  """Names, paths and digests as keras/src/applications builds them."""
  kv1 = keras.src.applications.efficientnet
  kv2 = keras.src.applications.efficientnet_v2
  files = efficientnet.IMAGENET_FILES
  for arch in efficientnet.V1_ARCHS:
    top_md5, notop_md5 = kv1.WEIGHTS_HASHES[arch[-2:]]
    base = efficientnet.IMAGENET_BASE_URLS[arch]
    assert base == kv1.BASE_WEIGHTS_PATH != sources.KERAS_BASE_URL
    for top, suffix, md5 in ((True, "", top_md5), (False, "_notop", notop_md5)):
      rel, digest = files[(arch, top)]
      assert (rel, digest) == (f"{arch}{suffix}.h5", md5)
    assert efficientnet.IMAGENET_OPTIONS[arch] == {"imagenet_rescaling": True}
  for arch in efficientnet.V2_ARCHS:
    variant = arch.removeprefix("efficientnetv2")
    key = variant if variant.startswith("b") else "-" + variant
    top_md5, notop_md5 = kv2.WEIGHTS_HASHES[key]
    assert arch not in efficientnet.IMAGENET_BASE_URLS
    for top, suffix, md5 in ((True, "", top_md5), (False, "_notop", notop_md5)):
      rel, digest = files[(arch, top)]
      name = f"efficientnetv2-{variant}{suffix}.h5"
      assert sources.KERAS_BASE_URL + rel == kv2.BASE_WEIGHTS_PATH + name
      assert digest == md5
  assert {a for a, _ in files} == set(models.names("efficientnet"))
