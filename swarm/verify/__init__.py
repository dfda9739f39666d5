"""Checking what servers compute without trusting them: ``python -m swarm.verify commit MODEL --blocks A:B``.

- __main__.py: the command line: a checkpoint's weights commitments (what honest servers of a span announce)

The pieces it uses sit below: swarm/trust/weights.py (the hash tree), swarm/blocks/weights.py (from a checkpoint or
a loaded span), swarm/trust/zk.py (proofs of sampled steps).
"""
