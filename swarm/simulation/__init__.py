"""Deterministic swarm simulation: the real routing and block choice on synthetic swarms, with no processes.

- swarm.py: ``random_swarm`` (heterogeneous servers and the client's measurements), ``exhaustive_best_cost`` (the
  true optimum, for checking ``find_chain``), ``random_valid_chain`` (the no-routing baseline), ``chain_problems``
  (validity of a chain) and ``simulate_coverage`` (join / leave / rebalance churn with ``choose_span`` and
  ``should_move``)

Used by benchmarks/routing.py and tests/test_simulation.py.
"""
