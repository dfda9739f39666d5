"""Trust between peers that do not know each other.

- commitment.py: short hashes of step outputs, checkable later by recomputation
- weights.py: commitments to the exact weights a server serves (hash tree), ``ReferenceWeights`` a client accepts
- zk.py: zero-knowledge proofs (ezkl) that a module's output follows from its input and committed weights
- faults.py: deliberate misbehaviour for tests (``SWARM_TEST_FAULT``), never reachable from normal use
"""
