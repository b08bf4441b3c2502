"""Probes held to direct solves (numpy lstsq, scikit-learn, brute force);
the feature cache and the command line's user errors."""

import subprocess
import sys

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from flaxtl.models import common, registry
from flaxtl.probe import __main__ as cli
from flaxtl.probe import features, fewshot, knn, linear
from flaxtl.weights import store


@pytest.mark.parametrize("n,d", [(40, 6), (12, 30)])  # Primal and dual.
def test_fewshot_equals_lstsq(n, d):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(n, d)) * rng.uniform(0.5, 3, size=d) + 2.0
  y = np.arange(n) % 3
  l2 = 0.7
  model = fewshot.fit(x, y, 3, l2=l2)
  # The same problem as one least-squares solve: ||a w - t||^2 + l2 ||w||^2.
  mean, std = x.mean(0), x.std(0) + 1e-5
  a = np.hstack([(x - mean) / std, np.full((n, 1), fewshot.BIAS_CONSTANT)])
  t = 2.0 * np.eye(3)[y] - 1.0
  big_a = np.vstack([a, np.sqrt(l2) * np.eye(d + 1)])
  big_t = np.vstack([t, np.zeros((d + 1, 3))])
  w, *_ = np.linalg.lstsq(big_a, big_t, rcond=None)
  np.testing.assert_allclose(model.w, w, rtol=1e-6, atol=1e-9)
  x_new = rng.normal(size=(5, d))
  np.testing.assert_allclose(
    model.scores(x_new),
    np.hstack([(x_new - mean) / std, np.full((5, 1), 100.0)]) @ w,
    rtol=1e-6,
    atol=1e-9,
  )
  # Leave-one-out in closed form equals refitting without each row.
  loo = fewshot.loo_scores(a, t, l2)
  for i in range(n):
    keep = np.arange(n) != i
    ai = np.vstack([a[keep], np.sqrt(l2) * np.eye(d + 1)])
    ti = np.vstack([t[keep], np.zeros((d + 1, 3))])
    wi, *_ = np.linalg.lstsq(ai, ti, rcond=None)
    np.testing.assert_allclose(loo[i], a[i] @ wi, rtol=1e-6, atol=1e-8)


def test_fewshot_shots_and_l2_choice():
  x, y = load_digits(return_X_y=True)
  idx = fewshot.sample_shots(y, 5, 10, np.random.default_rng(1))
  assert np.bincount(y[idx]).tolist() == [5] * 10
  acc, l2 = fewshot.accuracy(x[idx], y[idx], x[1000:], y[1000:], 10)
  assert l2 in fewshot.L2_GRID and acc > 0.6
  with pytest.raises(fewshot.UserError, match="class 0 has 3"):
    fewshot.sample_shots(np.array([0, 0, 0, 1, 1, 1, 1]), 4, 2, None)


def test_linear_probe_matches_sklearn():
  x, y = load_digits(return_X_y=True)
  x = x.astype(np.float32)
  xtr, ytr, xte, yte = x[:1000], y[:1000], x[1000:], y[1000:]
  ours, wd = linear.accuracy(xtr, ytr, xte, yte, 10)
  ref = LogisticRegression(max_iter=5000).fit(xtr, ytr).score(xte, yte)
  assert wd in linear.WD_GRID
  assert ours >= ref - 0.01, (ours, ref)


def test_knn_equals_brute_force():
  rng = np.random.default_rng(0)
  xtr, ytr = rng.normal(size=(45, 5)), rng.integers(0, 3, 45)
  xte = rng.normal(size=(11, 5))
  got = knn.votes(xtr, ytr, xte, 3, k=20, temperature=0.07)
  want = np.zeros((11, 3))
  for i, q in enumerate(xte):
    sims = [q @ p / (np.linalg.norm(q) * np.linalg.norm(p)) for p in xtr]
    for j in np.argsort(sims)[::-1][:20]:
      want[i, ytr[j]] += np.exp(sims[j] / 0.07)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert (knn.predict(xtr, ytr, xte, 3) == want.argmax(1)).all()


def test_pooling_ranks():
  x = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
  np.testing.assert_allclose(features.pool(x), x.mean((1, 2)))
  t = x.reshape(2, 12, 5)
  np.testing.assert_allclose(features.pool(t, "cls"), t[:, 0])
  np.testing.assert_allclose(features.pool(t, "mean"), t.mean(1))


