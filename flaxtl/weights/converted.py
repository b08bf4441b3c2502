"""What a weight mapping returns: a file's weights as flaxtl variables."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class Converted:
  """A file's weights as flaxtl variables, and how they were found."""

  variables: dict  # {'params': {...}, ['batch_stats': {...}]}
  arch: str
  include_top: bool
  num_classes: int | None
  mapping: str  # "by_name" or "by_order".
  skipped: list[str]  # File layers that were not used, for the log.
  options: dict[str, Any] = dataclasses.field(default_factory=dict)
