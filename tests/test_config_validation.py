"""Bad configuration fails before any work starts, in one line naming the option and what is allowed."""
import re

import pytest

from mimkit import config as C
from mimkit.config import load_config
from mimkit.errors import ConfigError

OK = dict(data="builtin", model="vit_micro_patch4_32", output="unused", threads=1, num_workers=0)

# (options class, options, pattern the one-line message must match)
PRETRAIN = [
    # unknown keys, with the nearest valid name
    (dict(mask_rato=0.5), r"unknown option --mask-rato; did you mean --mask-ratio\?"),
    (dict(epoch=3), r"unknown option --epoch; did you mean --epochs\?"),
    (dict(batchsize=3), r"unknown option --batchsize; did you mean --batch-size\?"),
    (dict(learning_rate=0.1), r"unknown option --learning-rate"),
    # wrong types
    (dict(lr="fast"), r"--lr must be a number, got 'fast'"),
    (dict(epochs=2.5), r"--epochs must be an integer, got 2\.5"),
    (dict(epochs="ten"), r"--epochs must be an integer, got 'ten'"),
    (dict(epochs=True), r"--epochs must be an integer, got True"),
    (dict(resume="maybe"), r"--resume must be true or false, got 'maybe'"),
    (dict(objective_args=3), r"--objective-args must be a mapping, got 3"),
    (dict(output=None), r"--output must be a string, got None"),
    (dict(model=["a"]), r"--model must be a string"),
    (dict(base_lr="inf"), r"--base-lr must be a finite number, got 'inf'"),
    (dict(mask_ratio="nan"), r"--mask-ratio must be a finite number, got 'nan'"),
    # values
    (dict(mask_ratio=0), r"--mask-ratio must be in \(0, 1\), got 0"),
    (dict(mask_ratio=1), r"--mask-ratio must be in \(0, 1\), got 1"),
    (dict(mask_ratio=1.5), r"--mask-ratio must be in \(0, 1\), got 1\.5"),
    (dict(mask_ratio=-0.25), r"--mask-ratio must be in \(0, 1\), got -0\.25"),
    (dict(img_size=30), r"--img-size 30 is not divisible by the patch size 4 of vit_micro_patch4_32; use a multiple of 4"),
    (dict(model="vit_tiny_patch16_224", img_size=200), r"--img-size 200 is not divisible by the patch size 16"),
    (dict(model="vit_huge_patch14_224", img_size=200), r"--img-size 200 is not divisible by the patch size 14"),
    (dict(model="vit_micro"), r"--model must be one of .*vit_micro_patch4_32.*; got 'vit_micro' \(did you mean"),
    # an unknown --objective is checked by the objectives registry at the command layer (test_objectives.py)
    (dict(precision="fp8"), r"--precision must be one of auto, fp32, bf16, fp16; got 'fp8'"),
    (dict(aug="rrc2"), r"--aug must be one of rrc, none, fixed_crop, rrc_jitter; got 'rrc2'"),
    (dict(cache="maybe"), r"--cache must be one of auto, on, off; got 'maybe'"),
    (dict(batch_size=0), r"--batch-size must be > 0, got 0"),
    (dict(epochs=0), r"--epochs must be > 0, got 0"),
    (dict(epochs=-1), r"--epochs must be > 0, got -1"),
    (dict(accum_steps=0), r"--accum-steps must be > 0, got 0"),
    (dict(lr=-1), r"--lr must be >= 0, got -1"),
    (dict(warmup_epochs=-1), r"--warmup-epochs must be >= 0"),
    (dict(weight_decay=-0.1), r"--weight-decay must be >= 0"),
    (dict(val_fraction=1.0), r"--val-fraction must be in \[0, 1\), got 1\.0"),
    (dict(keep_checkpoints=0), r"--keep-checkpoints must be >= 1, got 0"),
    (dict(log_every=0), r"--log-every must be > 0, got 0"),
    (dict(max_bad_steps=0), r"--max-bad-steps must be > 0, got 0"),
    (dict(sigterm_grace=-1), r"--sigterm-grace must be >= 0, got -1"),
    (dict(dist_timeout=0), r"--dist-timeout must be > 0, got 0"),
    (dict(save_every=-2), r"--save-every must be >= 0, got -2"),
    (dict(max_steps=-1), r"--max-steps must be >= 0, got -1"),
    (dict(img_size=-32), r"--img-size must be >= 0, got -32"),
    (dict(threads=-1), r"--threads must be >= 0 \(0: torch's default\), got -1"),
    (dict(num_workers=-2), r"--num-workers must be >= 0, or -1 for automatic; got -2"),
    (dict(device="gpu"), r"--device must be auto, cpu, cuda, cuda:N or mps; got 'gpu'"),
    (dict(device="cuda:x"), r"--device must be auto, cpu, cuda, cuda:N or mps; got 'cuda:x'"),
    (dict(decoder_dim=-1), r"--decoder-dim must be >= 0, got -1"),
    (dict(figure_every=-1), r"--figure-every must be >= 0, got -1"),
    # missing files
    (dict(data="/no/such/folder"), r"--data: no such file or directory: /no/such/folder"),
    (dict(init="/no/such/mae.pth"), r"--init: no such file or directory: /no/such/mae\.pth"),
]

