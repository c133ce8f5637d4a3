"""What (ε, δ) the Flower engine's DP gives, by Flower's own RDP accountant
(``flwr.serverapp.RdpAccountant``, which runs Google's dp-accounting; docs/flower.md).

Client-level DP, one neighbouring relation throughout: two federations are neighbours when one
client's data is replaced by other data (the number of clients is public: the server knows it).
Replacing a client's data moves its clipped update (L2 <= C) by at most 2 C.

Central DP (``federation.central_dp``): a round samples m of the n clients uniformly without
replacement (``engines.round.participants``), averages the clipped updates of the k it accepts
and adds Gaussian noise of std z C / m to every value of the mean (Flower's wrappers calibrate
it for the m sampled). On the sum that is noise z C k / m against a sensitivity of 2 C: the
sampled Gaussian mechanism of noise multiplier z k / (2 m) at sampling rate q = m / n (RDP of
sampling without replacement: Wang, Balle, Kasiviswanathan, AISTATS 2019). With
``federation.fraction = 1.0`` every client takes part, q = 1: no amplification, each round is
the Gaussian mechanism alone. The rounds compose; ε is reported at ``federation.dp_delta``.

Local DP (``local-dp`` in a node's config): Flower's ``LocalDpMod`` clips the update to C and
adds Gaussian noise of std s to every value, on the node: the Gaussian mechanism with noise
multiplier s / (2 C), q = 1 (nothing is sampled from the node's point of view), per round the
node's upload is aggregated.
"""

from __future__ import annotations

import math
from typing import Any

from ...errors import AsymloraError

INSTALL = "pip install 'asymlora[flower]' (or pip install 'flwr[dp]')"


class AccountingUnavailable(AsymloraError, ImportError):
    """Flower's RDP accountant cannot run: its backend, dp-accounting, is not installed."""


def central_multiplier(z: float, sampled: int, aggregated: int) -> float:
    """A central-DP round's noise multiplier against the replace-one sensitivity 2 C: the noise
    z C / ``sampled`` on a mean of ``aggregated`` clipped updates (see the module's docstring)."""
    return z * aggregated / (2 * sampled)


def local_multiplier(std: float, clipping_norm: float) -> float:
    """Local DP's noise multiplier: noise ``std`` on an update clipped to ``clipping_norm``."""
    return std / (2 * clipping_norm)


class Account:
    """The (ε, δ) of releases composed so far, each a Gaussian of a noise multiplier on ``sampled``
    of ``population`` drawn without replacement (sampled = population: no sampling)."""

    def __init__(self, population: int, delta: float):
        flwr = _flwr_accounting()
        self.delta, self.population, self._event = delta, population, flwr.GaussianPrivacyEvent
        config = flwr.PrivacyConfig(
            target_delta=delta,
            population_size=population,
            neighboring_relation=flwr.NeighboringRelation.REPLACE_ONE,
            sampling_method=flwr.SamplingMethod.WITHOUT_REPLACEMENT,
        )
        self._accountant = flwr.RdpAccountant(config)
        self._exact = True  # False once a release had no noise: no finite ε

    def compose(self, multiplier: float, sampled: int, count: int = 1) -> float:
        """Add ``count`` releases; returns the ε of everything composed (inf once one had no noise)."""
        if multiplier > 0:
            self._accountant.compose(self._event(multiplier, sampled, self.population), count)
        else:
            self._exact = False
        return self.epsilon

    @property
    def epsilon(self) -> float:
        if not self._exact:
            return math.inf
        return self._accountant.get_epsilon(self.delta) if self._accountant.num_releases else 0.0


def gaussian_epsilon(multiplier: float, delta: float, rounds: int = 1) -> float:
    """ε at ``delta`` of ``rounds`` Gaussian releases of noise multiplier ``multiplier`` (q = 1)."""
    return Account(1, delta).compose(multiplier, 1, rounds)


class CentralPrivacy:
    """A run's central-DP account: ``z`` the noise multiplier, ``sampled`` of ``clients`` per
    round, reported at ``delta``. ``spend`` adds a round and gives its line of rounds.jsonl."""

    def __init__(self, z: float, clients: int, sampled: int, delta: float):
        self.z, self.sampled = z, sampled
        self.account = Account(clients, delta)

    def spend(self, aggregated: int) -> dict[str, Any]:
        """The round whose mean held ``aggregated`` uploads: the run's ε after it, and δ."""
        epsilon = self.account.compose(central_multiplier(self.z, self.sampled, aggregated), self.sampled)
        return {"epsilon": epsilon, "delta": self.account.delta}

    def summary(self) -> str:
        rate = self.sampled / self.account.population
        return (
            f"central DP: (ε, δ) = ({self.account.epsilon:.4g}, {self.account.delta:g}) for the run, "
            f"noise multiplier {self.z:g}, {self.sampled} of {self.account.population} clients per round "
            f"(q = {rate:.3g}), client-level, one client's data replaced (Flower's RDP accountant)"
        )


def _flwr_accounting() -> Any:
    """``flwr.serverapp`` with its RDP accountant importable, or a one-line error."""
    import flwr.serverapp as flwr

    try:
        import dp_accounting  # noqa: F401  (what flwr.serverapp.RdpAccountant runs on)
    except ImportError:
        raise AccountingUnavailable(
            f"DP accounting needs the dp-accounting package (Flower's 'dp' extra), which is not installed: {INSTALL}"
        ) from None
    return flwr
