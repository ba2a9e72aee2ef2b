"""`mimkit explore`'s endpoints (FastAPI's TestClient, no browser), `mimkit viz` and the views they share.

The browser test (tests/test_explore_browser.py) drives the page itself; here each endpoint is checked for its
numbers (the page's loss is `mimkit reconstruct`'s), its refusals (paths out of --data, bad uploads) and that the
server keeps serving after them.
"""
import io
import json
import os

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from helpers_explore import cli, cli_loss, make_folder, make_run
from mimkit.explore import Explorer, create_app, is_loopback, load_models
from mimkit import views


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("explore")
    run = make_run(base / "run")
    data = make_folder(base / "data")
    outside = base / "outside"
    outside.mkdir()
    Image.new("RGB", (32, 32), (200, 0, 0)).save(outside / "secret.png")
    os.symlink(outside / "secret.png", data / "cat" / "link-out.png")  # a file link out of --data
    os.symlink(outside, data / "linked")  # a folder link out of --data
    explorer = Explorer(load_models(str(run)), str(data), max_pixels=100_000, max_upload_bytes=200_000)
    with TestClient(create_app(explorer)) as client:
        yield base, run, data, explorer, client


def png_bytes(size=(32, 32), seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def plain_png(size) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (90, 120, 30)).save(buf, format="PNG")  # compresses to almost nothing
    return buf.getvalue()


def test_page_is_self_contained(setup):
    client = setup[-1]
    page = client.get("/")
    assert page.status_code == 200 and "mimkit explore" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing fetched from elsewhere
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert client.get("/docs").status_code == 404  # FastAPI's docs would load scripts from a CDN


def test_listing_is_paged_searchable_and_inside_data(setup):
    _, _, data, explorer, client = setup
    listed = client.get("/api/images", params={"per_page": 100}).json()
    names = [im["name"] for im in listed["images"]]
    assert listed["total"] == 18 == len(names) and listed["by_name"]
    assert "cat/link-out.png" not in names and not any(n.startswith("linked/") for n in names)
    # the folder source itself follows links: the explorer is what keeps them out
    assert "cat/link-out.png" in explorer.source.names and "linked/secret.png" in explorer.source.names
    ships = client.get("/api/images", params={"q": "SHIP/", "per_page": 4, "page": 1}).json()
    assert ships["total"] == 6 and [im["name"] for im in ships["images"]] == names[10:12]


@pytest.mark.parametrize("name", ["../outside/secret.png", "/etc/passwd", "cat/../../outside/secret.png",
                                  "cat/link-out.png", "linked/secret.png", "C:/Windows/win.ini", "cat\\..\\..\\x"])
def test_paths_out_of_data_are_refused(setup, name):
    client = setup[-1]
    for response in (client.get("/api/file", params={"name": name}), client.get("/api/thumb", params={"name": name}),
                     client.post("/api/reconstruct", json={"image": {"name": name}})):
        assert response.status_code == 403, (name, response.text)
    assert client.get("/api/file", params={"name": "cat/0000.jpg"}).content == (setup[2] / "cat/0000.jpg").read_bytes()


def test_index_of_a_link_out_is_refused(setup):
    _, _, _, explorer, client = setup
    hidden = explorer.source.names.index("cat/link-out.png")
    assert client.get("/api/thumb", params={"index": hidden}).status_code == 404
    assert client.get("/api/thumb", params={"index": 10 ** 6}).status_code == 404


