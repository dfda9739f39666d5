"""What a block is, per kind of model: the parts servers load and run, and the parts clients keep.

- served.py: ``ServedBlocks``, the protocol every kind of served blocks implements for the server (sessions,
  checked requests, cost, measured speed), with ``Bounds``, ``BlockSession``, ``Prepared``, ``SpanSpeed``
- span.py: ``BlockSpan``: decoder layers [start, end) of a causal LM, with per-session KV caches (``SpanSession``)
  and merged decode steps
- families.py: ``BlockFamily`` / ``FAMILIES``: where each decoder-only family keeps its layers, embeddings, norm, head
- compat.py: every transformers call whose spelling drifts inside 5.x (caches, attention masks, layer calls)
- checkpoint.py: ``Checkpoint``: selected tensors of a safetensors checkpoint, opening only the shards holding them
- quantization.py: bitsandbytes weight quantization of a span's linear layers (``int8``, ``nf4``)
- weights.py: the weights commitment of served blocks, from a loaded span or a checkpoint (``reference_weights``)
- provable.py: ``ProvableSpan``: Llama-style layers restated in operations ezkl can prove (finite mask, rotary
  tables as constants), equal to the span's forward in float32; ``PROOF_SCALES``
- adapters.py: peft LoRA adapters served beside a span's base weights (``--adapters``), chosen per request
- unet.py: diffusers U-Nets cut into head, levels (``UNetLevels``: down block i + up block n-1-i) and tail
- unet_backward.py: the levels' backward steps (``up_backward``, ``down_backward``): input gradients by
  recomputation from inputs the client resends; weights frozen, nothing kept between requests
- latent_shift.py: ``LatentShiftUNet``: an image U-Net run on video by a parameter-free temporal shift
- unet_modifiers.py: per-session U-Net modifiers, the same on servers and local U-Nets: named attention
  processors (``FirstFrameAttnProcessor``, ``FirstFrameTemporalAttnProcessor``), features captured in one pass
  and injected in another (``FeatureStore``, ``LocalFeatureBank``)
- unet_adapters.py: diffusers LoRAs served beside U-Net levels (``--adapters``), injected by diffusers into the
  levels' modules; a session's adapters, weights and per-call scale (``LoraChoice``) set before each level call
"""
