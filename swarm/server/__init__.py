"""The server role: ``python -m swarm.server MODEL --blocks START:END``.

- server.py: ``Server`` / ``ServerConfig``: load the span, join the DHT, announce, serve until SIGTERM
- handler.py: ``BlockHandler``: the info / forward / backward / inference RPCs, one compute thread
- sessions.py: ``SessionTable``: inference sessions with their KV caches under one token budget, usage per session
- validation.py: checks on every tensor and field a caller sends
"""
