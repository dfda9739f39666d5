"""A node's libp2p identity key, used both by its libp2p daemon and to sign its DHT records.

The peer id is derived from the public key (libp2p's rule for RSA keys: the SHA-256 multihash of the protobuf
public key), so a record signed by this key and stored under this peer id can be checked by anyone, and nobody else
can write records under it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
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
    def __init__(self, path: Path | None, created: bool = False, key_bytes: bytes | None = None):
        self.path = path  # None: a temporary key that lives only in memory (see key_file)
        self.created = created  # a fresh key: no other peer can be using it
        self._key_bytes = key_bytes if key_bytes is not None else path.read_bytes()
        key_data = crypto_pb2.PrivateKey.FromString(self._key_bytes).data
        self._private_key = serialization.load_der_private_key(key_data, password=None)
        if not isinstance(self._private_key, rsa.RSAPrivateKey):
            raise ValueError(f"{path} does not hold an RSA key")
        self.public_key = self._private_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        self.peer_id = peer_id_of(self.public_key)

    @classmethod
    def load_or_create(cls, path: str | os.PathLike | None = None) -> Identity:
        """The key in ``path``, created there if missing; without a path, a new key kept in memory only (the peer
        id then changes at every start)."""
        if path is None:
            # generated through a file (hivemind's generator writes one), which is removed at once: thousands of
            # starts must not leave thousands of key files behind
            with _temporary_dir() as folder:
                P2P.generate_identity(str(folder / "identity.key"))
                return cls(None, created=True, key_bytes=(folder / "identity.key").read_bytes())
        path = Path(path)
        created = not path.exists()
        if created:
            path.parent.mkdir(parents=True, exist_ok=True)
            P2P.generate_identity(str(path))
        return cls(path, created)

    @contextmanager
    def key_file(self) -> Iterator[Path]:
        """A path holding the key, for the daemon to read at its start: the identity's own file, or for a
        temporary identity a private file that is removed again on leaving."""
        if self.path is not None:
            yield self.path
            return
        with _temporary_dir() as folder:
            path = folder / "identity.key"
            path.write_bytes(self._key_bytes)
            path.chmod(0o400)
            yield path

    def sign(self, data: bytes) -> bytes:
        return self._private_key.sign(data, _PADDING, hashes.SHA256())


@contextmanager
def _temporary_dir() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="swarm-identity-"))  # mode 0700: only this user reads the key
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


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
