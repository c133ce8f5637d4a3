"""Who runs the clients of a federation. ``round`` is the server's side of a round, which every
engine calls; ``local`` is the in-process simulator (one base model, every client's adapter
state swapped in turn); ``flower`` runs the clients on Flower SuperNodes. The methods
themselves live in ``asymlora.federated`` and know nothing of engines."""

from .local import Client, LocalSimulator, find_checkpoint
from .round import RoundError, RoundLog, participants

__all__ = ["Client", "LocalSimulator", "RoundError", "RoundLog", "find_checkpoint", "participants"]
