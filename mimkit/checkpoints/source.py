"""A checkpoint rewritten into mimkit's MAE names (:class:`Source`): what every format reader produces and the
one reader (:mod:`.read`) turns into a model."""
from typing import Dict, List

import torch

from ..errors import CheckpointError


class Source:
    """A checkpoint rewritten into mimkit MAE names, with where each tensor came from."""

    def __init__(self, path: str, fmt: str):
        self.path, self.format, self.kind = str(path), fmt, None
        self.tensors: Dict[str, torch.Tensor] = {}
        self.origin: Dict[str, str] = {}  # mimkit name -> name in the file
        self.unused: List[str] = []  # names in the file that map to nothing
        self.hints: dict = {}  # what the files say: num_heads, decoder_heads, mask_ratio, norm_pix_loss, ...
        self.notes: List[str] = []
        self.raw, self.arch = None, None  # a mimkit checkpoint's own state dict and arch
        self.used: set = set()  # mimkit names copied into the model

    def add(self, name: str, tensor: torch.Tensor, origin: str):
        self.tensors[name] = tensor
        self.origin[name] = origin

    def where(self, name: str) -> str:
        return self.origin.get(name, name)

    def error(self, msg: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {msg}")
