"""One table for all archs: forward and train steps at 224 from results/.

    python benchmarks/families.py        # after run_families.sh

Reads results/forward_<arch>.json and results/train_step_<arch>.json (written
by forward.py / train_step.py with `--arch`) for every arch of
benchmarks/archs.py, and prints images/s per framework, the ratios against
PyTorch fp32 (the target is >= 1.0x) and Keras 3, and how contended each row
was: the largest share of the machine other processes used during any of the
row's measurements (`*` marks a cell above 15%).
"""

from __future__ import annotations

import argparse
import json

import archs
import common

FRAMEWORKS = (
  "flaxtl",
  "flaxtl_tuned",
  "torch",
  "torch_tuned",
  "keras",
  "keras_tuned",
)
PAIRS = (
  ("flaxtl_tuned", "torch"),
  ("flaxtl_tuned", "torch_tuned"),
  ("flaxtl", "torch"),
  ("flaxtl_tuned", "keras_tuned"),
  ("flaxtl", "keras"),
)


def _load(name: str) -> dict:
  path = common.RESULTS / name
  return json.loads(path.read_text()) if path.exists() else {}


def rows_for(arch: str) -> list[tuple[str, dict]]:
  """(step label, {framework: record}) for one arch's forward/train cases."""
  out = []
  fw = _load(f"forward_{arch}.json").get("results", {})
  cases = sorted(
    {k for r in fw.values() for k in r if k.endswith("/fp32")},
    key=lambda c: -int(c.split("x")[0]),
  )
  for case in cases:
    size, batch = case.split("/")[0].split("x")
    recs = {f: fw[f][case] for f in fw if case in fw[f]}
    out.append((f"forward {size}, batch {batch}", recs))
  ts = _load(f"train_step_{arch}.json")
  cfg = ts.get("config", {})
  for case in archs.CASES:
    recs = {
      f: r[case]
      for f, r in ts.get("results", {}).items()
      if case in r and "img_s" in r[case]
    }
    if recs:
      label = "freeze" if case == "freeze" else "full fine-tune"
      out.append(
        (f"train {label} {cfg.get('size')}, batch {cfg.get('batch')}", recs)
      )
  return out


def summarise(names: list[str]) -> tuple[str, dict]:
  header = ["arch", "step", *[f"{f}" for f in FRAMEWORKS]]
  header += [f"{a}/{b}" for a, b in PAIRS] + ["others' CPU (max)"]
  rows, derived = [], {}
  for arch in names:
    for label, recs in rows_for(arch):

      def ips(f, recs=recs):
        r = recs.get(f)
        return r.get("img_s") if r else None

      cells = []
      for f in FRAMEWORKS:
        r = recs.get(f)
        star = "*" if r and r.get("contended") else ""
        cells.append(common.fmt(ips(f)) + star)
      ratios = common.ratio_cells(PAIRS, ips, f"{arch}/{label}", derived)
      other = max((r.get("other_cpu", 0) for r in recs.values()), default=0)
      rows.append([arch, label, *cells, *ratios, f"{other:.2f}"])
  return (
    "images/s (fp32)\n\n"
    + common.markdown_table(header, rows)
    + "\n\n"
    + common.STAR_NOTE
  ), derived


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--archs", default=",".join(archs.ARCHS))
  ap.add_argument("--out", default="families.json")
  args = ap.parse_args()
  table, derived = summarise(args.archs.split(","))
  path = common.write_json(args.out, {"derived": derived, "table": table})
  print(table)
  print(f"\nwrote {path}")


if __name__ == "__main__":
  main()