@pytest.fixture(scope="module")
def tiny(module_tmp):
  """Digits 0..2 (real, 8x8): 12 per class to train, 6 to test."""
  root = module_tmp("probe")
  x, y = load_digits(return_X_y=True)
  images = np.clip(x * 16, 0, 255).astype(np.uint8).reshape(-1, 8, 8)
  paths = {}
  for split, lo, hi in (("train", 0, 12), ("test", 12, 18)):
    idx = np.concatenate([np.flatnonzero(y == c)[lo:hi] for c in range(3)])
    paths[split] = root / f"{split}.npz"
    np.savez(paths[split], images=images[idx], labels=y[idx])
  one = root / "one.npz"
  np.savez(one, images=images[:5], labels=np.zeros(5, np.int64))
  return root, paths, one


def _checkpoint(path, seed):
  """A converted-checkpoint dir of MobileNetV2 (alpha 0.35), seeded."""
  model = registry.create("mobilenetv2", include_top=False, alpha=0.35)
  variables = common.init_variables(
    model, 32, __import__("jax").random.PRNGKey(seed)
  )
  prov = {"arch": "mobilenetv2", "include_top": False,
          "options": {"alpha": 0.35}, "source": "test"}  # fmt: skip
  store.save(variables, path, prov, force=True)


def test_cache_reused_and_invalidated(tiny, tmp_path):
  _, paths, _ = tiny
  ckpt = tmp_path / "ckpt"
  _checkpoint(ckpt, 0)

  def run(layer):
    before = features.STATS["extractions"]
    records = cli.main([
      "--arch", "mobilenetv2", "--weights", str(ckpt), "--layers", layer,
      "--data", f"npz:{paths['train']}", "--test-data",
      f"npz:{paths['test']}", "--methods", "knn,fewshot", "--shots", "2",
      "--seeds", "2", "--image-size", "32", "--out", str(tmp_path / "out"),
      "--no-progress",
    ])  # fmt: skip
    return features.STATS["extractions"] - before, records

  n, first = run("Conv1")
  assert n == 2  # Train and test.
  n, again = run("Conv1")
  assert n == 0 and again == first
  _checkpoint(ckpt, 1)  # Same architecture, different weight files.
  n, changed = run("Conv1")
  assert n == 2 and changed != first
  n, _ = run("bn_Conv1")
  assert n == 2
  out = tmp_path / "out"
  assert {"results.json", "report.md", "shots.png"} <= {
    p.name for p in out.iterdir()
  }
  rec = first[0]
  assert set(rec) >= {"arch", "weights", "layer", "method", "shots",
                      "seeds", "accuracy_mean", "accuracy_ci95", "n_train",
                      "n_test"}  # fmt: skip
  assert (rec["n_train"], rec["n_test"]) == (6, 18)


def _one_line(capsys):
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: "), err
  return err[0]


def test_user_errors_exit_2(tiny, tmp_path, capsys):
  _, paths, one = tiny
  base = ["--arch", "pixels", "--out", str(tmp_path), "--no-progress"]
  cases = [
    (["--layers", "block9", "--data", f"npz:{paths['train']}"], "no layer"),
    (
      ["--data", f"npz:{paths['train']}", "--shots", "20"],
      "class 0 has only",
    ),
    (["--data", f"npz:{one}"], "one class"),
    (["--data", f"npz:{paths['train']}", "--methods", "svm"], "svm"),
  ]
  for argv, expect in cases:
    with pytest.raises(SystemExit) as e:
      cli.main(base + argv)
    assert e.value.code == 2
    assert expect in _one_line(capsys)
  assert not (tmp_path / "results.json").exists()
  # The real command line: one line on stderr, no traceback.
  proc = subprocess.run(
    [sys.executable, "-m", "flaxtl.probe", "--arch", "mobilenetv2",
     "--layers", "nope", "--data", f"npz:{paths['train']}"],
    capture_output=True, text=True,
  )  # fmt: skip
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and "no layer 'nope'" in lines[0], lines


def test_offline_suite_pixels(tmp_path):
  """The suite end to end on two data sets built from scikit-image's files:
  disjoint train/test photo regions, a leaderboard with every output."""
  rows = cli.main([
    "--suite", "offline", "--datasets", "faces,textures", "--n-train", "5",
    "--n-test", "4", "--methods", "fewshot,knn", "--shots", "1,5",
    "--seeds", "2", "--out", str(tmp_path / "suite"), "--download-cache",
    str(tmp_path / "dl"), "--no-progress",
  ])  # fmt: skip
  assert [(r["dataset"], r["backbone"]) for r in rows] == [
    ("faces", "pixels:none"),
    ("textures", "pixels:none"),
  ]
  assert rows[0]["knn:all"]["seeds"] == 1
  out = tmp_path / "suite"
  for name in ("leaderboard.md", "leaderboard.json", "leaderboard.png"):
    assert (out / name).stat().st_size > 0
  text = (out / "leaderboard.md").read_text()
  assert "bottom halves" in text and "| faces |" in text
