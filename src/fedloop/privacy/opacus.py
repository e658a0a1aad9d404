"""Agent-side (example-level) differential privacy for PyTorch training, through Opacus.

DP-SGD (Abadi et al. 2016) on the agent: per-example gradients clipped to ``max_grad_norm``,
Gaussian noise of std ``noise_multiplier · max_grad_norm`` added per batch, batches drawn by
Poisson sampling, ε tracked by Opacus's RDP accountant. This protects each *training example*
of one agent, also against the aggregator; it composes with ``dp_fedavg`` (which protects each
*agent*) and with secure aggregation. Needs ``pip install opacus``.

Keep one :class:`LocalDP` per agent process: it wraps each round's model/optimizer/loader
with the same PrivacyEngine, so ε accumulates over rounds. Read and write weights through your
own ``nn.Module`` (``fedloop.ml.torch.to_weights`` / ``load_weights``): Opacus's wrapper shares
its parameters but prefixes their names with ``_module.``.
"""

from __future__ import annotations

from typing import Any

from fedloop.errors import ConfigError

try:
    from opacus import PrivacyEngine
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("fedloop.privacy.opacus needs Opacus: pip install 'opacus>=1.4'") from exc


class LocalDP:
    """Return private (model, optimizer, data_loader) triples per round and the ε spent so far.

    ``noise_multiplier`` σ and ``max_grad_norm`` C as in DP-SGD; ``secure_mode`` uses a
    cryptographically secure noise generator (slower; Opacus needs ``torchcsprng`` for it).
    """

    def __init__(
        self,
        noise_multiplier: float,
        max_grad_norm: float,
        *,
        accountant: str = "rdp",
        secure_mode: bool = False,
    ) -> None:
        if not noise_multiplier >= 0:
            raise ConfigError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
        if not max_grad_norm > 0:
            raise ConfigError(f"max_grad_norm must be > 0, got {max_grad_norm}")
        self.noise_multiplier = float(noise_multiplier)
        self.max_grad_norm = float(max_grad_norm)
        self.engine: Any = PrivacyEngine(accountant=accountant, secure_mode=secure_mode)
        self._wrapped: tuple[Any, Any] | None = None  # (your module, Opacus's wrapper of it)

    def make_private(self, model: Any, optimizer: Any, data_loader: Any) -> tuple[Any, Any, Any]:
        """Return (wrapped model, DP optimizer, Poisson-sampled loader) to train this round with."""
        # Opacus refuses to hook one module twice: later rounds reuse the first round's wrapper.
        if self._wrapped is not None and self._wrapped[0] is model:
            module = self._wrapped[1]
        else:
            module = model
        wrapped, dp_optimizer, loader = self.engine.make_private(
            module=module,
            optimizer=optimizer,
            data_loader=data_loader,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            poisson_sampling=True,
        )
        self._wrapped = (model, wrapped)
        return wrapped, dp_optimizer, loader

    def epsilon(self, delta: float) -> float:
        """Return the ε this agent's examples have spent so far, at δ (0 before any step)."""
        if not 0.0 < delta < 1.0:
            raise ConfigError(f"delta must be in (0, 1), got {delta}")
        if len(self.engine.accountant) == 0:
            return 0.0
        return float(self.engine.get_epsilon(delta))
