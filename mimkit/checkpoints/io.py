"""Moved: checkpoint file I/O is :mod:`mimkit.checkpoint_files` (the ground floor, importable without the reader,
the exporter and the data layer that this package's ``__init__`` brings). Old imports keep working through here."""
from ..checkpoint_files import *  # noqa: F401,F403
from ..checkpoint_files import CKPT_RE  # noqa: F401
