"""A node's libp2p identity key, used both by its libp2p daemon and to sign its DHT records.

The peer id is derived from the public key (libp2p's rule for RSA keys: the SHA-256 multihash of the protobuf
public key), so a record signed by this key and stored under this peer id can be checked by anyone, and nobody else
can write records under it.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import base58
import multihash
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from hivemind.p2p import P2P
from hivemind.proto import crypto_pb2

_PADDING = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH)


class Identity:
    def __init__(self, path: Path, created: bool = False):
        self.path = path
        self.created = created  # a fresh key: no other peer can be using it
        key_data = crypto_pb2.PrivateKey.FromString(path.read_bytes()).data
        self._private_key = serialization.load_der_private_key(key_data, password=None)
        if not isinstance(self._private_key, rsa.RSAPrivateKey):
            raise ValueError(f"{path} does not hold an RSA key")
        self.public_key = self._private_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        self.peer_id = peer_id_of(self.public_key)

    @classmethod
    def load_or_create(cls, path: str | os.PathLike | None = None) -> Identity:
        """The key in ``path``, created there if missing; without a path, a new key in a temporary file (the peer
        id then changes at every start)."""
        if path is None:
            path = Path(tempfile.mkdtemp(prefix="swarm-identity-")) / "identity.key"
        path = Path(path)
        created = not path.exists()
        if created:
            path.parent.mkdir(parents=True, exist_ok=True)
            P2P.generate_identity(str(path))
        return cls(path, created)

    def sign(self, data: bytes) -> bytes:
        return self._private_key.sign(data, _PADDING, hashes.SHA256())


def peer_id_of(public_key: bytes) -> str:
    """The libp2p peer id (base58) of an RSA public key in DER SubjectPublicKeyInfo form."""
    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=public_key).SerializeToString()
    return base58.b58encode(multihash.encode(hashlib.sha256(encoded).digest(), "sha2-256")).decode()


def verify(public_key: bytes, data: bytes, signature: bytes) -> bool:
    try:
        key = serialization.load_der_public_key(public_key)
        if not isinstance(key, rsa.RSAPublicKey):
            return False
        key.verify(signature, data, _PADDING, hashes.SHA256())
        return True
    except (InvalidSignature, ValueError, TypeError):
        return False
