"""The Flower engine: a ServerApp and a ClientApp (flwr >= 1.42, Message API) that run the same
federated method functions, the same client training and the same server round
(``engines.round.Server``) as the in-process simulator, across real machines.

One file per job:

    config.py      Flower's run config (dotted keys) -> asymlora federate's config
    protocol.py    the messages and how tensors travel in them
    client_app.py  the ClientApp: one SuperNode is one client; per-process caches
    strategy.py    the round as a flwr ``Strategy`` (configure_train / aggregate_train)
    server_app.py  the ServerApp: init, ``strategy.start(...)``, finish
    dp.py          local DP (Flower's LocalDpMod) and central DP (Flower's fixed-clipping wrappers)
    accounting.py  the (ε, δ) of both, by Flower's RDP accountant (dp-accounting)

The app is declared in pyproject.toml (``[tool.flwr.app]``): ``serverapp =
"asymlora.engines.flower:server_app"``, ``clientapp = "asymlora.engines.flower:client_app"``.
"""

from .client_app import STATE, TRAINED, Node, base_key, base_model, client_app, client_app_with
from .config import AppSettings, federated_config
from .dp import REFERENCE, local_dp_mod, noise_std, privacy
from .protocol import (
    DOWNLOAD,
    PACKED,
    ROUNDS_FILE,
    SERVER_FILE,
    SETUP,
    UPLOAD,
    from_record,
    message,
    packed,
    to_record,
)
from .server_app import server_app, server_main
from .strategy import FederatedStrategy, ScreenUploads

__all__ = [
    "DOWNLOAD",
    "PACKED",
    "REFERENCE",
    "ROUNDS_FILE",
    "SERVER_FILE",
    "SETUP",
    "STATE",
    "TRAINED",
    "UPLOAD",
    "AppSettings",
    "FederatedStrategy",
    "Node",
    "ScreenUploads",
    "base_key",
    "base_model",
    "client_app",
    "client_app_with",
    "federated_config",
    "from_record",
    "local_dp_mod",
    "message",
    "noise_std",
    "packed",
    "privacy",
    "server_app",
    "server_main",
    "to_record",
]
