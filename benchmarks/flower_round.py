"""The round overhead of the Flower engine (docs/performance.md): a round's time outside the
clients' local training, with asymlora's real ServerApp (``server_main``: ``FederatedStrategy``
started by ``strategy.start``) and ClientApp, 8 clients on one machine.

Every message and reply is deflated to Flower's object bytes and inflated back (content-hashed,
as flwr 1.42 ships messages between processes), and every node's Context (which holds the
client's adapter states) goes through its protobuf bytes before and after each message, as a
SuperNode hands it to a ClientApp process and takes it back. Not included: the network, the
SuperLink's object store and the start of a ClientApp process per message.

A round runs from one ``configure_train`` to the next (the last: to the end of
``strategy.start``): selection, the messages, the clients' state handling (the download
applied, the state loaded into the model, the upload cast and recorded), validation,
aggregation, the record, ``rounds.jsonl`` and ``server.safetensors``, and Flower's strategy
loop; ``train_locally`` is timed apart. ``--cold`` also drops each node's cached config,
data and wrapped model before every message, as a task forked from a warm process that only
preloaded the model (``asymlora.engines.flower_exec --preload``) starts.

    python benchmarks/flower_round.py --config configs/fed-nlp-smollm2.yaml --small-tasks \\
        [--rounds 3] [--steps 1] [--methods fedalora] [--cold] [--json docs/bench/flower_round.json]
"""

from __future__ import annotations

import importlib
import json
import tempfile
from pathlib import Path

from federated_round import now, round_arguments, setup, small_tasks, timed
from flwr.app import Context, Message, RecordDict
from flwr.common.serde import context_from_proto, context_to_proto
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.task_identity import TaskIdentity

NODE0 = 100  # node ids: NODE0 + partition id
CLIENT_APP = (
    "asymlora.engines.flower.client_app"  # the module (the package exports the ClientApp as client_app)
)


def through_wire(msg: Message) -> Message:
    """``msg`` as the receiving process gets it: deflated to its objects' bytes (each named by
    its SHA-256), inflated from them."""
    contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(msg).items()}
    received = inflate_object_from_contents(msg.object_id, contents)
    received.metadata.__dict__["_message_id"] = msg.object_id
    return received


def forget_node_caches() -> None:
    """A fresh task's ClientApp caches: the preloaded model only (unwrapped, its weights as loaded)."""
    ca = importlib.import_module(CLIENT_APP)
    for name, model in list(ca._WRAPPED.items()):
        ca.set_base_delta(name, model, {})
        model.unload()
    ca._WRAPPED.clear()
    ca._ORIGINAL.clear()
    ca._NODES.clear()


class WireGrid:
    """Flower's Grid as ``server_main`` uses it, with the SuperNodes' ClientApps in this process."""

    def __init__(self, run_config: dict, nodes: int, cold: bool) -> None:
        self.contexts = {
            NODE0 + k: self.pack(Context(1, NODE0 + k, {"partition-id": k}, RecordDict(), run_config))
            for k in range(nodes)
        }
        self.cold = cold

    @staticmethod
    def pack(context: Context) -> bytes:
        return context_to_proto(context).SerializeToString()

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: list[Message], timeout: float) -> list[Message]:
        from asymlora.engines.flower import client_app

        replies = []
        for msg in messages:
            msg.metadata.__dict__["_src_node_id"] = 1
            node = msg.metadata.dst_node_id
            received = through_wire(msg)
            context = context_from_proto(ProtoContext.FromString(self.contexts[node]))
            if self.cold:
                forget_node_caches()
            reply = client_app(received, context)
            self.contexts[node] = self.pack(context)
            replies.append(through_wire(reply))
        return replies


def measure(run_config: dict, clients: int, cold: bool) -> dict:
    """One Flower run; per round its wall time, the local training in it, and the rest."""
    from asymlora.engines import flower as app
    from asymlora.engines.flower import strategy

    client_app = importlib.import_module(CLIENT_APP)

    starts: list[float] = []  # when each round's configure_train began
    training: dict[int, float] = {}  # round -> seconds in train_locally

    def round_started(self, *args, **kwargs):
        starts.append(now())
        return configure(self, *args, **kwargs)

    def train_timed(*args, **kwargs):
        start = now()
        try:
            return train(*args, **kwargs)
        finally:
            training[len(starts)] = training.get(len(starts), 0.0) + now() - start

    configure, train = strategy.FederatedStrategy.configure_train, client_app.train_locally
    strategy.FederatedStrategy.configure_train, client_app.train_locally = round_started, train_timed
    try:
        with timed(client_app.Node, "build") as built:
            app.server_main(WireGrid(run_config, clients, cold), Context(1, 0, {}, RecordDict(), run_config))
            end = now()
    finally:
        strategy.FederatedStrategy.configure_train, client_app.train_locally = configure, train
    rows = []
    for rnd, (start, stop) in enumerate(zip(starts, [*starts[1:], end], strict=True), 1):
        took = stop - start  # no finish after the last round: save-adapters is off
        rows.append(
            {"round_s": took, "training_s": training[rnd], "outside_training_s": took - training[rnd]}
        )
    return {"rounds": rows, "node_builds_s": built["s"]}


def main() -> None:
    parser = round_arguments(__doc__, "fedalora", 3)
    parser.add_argument("--model", help="another model than the config's (tiny-llama: a quick check)")
    parser.add_argument("--cold", action="store_true", help="also a run with cold node caches")
    args = parser.parse_args()
    setup(args)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1  # what flwr stamps
    from asymlora.engines.flower import federated_config

    result: dict = {"engine": "flower (in-process nodes, messages and contexts serialised)", "methods": {}}
    with tempfile.TemporaryDirectory() as tmp:
        run_config = {
            "config": args.config,
            "train.steps": args.steps,
            "federation.rounds": args.rounds,
            "num-threads": args.threads,
            "timeout-s": 3600,
            "save-adapters": False,
        }
        if args.small_tasks:
            run_config["clients.tasks"] = ",".join(small_tasks(Path(tmp) / "tasks"))
        if args.model:
            run_config["model"] = args.model
        cfg = federated_config(run_config)
        clients = cfg.clients.count()
        result |= {"model": cfg.model, "clients": clients, "steps": args.steps, "threads": args.threads}
        result["clock"] = "process CPU time" if args.cpu_time else "wall"
        result |= {
            "batch_size": cfg.train.batch_size,
            "tasks": "8 small local tasks" if args.small_tasks else cfg.clients.suite,
        }
        for method in args.methods.split(","):
            entry = {}
            for cold in (False, True) if args.cold else (False,):
                config = run_config | {"federation.method": method, "output_dir": f"{tmp}/{method}-{cold}"}
                entry["cold" if cold else "warm"] = measure(config, clients, cold)
                print(method, "cold" if cold else "warm", json.dumps(entry, indent=1), flush=True)
            result["methods"][method] = entry
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
