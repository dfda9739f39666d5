# pragma version ~=0.4.3
"""
@title Swarm escrow: clients deposit, servers settle client-signed usage receipts, then withdraw their earnings.
@notice A receipt is cumulative per (server, session key): settling pays only its increase over what that session
        already paid, so a replayed or older receipt reverts ("receipt used"). The client signs, EIP-191 style,
        keccak256(abi_encode(this contract, client, server, total, key)).
"""

struct Claim:
    client: address
    total: uint256  # cumulative amount of the session, in wei (tokens x price)
    key: bytes32  # the session key (server peer id + session id, hashed)
    v: uint8
    r: bytes32
    s: bytes32

event Deposited:
    client: indexed(address)
    amount: uint256

event Settled:
    client: indexed(address)
    server: indexed(address)
    key: bytes32
    amount: uint256

event Withdrawn:
    account: indexed(address)
    amount: uint256

MAX_BATCH: constant(uint256) = 64

deposits: public(HashMap[address, uint256])
earnings: public(HashMap[address, uint256])
settled: public(HashMap[address, HashMap[bytes32, uint256]])  # server -> session key -> total paid so far


@external
@payable
def deposit():
    self.deposits[msg.sender] += msg.value
    log Deposited(client=msg.sender, amount=msg.value)


@view
@internal
def _digest(client: address, server: address, total: uint256, key: bytes32) -> bytes32:
    inner: bytes32 = keccak256(abi_encode(self, client, server, total, key))
    return keccak256(concat(b"\x19Ethereum Signed Message:\n32", inner))


@view
@external
def digest(client: address, server: address, total: uint256, key: bytes32) -> bytes32:
    return self._digest(client, server, total, key)


@internal
def _settle(server: address, claim: Claim):
    signer: address = ecrecover(self._digest(claim.client, server, claim.total, claim.key), claim.v, claim.r, claim.s)
    assert signer != empty(address) and signer == claim.client, "bad signature"
    paid: uint256 = self.settled[server][claim.key]
    assert claim.total > paid, "receipt used"
    amount: uint256 = claim.total - paid
    assert self.deposits[claim.client] >= amount, "insufficient deposit"
    self.settled[server][claim.key] = claim.total
    self.deposits[claim.client] -= amount
    self.earnings[server] += amount
    log Settled(client=claim.client, server=server, key=claim.key, amount=amount)


@external
def settle(claim: Claim):
    """@notice Settle one receipt for the caller (the server named in it)."""
    self._settle(msg.sender, claim)


@external
def settle_batch(claims: DynArray[Claim, MAX_BATCH]):
    """@notice Settle several receipts for the caller in one transaction; any bad one reverts all."""
    for claim: Claim in claims:
        self._settle(msg.sender, claim)


@external
@nonreentrant
def withdraw() -> uint256:
    amount: uint256 = self.earnings[msg.sender]
    self.earnings[msg.sender] = 0
    send(msg.sender, amount)
    log Withdrawn(account=msg.sender, amount=amount)
    return amount


@external
@nonreentrant
def refund(amount: uint256):
    """@notice A client takes back deposit it has not spent."""
    assert self.deposits[msg.sender] >= amount, "insufficient deposit"
    self.deposits[msg.sender] -= amount
    send(msg.sender, amount)
