"""Helpers shared by every role; the command-line ones import neither torch nor hivemind.

- cli.py: ``Parser`` (what every command line shares) and ``entry_point`` (``UserError`` as one line, quiet Ctrl-C)
- errors.py: ``UserError``: a mistake the user can fix, shown without a traceback
- multiaddrs.py: peer addresses as users type them (``--initial-peers``, ``SWARM_INITIAL_PEERS``), checked up front
- ports.py: ``check_can_listen``: whether a TCP port is free before a libp2p daemon is started on it
- cache.py: ``cache_root`` / ``cache_path``: the cache directory (``$SWARM_CACHE`` or ``~/.cache/swarm``)
- loop_thread.py: ``LoopThread``: an asyncio event loop in a daemon thread, for synchronous callers
- threads.py: torch computes in parallel on one thread per process; helper threads run it serially (libgomp)
- peer_addresses.py: relayed addresses of NATed servers, noted from their records for the RPC layer to dial
- emulated_hosts.py: ``EmulatedNetwork``: hosts in network namespaces, public or behind NAT (tests, benchmarks)
- preloaded.py: ``start`` / ``popen`` / ``run``: ``python -m swarm.X`` or ``python SCRIPT`` forked from one process
  that imported torch, transformers, diffusers and hivemind once (how ``LocalSwarm`` starts its processes, and the
  tests their scripts); forks that start forks reach the same one
- wan_proxy.py: ``WanProxy``: a TCP proxy on 127.0.0.1 adding a one-way delay and a bandwidth cap (benchmarks)
"""
