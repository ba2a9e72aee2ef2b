"""The ``mimkit`` command: flags are generated from the option dataclasses; each subcommand calls the API."""
import argparse
import logging
import sys
import typing

from . import config as C

# name -> (options class, "module:function" run with the loaded config, one-line help)
COMMANDS = {
    "pretrain": (C.PretrainConfig, "mimkit.pretrain:pretrain", "pretrain an encoder with a masked-image objective"),
    "knn": (C.KnnConfig, "mimkit.eval.knn:knn", "weighted k-NN accuracy on frozen features"),
    "linprobe": (C.LinprobeConfig, "mimkit.eval.linprobe:linprobe", "linear probe on frozen features"),
    "finetune": (C.FinetuneConfig, "mimkit.eval.finetune:finetune", "fine-tune the encoder end to end"),
    "reconstruct": (C.ReconstructConfig, "mimkit.viz:reconstruct", "figures of masked images and their reconstructions"),
}


def add_options(parser: argparse.ArgumentParser, cls):
    parser.add_argument("--config", metavar="YAML", help="read options from a YAML file; flags override it")
    for f, typ in C.option_fields(cls):
        help_ = f.metadata.get("help", "")
        default = f.default if f.default is not C.dataclasses.MISSING else "{}"
        kw = dict(dest=f.name, default=argparse.SUPPRESS, help=f"{help_} (default: {default})")
        if f.metadata.get("choices"):
            kw["choices"] = f.metadata["choices"]
        if typ is bool:
            parser.add_argument(C.flag(f.name), action=argparse.BooleanOptionalAction, **kw)
        elif typing.get_origin(typ) in (dict, typing.Dict):
            parser.add_argument(C.flag(f.name), type=_yaml_mapping, metavar="YAML", **kw)
        else:
            parser.add_argument(C.flag(f.name), type=str, metavar=f.name.upper(), **kw)


def _yaml_mapping(text: str):
    import yaml
    return yaml.safe_load(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mimkit", description="Masked image modeling: MAE and its lineage.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (cls, _, help_) in COMMANDS.items():
        add_options(sub.add_parser(name, help=help_, description=help_), cls)
    models = sub.add_parser("models", help="list the model presets")
    models.set_defaults(command="models")
    return parser


def _resolve(target: str):
    import importlib
    module, fn = target.split(":")
    return getattr(importlib.import_module(module), fn)


def main(argv=None) -> int:
    args = vars(build_parser().parse_args(argv))
    logging.basicConfig(level=logging.DEBUG if args.pop("verbose") else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    command = args.pop("command")
    if command == "models":
        from .models import ENCODERS
        for name, a in sorted(ENCODERS.items()):
            print(f"{name:24s} {a['img_size']:>4d}px patch {a['patch_size']:<2d} width {a['embed_dim']:<5d} "
                  f"depth {a['depth']:<3d} heads {a['num_heads']}")
        return 0
    cls, target, _ = COMMANDS[command]
    from .checkpoints.io import CheckpointError
    from .data import DataError
    from .engine import DivergedError, Preempted
    try:
        cfg = C.load_config(cls, args.pop("config", None), args)
        _resolve(target)(cfg)
    except (C.ConfigError, DataError, CheckpointError, DivergedError) as e:
        print(f"mimkit {command}: error: {e}", file=sys.stderr)
        return 2
    except Preempted as e:
        print(f"mimkit {command}: {e}", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"mimkit {command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
