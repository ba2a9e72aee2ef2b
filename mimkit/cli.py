"""The ``mimkit`` command: flags are generated from the option dataclasses; each subcommand calls the API."""
import argparse
import logging
import sys
import typing

from . import config as C
from .errors import did_you_mean
from .bench import bench
from .checkpoints.export import export_command
from .data.shards import shards_command
from .eval.finetune import finetune
from .explore import explore
from .eval.knn import knn
from .eval.linprobe import linprobe
from .features import embed_command
from .pretrain import pretrain
from .segment import segment
from .sweep import sweep
from .tokenizer import tokenizer_command
from .viz import reconstruct, viz
from .errors import CheckpointError, ConfigError, DataError, DivergedError, Preempted
from .models import ENCODERS
from .objectives import OBJECTIVES, describe

# name -> (options class, the API function run with the loaded config, one-line help)
COMMANDS = {
    "pretrain": (C.PretrainConfig, pretrain, "pretrain an encoder with a masked-image objective"),
    "knn": (C.KnnConfig, knn, "weighted k-NN accuracy on frozen features"),
    "linprobe": (C.LinprobeConfig, linprobe, "linear probe on frozen features"),
    "finetune": (C.FinetuneConfig, finetune, "fine-tune the encoder end to end"),
    "reconstruct": (C.ReconstructConfig, reconstruct, "figures of masked images and their reconstructions"),
    "export": (C.ExportConfig, export_command,
               "write weights as timm, Hugging Face ViTMAE or official MAE checkpoints"),
    "embed": (C.EmbedConfig, embed_command, "features of a folder of images, to a .npy file"),
    "viz": (C.VizConfig, viz, "figures of what an encoder learned: attention, pca or neighbours (PNG, numbers in JSON "
            "beside)"),
    "explore": (C.ExploreConfig, explore,
                "a local web page: reconstructions, attention, features and neighbours of checkpoints side by side"),
    "tokenizer": (C.TokenizerConfig, tokenizer_command,
                  "train a discrete visual tokenizer (VQ-VAE) for BEiT: mimkit tokenizer train"),
    "sweep": (C.SweepConfig, sweep, "pretrain and evaluate a grid or list of runs; a table and plots"),
    "shards": (C.ShardsConfig, shards_command,
               "write images as webdataset tar shards for streaming (--data 'OUT/shard-{000000..000009}.tar')"),
    "segment": (C.SegmentConfig, segment,
                "semantic segmentation on an encoder: mimkit segment train | predict (masks for new images)"),
    "bench": (C.BenchConfig, bench, "time pretraining steps against the peers (HF ViTMAE, lightly)"),
}


def add_options(parser: argparse.ArgumentParser, cls):
    parser.add_argument("--config", metavar="YAML", help="read options from a YAML file; flags override it")
    positional = [f.name for f, _ in C.option_fields(cls) if f.metadata.get("positional")]
    if positional:  # bare arguments fill these fields in order (the flag form works too); see _positionals
        parser.add_argument("_positional", nargs="*", metavar=" ".join(n.upper() for n in positional),
                            help=f"the same as {', '.join(C.flag(n) for n in positional)}")
    for f, typ in C.option_fields(cls):
        help_ = f.metadata.get("help", "")
        if cls is C.PretrainConfig and f.name == "objective":
            help_ = f"pretraining objective: {', '.join(OBJECTIVES)} (`mimkit objectives` describes each)"
        default = f.default if f.default is not C.dataclasses.MISSING else "{}"
        kw = dict(dest=f.name, default=argparse.SUPPRESS, help=f"{help_} (default: {default})")
        if f.metadata.get("choices"):
            kw["choices"] = f.metadata["choices"]
        flags = [C.flag(f.name)] + [C.flag(a) for a in f.metadata.get("aliases", ())]  # old spellings still work
        if typ is bool:
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, **kw)
        elif typing.get_origin(typ) in (dict, typing.Dict):
            parser.add_argument(*flags, type=_yaml_mapping, metavar="YAML", **kw)
        else:
            parser.add_argument(*flags, type=str, metavar=f.name.upper(), **kw)


