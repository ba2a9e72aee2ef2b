"""One name per concept on the command line: ``--data`` for the images a command reads, ``--output`` for what it
writes; the old spellings (``--images``, ``--out``, ``--src``; the same keys in YAML) still work.

Breaking it: dropping an alias from a field in ``config.py`` fails ``test_old_spellings_still_work``; a command that
checks its images as a plain path again (``mimkit shards builtin OUT`` refused as "no such file") fails
``test_every_command_that_reads_images_takes_builtin``.
"""
import pytest

from mimkit import cli
from mimkit import config as C
from mimkit.errors import ConfigError

CKPT = __file__  # an existing file: the commands' checks only ask that the checkpoint exists

# command -> (the new-name arguments, the old-name arguments, the expected fields)
CASES = {
    "reconstruct": (["--checkpoint", CKPT, "--data", "builtin"], ["--checkpoint", CKPT, "--images", "builtin"],
                    {"data": "builtin"}),
    "embed": ([CKPT, "--data", "builtin", "--output", "f.npy"], [CKPT, "--images", "builtin", "--out", "f.npy"],
              {"data": "builtin", "output": "f.npy"}),
    "export": ([CKPT, "--output", "no-such-out"], [CKPT, "--out", "no-such-out"], {"output": "no-such-out"}),
    "shards": (["--data", "builtin", "--output", "s"], ["--src", "builtin", "--out", "s"],
               {"data": "builtin", "output": "s"}),
    "bench": (["--output", "b.json"], ["--out", "b.json"], {"output": "b.json"}),
}


def parsed(monkeypatch, argv):
    """The config ``mimkit ARGV`` would run with (the command itself replaced)."""
    seen = []
    name = argv[0]
    cls, _, help_ = cli.COMMANDS[name]
    monkeypatch.setitem(cli.COMMANDS, name, (cls, seen.append, help_))
    assert cli.main(argv) == 0
    return seen[0]


@pytest.mark.parametrize("command", sorted(CASES))
def test_old_spellings_still_work(command, monkeypatch):
    new, old, fields = CASES[command]
    a, b = parsed(monkeypatch, [command] + new), parsed(monkeypatch, [command] + old)
    assert a == b and all(getattr(a, k) == v for k, v in fields.items())


def test_old_keys_in_yaml_still_load(tmp_path):
    f = tmp_path / "embed.yaml"
    f.write_text(f"checkpoint: {CKPT}\nimages: builtin\nout: f.npy\n")
    cfg = C.load_config(C.EmbedConfig, str(f))
    assert (cfg.data, cfg.output) == ("builtin", "f.npy")
    with pytest.raises(ConfigError, match=r"--output given twice \(--out is its old name\)"):
        C.load_config(C.EmbedConfig, str(f), {"output": "g.npy"})


@pytest.mark.parametrize("argv", [["shards", "builtin", "OUT"], ["embed", CKPT, "builtin", "OUT.npy"],
                                  ["reconstruct", "--checkpoint", CKPT, "--data", "builtin"],
                                  ["pretrain", "--data", "builtin"]])
def test_every_command_that_reads_images_takes_builtin(argv, monkeypatch):
    assert parsed(monkeypatch, argv).data == "builtin"


def test_shards_of_the_builtin_sample(tmp_path):
    """The real command, not only its options: the embedded sample written as shards, which read back whole."""
    from mimkit.data import open_images
    out = tmp_path / "s"
    assert cli.main(["shards", "builtin", str(out), "--shard-size", "400"]) == 0
    n = len(open_images("builtin"))
    assert len(list(out.glob("shard-*.tar"))) == -(-n // 400)
    assert len(open_images(str(out / f"shard-{{000000..{-(-n // 400) - 1:06d}}}.tar"))) == n
