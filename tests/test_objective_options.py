"""Objective options: typed dataclasses parsed from ``objective_args``, the mask-ratio rule, the registry (a sixth
objective added from a test alone), `mimkit objectives`, and the tokenizer command on mixed-size images."""
import dataclasses

import pytest
import torch
import yaml
from PIL import Image

from mimkit.checkpoint_files import load_latest
from mimkit.cli import main as cli
from mimkit.config import PretrainConfig, load_config, opt
from mimkit.errors import ConfigError
from mimkit.masking import draw_mask
from mimkit.models.vq import VQTokenizer, save_tokenizer
from mimkit.objectives import OBJECTIVES, build_objective, register
from mimkit.objectives.base import MaskTokenObjective, ObjectiveOptions, make_encoder, masked_mean, resolve_mask_ratio

COMMON = ["--data", "builtin", "--model", "vit_micro_patch4_32", "--max-steps", "2", "--batch-size", "16",
          "--threads", "1", "--num-workers", "0", "--figure-every", "0", "--log-every", "1"]


def cfg(**kw):
    return load_config(PretrainConfig, None, {"model": "vit_micro_patch4_32", **kw})


def tokenizer_file(tmp_path):
    save_tokenizer(VQTokenizer(img_size=32, patch_size=4, codebook_size=4, code_dim=4, hidden=8), tmp_path / "tok.pt")
    return str(tmp_path / "tok.pt")


def test_explicit_mask_ratio_075_with_beit_trains_at_075(tmp_path):
    """An explicit --mask-ratio 0.75 is what BEiT trains at (it used to become BEiT's 0.4 because 0.75 was also the
    flag's default): the recorded arch and config say 0.75. Restoring the 'changed from its default?' guess fails it;
    without the flag the paper's 0.4 is used and recorded."""
    tok = tokenizer_file(tmp_path)
    for ratio, expected in (("0.75", 0.75), (None, 0.4)):
        out = tmp_path / f"beit-{ratio}"
        flags = ["--mask-ratio", ratio] if ratio else []
        assert cli(["pretrain", "--objective", "beit", "--objective-args", f"{{tokenizer: {tok}}}",
                    "--output", str(out)] + flags + COMMON) == 0
        state = load_latest(out)
        assert state["arch"]["mask_ratio"] == expected
        assert yaml.safe_load((out / "config.yaml").read_text())["mask_ratio"] == expected


def test_mask_ratio_rule():
    """objective_args.mask_ratio, else --mask-ratio, else the paper's; two different explicit ratios are a one-line
    error (dropping the check lets one silently win and fails this)."""
    assert resolve_mask_ratio(cfg(), None, 0.4) == 0.4
    assert resolve_mask_ratio(cfg(mask_ratio=0.75), None, 0.4) == 0.75
    assert resolve_mask_ratio(cfg(), 0.3, 0.4) == 0.3
    assert resolve_mask_ratio(cfg(mask_ratio=0.3), 0.3, 0.4) == 0.3
    with pytest.raises(ConfigError, match=r"--mask-ratio 0.5 and --objective-args mask_ratio 0.3 disagree"):
        resolve_mask_ratio(cfg(mask_ratio=0.5), 0.3, 0.4)
    assert build_objective(cfg(objective="vit_mpp", objective_args={"mask_ratio": 0.3})).mask_ratio == 0.3
    assert build_objective(cfg(objective="mae")).mask_ratio == 0.75
    assert build_objective(cfg(objective="mae", mask_ratio=0.5)).mask_ratio == 0.5


def test_objective_args_are_coerced_like_command_options():
    """YAML or flag strings go through the command options' coercion ('0.3' is a number, 'true' a bool), so
    `--objective-args '{mask_ratio: 0.3}'` and YAML behave the same; a wrong type is one line."""
    obj = build_objective(cfg(objective="simmim", objective_args={"mask_ratio": "0.3", "masking": "block"}))
    assert obj.mask_ratio == 0.3 and obj.masking == "block"
    obj = build_objective(cfg(objective="mae", objective_args={"mask_token_in_encoder": "true"}))
    assert obj.enc_mask_token is not None
    with pytest.raises(ConfigError, match=r"^--objective-args: min_block must be an integer, got 'x' \(objective simmim\)$"):
        build_objective(cfg(objective="simmim", objective_args={"min_block": "x"}))


