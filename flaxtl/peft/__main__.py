"""PEFT runs: merge, export and apply.

    python -m flaxtl.peft merge --workdir W --out W2   # updates folded in
    python -m flaxtl.peft export --workdir W --out D   # adapters + head only
    python -m flaxtl.peft apply --adapters D --base W --out W3

`merge` writes a normal run directory (`python -m flaxtl.predict` reads it);
`export` an adapter-only checkpoint whose peft.json records the base's
sha256; `apply` refuses a base whose sha256 differs.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from flaxtl.errors import cli_logging, exit_on_user_error


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> dict:
  p = argparse.ArgumentParser(
    prog="python -m flaxtl.peft", description=__doc__.split("\n\n")[0]
  )
  sub = p.add_subparsers(dest="command", required=True)
  m = sub.add_parser("merge", help="fold the low-rank updates into a run dir")
  m.add_argument("--workdir", required=True, type=Path)
  m.add_argument("--out", required=True, type=Path)
  e = sub.add_parser("export", help="write an adapter-only checkpoint")
  e.add_argument("--workdir", required=True, type=Path)
  e.add_argument("--out", required=True, type=Path)
  a = sub.add_parser("apply", help="load an export onto its base run")
  a.add_argument("--adapters", required=True, type=Path)
  a.add_argument("--base", required=True, type=Path)
  a.add_argument("--out", required=True, type=Path)
  args = p.parse_args(argv)
  cli_logging()
  from flaxtl.peft import runs  # After parsing: --help needs no JAX.

  if args.command == "merge":
    return runs.merge(args.workdir, args.out)
  if args.command == "export":
    return runs.export(args.workdir, args.out)
  return runs.apply(args.adapters, args.base, args.out)


if __name__ == "__main__":
  main()