def test_page_loss_equals_reconstruct_on_the_file(setup, tmp_path):
    base, run, data, _, client = setup
    name = "ship/0003.jpg"
    for ratio, kind, seed in [(0.75, "random", 0), (0.4, "random", 5), (0.6, "block", 1), (0.75, "grid", 0)]:
        out = client.post("/api/reconstruct", json={"image": {"name": name}, "ratio": ratio, "kind": kind,
                                                    "seed": seed}).json()
        assert len(out["panels"]) == 4 and out["error_map"].startswith("data:image/png;base64,")
        assert out["hidden"] == sum(out["mask"]) and len(out["errors"]) == out["patches"] == 64
        hidden = np.array(out["mask"], bool)
        assert out["loss"] == pytest.approx(np.mean(np.array(out["errors"])[hidden]), rel=1e-6)
        # the file alone, and the same file inside its folder among others: the same mask, the same loss
        assert out["loss"] == cli_loss(run, data / name, tmp_path / f"one-{kind}", ratio, seed, kind)
    folder = client.post("/api/reconstruct", json={"image": {"name": name}, "ratio": 0.5}).json()
    by_index = {"index": setup[3].source.names.index(name)}
    alone = client.post("/api/reconstruct", json={"image": by_index, "ratio": 0.5}).json()
    assert folder["loss"] == alone["loss"]


def test_masks_follow_the_image_not_its_place_in_a_batch():
    from mimkit.models import create_mae
    torch.manual_seed(0)
    mae = create_mae("vit_micro_patch4_32", decoder_dim=32, decoder_depth=1, decoder_heads=2).eval()
    x = torch.randn(3, 3, 32, 32)
    for kind in ("random", "block"):
        both = views.reconstruction(mae, x, ["a.png", "b.png", "c.png"], 0.75, 0, kind)
        alone = views.reconstruction(mae, x[2:], ["c.png"], 0.75, 0, kind)
        assert torch.equal(both["mask"][2], alone["mask"][0])
        torch.testing.assert_close(both["loss"][2], alone["loss"][0])
        assert not torch.equal(both["mask"][0], both["mask"][1])  # each image its own mask
        assert both["mask"].sum(1).unique().numel() == 1


def test_upload_then_views(setup, tmp_path):
    base, run, _, _, client = setup
    data = png_bytes(seed=1)
    up = client.post("/api/upload", files={"file": ("../../photo.png", data, "image/png")}).json()
    assert up["name"] == "photo.png"  # only the file's own name is kept
    ref = {"upload": up["upload"]}
    out = client.post("/api/reconstruct", json={"image": ref, "ratio": 0.75, "seed": 2}).json()
    (tmp_path / "photo.png").write_bytes(data)
    assert out["loss"] == cli_loss(run, tmp_path / "photo.png", tmp_path / "rec", 0.75, 2)
    attn = client.post("/api/attention", json={"image": ref, "block": 1, "head": 2}).json()
    assert len(attn["weights"]) == 64 and 0 < sum(attn["weights"]) < 1  # the class token keeps a share
    pca = client.post("/api/pca", json={"image": ref, "fit": "image"}).json()
    assert pca["image"].startswith("data:image/png") and pca["explained"] == sorted(pca["explained"], reverse=True)
    assert client.get("/api/thumb", params={"upload": up["upload"]}).headers["content-type"] == "image/png"


