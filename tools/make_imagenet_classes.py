"""Builds flaxtl/resources/imagenet_classes.json: the 1000 ImageNet-1k classes.

Keras' `decode_predictions` downloads `imagenet_class_index.json`, which does
not resolve offline. The same synsets, in the same (sorted wnid) order, ship in
the PyPI wheel of timm (Apache-2.0); names are the first WordNet lemma with
spaces as underscores, as in the Keras file.

    pip download --no-deps timm -d /tmp/timm && python tools/make_imagenet_classes.py /tmp/timm/timm-*.whl
"""

import json
from pathlib import Path
import sys
import zipfile

OUT = (
  Path(__file__).resolve().parents[1]
  / "flaxtl"
  / "resources"
  / "imagenet_classes.json"
)


def main(wheel: str) -> None:
  with zipfile.ZipFile(wheel) as z:
    synsets = z.read("timm/data/_info/imagenet_synsets.txt").decode().split()
    lemmas = dict(
      line.split("\t", 1)
      for line in z.read("timm/data/_info/imagenet_synset_to_lemma.txt")
      .decode()
      .splitlines()
      if "\t" in line
    )
  assert len(synsets) == 1000 and synsets == sorted(synsets), (
    "unexpected synset list"
  )
  classes = [
    [wnid, lemmas[wnid].split(",")[0].strip().replace(" ", "_")]
    for wnid in synsets
  ]
  OUT.write_text(json.dumps(classes, separators=(",", ":")) + "\n")
  print(f"wrote {OUT} ({len(classes)} classes)")


if __name__ == "__main__":
  main(sys.argv[1])
