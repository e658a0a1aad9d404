"""Secure aggregation (Bonawitz et al. 2017): the server learns the sum of updates, not one update.

The semi-honest protocol of the paper's Figure 4 (rounds 0–3, without the ConsistencyCheck round
and signatures that the actively secure variant adds), as a transport-free library: clients and
server exchange the frozen dataclasses below; how they travel is up to the caller.

- **Encoding.** Each float x is mapped to round(x · 2^frac_bits) mod R with R = 2^num_bits,
  so sums wrap exactly in numpy's unsigned integers and decode, as two's complement, to the
  float sum within n · 2^−(frac_bits+1) per coordinate. Every input must satisfy
  |x| ≤ max_abs(n) so that the sum of n inputs cannot wrap.
- **Round 0, AdvertiseKeys.** Client u makes two X25519 key pairs: (c_u) for the channel that
  carries shares through the server, (s_u) for the pairwise masks.
- **Round 1, ShareKeys.** u draws a 32-byte self-mask seed b_u and Shamir-shares b_u and
  s_u's private key t-of-n to every other client, each share encrypted (AES-256-GCM under an
  HKDF key from X25519(c_u, c_v)), so the relaying server cannot read them.
- **Round 2, MaskedInputCollection.** u sends
  y_u = x_u + PRG(b_u) + Σ_{v≠u} ±PRG(X25519(s_u, s_v)) mod R (+ when u < v, − when u > v);
  the pairwise masks cancel in the sum over all clients.
- **Round 3, Unmasking.** Told the survivors U3, each client reveals, per other client v, the
  share of b_v if v survived or the share of s_v's key if v dropped — never both. From t shares
  the server removes the survivors' self masks and the dropped clients' pairwise masks.

PRG: AES-256-CTR keyed by HKDF-SHA256 of the seed (a shared secret or b_u) with the session id
in the HKDF info, so masks of different rounds are independent even for the same keys.
Client ids are the Shamir x-coordinates: distinct integers ≥ 1.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

try:
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "fedloop.privacy.secagg needs the 'cryptography' package: pip install 'cryptography>=42'"
    ) from exc

from fedloop.errors import FedloopError
from fedloop.privacy import shamir

UIntArray = NDArray[np.unsignedinteger]


class SecAggError(FedloopError):
    """A secure-aggregation round cannot go on (too few clients, bad message, wrong step)."""


# --- configuration and encoding ----------------------------------------------------------------


@dataclass(frozen=True)
class SecAggConfig:
    """What every participant of one secure-aggregation round agrees on.

    ``threshold`` t: Shamir threshold, and the fewest clients that may reach each step (the
    paper suggests t > n/2 against a semi-honest server). ``dimension``: length of the vectors.
    ``num_bits``: 32 or 64, the modulus R = 2^num_bits. ``frac_bits``: fixed-point fraction
    bits. ``session``: bytes unique to this round (e.g. the round number), bound into every key.
    """

    threshold: int
    dimension: int
    num_bits: int = 32
    frac_bits: int = 16
    session: bytes = b""

    def __post_init__(self) -> None:
        if self.threshold < 2:
            raise SecAggError(f"threshold must be >= 2, got {self.threshold}")
        if self.dimension < 1:
            raise SecAggError(f"dimension must be >= 1, got {self.dimension}")
        if self.num_bits not in (32, 64):
            raise SecAggError(f"num_bits must be 32 or 64, got {self.num_bits}")
        if not 0 <= self.frac_bits < self.num_bits - 1:
            raise SecAggError(f"frac_bits must be in [0, {self.num_bits - 2}]")

    @property
    def dtype(self) -> type[np.unsignedinteger]:
        """The unsigned numpy type whose wrap-around is arithmetic mod R."""
        return np.uint32 if self.num_bits == 32 else np.uint64

    @property
    def scale(self) -> float:
        """2^frac_bits: one integer step is 1/scale."""
        return float(2**self.frac_bits)

    def max_abs(self, num_clients: int) -> float:
        """Return the largest |x| an input may hold so that the sum of num_clients cannot wrap."""
        return float((2 ** (self.num_bits - 1) - 1) // max(1, num_clients)) / self.scale

    def encode(self, values: NDArray[np.floating], num_clients: int) -> UIntArray:
        """Return the values in fixed point mod R; raise SecAggError if one is out of range."""
        array = np.asarray(values, dtype=np.float64).ravel()
        if array.shape != (self.dimension,):
            raise SecAggError(f"input has {array.size} values, the round has {self.dimension}")
        limit = self.max_abs(num_clients)
        if not np.all(np.isfinite(array)) or float(np.max(np.abs(array))) > limit:
            raise SecAggError(
                f"input values must be finite with |x| <= {limit:g} so that {num_clients} of them "
                "sum without overflow; clip the update or use fewer frac_bits / num_bits=64"
            )
        signed = np.rint(array * self.scale).astype(np.int64)
        return signed.astype(self.dtype)

    def decode(self, encoded: UIntArray) -> NDArray[np.float64]:
        """Return the float values of a fixed-point vector (two's complement mod R)."""
        signed_type = np.int32 if self.num_bits == 32 else np.int64
        signed = np.asarray(encoded, dtype=self.dtype).view(signed_type)
        return signed.astype(np.float64) / self.scale


# --- messages ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdvertiseKeys:
    """Round 0, client → server: the client's two X25519 public keys (raw, 32 bytes each)."""

    client_id: int
    c_pk: bytes
    s_pk: bytes


@dataclass(frozen=True)
class ShareKeys:
    """Round 1, client → server: per recipient v, the encrypted shares of b_u and s_u^SK."""

    client_id: int
    ciphertexts: Mapping[int, bytes]


@dataclass(frozen=True)
class MaskedInput:
    """Round 2, client → server: y_u, the masked fixed-point input."""

    client_id: int
    masked: UIntArray = field(repr=False)


@dataclass(frozen=True)
class UnmaskShares:
    """Round 3, client → server: shares of b_v for surviving v, of s_v^SK for dropped v."""

    client_id: int
    b_shares: Mapping[int, bytes]
    sk_shares: Mapping[int, bytes]


# --- primitives -------------------------------------------------------------------------------


def _hkdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def prg_mask(seed: bytes, config: SecAggConfig) -> UIntArray:
    """Return the pseudorandom mask vector in Z_R^dimension that seed expands to."""
    key = _hkdf(seed, b"fedloop-secagg-prg|" + config.session)
    encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    itemsize = np.dtype(config.dtype).itemsize
    stream = encryptor.update(bytes(config.dimension * itemsize)) + encryptor.finalize()
    return np.frombuffer(stream, dtype=config.dtype)


def _raw(public_key: X25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _private_raw(private_key: X25519PrivateKey) -> bytes:
    return private_key.private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )


def _agree(private_key: X25519PrivateKey, public_raw: bytes) -> bytes:
    try:
        return private_key.exchange(X25519PublicKey.from_public_bytes(public_raw))
    except ValueError as exc:
        raise SecAggError(f"bad X25519 public key: {exc}") from exc


def _pair_sign(u: int, v: int) -> int:
    return 1 if u < v else -1


def _apply(total: UIntArray, mask: UIntArray, sign: int) -> None:
    if sign > 0:
        np.add(total, mask, out=total)
    else:
        np.subtract(total, mask, out=total)


def _share_aad(config: SecAggConfig, sender: int, recipient: int) -> bytes:
    return b"fedloop-secagg-share|" + config.session + struct.pack(">QQ", sender, recipient)


# --- client -----------------------------------------------------------------------------------


class SecAggClient:
    """One client's side of a round: call the four steps in order with what the server relays."""

    def __init__(self, client_id: int, config: SecAggConfig) -> None:
        if client_id < 1:
            raise SecAggError(f"client ids must be integers >= 1, got {client_id}")
        self.client_id = client_id
        self.config = config
        self._c_sk = X25519PrivateKey.generate()
        self._s_sk = X25519PrivateKey.generate()
        self._b_seed = os.urandom(32)
        self._keys: dict[int, AdvertiseKeys] = {}
        self._shared_with: list[int] = []  # U2: the clients whose shares we hold
        self._received: dict[int, tuple[bytes, bytes]] = {}  # v -> (b share, sk share)
        self._step = 0
        self._unmasked = False

    def _expect(self, step: int, name: str) -> None:
        if self._step != step:
            raise SecAggError(f"client {self.client_id}: {name} called out of order")
        self._step += 1

    def advertise_keys(self) -> AdvertiseKeys:
        """Round 0: return the two public keys to send to the server."""
        self._expect(0, "advertise_keys")
        return AdvertiseKeys(
            self.client_id, _raw(self._c_sk.public_key()), _raw(self._s_sk.public_key())
        )

    def join(self, client_id: int, config: SecAggConfig) -> None:
        """Take the id and round parameters the server assigned, between rounds 0 and 1.

        In a deployment the cohort (so n, the threshold and the ids) is known only when the key
        round closes, after the client advertised keys made under a provisional config.
        """
        if self._step != 1:
            raise SecAggError(f"client {self.client_id}: join belongs between rounds 0 and 1")
        if client_id < 1:
            raise SecAggError(f"client ids must be integers >= 1, got {client_id}")
        self.client_id = client_id
        self.config = config

    def share_keys(self, keys: Mapping[int, AdvertiseKeys]) -> ShareKeys:
        """Round 1: given every client's keys (U1, self included), return the encrypted shares."""
        self._expect(1, "share_keys")
        if len(keys) < self.config.threshold:
            raise SecAggError(
                f"only {len(keys)} clients advertised keys; the round needs {self.config.threshold}"
            )
        if self.client_id not in keys or keys[self.client_id].s_pk != _raw(self._s_sk.public_key()):
            raise SecAggError("the key list does not hold this client's own keys")
        seen = [m.c_pk for m in keys.values()] + [m.s_pk for m in keys.values()]
        if len(set(seen)) != len(seen):
            raise SecAggError("the key list repeats a public key")
        self._keys = dict(keys)
        ids = sorted(keys)
        b_shares = shamir.split(self._b_seed, ids, self.config.threshold)
        sk_shares = shamir.split(_private_raw(self._s_sk), ids, self.config.threshold)
        ciphertexts: dict[int, bytes] = {}
        for v in ids:
            if v == self.client_id:
                self._received[v] = (
                    shamir.share_to_bytes(b_shares[v]),
                    shamir.share_to_bytes(sk_shares[v]),
                )
                continue
            key = _hkdf(
                _agree(self._c_sk, keys[v].c_pk), b"fedloop-secagg-enc|" + self.config.session
            )
            nonce = os.urandom(12)
            plaintext = shamir.share_to_bytes(b_shares[v]) + shamir.share_to_bytes(sk_shares[v])
            aad = _share_aad(self.config, self.client_id, v)
            ciphertexts[v] = nonce + AESGCM(key).encrypt(nonce, plaintext, aad)
        return ShareKeys(self.client_id, ciphertexts)

    def masked_input(
        self, values: NDArray[np.floating], ciphertexts: Mapping[int, bytes]
    ) -> MaskedInput:
        """Round 2: given the shares addressed to this client (from U2), return y_u."""
        self._expect(2, "masked_input")
        senders = sorted(set(ciphertexts) | {self.client_id})
        if len(senders) < self.config.threshold:
            raise SecAggError(
                f"only {len(senders)} clients shared keys; the round needs {self.config.threshold}"
            )
        for v in senders:
            if v == self.client_id:
                continue
            if v not in self._keys:
                raise SecAggError(f"shares from client {v}, who advertised no keys")
            blob = ciphertexts[v]
            key = _hkdf(
                _agree(self._c_sk, self._keys[v].c_pk), b"fedloop-secagg-enc|" + self.config.session
            )
            try:
                plain = AESGCM(key).decrypt(
                    blob[:12], blob[12:], _share_aad(self.config, v, self.client_id)
                )
            except Exception as exc:  # InvalidTag: tampered or misrouted
                raise SecAggError(f"the shares from client {v} do not decrypt") from exc
            size = shamir.SHARE_BYTES
            self._received[v] = (plain[:size], plain[size:])
        self._shared_with = senders
        total = self.config.encode(values, len(self._keys)).copy()
        _apply(total, prg_mask(self._b_seed, self.config), 1)
        for v in senders:
            if v != self.client_id:
                seed = _agree(self._s_sk, self._keys[v].s_pk)
                _apply(total, prg_mask(seed, self.config), _pair_sign(self.client_id, v))
        return MaskedInput(self.client_id, total)

    def unmask(self, survivors: Sequence[int]) -> UnmaskShares:
        """Round 3: given U3 (who sent inputs), return b shares of survivors, sk of the rest."""
        self._expect(3, "unmask")
        alive = set(survivors)
        if len(alive) < self.config.threshold:
            raise SecAggError(
                f"only {len(alive)} clients sent masked inputs; the round needs "
                f"{self.config.threshold}, so it cannot be unmasked"
            )
        if not alive <= set(self._shared_with) or self.client_id not in alive:
            raise SecAggError("the survivor list names clients that never shared keys with us")
        b_shares: dict[int, bytes] = {}
        sk_shares: dict[int, bytes] = {}
        for v in self._shared_with:
            b_share, sk_share = self._received[v]
            # Never both for one v: b_v and s_v^SK together would unmask y_v.
            if v in alive:
                b_shares[v] = b_share
            else:
                sk_shares[v] = sk_share
        return UnmaskShares(self.client_id, b_shares, sk_shares)


# --- server -----------------------------------------------------------------------------------


class SecAggServer:
    """The server's side: collect each round's messages, close it, relay, and finally unmask."""

    def __init__(self, config: SecAggConfig) -> None:
        self.config = config
        self._keys: dict[int, AdvertiseKeys] = {}
        self._shares: dict[int, ShareKeys] = {}
        # Masked inputs are folded into one running sum as they arrive: the server holds one
        # vector, not one per client (only the sum is ever needed).
        self._masked: dict[int, bool] = {}
        self._masked_sum: UIntArray | None = None
        self._unmask: dict[int, UnmaskShares] = {}
        self._stage = 0  # the round now collecting
        self.integer_sum: UIntArray | None = None

    @property
    def received(self) -> tuple[int, int, int, int]:
        """Return how many clients sent keys, shares, masked inputs and unmasking shares."""
        return len(self._keys), len(self._shares), len(self._masked), len(self._unmask)

    def _collecting(self, stage: int, what: str) -> None:
        if self._stage != stage:
            raise SecAggError(f"secure aggregation is not collecting {what} now")

    def _enough(self, count: int, what: str) -> None:
        if count < self.config.threshold:
            raise SecAggError(
                f"only {count} clients {what}; secure aggregation needs at least "
                f"{self.config.threshold} (the threshold), so this round must be abandoned"
            )

    # round 0
    def receive_keys(self, message: AdvertiseKeys) -> None:
        """Take one client's public keys."""
        self._collecting(0, "keys")
        if message.client_id < 1 or message.client_id in self._keys:
            raise SecAggError(f"bad or repeated client id {message.client_id}")
        self._keys[message.client_id] = message

    def key_list(self) -> dict[int, AdvertiseKeys]:
        """Close round 0 and return U1's keys, to send to every client in U1."""
        if self._stage == 0:
            self._enough(len(self._keys), "advertised keys")
            self._stage = 1
        return dict(self._keys)

    # round 1
    def receive_shares(self, message: ShareKeys) -> None:
        """Take one client's encrypted shares."""
        self._collecting(1, "shares")
        if message.client_id not in self._keys or message.client_id in self._shares:
            raise SecAggError(f"unexpected shares from client {message.client_id}")
        expected = set(self._keys) - {message.client_id}
        if set(message.ciphertexts) != expected:
            raise SecAggError(f"client {message.client_id} did not share with every client of U1")
        self._shares[message.client_id] = message

    def close_shares(self) -> list[int]:
        """Close round 1 and return U2, the clients that shared keys."""
        if self._stage == 1:
            self._enough(len(self._shares), "shared keys")
            self._stage = 2
        return sorted(self._shares)

    def shares_for(self, client_id: int) -> dict[int, bytes]:
        """Return the ciphertexts addressed to one client of U2 (from every other client of U2)."""
        self.close_shares()
        return {
            u: message.ciphertexts[client_id]
            for u, message in self._shares.items()
            if u != client_id
        }

    # round 2
    def receive_masked_input(self, message: MaskedInput) -> None:
        """Take one client's masked input."""
        self._collecting(2, "masked inputs")
        if message.client_id not in self._shares or message.client_id in self._masked:
            raise SecAggError(f"unexpected masked input from client {message.client_id}")
        masked = np.asarray(message.masked)
        if masked.dtype != self.config.dtype or masked.shape != (self.config.dimension,):
            raise SecAggError(f"masked input from client {message.client_id} has the wrong shape")
        if self._masked_sum is None:
            self._masked_sum = masked.copy()
        else:
            np.add(self._masked_sum, masked, out=self._masked_sum)
        self._masked[message.client_id] = True

    def survivors(self) -> list[int]:
        """Close round 2 and return U3, the clients whose masked input arrived."""
        if self._stage == 2:
            self._enough(len(self._masked), "sent masked inputs")
            self._stage = 3
        return sorted(self._masked)

    # round 3
    def receive_unmask(self, message: UnmaskShares) -> None:
        """Take one survivor's shares."""
        self._collecting(3, "unmasking shares")
        alive = set(self._masked)
        if message.client_id not in alive or message.client_id in self._unmask:
            raise SecAggError(f"unexpected unmasking shares from client {message.client_id}")
        dropped = set(self._shares) - alive
        if set(message.b_shares) - alive or set(message.sk_shares) - dropped:
            raise SecAggError(f"client {message.client_id} sent shares for the wrong clients")
        self._unmask[message.client_id] = message

    def result(self) -> NDArray[np.float64]:
        """Close round 3 and return the float sum of the survivors' inputs.

        Raises SecAggError when fewer than ``threshold`` clients answered the unmasking round.
        """
        self._collecting(3, "unmasking shares")
        self._enough(len(self._unmask), "answered the unmasking round")
        config = self.config
        alive = sorted(self._masked)
        dropped = sorted(set(self._shares) - set(self._masked))
        total = np.zeros(config.dimension, dtype=config.dtype)
        if self._masked_sum is not None:
            _apply(total, self._masked_sum, 1)
        for u in alive:
            seed = self._recover(u, "b")
            _apply(total, prg_mask(seed, config), -1)
        for v in dropped:
            s_sk = X25519PrivateKey.from_private_bytes(self._recover(v, "sk"))
            if _raw(s_sk.public_key()) != self._keys[v].s_pk:
                raise SecAggError(f"the shares of client {v}'s key do not match its public key")
            for u in alive:
                # y_u holds sign(u, v) · PRG(s_uv); take it out.
                seed = _agree(s_sk, self._keys[u].s_pk)
                _apply(total, prg_mask(seed, config), -_pair_sign(u, v))
        self.integer_sum = total
        self._stage = 4
        return config.decode(total)

    def _recover(self, owner: int, kind: str) -> bytes:
        shares = []
        for message in self._unmask.values():
            table = message.b_shares if kind == "b" else message.sk_shares
            if owner in table:
                shares.append(shamir.share_from_bytes(message.client_id, table[owner]))
        try:
            return shamir.combine(shares, self.config.threshold)
        except ValueError as exc:
            raise SecAggError(f"cannot recover client {owner}'s {kind} secret: {exc}") from exc


# --- in-process simulation --------------------------------------------------------------------


@dataclass(frozen=True)
class SimulationResult:
    """What simulate returns: the decoded sum, its exact integer form, and who was summed."""

    total: NDArray[np.float64]
    integer_sum: UIntArray
    summed: list[int]
    masked_inputs: dict[int, UIntArray] = field(repr=False)


def simulate(
    inputs: Mapping[int, NDArray[np.floating]],
    threshold: int,
    *,
    num_bits: int = 32,
    frac_bits: int = 16,
    session: bytes = b"sim",
    drop_before_shares: Iterable[int] = (),
    drop_before_input: Iterable[int] = (),
    drop_before_unmask: Iterable[int] = (),
) -> SimulationResult:
    """Return the result of running the four rounds in process over the given clients.

    ``inputs`` maps client id (≥ 1) to its vector. Clients in ``drop_before_shares`` vanish after
    advertising keys, in ``drop_before_input`` after sharing keys (their pairwise masks must be
    rebuilt), in ``drop_before_unmask`` after sending their masked input (their input still
    counts). Raises SecAggError when too few clients are left at some step.
    """
    if not inputs:
        raise SecAggError("simulate needs at least one client")
    dimension = int(np.asarray(next(iter(inputs.values()))).size)
    config = SecAggConfig(threshold, dimension, num_bits, frac_bits, session)
    clients = {u: SecAggClient(u, config) for u in inputs}
    server = SecAggServer(config)
    gone_shares, gone_input, gone_unmask = (
        set(drop_before_shares),
        set(drop_before_input),
        set(drop_before_unmask),
    )
    for client in clients.values():
        server.receive_keys(client.advertise_keys())
    keys = server.key_list()
    active = [u for u in clients if u not in gone_shares]
    for u in active:
        server.receive_shares(clients[u].share_keys(keys))
    u2 = server.close_shares()
    active = [u for u in u2 if u not in gone_input]
    masked: dict[int, UIntArray] = {}
    for u in active:
        message = clients[u].masked_input(np.asarray(inputs[u]), server.shares_for(u))
        masked[u] = message.masked
        server.receive_masked_input(message)
    u3 = server.survivors()
    for u in u3:
        if u not in gone_unmask:
            server.receive_unmask(clients[u].unmask(u3))
    total = server.result()
    assert server.integer_sum is not None
    return SimulationResult(total, server.integer_sum, u3, masked)
