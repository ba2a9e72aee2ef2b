"""Pretraining objectives: each turns a batch into a loss on the shared ViT encoder.

An objective is an ``nn.Module`` with ``forward(images, labels, rng) -> loss`` (or a dict with ``loss`` and
other scalars to log), an ``encoder`` attribute (the network to evaluate and export), an ``arch`` dict and a
``build(arch)`` classmethod to rebuild it from a checkpoint. ``rng`` is an :class:`mimkit.engine.StepRandom`
(or None outside the engine). Its class also declares ``name``, a one-line ``description``, ``paper_mask_ratio``
and ``Options`` (an :class:`.base.ObjectiveOptions` dataclass: its ``objective_args``), and
``from_config(cfg, options)`` builds it for a ``PretrainConfig``.

A new objective is one module whose class is passed to ``register``; nothing else changes.
"""
from typing import Dict

from ..config import build_options, check_choice
from ..errors import ConfigError
from .base import ObjectiveOptions, require_rgb

OBJECTIVES: Dict[str, type] = {}


def register(cls: type) -> type:
    """Add an objective class (keyed by its ``name``); usable as a decorator."""
    for attr in ("name", "description", "Options", "from_config", "build"):
        if not hasattr(cls, attr):
            raise TypeError(f"an objective needs {attr!r}; {cls.__name__} has none")
    OBJECTIVES[cls.name] = cls
    return cls


def get_objective(name: str) -> type:
    """The class registered as ``name``; an unknown name is a one-line ConfigError with the nearest one."""
    check_choice("objective", name, OBJECTIVES)
    return OBJECTIVES[name]


def parse_options(name: str, args) -> ObjectiveOptions:
    """``objective_args`` of objective ``name`` as its ``Options``: keys, types, choices and values checked."""
    cls = get_objective(name)
    try:
        return build_options(cls.Options, dict(args or {}), label=str)
    except ConfigError as e:
        raise ConfigError(f"--objective-args: {e} (objective {name})") from None


def check_objective(cfg) -> ObjectiveOptions:
    """The objective's name and its options for a PretrainConfig, checked before any work starts."""
    return parse_options(cfg.objective, cfg.objective_args)


def check_channels(name: str, in_chans: int):
    """An objective whose class declares ``rgb_only`` (why) refuses data of other channel counts, naming the
    objectives that take any."""
    why = getattr(get_objective(name), "rgb_only", None)
    if why:
        others = ", ".join(n for n, c in OBJECTIVES.items() if not getattr(c, "rgb_only", None))
        require_rgb(in_chans, f"--objective {name}", why, f": use {others}")


def build_objective(cfg):
    """The objective named by ``cfg.objective`` for a PretrainConfig."""
    return get_objective(cfg.objective).from_config(cfg, check_objective(cfg))


def describe() -> str:
    """Every objective: one line each, then its options with defaults (what `mimkit objectives` prints)."""
    import dataclasses
    lines = []
    for name, cls in OBJECTIVES.items():
        lines.append(f"{name:10s} {cls.description} (mask ratio: {cls.paper_mask_ratio:g})")
        for f in dataclasses.fields(cls.Options):
            lines.append(f"    {f.name} (default {f.default!r}): {f.metadata.get('help', '')}")
    return "\n".join(lines)


from .mae import MAEObjective  # noqa: E402  (registered in the order `mimkit objectives` lists them)
from .simmim import SimMIMObjective  # noqa: E402
from .vit_mpp import ViTMPPObjective  # noqa: E402
from .beit import BEiTObjective  # noqa: E402
from .igpt import IGPTObjective  # noqa: E402

for _cls in (MAEObjective, SimMIMObjective, ViTMPPObjective, BEiTObjective, IGPTObjective):
    register(_cls)
