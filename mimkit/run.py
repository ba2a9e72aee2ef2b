"""A run's one opening and one ending, shared by every command that claims a run folder.

``start(cfg, command)`` resolves the environment (device, processes, precision), claims ``--output``
(:func:`mimkit.rundir.prepare`) and seeds every generator; it returns a :class:`Run`, which is immutable: what a
command resolves later (the pixel spec, the mask ratio) makes a new one (``run.derive``), and nothing is written
back into the options. ``run.record(cfg)`` writes ``config.yaml`` (the options as given, with the folder and the
resolved values in place of their defaults, so the file reruns the same run) and adds the resolved values to
``run.json`` beside it; it returns that recorded config (what the engine stores in each checkpoint).
"""
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from . import rundir
from .config import save_config
from .data import PixelSpec
from .engine import Env, seed_everything, setup


@dataclass(frozen=True)
class Run:
    command: str
    output: Path  # the claimed run folder
    env: Env
    pixels: Optional[PixelSpec] = None  # the input spec pretraining resolved from its options and data
    mask_ratio: Optional[float] = None  # the ratio the objective masks at (its paper's unless given)

    def derive(self, **values) -> "Run":
        return dataclasses.replace(self, **values)

    def config(self, cfg):
        """``cfg`` as this run records it (a copy): its folder, and the values resolved from defaults."""
        values = {"output": str(self.output)}
        if self.mask_ratio is not None and hasattr(cfg, "mask_ratio"):
            values["mask_ratio"] = float(self.mask_ratio)
        if self.pixels is not None and self.pixels != PixelSpec() and hasattr(cfg, "pixels"):
            values["pixels"] = self.pixels.to_dict()  # 8-bit RGB, the default, stays implicit
        return dataclasses.replace(cfg, **values)

    def record(self, cfg):
        """Write ``config.yaml`` and the resolved values into ``run.json`` (main process); return the config."""
        recorded = self.config(cfg)
        if self.env.is_main:  # the folder exists: start claimed it
            save_config(recorded, self.output / "config.yaml")
            facts = {"mask_ratio": self.mask_ratio} if self.mask_ratio is not None else {}
            if self.pixels is not None:
                facts["pixels"] = self.pixels.to_dict()
            if facts:
                rundir.add_facts(self.output, facts)
        return recorded


def start(cfg, command: str) -> Run:
    """The environment, the claimed folder (a new one, or refuse another run's), the seeds: before any work."""
    env = setup(cfg)
    output = rundir.prepare(cfg, command, env)
    seed_everything(cfg.seed)
    return Run(command, output, env)
