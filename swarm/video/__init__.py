"""Video workloads through the swarm. Long video, TATS-style: a VQ code grid per clip, a token transformer served
like any LLM, and a sliding window over time to generate past the training length. And the video papers' diffusion
pipelines, each the same function for a local pipeline and a distributed one:

- consisti2v.py: ``consisti2v``: ConsistI2V-style image-to-video (first-frame conditioning and attention, FrameInit)
- anyv2v.py: ``anyv2v``: AnyV2V-style video editing with I2VGen-XL (first frame edited by any image function, DDIM
  inversion capturing the decoder's features on the servers, generation injecting them)
- interpolation.py: ``interpolate_frames``: Make-A-Video-style frame interpolation (known frames kept by masked
  known-frame sampling, the others generated) with a text-to-video pipeline

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
