"""User errors: one clear line, exit status 2, no traceback.

Anything raised as `UserError` is a problem with the user's input (a file, a
config key, an image). Every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

T = TypeVar("T")

EXIT_USER_ERROR = 2


class UserError(Exception):
  """A problem with the user's input; its message is the single line shown."""


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