class OneLineParser(argparse.ArgumentParser):
    """Usage mistakes are one line (``mimkit CMD: error: ...``), like every other bad input."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _suggest(command: str, flags: list) -> str:
    if command not in COMMANDS:
        return ""
    known = ["--config"] + [C.flag(f.name) for f, _ in C.option_fields(COMMANDS[command][0])]
    return did_you_mean(flags[0].split("=")[0], known)


def _yaml_mapping(text: str):
    import yaml
    return yaml.safe_load(text)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="mimkit", allow_abbrev=False, description="Masked image modeling: MAE and its lineage.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (cls, _, help_) in COMMANDS.items():
        add_options(sub.add_parser(name, help=help_, description=help_, allow_abbrev=False), cls)
    models = sub.add_parser("models", help="list the model presets")
    models.set_defaults(command="models")
    objectives = sub.add_parser("objectives", help="list the pretraining objectives, one line each, and their "
                                "objective_args with defaults")
    objectives.set_defaults(command="objectives")
    return parser


def _positionals(parser, args: dict, extra: list) -> dict:
    """Bare arguments to their fields, in order; argparse leaves those after an option in ``extra``."""
    given = args.pop("_positional", []) + [a for a in extra if not a.startswith("-")]
    unknown = [a for a in extra if a.startswith("-")]
    if unknown or (given and args.get("command") not in COMMANDS):
        hint = _suggest(args.get("command"), unknown) if unknown else ""
        parser.error(f"unrecognized arguments: {' '.join(unknown or given)}{hint}")
    if given:
        names = [f.name for f, _ in C.option_fields(COMMANDS[args["command"]][0]) if f.metadata.get("positional")]
        if len(given) > len(names):
            parser.error(f"{args['command']}: too many arguments: {' '.join(given[len(names):])}")
        for name, value in zip(names, given):
            if name in args:
                parser.error(f"{args['command']}: {name.upper()} given twice ({C.flag(name)} and as an argument)")
            args[name] = value
    return args


def main(argv=None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    args = _positionals(parser, vars(args), extra)
    logging.basicConfig(level=logging.DEBUG if args.pop("verbose") else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    command = args.pop("command")
    if command == "models":
        for name, a in sorted(ENCODERS.items()):
            print(f"{name:24s} {a['img_size']:>4d}px patch {a['patch_size']:<2d} width {a['embed_dim']:<5d} "
                  f"depth {a['depth']:<3d} heads {a['num_heads']}")
        return 0
    if command == "objectives":
        print(describe())
        return 0
    cls, run, _ = COMMANDS[command]
    try:
        path = args.pop("config", None)
        if path is None and cls is C.SweepConfig:  # `mimkit sweep CONFIG`: the bare argument is the YAML file
            path = args.pop("file", None)
        cfg = C.load_config(cls, path, args)
        run(cfg)
    except (ConfigError, DataError, CheckpointError, DivergedError) as e:
        print(f"mimkit {command}: error: {e}", file=sys.stderr)
        return 2
    except Preempted as e:
        print(f"mimkit {command}: {e}", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"mimkit {command}: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as e:
        lost = _peer_lost(e)
        if lost is None:
            raise
        print(f"mimkit {command}: error: {lost}", file=sys.stderr)
        return 1
    return 0


def _peer_lost(e: RuntimeError):
    """Under torchrun, a collective that failed because another process died or stopped answering (gloo: the
    connection closed; NCCL or a stuck peer: --dist-timeout ran out) as one line, else None."""
    import os
    import re
    import torch.distributed as dist
    world = C.world_size()
    if world <= 1:
        return None
    text = str(e).replace("\n", " ")
    dist_error = isinstance(e, getattr(dist, "DistError", ()))
    if not dist_error and not re.search(r"[Cc]onnection (closed|reset) by peer|[Tt]imed out|NCCL|gloo", text):
        return None
    return (f"another process of this job stopped or cannot be reached (rank {os.environ.get('RANK', '?')} of "
            f"{world}: {text[:200]}); the other processes' logs say why; the last checkpoint is "
            f"kept (--resume continues from it)")


if __name__ == "__main__":
    sys.exit(main())
