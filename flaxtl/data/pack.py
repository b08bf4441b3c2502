"""Packs any data source into ArrayRecord shards for fast repeated epochs.

    python -m flaxtl.data.pack folder:data/train --out data/train_packed
    python launch.py ... --config.data.source=arrayrecord:data/train_packed

Records hold the encoded image bytes (the files' own bytes; PNG for in-memory
arrays) and the label; see `flaxtl.data.packed`. `mnist_sample` and `tfds:NAME`
without a split pack their training pool; name a split (`tfds:NAME:test`) to
pack another. The output appears whole or not at all; an existing --out is
left alone unless --force.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
import time

from flaxtl.data import packed, sources
from flaxtl.errors import UserError, cli_logging, exit_on_user_error


def pack(
  spec: str,
  out: Path,
  tfds_data_dir: str | None = None,
  shard_size: int = 10_000,
  force: bool = False,
) -> dict:
  """Packs source `spec` into `out`; returns the pack index."""
  if out.exists() and not force:
    raise UserError(f"--out {out} already exists; pass --force to replace it")
  if out.exists() and not (out / packed.META).is_file():
    raise UserError(
      f"--out {out} exists and is not a flaxtl pack; refusing to replace it"
    )
  if shard_size < 1:
    raise UserError(f"--shard-size must be positive, got {shard_size}")
  opts = sources.Options(
    key="SOURCE", labels_required=False, tfds_data_dir=tfds_data_dir
  )
  ds, _ = sources.read(spec, opts)
  return packed.write(ds, out, shard_size)


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> dict:
  p = argparse.ArgumentParser(
    prog="python -m flaxtl.data.pack", description=__doc__.split("\n\n")[0]
  )
  p.add_argument("source", help=" | ".join(sources.SCHEMES))
  p.add_argument("--out", required=True, type=Path, help="folder to write")
  p.add_argument("--tfds-data-dir", default=None, help="TFDS data_dir")
  p.add_argument(
    "--shard-size", type=int, default=10_000, help="examples per shard"
  )
  p.add_argument("--force", action="store_true", help="replace --out")
  args = p.parse_args(argv)
  cli_logging()
  t0 = time.perf_counter()
  meta = pack(
    args.source, args.out, args.tfds_data_dir, args.shard_size, args.force
  )
  print(
    f"packed {meta['num_examples']} examples into {len(meta['shards'])} "
    f"shard(s) in {args.out} ({time.perf_counter() - t0:.1f} s); use "
    f"data.source=arrayrecord:{args.out}"
  )
  return meta


if __name__ == "__main__":
  main()
