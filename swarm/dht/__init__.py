"""The swarm's shared directory, on a hivemind Kademlia DHT.

- schema.py: ``ServerInfo`` (one record per block and server), ``ModelInfo`` (the index of served models), keys
- records.py: ``announce_span``, ``fetch_block_infos``, ``fetch_models``
- node.py: ``start_dht``: a libp2p daemon plus a DHT node in the caller's event loop
- p2pd.py: ``daemon_program``: hivemind's UPX-packed p2pd, started from a copy decompressed once per machine
- relay.py: relays for servers behind NAT: a dial-back probe, and a reverse tunnel to the server's libp2p port
  (``RelayService`` on public peers, ``Reservation`` on the NATed server), announced under ``RELAYS_KEY``;
  ``order_relays``: the initial peers' relays first
- identity.py: ``Identity``: a node's libp2p key, which also signs its DHT records; ``peer_id_of``, ``verify``
- validation.py: ``SignedRecordValidator``: signed records whose subkeys name their signer's peer id
- __main__.py: ``python -m swarm.dht``, a bootstrap-only node (relaying for NATed servers unless on loopback)
"""

from swarm.dht.schema import MODELS_KEY, ModelInfo, ServerInfo, ServerState, block_key

__all__ = ["MODELS_KEY", "ModelInfo", "ServerInfo", "ServerState", "block_key"]
