"""Weights on the Hugging Face Hub: ``hf://ORG/NAME[@REVISION][/FILE]`` wherever a checkpoint path is accepted.

Resolution goes through huggingface_hub (``snapshot_download`` / ``hf_hub_download``), so the local cache
(``HF_HOME`` / ``HF_HUB_CACHE``), tokens, mirrors and ``HF_HUB_OFFLINE=1`` work as they do for transformers and
timm; the result is a local folder (or file) the checkpoint reader reads like any other.
"""
import re
from pathlib import Path

from ..errors import CheckpointError

PREFIX = "hf://"
_WEIGHTS = ("*.safetensors", "*.pth", "*.pt", "*.bin")


def is_hub_path(path) -> bool:
    return str(path).startswith(PREFIX)


def parse(path: str):
    """``hf://ORG/NAME[@REVISION][/FILE]`` -> (repo id, revision or None, file in the repo or None)."""
    m = re.fullmatch(r"hf://([\w.-]+/[\w.-]+)(?:@([^/]+))?(?:/(.+))?", str(path))
    if not m:
        raise CheckpointError(f"{path}: expected hf://ORG/NAME, optionally @REVISION and /FILE in the repository")
    return m.group(1), m.group(2), m.group(3)


def resolve(path: str) -> str:
    """The local path of Hub weights, downloaded into (or found in) the Hugging Face cache.

    A repository with a ``config.json`` is a folder checkpoint (HF ViTMAE, timm); otherwise its one weights file
    (an official MAE ``.pth``, a timm ``.safetensors``) is used, or the FILE the path names.
    """
    try:
        from huggingface_hub import hf_hub_download, snapshot_download
        from huggingface_hub import errors as hub_errors
    except ImportError:
        raise CheckpointError(f"{path}: reading Hub weights needs huggingface_hub: pip install huggingface_hub") from None
    repo, revision, filename = parse(path)
    try:
        if filename:
            return hf_hub_download(repo, filename, revision=revision)
        folder = Path(snapshot_download(repo, revision=revision))
    except hub_errors.RevisionNotFoundError:
        raise CheckpointError(f"{path}: revision {revision!r} does not exist in {repo}") from None
    except hub_errors.RepositoryNotFoundError:
        raise CheckpointError(f"{path}: no repository {repo} on the Hub (or it is private or gated: log in with "
                              f"`hf auth login`)") from None
    except hub_errors.LocalEntryNotFoundError:  # before its base class EntryNotFoundError
        raise CheckpointError(f"{path}: {_not_cached(repo, revision)}") from None
    except hub_errors.EntryNotFoundError:
        raise CheckpointError(f"{path}: {repo} has no file {filename}") from None
    except (OSError, ValueError) as e:  # network errors, a broken cache
        raise CheckpointError(f"{path}: cannot get it from the Hub ({type(e).__name__}: {e})".replace("\n", " ")) from None
    if (folder / "config.json").is_file():
        return str(folder)
    found = sorted({p for pattern in _WEIGHTS for p in folder.glob(pattern)})
    if len(found) == 1:
        return str(found[0])
    raise CheckpointError(f"{path}: {repo} holds {len(found) or 'no'} weights files and no config.json; name one: "
                          f"hf://{repo}{'@' + revision if revision else ''}/FILE"
                          + (f" ({', '.join(p.name for p in found[:4])})" if found else ""))


def _not_cached(repo: str, revision) -> str:
    """Why a repository could not be found offline (or without a connection): which revisions the cache holds."""
    from huggingface_hub import constants
    refs = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}" / "refs"
    offline = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached"
    if refs.is_dir():
        cached = sorted(p.name for p in refs.iterdir()) or ["none"]
        return (f"revision {revision or 'main'!r} of {repo} is not in the local cache {constants.HF_HUB_CACHE} "
                f"(cached: {', '.join(cached)}) and {offline}")
    return f"{repo} is not in the local Hugging Face cache {constants.HF_HUB_CACHE} and {offline}"


def resolve_path(path) -> str:
    """``path`` itself, or for ``hf://...`` its local copy: what every checkpoint reader calls first."""
    return resolve(str(path)) if is_hub_path(path) else path
