"""Secure aggregation: the server learns the sum of the clients' updates, nothing about one.

The protocol of Bonawitz et al. 2017 ("Practical Secure Aggregation for Privacy-Preserving
Machine Learning"), with dropped clients recovered from Shamir-shared secrets as in SecAgg+
(Bell et al. 2020; Flower's ``secaggplus``). Each client u, every round, with fresh keys:

1. advertises two X25519 public keys: ``c`` (to encrypt share traffic) and ``s`` (masks);
2. Shamir-shares (t of n) its self-mask seed b_u and its ``s`` private key among the clients,
   each share AES-GCM-encrypted for its recipient (key from X25519(c_u, c_v)), so the server
   routes ciphertexts it cannot read;
3. sends y_u = x_u + PRG(b_u) + sum_{v>u} PRG(s_uv) - sum_{v<u} PRG(s_uv)  (mod 2^64), s_uv the
   X25519 agreement of u and v: every pairwise mask cancels in the sum;
4. returns, for the survivors' sum, its shares of b_v for each v whose y_v arrived and of v's
   ``s`` key for each v that dropped after step 2 -- never both for one client (that would
   unmask it), and only if at least t inputs arrived (else the "sum" could be one input).
With t shares the server rebuilds each b_v (removes PRG(b_v)) and each dropped key (recomputes
and removes its pairwise masks with every survivor).

Threat model: an honest-but-curious server and clients. No signatures on the advertised keys
and no consistency round (the paper's defences against an active server) -- said plainly.
Updates are fixed-point integers mod 2^64 with ``frac_bits`` fractional bits (numpy's uint64
arithmetic wraps by itself); each element's quantisation error is at most 2^-(frac_bits+1).
Written here because Flower's SecAgg+ runs inside Flower's own runtime (SuperLink/SuperNode
mods), not as a library over our Ray actors; ``cryptography`` gives X25519, HKDF and AES.
No torch, no Ray.
"""

from __future__ import annotations

import os
import secrets
import struct

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

