"""Differential privacy on the Flower engine, with Flower's own pieces (docs/flower.md).

- Local DP, switched on per SuperNode (``--node-config "local-dp='clipping_norm=C,
  sensitivity=S,epsilon=E,delta=D'"``): each upload goes through Flower's ``LocalDpMod``.
- Central DP, switched on for the run (``federation.central_dp``): the ServerApp's strategy is
  wrapped in Flower's ``DifferentialPrivacyServerSideFixedClipping`` (``"server"``) or
  ``DifferentialPrivacyClientSideFixedClipping`` (``"client"``: each node clips its update with
  Flower's ``fixedclipping_mod`` before sending it).

Both measure a client's update from the point the server sent it, so both fit only the methods
whose server averages the uploads and sends the average back (``not_an_average`` is None); for
the others the method's own reason is given. The update is measured from the client's
reference: the uploaded parts of its state before training, which the train handler keeps in
``context.state`` (``REFERENCE``); that is exactly the server's last download, or setup's parts,
or (for a client whose last upload was left out) its unchanged state.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp.mod import LocalDpMod, fixedclipping_mod
from flwr.common import log as flwr_log
from flwr.common.constant import ErrorCode
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from ...fedconfig import FederationConfig
from ...federated import FederatedMethod
from ...federated.registry import averaging, known
from .config import federated_config
from .protocol import UPLOAD, from_record, to_record

LOCAL_DP = "local-dp"  # the node-config key: "clipping_norm=C,sensitivity=S,epsilon=E,delta=D"
LOCAL_DP_FIELDS = ("clipping_norm", "sensitivity", "epsilon", "delta")
REFERENCE = "asymlora-dp-reference"  # context.state: the upload's parts before training


# --- local DP ---------------------------------------------------------------------------------------
def local_dp_params(node_config: Mapping[str, Any]) -> dict[str, float] | None:
    """The node's local-DP parameters from its ``--node-config`` (``local-dp``), or None when
    the key is absent or empty. Bad values raise ValueError naming the key."""
    raw = node_config.get(LOCAL_DP, "")
    if raw is None or str(raw).strip() == "":
        return None
    where = f"node config {LOCAL_DP}={str(raw)!r}"
    form = ",".join(f"{k}=..." for k in LOCAL_DP_FIELDS)
    params: dict[str, float] = {}
    for item in str(raw).split(","):
        key, eq, value = (x.strip() for x in item.partition("="))
        if not eq or key not in LOCAL_DP_FIELDS or key in params:
            raise ValueError(f"{where}: expected {form} (each once), got {item.strip()!r}")
        try:
            params[key] = float(value)
        except ValueError:
            raise ValueError(f"{where}: {key}={value!r} is not a number") from None
        if not math.isfinite(params[key]):
            raise ValueError(f"{where}: {key} must be finite")
    missing = [k for k in LOCAL_DP_FIELDS if k not in params]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(missing)} (expected {form})")
    for key in ("clipping_norm", "sensitivity", "epsilon"):
        if params[key] <= 0:
            raise ValueError(f"{where}: {key} must be > 0")
    if not 0 < params["delta"] < 1:
        raise ValueError(f"{where}: delta must be in (0, 1)")
    return params


def local_dp_mod(node_config: Mapping[str, Any]) -> LocalDpMod | None:
    """Flower's ``LocalDpMod`` with the node's parameters, or None when local DP is off."""
    params = local_dp_params(node_config)
    return None if params is None else LocalDpMod(**params)


def noise_std(mod: LocalDpMod) -> float:
    """The standard deviation of the Gaussian noise ``mod`` adds to every value (its formula)."""
    return mod.sensitivity * math.sqrt(2 * math.log(1.25 / mod.delta)) / mod.epsilon


def local_dp_unfit(method: FederatedMethod) -> str | None:
    """Why local DP is refused for ``method``, or None (see the module's docstring)."""
    if method.not_an_average is None:
        return None
    return (
        f"local DP (local-dp in the node config) does not fit method {method.name}: "
        f"{method.not_an_average}; it is only supported where the server averages the uploads "
        f"and sends the average back ({known(averaging())}), so that the update is clipped from "
        "the server's own download"
    )


def check_local_dp(context: Context, federation: FederationConfig) -> LocalDpMod | None:
    """The node's LocalDpMod (None when off); raises ValueError when its parameters are bad or
    the run's method (``federation``: the run config's federation section) does not fit."""
    mod = local_dp_mod(context.node_config)
    reason = local_dp_unfit(federation.make_method()) if mod is not None else None
    wire = federation.wire_dtype
    if mod is not None and reason is None and wire != "float32":
        reason = f"local DP needs federation.wire_dtype='float32' (Flower's LocalDpMod computes in numpy), not {wire!r}"
    if reason is not None:
        raise ValueError(reason)
    return mod


def local_dp_on(context: Context) -> bool:
    return str(context.node_config.get(LOCAL_DP, "") or "").strip() != ""


def clipping_norm(msg: Message) -> float | None:
    """The clipping norm a client-side-clipping DP wrapper put in the train message, or None."""
    config = msg.content.get("config", {})
    return float(config[KEY_CLIPPING_NORM]) if KEY_CLIPPING_NORM in config else None


# --- the train handler's mod ------------------------------------------------------------------------
def privacy(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """The train handler's mod: the upload goes through Flower's ``fixedclipping_mod`` when the
    message carries a clipping norm (central DP, client-side clipping), then through Flower's
    ``LocalDpMod`` when the node config sets ``local-dp``: the update (upload minus the
    reference the train handler keeps) is clipped to the norm (L2 over every tensor together)
    and, for local DP, Gaussian noise of std ``sensitivity * sqrt(2 ln(1.25 / delta)) /
    epsilon`` is added to every value. Bad parameters or a method it does not fit give an error
    reply naming the reason, before any training; nothing un-clipped or un-noised is sent."""
    norm, local = clipping_norm(msg), local_dp_on(context)
    if norm is None and not local:
        return call_next(msg, context)  # off: the run config is not even read here
    try:
        mod = check_local_dp(context, federated_config(context.run_config).federation)
    except ValueError as err:
        flwr_log(logging.ERROR, str(err))
        return _error(msg, str(err))
    try:
        reply = call_next(msg, context)
        if reply.has_error():
            return reply
        if REFERENCE not in context.state or UPLOAD not in reply.content:
            return _error(msg, "DP: the train reply carries no upload or no reference was kept")
        reference = from_record(context.state[REFERENCE])
    finally:
        if REFERENCE in context.state:
            del context.state[REFERENCE]  # not kept across rounds
    upload = from_record(reply.content[UPLOAD])
    if set(upload) != set(reference):
        return _error(
            msg,
            f"DP: the upload's tensors differ from the reference's ({len(upload)} against {len(reference)})",
        )
    # Flower's mods read the reference from the message they are given (exactly one
    # ArrayRecord) and need the reply's keys in the same order: both sorted here.
    keys = sorted(upload)
    reply.content[UPLOAD] = to_record({k: upload[k] for k in keys})
    records: dict[str, Any] = {"reference": to_record({k: reference[k] for k in keys})}
    if norm is not None:
        records["config"] = ConfigRecord({KEY_CLIPPING_NORM: norm})
        reply = _through(fixedclipping_mod, Message(RecordDict(records), reply_to=msg), context, reply)
        if reply.has_error():
            return reply
        del records["config"]
    if mod is not None:
        # LocalDpMod draws from numpy's global generator; under the warm launcher every task is
        # a fork of one process, so every task would start from the same generator state (the
        # same noise for every client and round). Fresh OS entropy for each upload.
        np.random.seed()
        reply = _through(mod, Message(RecordDict(records), reply_to=msg), context, reply)
    return reply


def _through(mod: Callable[..., Message], ref_msg: Message, context: Context, reply: Message) -> Message:
    """``reply`` as Flower's ``mod`` rewrites it, measuring from ``ref_msg``'s one ArrayRecord."""
    return mod(ref_msg, context, lambda _msg, _context: reply)


def _error(msg: Message, reason: str) -> Message:
    return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=reason), reply_to=msg)


