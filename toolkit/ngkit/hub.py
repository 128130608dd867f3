"""Tokenizers on the Hugging Face Hub: ``ngkit.load("user/repo")`` and ``ngkit export --push-to-hub``.

A hub repository of an ngkit tokenizer is an export folder: ``config.json``,
``model.safetensors`` and the ``README.md`` model card. Downloads fetch only those kinds of file
(:data:`FILES`), so nothing that travels is ever unpickled. ``huggingface_hub`` caches what it
downloads; with ``HF_HUB_OFFLINE=1`` it answers from that cache alone.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ngkit.errors import NgkitError

FILES = ["*.json", "*.safetensors", "README.md"]  # what a download fetches and a push uploads
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")  # "user/repo"


def _hub() -> Any:
    try:
        import huggingface_hub
    except ImportError:
        raise NgkitError("loading from or pushing to the Hugging Face Hub needs huggingface_hub; "
                         "pip install huggingface_hub") from None
    return huggingface_hub


def is_hub_id(path: str | Path) -> bool:
    """``user/repo`` that is not a local path."""
    return isinstance(path, str) and bool(HUB_ID.match(path)) and not Path(path).exists()


def download(repo_id: str, revision: str | None = None) -> Path:
    """The local folder of ``repo_id``'s export files, downloaded or from the hub cache."""
    hub = _hub()
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        folder = Path(hub.snapshot_download(repo_id, revision=revision, allow_patterns=FILES))
    except RepositoryNotFoundError:
        raise NgkitError(f"{repo_id} is neither a local folder nor a Hugging Face Hub repository you can read "
                         f"(for a private one log in with `hf auth login`)") from None
    except LocalEntryNotFoundError:
        raise NgkitError(f"{repo_id} is not a local folder and not in the Hugging Face Hub cache, and the hub "
                         f"cannot be reached (HF_HUB_OFFLINE=1 or no network); download it once where it can") from None
    except HfHubHTTPError as exc:
        raise NgkitError(f"{repo_id}: the Hugging Face Hub answered {exc}") from None
    from ngkit.export import CONFIG, WEIGHTS

    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        raise NgkitError(f"hub repository {repo_id} holds no ngkit export ({CONFIG} and {WEIGHTS}); "
                         f"push one with ngkit export RUN --push-to-hub {repo_id}")
    return folder


def resolve(path: str | Path, revision: str | None = None) -> Path:
    """A local path as given, or the downloaded folder of a hub id."""
    return download(path, revision) if is_hub_id(path) else Path(path)  # type: ignore[arg-type]


def push(folder: Path, repo_id: str, *, private: bool = False, message: str | None = None) -> str:
    """Upload an export folder to ``repo_id`` (created if missing); returns the repository's URL.
    Needs credentials: ``hf auth login`` or ``HF_TOKEN``."""
    if not HUB_ID.match(repo_id):
        raise NgkitError(f'--push-to-hub {repo_id!r}: a hub repository id is "user/name" (or "org/name")')
    api = _hub().HfApi()
    url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", allow_patterns=FILES,
                      commit_message=message or "Upload ngkit tokenizer")
    return str(url)