PRIME = 2**521 - 1  # a Mersenne prime: any 32-byte secret is one element of its field
SHARE_BYTES = 66  # an element of that field
_RAW = (serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class SecAggError(RuntimeError):
    """The round cannot be aggregated securely (too few clients left, a share refused)."""


# -- Shamir secret sharing over GF(PRIME) ---------------------------------------------------

def shamir_split(secret: bytes, xs: list[int], threshold: int) -> dict[int, int]:
    """Shares of ``secret`` at the points ``xs`` (nonzero); any ``threshold`` rebuild it."""
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = {}
    for x in xs:
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        shares[x] = y
    return shares


def shamir_combine(shares: dict[int, int], length: int = 32) -> bytes:
    """The secret from ``threshold`` (or more) shares {x: y}: Lagrange interpolation at 0."""
    total = 0
    for xj, yj in shares.items():
        num = den = 1
        for xm in shares:
            if xm != xj:
                num = num * -xm % PRIME
                den = den * (xj - xm) % PRIME
        total = (total + yj * num * pow(den, -1, PRIME)) % PRIME
    if total >= 1 << (8 * length):  # too few or corrupted shares give a random field element
        raise SecAggError(f"{len(shares)} shares do not rebuild a {length}-byte secret")
    return total.to_bytes(length, "big")


# -- primitives -----------------------------------------------------------------------------

def prg(seed: bytes, n: int) -> np.ndarray:
    """(n,) uint64 pseudo-random words: the AES-256-CTR keystream of ``seed``."""
    enc = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    return np.frombuffer(enc.update(bytes(8 * n)) + enc.finalize(), dtype="<u8")


def agree(private: X25519PrivateKey, peer_public: bytes, info: bytes) -> bytes:
    """A 32-byte key both ends of an X25519 pair derive alike (HKDF-SHA256 over the secret)."""
    shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def encode(x: np.ndarray, frac_bits: int) -> np.ndarray:
    """Floats as fixed-point integers mod 2^64 (two's complement): sums of them wrap correctly."""
    q = np.rint(np.asarray(x, dtype=np.float64) * 2.0**frac_bits)
    if not np.all(np.abs(q) < 2.0**62):
        raise SecAggError(f"an update element exceeds the fixed-point range of {frac_bits} fractional bits")
    return q.astype(np.int64).view(np.uint64)


def decode(total: np.ndarray, frac_bits: int) -> np.ndarray:
    return total.view(np.int64).astype(np.float64) / 2.0**frac_bits


def _public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(*_RAW)


def _mask_info(round_id: int) -> bytes:
    return b"llm-ray secagg mask %d" % round_id


def _x(client: int) -> int:
    return client + 1  # Shamir points must be nonzero


# -- the two sides --------------------------------------------------------------------------

class SecAggClient:
    """Client ``cid``'s state for one round (fresh keys and self-mask seed)."""

    def __init__(self, cid: int, round_id: int):
        self.cid, self.round = cid, round_id
        self.c_key, self.s_key = X25519PrivateKey.generate(), X25519PrivateKey.generate()
        self.b_seed = os.urandom(32)
        self.peers: dict[int, tuple[bytes, bytes]] = {}
        self.held: dict[int, tuple[int, int]] = {}  # from client v: (share of b_v, share of v's s key)
        self.threshold = 0
        self.revealed: dict[int, str] = {}  # v -> which of v's secrets this client gave up

    def public_keys(self) -> tuple[bytes, bytes]:
        return _public(self.c_key), _public(self.s_key)

    def _channel(self, peer: int) -> AESGCM:
        return AESGCM(agree(self.c_key, self.peers[peer][0], b"llm-ray secagg shares %d" % self.round))

    def share_keys(self, peers: dict[int, tuple[bytes, bytes]], threshold: int) -> dict[int, bytes]:
        """Encrypted shares of b and of the ``s`` key for every peer (its own kept)."""
        if threshold < 2 or len(peers) < threshold:
            raise SecAggError(f"client {self.cid}: {len(peers)} clients cannot meet threshold {threshold}")
        self.peers, self.threshold = dict(peers), threshold
        xs = [_x(v) for v in peers]
        b = shamir_split(self.b_seed, xs, threshold)
        sk = shamir_split(self.s_key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                                   serialization.NoEncryption()), xs, threshold)
        out = {}
        for v in peers:
            if v == self.cid:
                self.held[v] = (b[_x(v)], sk[_x(v)])
                continue
            payload = b[_x(v)].to_bytes(SHARE_BYTES, "big") + sk[_x(v)].to_bytes(SHARE_BYTES, "big")
            nonce = os.urandom(12)
            out[v] = nonce + self._channel(v).encrypt(nonce, payload, struct.pack("<qqq", self.round, self.cid, v))
        return out

    def receive_shares(self, ciphertexts: dict[int, bytes]) -> None:
        """Decrypt the shares other clients sent this one (authenticated: sender, recipient, round)."""
        for u, blob in ciphertexts.items():
            payload = self._channel(u).decrypt(blob[:12], blob[12:], struct.pack("<qqq", self.round, u, self.cid))
            self.held[u] = (int.from_bytes(payload[:SHARE_BYTES], "big"), int.from_bytes(payload[SHARE_BYTES:], "big"))

    def mask(self, x: np.ndarray, survivors: list[int]) -> np.ndarray:
        """y = x + PRG(b) + pairwise masks with every other client that shared its keys."""
        y = x + prg(self.b_seed, len(x))
        info = _mask_info(self.round)
        for v in survivors:
            if v != self.cid:
                m = prg(agree(self.s_key, self.peers[v][1], info), len(x))
                y = y + m if self.cid < v else y - m
        return y

    def unmask_shares(self, alive: list[int], dropped: list[int]) -> dict[str, dict[int, int]]:
        """Shares of b_v for v in ``alive`` and of the ``s`` key for v in ``dropped``; refuses a
        request that would reveal both secrets of one client, or a sum of fewer than t inputs."""
        if len(alive) < self.threshold:
            raise SecAggError(f"client {self.cid}: {len(alive)} inputs are fewer than the threshold {self.threshold}")
        for kind, group in (("b", alive), ("sk", dropped)):
            for v in group:
                if self.revealed.setdefault(v, kind) != kind:
                    raise SecAggError(f"client {self.cid}: asked for both secrets of client {v}")
                if v not in self.held:
                    raise SecAggError(f"client {self.cid}: holds no share of client {v}")
        return {"b": {v: self.held[v][0] for v in alive}, "sk": {v: self.held[v][1] for v in dropped}}


class SecAggServer:
    """The server's side of one round: route shares, then unmask the sum of what arrived."""

    def __init__(self, round_id: int, threshold: int, public_keys: dict[int, tuple[bytes, bytes]]):
        self.round, self.threshold, self.keys = round_id, threshold, dict(public_keys)

    def route(self, outgoing: dict[int, dict[int, bytes]]) -> dict[int, dict[int, bytes]]:
        """{sender: {recipient: ciphertext}} -> {recipient: {sender: ciphertext}} among senders."""
        return {v: {u: cts[v] for u, cts in outgoing.items() if u != v} for v in outgoing}

    def aggregate(self, masked: dict[int, np.ndarray], shares: dict[int, dict], shared: list[int]) -> np.ndarray:
        """The sum (uint64) of the inputs in ``masked``; ``shared`` is who shared keys (step 2),
        ``shares`` the unmasking answers by responding client."""
        if len(masked) < self.threshold or len(shares) < self.threshold:
            raise SecAggError(f"round {self.round}: {len(masked)} inputs and {len(shares)} unmasking answers; "
                              f"the threshold is {self.threshold}")
        helpers = sorted(shares)[: self.threshold]
        n = len(next(iter(masked.values())))
        total = np.zeros(n, dtype=np.uint64)
        for y in masked.values():
            total = total + y
        for v in masked:  # remove each survivor's self mask
            b = shamir_combine({_x(w): shares[w]["b"][v] for w in helpers})
            total = total - prg(b, n)
        info = _mask_info(self.round)
        for v in sorted(set(shared) - set(masked)):  # a dropped client's pairwise masks stay in the sum
            raw = shamir_combine({_x(w): shares[w]["sk"][v] for w in helpers})
            key = X25519PrivateKey.from_private_bytes(raw)
            for u in masked:
                m = prg(agree(key, self.keys[u][1], info), n)
                total = total - m if u < v else total + m  # u added +m for u < v, -m otherwise
        return total