OTHERS = [
    (C.KnnConfig, dict(), r"--checkpoint is required \(or --random-init with --model\)"),
    (C.KnnConfig, dict(checkpoint="/no/such.pt"), r"--checkpoint: no such file or directory: /no/such\.pt"),
    (C.KnnConfig, dict(random_init=True, model=""), r"--random-init needs --model"),
    (C.KnnConfig, dict(random_init=True, model="vit_mini"), r"--model must be one of .*; got 'vit_mini'"),
    (C.KnnConfig, dict(random_init=True, model="vit_micro_patch4_32", k=0), r"--k must be > 0, got 0"),
    (C.KnnConfig, dict(random_init=True, model="vit_micro_patch4_32", temperature=0), r"--temperature must be > 0"),
    (C.KnnConfig, dict(random_init=True, model="vit_micro_patch4_32", pool="max"),
     r"--pool must be one of cls, mean; got 'max'"),
    (C.KnnConfig, dict(random_init=True, model="vit_micro_patch4_32", batch_size=0), r"--batch-size must be > 0"),
    (C.LinprobeConfig, dict(checkpoint="/no/such.pt"), r"--checkpoint: no such file or directory"),
    (C.LinprobeConfig, dict(random_init=True, model="vit_micro_patch4_32", epochs=0), r"--epochs must be > 0"),
    (C.FinetuneConfig, dict(random_init=True, model="vit_micro_patch4_32", layer_decay=0),
     r"--layer-decay must be in \(0, 1\], got 0"),
    (C.FinetuneConfig, dict(random_init=True, model="vit_micro_patch4_32", layer_decay=1.5),
     r"--layer-decay must be in \(0, 1\], got 1\.5"),
    (C.FinetuneConfig, dict(random_init=True, model="vit_micro_patch4_32", max_bad_steps=0),
     r"--max-bad-steps must be > 0"),
    (C.ReconstructConfig, dict(), r"--checkpoint is required"),
    (C.ReconstructConfig, dict(checkpoint="/no/such.pt"), r"--checkpoint: no such file or directory"),
    (C.ReconstructConfig, dict(checkpoint=__file__, val_fraction=1.0), r"--val-fraction must be in \[0, 1\), got 1\.0"),
]


def _expect_one_line(cls, overrides, pattern):
    with pytest.raises(ConfigError) as e:
        load_config(cls, overrides=overrides)
    msg = str(e.value)
    assert "\n" not in msg, msg
    assert re.search(pattern, msg), f"{msg!r} does not match {pattern!r}"
    assert re.search(r"--[a-z]", msg), f"{msg!r} names no option"
    return msg


@pytest.mark.parametrize("bad,pattern", PRETRAIN, ids=[f"{i}-{next(iter(b))}" for i, (b, _) in enumerate(PRETRAIN)])
def test_invalid_pretrain_options(bad, pattern):
    _expect_one_line(C.PretrainConfig, {**OK, **bad}, pattern)


@pytest.mark.parametrize("cls,bad,pattern", OTHERS, ids=[f"{c.__name__}-{i}" for i, (c, _, _) in enumerate(OTHERS)])
def test_invalid_eval_options(cls, bad, pattern):
    base = dict(data="builtin", threads=1, num_workers=0) if cls is not C.ReconstructConfig else {}
    if cls is C.ReconstructConfig and "checkpoint" not in bad:
        base = {}
    _expect_one_line(cls, {**base, **bad}, pattern)


def test_a_batch_smaller_than_the_processes_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    _expect_one_line(C.PretrainConfig, {**OK, "batch_size": 2},
                     r"--batch-size 2 is smaller than the 4 processes \(WORLD_SIZE\); it must be >= 4")
    load_config(C.PretrainConfig, overrides={**OK, "batch_size": 4})


def test_a_valid_configuration_passes(tmp_path):
    cfg = load_config(C.PretrainConfig, overrides={**OK, "img_size": 64, "mask_ratio": 0.9, "epochs": "3",
                                                   "resume": "yes", "lr": "1e-3"})
    assert (cfg.img_size, cfg.epochs, cfg.resume, cfg.lr) == (64, 3, True, 1e-3)


