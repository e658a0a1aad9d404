"""The aggregator's secure-round state machine, without HTTP: phases, deadlines, restarts."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("cryptography")

from fedloop.agent.secure import masked_vector
from fedloop.aggregator.secure import (
    SecureRound,
    SecureSum,
    check_strategy,
    dimension,
    mean_weights,
    session_bytes,
    threshold_for,
)
from fedloop.config import AggregatorConfig, SecAggSettings
from fedloop.errors import ConfigError, ProtocolError
from fedloop.privacy.secagg import AdvertiseKeys, SecAggClient, SecAggConfig, SecAggError
from fedloop.protocol.codec import ModelSpec
from fedloop.strategies import load as load_strategy

DIM = 50


def inputs(n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {f"agent{i}": rng.normal(size=DIM) for i in range(n)}


class Party:
    """One agent's side, as fedloop.agent.secure drives it over HTTP."""

    def __init__(self, agent_id: str, values: np.ndarray) -> None:
        self.agent_id = agent_id
        self.values = values
        self.client = SecAggClient(1, SecAggConfig(threshold=2, dimension=DIM))
        self.attempt = 0

    def advertise(self, secure: SecureRound) -> None:
        keys = self.client.advertise_keys()
        self.attempt, self.id = secure.advertise(self.agent_id, keys.c_pk, keys.s_pk)

    def share(self, secure: SecureRound) -> None:
        import base64

        listing = secure.key_list(self.agent_id, self.attempt)
        assert listing is not None
        config = SecAggConfig(
            listing.threshold,
            listing.dimension,
            listing.num_bits,
            listing.frac_bits,
            base64.b64decode(listing.session),
        )
        self.client.join(self.id, config)
        table = {
            int(k): AdvertiseKeys(int(k), base64.b64decode(v.c_pk), base64.b64decode(v.s_pk))
            for k, v in listing.keys.items()
        }
        message = self.client.share_keys(table)
        secure.receive_shares(self.agent_id, self.attempt, dict(message.ciphertexts))

    def mask(self, secure: SecureRound) -> None:
        import base64

        relayed = secure.shares_for(self.agent_id, self.attempt)
        assert relayed is not None
        ciphertexts = {int(u): base64.b64decode(c) for u, c in relayed.ciphertexts.items()}
        masked = self.client.masked_input(self.values, ciphertexts)
        body = np.asarray(masked.masked).astype("<u8").tobytes()
        secure.receive_masked(self.agent_id, self.attempt, body)

    def unmask(self, secure: SecureRound) -> None:
        survivors = secure.survivors(self.agent_id, self.attempt)
        assert survivors is not None
        reply = self.client.unmask(survivors.survivors)
        secure.receive_unmask(
            self.agent_id, self.attempt, dict(reply.b_shares), dict(reply.sk_shares)
        )


def make_round(
    needed: int, results: list[SecureSum], timeout: float = 30.0, number: int = 1
) -> SecureRound:
    async def finish(result: SecureSum) -> None:
        results.append(result)

    settings = SecAggSettings(enabled=True, phase_timeout=timeout)
    return SecureRound(number, settings, DIM, lambda: needed, finish).start()