@pytest.mark.parametrize("what", ["not an image", "truncated", "too many pixels", "too many bytes", "empty"])
def test_bad_uploads_are_messages_and_the_server_keeps_serving(setup, what):
    client = setup[-1]
    good = png_bytes()
    data = {"not an image": b"hello, world\n" * 10, "truncated": good[:len(good) // 2],
            "too many pixels": plain_png((400, 300)), "too many bytes": b"\0" * 300_000, "empty": b""}[what]
    r = client.post("/api/upload", files={"file": ("x.png", data, "image/png")})
    assert r.status_code == 400 and r.json()["error"].startswith("x.png"), r.text
    if what == "too many pixels":
        assert "120,000 pixels" in r.json()["error"]
    assert client.post("/api/reconstruct", json={"image": {"name": "cat/0000.jpg"}}).status_code == 200


def test_attention_weights_are_the_blocks_own():
    """The class token's weights recomputed from the hooked block input give that block's attention output."""
    from mimkit.models import create_encoder
    torch.manual_seed(0)
    enc = create_encoder("vit_micro_patch4_32").eval()
    x = torch.randn(2, 3, 32, 32)
    w = views.cls_attention(enc, x, block=2)  # (B, heads, 8, 8)
    attn, seen = enc.blocks[2].attn, {}
    hook = attn.register_forward_hook(lambda m, args, out: seen.update(x=args[0], out=out))
    enc.forward_features(x)
    hook.remove()
    b, n, _ = seen["x"].shape
    qkv = attn.qkv(seen["x"]).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    v = qkv[2]  # (B, heads, N, hd)
    full = torch.cat([1 - w.flatten(2).sum(-1, keepdim=True), w.flatten(2)], -1)  # the class token's own share first
    cls_out = attn.proj((full.unsqueeze(2) @ v).transpose(1, 2).reshape(b, -1))
    torch.testing.assert_close(cls_out, seen["out"][:, 0], atol=1e-5, rtol=1e-4)


def test_neighbours_index_built_with_progress_and_from_embed(setup, tmp_path):
    base, run, data, explorer, client = setup
    ref = {"name": "truck/0002.jpg"}
    first = client.post("/api/neighbours", json={"image": ref, "k": 5}).json()
    assert first["index"]["state"] in ("building", "ready") and first["index"]["total"] == 18
    for t in explorer.builders:
        t.join()
    out = client.post("/api/neighbours", json={"image": ref, "k": 5}).json()
    assert out["index"]["state"] == "ready" and len(out["neighbours"]) == 5
    assert "truck/0002.jpg" not in [n["name"] for n in out["neighbours"]]
    sims = [n["similarity"] for n in out["neighbours"]]
    assert sims == sorted(sims, reverse=True)

    # mimkit embed's output, with how it was made beside it, read as the index (and refused when it does not fit)
    assert cli("embed", run, data, tmp_path / "feats.npy", "--device", "cpu", "--num-workers", "0") == 0
    meta = json.loads((tmp_path / "feats.json").read_text())
    assert meta["checkpoint"] == os.path.realpath(run) and meta["pool"] == "cls" and meta["img_size"] == 32
    index = views.FeatureIndex.read(tmp_path / "feats.npy", str(run), 32, explorer.source)
    query = views.extract_features(explorer.models[0].encoder, explorer.inputs(explorer.models[0], ref))[0]
    assert [n["name"] for n in index.nearest(query, 5, exclude=explorer.by_name(ref["name"]))] == \
        [n["name"] for n in out["neighbours"]]
    with pytest.raises(Exception, match="made from"):
        views.FeatureIndex.read(tmp_path / "feats.npy", str(base), 32, explorer.source)
    with pytest.raises(Exception, match="made at 32 px"):
        views.FeatureIndex.read(tmp_path / "feats.npy", str(run), 64, explorer.source)
    (tmp_path / "feats.json").unlink()
    with pytest.raises(Exception, match="write it again with mimkit embed"):
        views.FeatureIndex.read(tmp_path / "feats.npy", str(run), 32, explorer.source)


def test_viz_files(setup, tmp_path):
    base, run, data, _, _ = setup
    for action, extra in [("attention", ["--block", "1"]), ("pca", ["--pca-fit", "sample", "--pca-images", "6"]),
                          ("neighbours", ["--k", "3"])]:
        assert cli("viz", action, "--checkpoint", run, "--data", data, "--num-images", 3, "--output", tmp_path,
                   *extra) == 0
        numbers = json.loads((tmp_path / f"{action}.json").read_text())
        w, h = Image.open(tmp_path / f"{action}.png").size
        assert len(numbers["per_image"]) == 3 and w == len(numbers["columns"]) * 130 + 2 and h == 3 * 130 + 2
    attention = json.loads((tmp_path / "attention.json").read_text())
    assert attention["block"] == 1 and len(attention["per_image"][0]["heads"]) == attention["heads"] == 3
    torch.testing.assert_close(torch.tensor(attention["per_image"][0]["mean"]),
                               torch.tensor(attention["per_image"][0]["heads"]).mean(0))
    pca = json.loads((tmp_path / "pca.json").read_text())
    assert pca["per_image"][0]["explained"] == pca["per_image"][1]["explained"]  # one fit on the sample
    neighbours = json.loads((tmp_path / "neighbours.json").read_text())
    for row in neighbours["per_image"]:
        assert len(row["neighbours"]) == 3 and row["name"] not in [n["name"] for n in row["neighbours"]]


def test_unreadable_checkpoint_is_one_line_at_start(tmp_path, capsys):
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"not a checkpoint")
    assert cli("explore", "--checkpoint", bad, "--port", 0) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mimkit explore: error:") and "broken.pt" in err and "\n" not in err


