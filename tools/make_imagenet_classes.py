"""Builds flaxtl/resources/imagenet_classes.json: the 1000 ImageNet-1k classes.

Keras' `decode_predictions` downloads `imagenet_class_index.json`, which does
not resolve offline. The same synsets, in the same (sorted wnid) order, ship in
the PyPI wheel of timm (Apache-2.0); names are the first WordNet lemma with
spaces as underscores, as in the Keras file.

    pip download --no-deps timm -d /tmp/timm
    python tools/make_imagenet_classes.py /tmp/timm/timm-*.whl
"""

import json
from pathlib import Path
import sys
import zipfile

RESOURCES = Path(__file__).resolve().parents[1] / "flaxtl" / "resources"
OUT = RESOURCES / "imagenet_classes.json"
INFO = "timm/data/_info/"


def main(wheel: str) -> None:
  with zipfile.ZipFile(wheel) as z:
    synsets = z.read(INFO + "imagenet_synsets.txt").decode().split()
    lemma_lines = z.read(INFO + "imagenet_synset_to_lemma.txt").decode()
  lemmas = dict(
    line.split("\t", 1) for line in lemma_lines.splitlines() if "\t" in line
  )
  if len(synsets) != 1000 or synsets != sorted(synsets):
    raise SystemExit(f"{wheel}: expected 1000 sorted synsets")
  classes = [
    [wnid, lemmas[wnid].split(",")[0].strip().replace(" ", "_")]
    for wnid in synsets
  ]
  OUT.write_text(json.dumps(classes, separators=(",", ":")) + "\n")
  print(f"wrote {OUT} ({len(classes)} classes)")


if __name__ == "__main__":
  main(sys.argv[1])
