"""The messages between asymlora's ServerApp and ClientApp, and how tensors travel in them.

For a federation of N clients::

    query.init    server -> every node: build your initial adapter;
                  node -> server: its index, examples, rank, scale, and the parts setup needs
    train         server -> round participants: your pending download (setup's parts in round
                  1, the last aggregate otherwise), apply it, train one local round;
                  node -> server: method.upload(state) (one ArrayRecord), mean loss
    query.finish  server -> every node with a pending download: apply it, save your adapter

A download carries the round it answers (``answers``; 0: setup) and is sent again after a lost
message or reply; the client applies each round's download once. Under FLoRA a client left out
of a round gets that round's merge (``merge-<round>``) with its next message.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from torch import Tensor

from ...federated.common import Tensors

INIT, FINISH = f"{MessageType.QUERY}.init", f"{MessageType.QUERY}.finish"
SETUP, DOWNLOAD, UPLOAD, TENSORS = "setup", "download", "upload", "tensors"
ANSWERS, MERGE = "answers", "merge"  # the round a download answers; a missed round's merge
SERVER_FILE, ROUNDS_FILE = "server.safetensors", "rounds.jsonl"
BASE_DELTA_FILE = "base_delta.safetensors"

Pending = tuple[str, Tensors, int]  # (SETUP or DOWNLOAD, tensors, the round it answers)


BF16_BITS = "torch.bfloat16.bits"  # an Array's stype: bfloat16 values as raw bytes (numpy has no bfloat16)
PACKED = "asymlora.packed"  # an Array's stype: a whole dict of tensors in one buffer (``packed``)


def to_record(tensors: Mapping[str, Tensor]) -> ArrayRecord:
    """Tensors as an ArrayRecord of Flower's own arrays, one per tensor, the form Flower's mods
    and DP wrappers read: numpy arrays, except bfloat16, sent as its raw 2-byte values."""
    return ArrayRecord(
        {k: _array(v.detach().contiguous().cpu()) for k, v in tensors.items()}, keep_input=True
    )


def packed(tensors: Mapping[str, Tensor]) -> ArrayRecord:
    """Tensors as an ArrayRecord of one Array that holds them all: an 8-byte little-endian
    header length, the header (JSON: each tensor's name, dtype and shape, in order), then every
    tensor's raw bytes in that order. Exact for every dtype, and one buffer to copy and hash
    where ``to_record`` runs ``np.save`` per tensor; Flower's mods cannot read it."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    header = [[k, str(v.dtype).removeprefix("torch."), list(v.shape)] for k, v in tensors.items()]
    head = json.dumps(header).encode()
    body = [v.reshape(-1).view(torch.uint8).numpy().data for v in tensors.values() if v.numel()]
    data = b"".join([len(head).to_bytes(8, "little"), head, *body])
    return ArrayRecord({PACKED: Array(dtype="uint8", shape=(len(data),), stype=PACKED, data=data)})


def as_record(tensors: Mapping[str, Tensor], for_flower: bool) -> ArrayRecord:
    """``packed(tensors)``, or where a Flower wrapper reads the record (``for_flower``)
    ``to_record`` of them in sorted key order: a wrapper pairs the arrays of two records by
    position (an upload with the arrays it was sent), so both must be in one order."""
    return to_record(dict(sorted(tensors.items()))) if for_flower else packed(tensors)


def from_record(record: ArrayRecord) -> Tensors:
    """The tensors of a record of either form (``to_record``'s or ``packed``'s); raises
    ValueError (or another error) on a malformed one."""
    tensors: Tensors = {}
    for k, array in record.items():
        if array.stype == PACKED:
            tensors |= _unpacked(array.data)
        else:
            tensors[k] = _tensor(array)
    return tensors


def _array(t: Tensor) -> Array:
    if t.dtype != torch.bfloat16:
        return Array(t)
    return Array(
        dtype="bfloat16", shape=tuple(t.shape), stype=BF16_BITS, data=t.view(torch.int16).numpy().tobytes()
    )


def _tensor(array: Array) -> Tensor:
    if array.stype == BF16_BITS:
        bits = torch.frombuffer(bytearray(array.data), dtype=torch.int16)
        return bits.view(torch.bfloat16).reshape(array.shape).clone()
    return torch.from_numpy(array.numpy()).clone()


def _unpacked(data: bytes) -> Tensors:
    """``packed``'s tensors, each a copy that owns its memory."""
    size = int.from_bytes(data[:8], "little")
    raw = np.frombuffer(data, dtype=np.uint8, offset=8 + size)
    tensors: Tensors = {}
    start = 0
    for name, dtype_name, shape in json.loads(bytes(data[8 : 8 + size])):
        dtype = getattr(torch, str(dtype_name), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"a packed record names an unknown dtype {dtype_name!r}")
        if not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ValueError(f"a packed record gives {name!r} the shape {shape!r}")
        end = start + math.prod(shape) * dtype.itemsize
        if end > len(raw):
            raise ValueError("a packed record is shorter than its header says")
        chunk = raw[start:end]
        tensors[str(name)] = (
            torch.from_numpy(chunk.copy()).view(dtype).reshape(shape)
            if chunk.size
            else torch.empty(shape, dtype=dtype)
        )
        start = end
    if start != len(raw):
        raise ValueError("a packed record is longer than its header says")
    return tensors


def message(
    node_id: int,
    kind: str,
    rnd: int,
    pending: Pending | None = None,
    merges: Mapping[int, Tensors] | None = None,
    config: Mapping[str, Any] | None = None,
) -> Message:
    """A message of round ``rnd``, carrying the node's pending setup or download if any,
    (FLoRA) the merges of the rounds it was left out of, as ``merge-<round>``, and ``config``
    (the strategy's train config, such as a DP wrapper's clipping norm) in its ConfigRecord."""
    settings: dict[str, Any] = {**(config or {}), "round": rnd}
    records: dict[str, Any] = {}
    if pending is not None:
        name, tensors, answers = pending
        settings[ANSWERS] = answers
        records[name] = packed(tensors)
    for r, tensors in sorted((merges or {}).items()):
        records[f"{MERGE}-{r}"] = packed(tensors)
    content = RecordDict({"config": ConfigRecord(settings), **records})
    return Message(content, dst_node_id=node_id, message_type=kind, group_id=str(rnd))


def upload_of(reply: Message) -> Any:
    """The tensors a train reply carries, or what the validator will refuse (None)."""
    try:
        return from_record(reply.content[UPLOAD])
    except Exception:  # noqa: BLE001 - a malformed reply is a rejected upload, not a crash
        return None


def loss_of(reply: Message) -> float:
    try:
        return float(reply.content["metrics"]["loss"])
    except Exception:  # noqa: BLE001
        return float("nan")


def sort_replies(
    nodes: Mapping[int, int], replies: Iterable[Message], timeout: float
) -> tuple[dict[int, Message], dict[int, str]]:
    """The replies of the clients ``nodes`` (client index -> node id) by client, and why each
    other client has none (no reply within ``timeout`` s, or an error reply)."""
    by_node = {r.metadata.src_node_id: r for r in replies}
    got: dict[int, Message] = {}
    failed: dict[int, str] = {}
    for i, node in nodes.items():
        reply = by_node.get(node)
        if reply is None:
            failed[i] = f"no reply within {timeout:g} s"
        elif reply.has_error():
            failed[i] = f"the ClientApp failed: {reply.error.reason}"
        else:
            got[i] = reply
    return got, failed
