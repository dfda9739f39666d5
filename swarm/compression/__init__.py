"""Wire encoding of tensors.

- codecs.py: the ``Codec`` interface and the codecs by name ("none" bit-exact, "float16", "bfloat16")
- serialize.py: ``serialize_tensor`` / ``deserialize_tensor`` (a compact array on the wire) with validation of
  untrusted payloads
- blockwise.py: dynamic blockwise 8-bit quantization (``quantize`` / ``dequantize``), through bitsandbytes or torch
"""

from swarm.compression.codecs import CODECS, Codec, PayloadError
from swarm.compression.serialize import deserialize_tensor, is_serialized_tensor, serialize_tensor

__all__ = ["CODECS", "Codec", "PayloadError", "deserialize_tensor", "is_serialized_tensor", "serialize_tensor"]