def needs_reference(msg: Message, context: Context) -> bool:
    """Whether the train handler must keep the reference for ``privacy``."""
    return local_dp_on(context) or clipping_norm(msg) is not None


# --- central DP: Flower's strategy wrappers ---------------------------------------------------------
CENTRAL_DP_WRAPPERS = {
    "server": DifferentialPrivacyServerSideFixedClipping,
    "client": DifferentialPrivacyClientSideFixedClipping,
}


def wrapper_reads_arrays(federation: FederationConfig) -> bool:
    """Whether a central-DP wrapper reads the run's arrays (the strategy loop's and the
    uploads), which must then be Flower's own, one per tensor (``protocol.to_record``)."""
    return federation.central_dp in CENTRAL_DP_WRAPPERS


def with_central_dp(strategy: Strategy, federation: FederationConfig, per_round: int) -> Strategy:
    """``strategy`` wrapped in Flower's fixed-clipping DP wrapper ``federation.central_dp``
    names (itself when off); ``per_round``: the clients sampled per round. The config has
    refused the methods it does not fit."""
    if not wrapper_reads_arrays(federation):
        return strategy
    wrapper = CENTRAL_DP_WRAPPERS[federation.central_dp]
    return wrapper(strategy, federation.dp_noise_multiplier, federation.dp_clipping_norm, per_round)
