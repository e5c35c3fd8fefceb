"""(to be written)"""

from __future__ import annotations

import numpy as np

from .base import Op, register, unbroadcast  # noqa: F401
