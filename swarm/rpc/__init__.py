"""The wire protocol between clients and servers, shared by both roles.

- framing.py: length-prefixed msgpack messages with a size limit read from the header
- protocol.py: RPC names, ``RequestError`` and typed field access for handlers
- messages.py: every RPC message: builders for the client (``open_span``, ``step``, ...) and ``read_*`` checks
  for the server
- client.py: ``Stream`` and ``call`` for callers; ``RemoteError`` / ``PeerUnavailable`` tell refusals from outages
"""
