"""Untrusted checkpoints: loading never runs code from a file, and tensors of the wrong shape or dtype are
refused with the tensor's name."""
import hashlib
import io
import os
import pickle
import re
from pathlib import Path

import pytest
import torch

from mimkit.checkpoint_files import check_state_dict, load_checkpoint, load_latest, safe_torch_load, save_checkpoint
from mimkit.errors import CheckpointError

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this runs ``os.system`` (it would create the marker file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class ExecPayload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def _malicious_files(d: Path, marker: Path) -> dict:
    """Files that would run code on an unsafe load, in every container torch.load reads."""
    model = {"encoder.cls_token": torch.zeros(1, 1, 96)}
    files = {}
    files["zip.pt"] = lambda p: torch.save({"model": model, "args": Payload(marker)}, p)
    files["legacy.pt"] = lambda p: torch.save({"model": model, "x": ExecPayload(marker)}, p,
                                              _use_new_zipfile_serialization=False)
    files["raw_pickle.pth"] = lambda p: p.write_bytes(pickle.dumps({"model": model, "x": Payload(marker)}))
    files["payload_only.bin"] = lambda p: p.write_bytes(pickle.dumps(Payload(marker), protocol=2))
    out = {}
    for name, write in files.items():
        p = d / name
        write(p)
        out[name] = p
    # one with a valid checksum beside it, named like a mimkit checkpoint: a checksum is not trust
    p = d / "run" / "checkpoints" / "checkpoint-00000009.pt"
    p.parent.mkdir(parents=True)
    torch.save({"model": model, "step": 9, "x": Payload(marker)}, p)
    p.with_name(p.name + ".sha256").write_text(hashlib.sha256(p.read_bytes()).hexdigest())
    out["run_checkpoint"] = p
    return out


REFUSED = re.compile(r"refusing to load .*: it holds Python objects beyond tensors, which could run code on load")


def test_a_malicious_pickle_is_refused_and_its_code_does_not_run(tmp_path):
    marker = tmp_path / "PWNED"
    files = _malicious_files(tmp_path, marker)
    # sanity: the payload really runs under an unsafe load
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()
    marker.unlink()
    tried = 0
    for name, path in files.items():
        with pytest.raises(CheckpointError, match=REFUSED) as e:
            load_checkpoint(path)
        assert str(path) in str(e.value) and "\n" not in str(e.value)
        with pytest.raises(CheckpointError, match=REFUSED):
            safe_torch_load(io.BytesIO(path.read_bytes()), name)
        tried += 1
    assert not marker.exists(), "code from a checkpoint ran"
    print(f"[safe-loading] malicious files refused: {tried}")


def test_every_checkpoint_reader_refuses_a_malicious_pickle(tmp_path, caplog):
    from mimkit.checkpoints import load, load_encoder, load_mae
    marker = tmp_path / "PWNED"
    files = _malicious_files(tmp_path, marker)
    for path in files.values():
        for reader in (load, load_encoder, load_mae):
            with pytest.raises(CheckpointError, match=REFUSED):
                reader(path)
    # a run directory whose only checkpoint is malicious: skipped with a warning, nothing loads
    with caplog.at_level("WARNING", logger="mimkit"):
        assert load_latest(tmp_path / "run") is None
    assert any("refusing to load" in r.getMessage() for r in caplog.records)
    with pytest.raises(CheckpointError):
        load_encoder(tmp_path / "run")
    assert not marker.exists(), "code from a checkpoint ran"


def test_the_command_line_refuses_a_malicious_checkpoint_in_one_line(tmp_path, capsys):
    from mimkit.cli import main
    marker = tmp_path / "PWNED"
    evil = _malicious_files(tmp_path, marker)["zip.pt"]
    common = ["--data", "builtin", "--threads", "1", "--num-workers", "0", "--output", str(tmp_path / "out")]
    runs = [["knn", "--checkpoint", str(evil), *common],
            ["pretrain", "--init", str(evil), "--model", "vit_micro_patch4_32", "--epochs", "1", *common]]
    for argv in runs:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and REFUSED.search(err) and err.startswith(f"mimkit {argv[0]}: error:"), err
    assert not marker.exists()


def test_resuming_skips_a_malicious_newest_checkpoint(tmp_path, caplog):
    """A foreign file dropped into a run's checkpoints is never unpickled; the run resumes from its own."""
    run = tmp_path / "run"
    save_checkpoint({"model": {"w": torch.ones(3)}, "step": 4}, run / "checkpoints" / "checkpoint-00000004.pt")
    marker = tmp_path / "PWNED"
    torch.save({"x": Payload(marker)}, run / "checkpoints" / "checkpoint-00000008.pt")
    with caplog.at_level("WARNING", logger="mimkit"):
        state = load_latest(run)
    assert state["step"] == 4 and not marker.exists()
    assert any("checkpoint-00000008.pt" in r.getMessage() and "refusing" in r.getMessage() for r in caplog.records)


def test_damaged_and_foreign_files_are_one_line_errors(tmp_path):
    cases = {"empty.pt": b"", "text.pt": b"hello world\n", "random.pt": os.urandom(4096),
             "truncated.pt": None}
    buf = io.BytesIO()
    torch.save({"model": {"w": torch.zeros(1000)}}, buf)
    cases["truncated.pt"] = buf.getvalue()[:2000]
    for name, data in cases.items():
        p = tmp_path / name
        p.write_bytes(data)
        with pytest.raises(CheckpointError, match=re.escape(str(p))) as e:
            load_checkpoint(p)
        assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


# tensors of the wrong shape or dtype ------------------------------------------------------------------------
def _micro_encoder():
    from mimkit.models import create_encoder
    torch.manual_seed(0)
    return create_encoder("vit_micro_patch4_32")


BAD_TENSORS = {
    "shape": ("blocks.0.attn.qkv.weight", lambda t: torch.zeros(3, 3), r"has shape \(3, 3\)"),
    "int64": ("blocks.0.attn.qkv.weight", lambda t: t.long(), r"has dtype torch\.int64, expected torch\.float32"),
    "bool": ("norm.weight", lambda t: t > 0, r"has dtype torch\.bool, expected torch\.float32"),
    "complex": ("norm.weight", lambda t: t.to(torch.complex64), r"has dtype torch\.complex64, expected torch\.float32"),
    "uint8": ("patch_embed.proj.weight", lambda t: t.to(torch.uint8), r"has dtype torch\.uint8, expected torch\.float32"),
}


@pytest.mark.parametrize("case", sorted(BAD_TENSORS))
def test_check_state_dict_names_the_bad_tensor(case):
    enc = _micro_encoder()
    name, change, msg = BAD_TENSORS[case]
    sd = enc.state_dict()
    sd[name] = change(sd[name])
    with pytest.raises(CheckpointError, match=rf"src\.pt: tensor '{re.escape(name)}' {msg}"):
        check_state_dict(enc, sd, "src.pt")


def test_check_state_dict_names_missing_unexpected_and_non_tensors():
    enc = _micro_encoder()
    sd = enc.state_dict()
    check_state_dict(enc, sd, "ok.pt")
    half = {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
    check_state_dict(enc, half, "half.pt")  # another float precision is fine
    with pytest.raises(CheckpointError, match=r"missing tensor 'norm\.bias'"):
        check_state_dict(enc, {k: v for k, v in sd.items() if k != "norm.bias"}, "x.pt")
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'extra\.weight'"):
        check_state_dict(enc, {**sd, "extra.weight": torch.zeros(1)}, "x.pt")
    with pytest.raises(CheckpointError, match=r"'norm\.weight' is a str, not a tensor"):
        check_state_dict(enc, {**sd, "norm.weight": "hello"}, "x.pt")
    with pytest.raises(CheckpointError, match=r"expected a mapping of tensor names"):
        check_state_dict(enc, [1, 2], "x.pt")


def test_loading_released_weights_rejects_a_tensor_of_the_wrong_shape_by_name(tmp_path):
    from mimkit.checkpoints import load_encoder
    enc = _micro_encoder()
    sd = enc.state_dict()
    sd["blocks.0.attn.qkv.weight"] = torch.zeros(3, 3)
    torch.save({"model": sd}, tmp_path / "w.pth")
    with pytest.raises(CheckpointError, match=r"'blocks\.0\.attn\.qkv\.weight' has shape \(3, 3\)"):
        load_encoder(tmp_path / "w.pth")


def test_a_mimkit_checkpoint_with_a_tensor_of_the_wrong_dtype_is_refused_by_name(tmp_path):
    from mimkit.checkpoints import load_encoder, load_mae
    from mimkit.config import PretrainConfig, load_config
    from mimkit.objectives import build_objective
    cfg = load_config(PretrainConfig, overrides=dict(model="vit_micro_patch4_32", decoder_dim=32, decoder_depth=1,
                                                     decoder_heads=2))
    obj = build_objective(cfg)
    sd = obj.state_dict()
    sd["model.encoder.norm.weight"] = sd["model.encoder.norm.weight"].long()
    save_checkpoint({"format": "mimkit", "version": 1, "kind": "mae", "arch": obj.arch, "model": sd},
                    tmp_path / "checkpoints" / "checkpoint-00000001.pt")
    for reader in (load_encoder, load_mae):
        with pytest.raises(CheckpointError, match=r"tensor 'model\.encoder\.norm\.weight' has dtype torch\.int64"):
            reader(tmp_path)


@pytest.mark.parametrize("case", ["int64", "bool", "complex"])
def test_loading_released_weights_rejects_a_tensor_of_the_wrong_dtype_by_name(tmp_path, case):
    from mimkit.checkpoints import load_encoder
    enc = _micro_encoder()
    name, change, msg = BAD_TENSORS[case]
    sd = enc.state_dict()
    sd[name] = change(sd[name])
    torch.save({"model": sd}, tmp_path / "w.pth")
    with pytest.raises(CheckpointError, match=rf"{re.escape(name)}.*{msg.split(',')[0]}"):
        load_encoder(tmp_path / "w.pth")


def test_safetensors_with_the_wrong_dtype_or_shape_is_refused(tmp_path):
    from safetensors.torch import save_file
    from mimkit.checkpoints import load_encoder
    enc = _micro_encoder()
    sd = {k: v.contiguous() for k, v in enc.state_dict().items()}
    sd["blocks.1.mlp.fc1.weight"] = torch.zeros(7, 96)
    save_file(sd, str(tmp_path / "w.safetensors"))
    with pytest.raises(CheckpointError, match=r"'blocks\.1\.mlp\.fc1\.weight' has shape \(7, 96\)"):
        load_encoder(tmp_path / "w.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}" + os.urandom(64))
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        load_encoder(tmp_path / "bad.safetensors")


# the code itself ---------------------------------------------------------------------------------------------
def test_no_unsafe_deserialisation_anywhere_in_mimkit():
    """Every torch.load is weights_only (and lives in checkpoint_files.py); no pickle / numpy pickle loading."""
    offenders = []
    for path in sorted((ROOT / "mimkit").rglob("*.py")):
        text = path.read_text()
        rel = path.relative_to(ROOT).as_posix()
        for m in re.finditer(r"torch\.load\((.*)", text):
            if rel != "mimkit/checkpoint_files.py" or "weights_only=True" not in m.group(1):
                offenders.append(f"{rel}: torch.load({m.group(1)[:60]}")
        for pat in (r"\bpickle\.loads?\(", r"\bdill\.", r"allow_pickle\s*=\s*True", r"weights_only\s*=\s*False",
                    r"\bmarshal\.loads?\(", r"\byaml\.load\(", r"yaml\.unsafe_load", r"(?<![.\w])eval\(",
                    r"(?<![.\w])exec\("):
            for m in re.finditer(pat, text):
                offenders.append(f"{rel}: {m.group(0)}")
    assert not offenders, offenders