def test_only_the_loopback_is_quiet():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4")


def test_sources_other_than_a_folder_are_served_by_index(setup, tmp_path):
    import tarfile
    _, run, data, _, _ = setup
    archive = tmp_path / "images.tar"
    with tarfile.open(archive, "w") as tf:
        tf.add(data / "ship", arcname="ship")
    explorer = Explorer(load_models(str(run)), str(archive))
    with TestClient(create_app(explorer)) as client:
        listed = client.get("/api/images").json()
        assert not listed["by_name"] and listed["total"] == 6
        i = listed["images"][2]["index"]
        out = client.post("/api/reconstruct", json={"image": {"index": i}, "ratio": 0.75}).json()
        # the archive's one top folder is its root: ship/0002.jpg is 0002.jpg; the file itself gives the same loss
        assert out["loss"] == cli_loss(run, data / "ship" / listed["images"][2]["name"], tmp_path / "r", 0.75)
        assert client.get("/api/file", params={"name": "../x"}).status_code == 403


def test_two_checkpoints_side_by_side_one_without_a_decoder(setup, tmp_path):
    _, run, data, _, _ = setup
    assert cli("export", run, "--to", "timm", tmp_path / "enc.safetensors") == 0
    explorer = Explorer(load_models(f"{run},{tmp_path / 'enc.safetensors'}"), str(data))
    with TestClient(create_app(explorer)) as client:
        models = client.get("/api/info").json()["models"]
        assert [m["reconstructs"] for m in models] == [True, False]
        ref = {"name": "cat/0001.jpg"}
        r = client.post("/api/reconstruct", json={"image": ref, "model": 1})
        assert r.status_code == 400 and "no decoder" in r.json()["error"]
        # the same encoder weights: the same attention and features under both
        a, b = (client.post("/api/attention", json={"image": ref, "model": k}).json()["weights"] for k in (0, 1))
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
        assert client.post("/api/pca", json={"image": ref, "model": 1}).status_code == 200
        assert client.post("/api/attention", json={"image": ref, "model": 2}).status_code == 404


def test_multi_band_images_through_bands(tmp_path):
    import tifffile
    rng = np.random.default_rng(0)
    data = tmp_path / "bands"
    for k in range(24):
        (data / "ab"[k % 2]).mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(data / "ab"[k % 2] / f"{k:02d}.tif", rng.integers(0, 4096, (32, 32, 4)).astype(np.uint16))
    run = make_run(tmp_path / "run", data=data, steps=2)
    scene = tmp_path / "scene.tif"
    tifffile.imwrite(scene, rng.integers(0, 4096, (40, 36, 4)).astype(np.uint16))
    explorer = Explorer(load_models(str(run)), str(data), bands=[4, 3, 2])
    with TestClient(create_app(explorer)) as client:
        assert client.get("/api/info").json()["models"][0]["in_chans"] == 4
        up = client.post("/api/upload", files={"file": ("scene.tif", scene.read_bytes(), "image/tiff")}).json()
        out = client.post("/api/reconstruct", json={"image": {"upload": up["upload"]}, "ratio": 0.6}).json()
        assert out["loss"] == cli_loss(run, scene, tmp_path / "rec", 0.6)
        rgb = client.post("/api/upload", files={"file": ("photo.png", png_bytes(), "image/png")})
        assert rgb.status_code == 400 and "photo.png" in rgb.json()["error"]  # 3 channels for a 4-band model
    with pytest.raises(Exception, match="--bands"):
        Explorer(load_models(str(run)), str(data), bands=[5, 3, 2])
