"""Secure aggregation: exact sums, dropouts, the threshold, and what the server sees."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("cryptography")

from fedloop.privacy.secagg import (
    MaskedInput,
    SecAggClient,
    SecAggConfig,
    SecAggError,
    SecAggServer,
    simulate,
)

DIM = 2000


def make_inputs(n: int, seed: int = 0, scale: float = 1.0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {u: rng.normal(scale=scale, size=DIM).astype(np.float32) for u in range(1, n + 1)}


def check_sum(
    result_total: np.ndarray,
    integer_sum: np.ndarray,
    inputs: dict[int, np.ndarray],
    summed: list[int],
    config: SecAggConfig,
) -> None:
    expected_int = np.zeros(DIM, dtype=config.dtype)
    for u in summed:
        expected_int += config.encode(inputs[u], len(inputs))
    np.testing.assert_array_equal(integer_sum, expected_int)  # exact, mod R
    plain = np.sum([inputs[u].astype(np.float64) for u in summed], axis=0)
    step = 1.0 / config.scale
    assert np.max(np.abs(result_total - plain)) <= len(summed) * step / 2 + 1e-12


@pytest.mark.parametrize("num_bits", [32, 64])
def test_sum_is_exact_without_dropouts(num_bits: int) -> None:
    inputs = make_inputs(6)
    result = simulate(inputs, threshold=4, num_bits=num_bits, frac_bits=20)
    assert result.summed == [1, 2, 3, 4, 5, 6]
    config = SecAggConfig(4, DIM, num_bits, 20)
    check_sum(result.total, result.integer_sum, inputs, result.summed, config)


def test_dropouts_up_to_n_minus_t() -> None:
    inputs = make_inputs(8, seed=1)
    config = SecAggConfig(4, DIM)
    # 1 never shares keys, 2 and 5 drop after sharing (pairwise masks rebuilt from s^SK shares),
    # 7 drops after masking (its input counts; its self mask comes from the others' shares):
    # 4 of 8 answer the unmasking round, exactly the threshold.
    result = simulate(
        inputs, 4, drop_before_shares=[1], drop_before_input=[2, 5], drop_before_unmask=[7]
    )
    assert result.summed == [3, 4, 6, 7, 8]
    check_sum(result.total, result.integer_sum, inputs, result.summed, config)


def test_negative_and_large_values_decode() -> None:
    inputs = {u: np.full(DIM, -100.25 * u) for u in (1, 2, 3)}
    result = simulate(inputs, 2, drop_before_input=[3])
    np.testing.assert_allclose(result.total, -300.75)


@pytest.mark.parametrize(
    ("drops", "stage"),
    [
        ({"drop_before_shares": [1, 2, 3]}, "shared keys"),
        ({"drop_before_input": [1, 2, 3]}, "sent masked inputs"),
        ({"drop_before_unmask": [1, 2, 3]}, "answered the unmasking round"),
    ],
)
def test_fewer_than_t_survivors_fail_clearly(drops: dict[str, list[int]], stage: str) -> None:
    with pytest.raises(SecAggError, match=f"only 2 clients {stage}.*at least 3"):
        simulate(make_inputs(5), 3, **drops)  # type: ignore[arg-type]


def test_masked_input_looks_unrelated_to_the_input() -> None:
    inputs = make_inputs(5, seed=2)
    config = SecAggConfig(3, DIM)
    result = simulate(inputs, 3)
    for u, masked in result.masked_inputs.items():
        encoded = config.encode(inputs[u], 5)
        assert np.mean(masked != encoded) >= 0.99
        # Uniform over Z_{2^32}: the top bit is set about half the time, and the masked words
        # do not correlate with the input.
        top = (masked >> np.uint32(31)).astype(np.float64)
        assert abs(top.mean() - 0.5) < 0.05
        corr = np.corrcoef(masked.astype(np.float64), encoded.view(np.int32).astype(np.float64))
        assert abs(corr[0, 1]) < 0.1


def test_same_input_masks_differently_each_round() -> None:
    inputs = make_inputs(3)
    a = simulate(inputs, 2, session=b"round-1").masked_inputs[1]
    b = simulate(inputs, 2, session=b"round-1").masked_inputs[1]
    assert np.mean(a != b) >= 0.99


def test_out_of_range_input_is_refused() -> None:
    inputs = {1: np.full(DIM, 1e5), 2: np.zeros(DIM), 3: np.zeros(DIM)}
    with pytest.raises(SecAggError, match="without overflow"):
        simulate(inputs, 2)


def test_client_never_reveals_both_shares_and_checks_the_survivor_list() -> None:
    config = SecAggConfig(2, 4)
    clients = {u: SecAggClient(u, config) for u in (1, 2, 3)}
    server = SecAggServer(config)
    for c in clients.values():
        server.receive_keys(c.advertise_keys())
    keys = server.key_list()
    for c in clients.values():
        server.receive_shares(c.share_keys(keys))
    for u in (1, 2):  # 3 drops before its masked input
        server.receive_masked_input(clients[u].masked_input(np.ones(4), server.shares_for(u)))
    survivors = server.survivors()
    assert survivors == [1, 2]
    reply = clients[1].unmask(survivors)
    assert set(reply.b_shares) == {1, 2} and set(reply.sk_shares) == {3}
    assert not set(reply.b_shares) & set(reply.sk_shares)
    with pytest.raises(SecAggError, match="out of order"):
        clients[1].unmask(survivors)
    with pytest.raises(SecAggError, match="never shared keys"):
        clients[2].unmask([1, 2, 9])


def test_server_refuses_out_of_order_and_foreign_messages() -> None:
    config = SecAggConfig(2, 4)
    server = SecAggServer(config)
    client = SecAggClient(1, config)
    message = client.advertise_keys()
    server.receive_keys(message)
    with pytest.raises(SecAggError, match="repeated"):
        server.receive_keys(message)
    with pytest.raises(SecAggError, match="only 1 clients advertised keys"):
        server.key_list()
    with pytest.raises(SecAggError, match="not collecting masked inputs"):
        server.receive_masked_input(MaskedInput(1, np.zeros(4, dtype=np.uint32)))