async def settle(secure: SecureRound, phase: str, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while secure.phase != phase:
        assert asyncio.get_running_loop().time() < deadline, f"stuck in {secure.phase}"
        await asyncio.sleep(0.01)


def test_full_round_sums_every_input() -> None:
    async def main() -> None:
        results: list[SecureSum] = []
        secure = make_round(4, results)
        values = inputs(4)
        parties = [Party(a, v) for a, v in values.items()]
        for party in parties:
            assert secure.key_list(party.agent_id, secure.attempt) is None
            party.advertise(secure)
        assert secure.phase == "shares"  # closed by the 4th (needed) advertisement
        assert [p.id for p in parties] == [1, 2, 3, 4]  # arrival order
        assert secure.config is not None and secure.config.threshold == 3
        for party in parties:
            assert secure.shares_for(party.agent_id, party.attempt) is None
            party.share(secure)
        for party in parties:
            party.mask(secure)
        for party in parties:
            party.unmask(secure)
        await settle(secure, "done")
        (result,) = results
        assert sorted(result.survivors) == sorted(values)
        expected = np.sum(list(values.values()), axis=0)
        np.testing.assert_allclose(result.total, expected, atol=4 * 2.0**-24)
        # Agents keep their local model until the aggregator committed the global one.
        assert secure.outcome(parties[0].agent_id, parties[0].attempt) is None
        secure.committed()
        assert secure.outcome(parties[0].agent_id, parties[0].attempt) is not None
        secure.cancel()

    asyncio.run(main())


def test_dropout_before_masked_input_is_recovered_at_the_deadline() -> None:
    async def main() -> None:
        results: list[SecureSum] = []
        secure = make_round(4, results, timeout=0.3)
        values = inputs(4)
        parties = [Party(a, v) for a, v in values.items()]
        for party in parties:
            party.advertise(secure)
        for party in parties:
            party.share(secure)
        for party in parties[:3]:  # the fourth dies after sharing keys
            party.mask(secure)
        assert secure.phase == "masked"
        await settle(secure, "unmask")
        for party in parties[:3]:
            party.unmask(secure)
        await settle(secure, "done")
        (result,) = results
        assert sorted(result.survivors) == sorted(p.agent_id for p in parties[:3])
        expected = np.sum([p.values for p in parties[:3]], axis=0)
        np.testing.assert_allclose(result.total, expected, atol=3 * 2.0**-24)
        # the dead agent learns it is out
        with pytest.raises(ProtocolError) as info:
            secure.survivors(parties[3].agent_id, parties[3].attempt)
        assert info.value.code == "secagg_closed"
        secure.cancel()

    asyncio.run(main())


def test_too_few_shares_start_the_round_over() -> None:
    async def main() -> None:
        results: list[SecureSum] = []
        secure = make_round(4, results, timeout=0.2)
        parties = [Party(a, v) for a, v in inputs(4).items()]
        for party in parties:
            party.advertise(secure)
        for party in parties[:2]:  # t = 3: two are not enough
            party.share(secure)
        first = secure.attempt
        await settle(secure, "keys")
        assert secure.attempt == first + 1 and not secure.adverts
        with pytest.raises(ProtocolError) as info:
            secure.shares_for(parties[0].agent_id, first)
        assert info.value.code == "secagg_restart"
        # Everyone starts over with fresh keys; the new session differs.
        old_session = session_bytes(secure.boot, 1, first)
        parties = [Party(p.agent_id, p.values) for p in parties]
        for party in parties:
            party.advertise(secure)
        assert secure.config is not None and secure.config.session != old_session
        for party in parties:
            party.share(secure)
        for party in parties:
            party.mask(secure)
        for party in parties:
            party.unmask(secure)
        await settle(secure, "done")
        assert results[0].attempt == first + 1
        secure.cancel()

    asyncio.run(main())


def test_key_phase_closes_at_deadline_and_refuses_latecomers() -> None:
    async def main() -> None:
        results: list[SecureSum] = []
        secure = make_round(10, results, timeout=0.2)
        parties = [Party(a, v) for a, v in inputs(4).items()]
        for party in parties[:3]:
            party.advertise(secure)
        assert secure.phase == "keys"
        await settle(secure, "shares")
        assert len(secure.adverts) == 3
        with pytest.raises(ProtocolError) as info:
            parties[3].advertise(secure)
        assert info.value.code == "secagg_closed"
        with pytest.raises(ProtocolError) as info:
            secure.key_list(parties[3].agent_id, secure.attempt)
        assert info.value.code == "secagg_closed"
        secure.cancel()

    asyncio.run(main())


def test_one_agent_never_closes_the_key_phase() -> None:
    async def main() -> None:
        secure = make_round(1, [], timeout=0.1)
        Party("alone", np.zeros(DIM)).advertise(secure)
        await asyncio.sleep(0.3)
        assert secure.phase == "keys"  # one agent's sum would be its update
        secure.cancel()

    asyncio.run(main())


def test_bad_messages_are_refused() -> None:
    async def main() -> None:
        secure = make_round(2, [])
        parties = [Party(a, v) for a, v in inputs(2).items()]
        with pytest.raises(ProtocolError):
            secure.advertise("x", b"short", b"\x00" * 32)
        for party in parties:
            party.advertise(secure)
        with pytest.raises(ProtocolError) as info:
            secure.receive_shares(parties[0].agent_id, secure.attempt, {7: b"x"})
        assert info.value.code == "secagg_invalid"
        for party in parties:
            party.share(secure)
        with pytest.raises(ProtocolError) as info:
            secure.receive_masked(parties[0].agent_id, secure.attempt, b"\x00" * 7)
        assert info.value.code == "secagg_invalid"
        with pytest.raises(ProtocolError) as info:
            secure.receive_masked("stranger", secure.attempt, b"")
        assert info.value.code == "secagg_closed"
        secure.cancel()

    asyncio.run(main())


def test_mean_weights_undo_the_weighting() -> None:
    weights = [
        {"w": np.full((2, 3), 1.0, np.float32), "n": np.array(5, np.int64)},
        {"w": np.full((2, 3), 4.0, np.float32), "n": np.array(9, np.int64)},
    ]
    spec = ModelSpec.of(weights[0])
    assert dimension(spec) == 7
    total = masked_vector(weights[0], 10) + masked_vector(weights[1], 30)
    mean, samples = mean_weights(total, spec, {"w": np.zeros((2, 3)), "n": np.array(3)})
    assert samples == 40
    np.testing.assert_allclose(mean["w"], (10 * 1.0 + 30 * 4.0) / 40)
    assert int(mean["n"]) == 3  # non-floating tensors keep the global value
    with pytest.raises(SecAggError):
        mean_weights(np.zeros(7), spec, weights[0])


def test_threshold_and_sessions() -> None:
    assert threshold_for(0.66, 4) == 3
    assert threshold_for(0.66, 2) == 2
    assert threshold_for(0.1, 3) == 2
    assert threshold_for(1.0, 10) == 10
    boot = b"0" * 16
    sessions = {session_bytes(boot, r, a) for r in range(3) for a in range(3)}
    assert len(sessions) == 9
    assert session_bytes(b"1" * 16, 1, 0) != session_bytes(boot, 1, 0)


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi"])
def test_streaming_strategies_are_accepted(name: str) -> None:
    strategy = load_strategy(name)
    check_strategy(strategy, strategy.asynchronous)


@pytest.mark.parametrize(
    "name", ["median", "krum", "trimmed_mean", "dp_fedavg", "scaffold", "fedbuff"]
)
def test_other_strategies_are_refused(name: str, tmp_path: Path) -> None:
    from fedloop.aggregator.service import Aggregator

    config = AggregatorConfig.model_validate(
        {"data_dir": tmp_path, "strategy": {"name": name}, "secagg": {"enabled": True}}
    )
    with pytest.raises(ConfigError, match="secure aggregation"):
        Aggregator(config)


def test_settings_are_validated() -> None:
    from pydantic import ValidationError

    assert not SecAggSettings().enabled
    with pytest.raises(ValidationError):
        SecAggSettings(num_bits=48)
    with pytest.raises(ValidationError):
        SecAggSettings(num_bits=32, frac_bits=31)
    with pytest.raises(ValidationError):
        SecAggSettings(threshold=0.0)


def test_secagg_table_in_the_config_file(tmp_path: Path) -> None:
    from fedloop.config import load_config

    path = tmp_path / "aggregator.toml"
    path.write_text("[secagg]\nenabled = true\nthreshold = 0.5\nphase_timeout = 5\n")
    config = load_config(path)
    assert config.secagg.enabled and config.secagg.threshold == 0.5
    assert config.secagg.phase_timeout == 5.0 and config.secagg.num_bits == 64
    path.write_text("[secagg]\nenabled = true\nnum_bits = 16\n")
    with pytest.raises(ConfigError, match="secagg"):
        load_config(path)
