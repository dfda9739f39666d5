"""Long video through the swarm, TATS-style: a VQ code grid per clip, a token transformer served like any LLM,
and a sliding window over time to generate past the training length.

- mugen.py: ``MugenLikeClips``: MUGEN-like game clips (a sprite walking, jumping, collecting coins over a scrolling
  background) with a description and an audio track of the events, made from one script, deterministic per seed
- vqvae.py: ``VQVAE3D``: a small 3D VQ autoencoder (time and space downsampling, a learned codebook),
  ``train_vqvae``, ``psnr``, ``frame_errors``, ``save_vqvae`` / ``load_vqvae``
- transformer.py: ``TokenLayout`` (text and codes in one vocabulary and sequence, kept in the checkpoint's config),
  ``train_transformer``: a Llama over those sequences, saved as a normal transformers checkpoint
- recipe.py: ``train_long_video_models``: clips -> VQ -> code sequences -> transformer, saved in one directory
  (``python -m swarm.video train DIR``, __main__.py)
- quality.py: ``OrderClassifier``: real clips vs their frames shuffled; ``in_order_share`` of a generated clip
- long_generation.py: ``generate_long_video``: any number of frames with a sliding window, the prefix kept in the
  servers' caches and the window re-sent on each slide; the same for a local model and a swarm one
"""
