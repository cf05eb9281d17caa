"""Cross-rank weight tracking for a serving engine's own model.

Each rank declares the pieces of checkpoint tensors it expects (``Expectations``, or
``from_engine`` from vLLM-shaped metadata), records what its loaders wrote (``Recorder``),
and calls ``merge`` on every rank: one ``LoadReport``, the same everywhere, that names each
missing, inconsistent, defaulted and unexpected checkpoint tensor once, with its owners, by
the same definitions ``distload.load`` uses.
"""

from .expect import Expectations, Expected, from_engine
from .keys import Key
from .merge import enabled, merge
from .record import Recorder
from .slices import read_slices

__all__ = ["Expectations", "Expected", "Key", "Recorder", "enabled", "from_engine", "merge", "read_slices"]