class DummyObjective(MaskTokenObjective):
    """A sixth objective written in this test alone: predict each hidden patch's mean (normalised) value."""
    name = "dummy"
    description = "a test objective: regress each hidden patch's mean value"
    paper_mask_ratio = 0.5

    @dataclasses.dataclass
    class Options(ObjectiveOptions):
        scale: float = opt(1.0, "multiplies the loss")

        def validate(self):
            if self.scale <= 0:
                raise ConfigError(f"scale must be > 0, got {self.scale}")

    def __init__(self, encoder, mask_ratio: float = 0.5, scale: float = 1.0):
        super().__init__(encoder, 1)
        self.arch = dict(encoder=dict(encoder.arch), mask_ratio=mask_ratio, scale=scale)
        self.mask_ratio, self.scale = mask_ratio, scale

    @classmethod
    def from_config(cls, cfg, options):
        return cls(make_encoder(cfg), resolve_mask_ratio(cfg, None, cls.paper_mask_ratio), options.scale)

    def forward(self, images, labels=None, rng=None):
        from mimkit.models import patchify
        from mimkit.objectives.base import encode_with_mask_tokens
        p = self.encoder.patch_size
        hidden = draw_mask("random", images.shape[0], (images.shape[-2] // p, images.shape[-1] // p),
                           self.mask_ratio, rng, images.device)
        h = encode_with_mask_tokens(self.encoder, images, hidden, self.mask_token)
        target = patchify(images.float(), p).mean(-1)
        return self.scale * masked_mean((self.head(h[:, 1:]).float()[..., 0] - target).pow(2), hidden)


def test_a_sixth_objective_is_one_registered_class(tmp_path, capsys):
    """Registering DummyObjective (defined in this test, nothing else touched) makes `pretrain --objective dummy`
    run with its own option, its bad option a one-line error, and `mimkit objectives` list it. A registry that
    needs another edit (a hard-coded name list in config or the CLI) fails this."""
    register(DummyObjective)
    try:
        out = tmp_path / "dummy"
        assert cli(["pretrain", "--objective", "dummy", "--objective-args", "{scale: 2.0}", "--output", str(out)]
                   + COMMON) == 0
        state = load_latest(out)
        assert state["kind"] == "dummy" and state["step"] == 2 and state["arch"]["scale"] == 2.0
        assert state["arch"]["mask_ratio"] == 0.5
        assert cli(["pretrain", "--objective", "dummy", "--objective-args", "{scale: -1}", "--output",
                    str(tmp_path / "bad")] + COMMON) == 2
        assert "error: --objective-args: scale must be > 0, got -1.0 (objective dummy)" in capsys.readouterr().err
        assert cli(["objectives"]) == 0
        listing = capsys.readouterr().out
        assert "dummy      a test objective: regress each hidden patch's mean value" in listing
        assert "scale (default 1.0): multiplies the loss" in listing
    finally:
        OBJECTIVES.pop("dummy", None)


def test_objectives_command_and_help_name_every_objective(capsys):
    """`mimkit objectives` gives one line per objective plus its options; `pretrain --help` names the choices."""
    assert cli(["objectives"]) == 0
    out = capsys.readouterr().out
    heads = [line.split()[0] for line in out.splitlines() if not line.startswith(" ")]
    assert heads == list(OBJECTIVES) and len(heads) >= 5
    with pytest.raises(SystemExit):
        cli(["pretrain", "--help"])
    help_ = " ".join(capsys.readouterr().out.split())
    assert "pretraining objective: mae, simmim, vit_mpp, beit, igpt" in help_


def test_tokenizer_train_cache_off_on_mixed_size_images(tmp_path):
    """`mimkit tokenizer train --cache off` on images of different sizes trains (the pretraining recipe crops them
    to one size). Breaking it: the loader's collate stacking uncropped images raises from torch's DataLoader."""
    root = tmp_path / "mixed" / "a"
    root.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for i, (w, h) in enumerate([(40, 36), (64, 48), (33, 50), (90, 70)] * 4):
        px = (torch.rand(h, w, 3, generator=g) * 255).byte().numpy()
        Image.fromarray(px).save(root / f"{i}.png")
    out = tmp_path / "tok"
    assert cli(["tokenizer", "train", "--data", str(tmp_path / "mixed"), "--cache", "off", "--output", str(out),
                "--codebook-size", "8", "--max-steps", "2", "--batch-size", "4", "--threads", "1", "--val-fraction", "0.25",
                "--num-workers", "1"]) == 0
    assert (out / "tokenizer.pt").is_file()
