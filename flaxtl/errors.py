"""User errors: one clear line, exit status 2, no traceback.

Anything raised as `UserError` is a problem with the user's input (a file, a
config key, an image). Every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
import difflib
import functools
import logging
import sys
from typing import TypeVar

T = TypeVar("T")

EXIT_USER_ERROR = 2


class UserError(Exception):
  """A problem with the user's input; its message is the single line shown."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
  """ "; did you mean 'x'?" for the closest of `choices`, or "" if none is."""
  close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
  return f"; did you mean {close[0]!r}?" if close else ""


def exit_on_user_error(fn: Callable[..., T]) -> Callable[..., T]:
  """Wraps a CLI entry point: a `UserError` prints one line and exits with 2."""

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    try:
      return fn(*args, **kwargs)
    except UserError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(EXIT_USER_ERROR)

  return wrapper


def cli_logging() -> None:
  """flaxtl's INFO lines to stderr; other libraries (orbax, absl) at WARNING."""
  from absl import logging as absl_logging

  absl_logging.set_verbosity(absl_logging.WARNING)
  logger = logging.getLogger("flaxtl")
  if not logger.handlers:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
  logger.setLevel(logging.INFO)
  logger.propagate = False
