"""The server role: ``python -m swarm.server MODEL --blocks START:END``, for any kind of blocks.

- __main__.py: the command line (parsed before torch loads)
- server.py: ``Server`` / ``ServerConfig``: load the blocks, join the DHT, announce, serve until SIGTERM, rebalance
- in_process.py: ``InProcessServer``: a real server on an event-loop thread of the calling process (tests, tools)
- handler.py: ``Handler``: the info, session, push and one-shot forward/backward RPCs of any served blocks
  (swarm/blocks/served.py); ``Limits``
- session_loop.py: one session loop for transformer sessions and U-Net generations: open, pacing, steps, dedupe,
  links and server-to-server pushes, dropped work when the client goes away
- sessions.py: ``SessionTable``: sessions of every kind under one memory budget in bytes, with a per-peer share
- compute.py: ``ComputeQueue``: the one compute thread, shared in pieces round-robin between peers
- batching.py: decode steps of several sessions merged into one call of the span
- admission.py: per-peer pacing (token buckets) and session limits
- block_selection.py: which blocks to serve (``--num-blocks``) and when to move
- throughput.py: a span's speed measured at start, cached per (model, span length, device, dtype, quantization)
- proofs.py: ``Prover`` (``--zk``): zero-knowledge proofs of challenged forwards, made after the reply in a worker
  process, fetched by ticket (the ``PROOF`` RPC)
- settlement.py: receipts in step replies, countersigned ones settled in the background
"""