def test_yaml_files_are_checked_the_same_way(tmp_path):
    cases = {
        "unknown.yaml": ("model: vit_micro_patch4_32\nmask_ration: 0.5\n", r"unknown option --mask-ration; did you mean"),
        "type.yaml": ("epochs: [1, 2]\n", r"--epochs must be an integer"),
        "value.yaml": ("mask-ratio: 1.0\n", r"--mask-ratio must be in \(0, 1\)"),
        "list.yaml": ("- epochs\n- 3\n", r"--config: .* must hold a mapping of option: value"),
        "broken.yaml": ("epochs: [1, 2\n", r"--config: .* is not valid YAML"),
    }
    for name, (text, pattern) in cases.items():
        p = tmp_path / name
        p.write_text(text)
        with pytest.raises(ConfigError, match=pattern) as e:
            load_config(C.PretrainConfig, str(p), {"data": "builtin"})
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"--config: no such file"):
        load_config(C.PretrainConfig, str(tmp_path / "missing.yaml"))


def test_the_command_line_prints_one_line_and_starts_no_work(monkeypatch, capsys):
    """Through ``mimkit pretrain``: exit status 2, one line on stderr, and the pretrain function never called."""
    import mimkit.cli as cli

    def no_work(cfg):
        raise AssertionError(f"work started ({cfg}) despite an invalid option")

    for name, (cls, _, help_) in cli.COMMANDS.items():
        monkeypatch.setitem(cli.COMMANDS, name, (cls, no_work, help_))
    base = ["pretrain", "--data", "builtin", "--model", "vit_micro_patch4_32", "--threads", "1"]
    cases = [(["--mask-ratio", "1.0"], r"--mask-ratio must be in \(0, 1\)"),
             (["--epochs", "ten"], r"--epochs must be an integer"),
             (["--img-size", "30"], r"--img-size 30 is not divisible by the patch size 4"),
             (["--model", "vit_mikro_patch4_32"], r"did you mean vit_micro_patch4_32"),
             (["--lr", "nan"], r"--lr must be a finite number"),
             (["--data", "/no/such/dir"], r"--data: no such file or directory"),
             (["--init", "/no/such.pth"], r"--init: no such file or directory"),
             (["--objective-args", "[1, 2]"], r"--objective-args must be a mapping"),
             (["--max-bad-steps", "0"], r"--max-bad-steps must be > 0")]
    for extra, pattern in cases:
        assert cli.main(base + extra) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("mimkit pretrain: error: --"), err
        assert re.search(pattern, err), err


def test_flag_level_errors_are_one_line_naming_the_flag(monkeypatch, capsys):
    """Mistakes argparse sees itself (an unknown flag, a value outside a flag's choices) are one line as well."""
    import mimkit.cli as cli
    for name, (cls, _, help_) in cli.COMMANDS.items():
        monkeypatch.setitem(cli.COMMANDS, name, (cls, lambda cfg: pytest.fail(f"work started ({cfg})"), help_))
    cases = [(["pretrain", "--mask-ration", "0.5"], r"unrecognized arguments: --mask-ration; did you mean --mask-ratio\?"),
             (["pretrain", "--epoks", "3"], r"unrecognized arguments: --epoks; did you mean --epochs\?"),
             (["knn", "--chekpoint", "x.pt"], r"did you mean --checkpoint\?"),
             (["pretrain", "--precision", "fp8"], r"--precision: invalid choice: 'fp8'.*fp32.*bf16.*fp16"),
             (["pretrain", "--aug", "crop"], r"--aug: invalid choice: 'crop'.*rrc")]
    for argv, pattern in cases:
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and re.search(pattern, err), err


def test_every_shipped_config_loads_with_its_command(tmp_path):
    """Each YAML under configs/ is read by the command it is for, every key known and valid, so a recipe cannot
    drift from the options it names (a misspelt key, a removed option, a value out of range)."""
    from pathlib import Path
    root = Path(__file__).resolve().parents[1] / "configs"
    command = {"cifar10-finetune.yaml": C.FinetuneConfig, "lineage.yaml": C.SweepConfig,
               "mae-ablations.yaml": C.SweepConfig, "mae-curves.yaml": C.SweepConfig}
    names = sorted(p.name for p in root.glob("*.yaml"))
    assert "cifar10.yaml" in names and "cifar10-finetune.yaml" in names
    for name in names:
        cls = command.get(name, C.PretrainConfig)
        # the recipes' data paths exist on their users' machines, not in CI
        given = {} if cls is C.SweepConfig else {"data": str(tmp_path)}
        given.update({"checkpoint": str(tmp_path)} if cls is C.FinetuneConfig else {})  # named on the command line
        load_config(cls, str(root / name), given)
