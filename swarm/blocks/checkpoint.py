"""Read selected tensors from a safetensors checkpoint, opening only the shards that hold them."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from swarm.hub.source import ModelSource


class Checkpoint:
    """The tensor names of a checkpoint and which file holds each; files are fetched only when read.

    ``stem``: "model" for transformers checkpoints, "diffusion_pytorch_model" for diffusers ones; ``subfolder``:
    e.g. "unet" inside a diffusers pipeline directory.
    """

    def __init__(self, source: ModelSource, subfolder: str | None = None, stem: str = "model"):
        self.source, self.subfolder = source, subfolder
        index_file, single_file = f"{stem}.safetensors.index.json", f"{stem}.safetensors"
        index = source.fetch(self._path(index_file), required=False)
        if index is not None:
            self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        else:
            single = source.fetch(self._path(single_file), required=False)
            if single is None:
                raise FileNotFoundError(f"{source.name} has no {self._path(index_file)} or {self._path(single_file)}"
                                        "; only safetensors checkpoints are supported")
            with safe_open(str(single), framework="pt") as f:
                self.weight_map = {name: single_file for name in f.keys()}
        self.opened_files: set[str] = set()  # for logs and tests: what this process actually read

    def _path(self, filename: str) -> str:
        return f"{self.subfolder}/{filename}" if self.subfolder else filename

    def resolve_prefix(self, module_path: str) -> str:
        """Checkpoint prefix of a module: ``model.layers.3.`` or, for checkpoints saved from the base model alone,
        ``layers.3.``."""
        candidates = [module_path + "."]
        if "." in module_path:
            candidates.append(module_path.split(".", 1)[1] + ".")
        for prefix in candidates:
            if any(name.startswith(prefix) for name in self.weight_map):
                return prefix
        raise KeyError(f"no tensors for {module_path!r} in the checkpoint of {self.source.name}")

    def has_module(self, module_path: str) -> bool:
        try:
            self.resolve_prefix(module_path)
            return True
        except KeyError:
            return False

    def load_module(self, module_path: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """All tensors under ``module_path``, keyed relative to it (ready for ``module.load_state_dict``)."""
        return self.load_prefix(self.resolve_prefix(module_path), dtype)

    def load_prefix(self, prefix: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """All tensors whose names start with ``prefix``, keyed by the rest of their names."""
        by_file: dict[str, list[str]] = {}
        for name, file in self.weight_map.items():
            if name.startswith(prefix):
                by_file.setdefault(file, []).append(name)
        tensors = {}
        for file, names in sorted(by_file.items()):
            path: Path = self.source.fetch(self._path(file))
            self.opened_files.add(file)
            with safe_open(str(path), framework="pt") as f:
                for name in names:
                    tensor = f.get_tensor(name)
                    if dtype is not None and tensor.is_floating_point():
                        tensor = tensor.to(dtype)
                    tensors[name[len(prefix) :]] = tensor
        return tensors
