"""Who runs the clients of a federation: ``local`` is the in-process simulator (one base model,
every client's adapter state swapped in turn). The methods themselves live in
``asymlora.federated`` and know nothing of engines."""

from .local import Client, LocalSimulator, RoundError, RoundLog, find_checkpoint, participants

__all__ = ["Client", "LocalSimulator", "RoundError", "RoundLog", "find_checkpoint", "participants"]
