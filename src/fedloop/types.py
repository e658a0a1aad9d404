"""The one data type every part of fedloop shares."""

from __future__ import annotations

import numpy as np

# A model: a flat, ordered mapping of tensor name to array (the book's Dict[str, np.array]).
Weights = dict[str, np.ndarray]
