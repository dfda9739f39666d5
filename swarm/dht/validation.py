"""Signed DHT records: every value is wrapped with its signer's public key and signature, and every subkey names
its signer's peer id (a block record's subkey is the peer id; a model index entry's is "<model id> <peer id>").

Every swarm node runs this validator, so a record whose signature does not verify, or whose subkey claims a peer
id other than the signer's, is refused when stored and dropped when read. Servers sign with their libp2p identity
key; clients and monitors only verify.
"""

from __future__ import annotations

import dataclasses
import logging

import msgpack
from hivemind.dht.validation import DHTRecord, RecordValidatorBase

from swarm.dht.identity import Identity, peer_id_of, verify

logger = logging.getLogger(__name__)
MARKER = "swarm-signed-v1"


def owner_of(subkey: object) -> str | None:
    """The peer id a subkey claims: the subkey itself, or its last space-separated word."""
    return subkey.rsplit(" ", 1)[-1] if isinstance(subkey, str) and subkey else None


class SignedRecordValidator(RecordValidatorBase):
    def __init__(self, identity: Identity | None = None):
        self.identity = identity  # None: verify only (clients, monitors)

    def sign_value(self, record: DHTRecord) -> bytes:
        if self.identity is None:
            return record.value  # unsigned: honest nodes will refuse it, as they should
        signature = self.identity.sign(self._signed_bytes(record, record.value))
        return msgpack.packb([MARKER, record.value, self.identity.public_key, signature], use_bin_type=True)

    def validate(self, record: DHTRecord) -> bool:
        unpacked = self._unpack(record.value)
        if unpacked is None:
            logger.debug("Refused an unsigned or malformed DHT record")
            return False
        value, public_key, signature = unpacked
        try:
            subkey = msgpack.unpackb(record.subkey, raw=False) if record.subkey else None
        except Exception:
            return False
        owner = owner_of(subkey)
        if owner is None or owner != peer_id_of(public_key):
            logger.debug(f"Refused a DHT record whose subkey {subkey!r} is not its signer's")
            return False
        if not verify(public_key, self._signed_bytes(record, value), signature):
            logger.debug(f"Refused a DHT record with a bad signature from {owner}")
            return False
        return True

    def strip_value(self, record: DHTRecord) -> bytes:
        unpacked = self._unpack(record.value)
        return record.value if unpacked is None else unpacked[0]

    @staticmethod
    def _unpack(value: bytes) -> tuple[bytes, bytes, bytes] | None:
        try:
            marker, inner, public_key, signature = msgpack.unpackb(value, raw=False)
        except Exception:
            return None
        if marker != MARKER or not all(isinstance(x, bytes) for x in (inner, public_key, signature)):
            return None
        return inner, public_key, signature

    @staticmethod
    def _signed_bytes(record: DHTRecord, value: bytes) -> bytes:
        # key, subkey and expiration are covered too: a signed value cannot be replayed elsewhere or kept alive
        return msgpack.packb(dataclasses.astuple(dataclasses.replace(record, value=value)), use_bin_type=True)

    @property
    def priority(self) -> int:
        return 10

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return isinstance(other, SignedRecordValidator)
