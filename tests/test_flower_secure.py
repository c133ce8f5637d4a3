"""A secure Flower deployment in real processes on 127.0.0.1, as docs/flower.md shows it: TLS on
every API (a CA and a certificate for 127.0.0.1 made here with the cryptography package),
SuperNode authentication (``--enable-supernode-auth``; EC keys in OpenSSH format, registered with
``flwr supernode register``), and central DP reporting its (ε, δ) after every round.

Two registered SuperNodes run a 3-round fedit federation under central DP (server-side clipping,
noise multiplier 1, one of the two clients per round). Three more nodes try to join and are
turned away: one without a key (which a SuperLink without authentication would register), one
whose key was never registered (the SuperLink does not activate it), and one that does not trust
the CA (its TLS handshake fails)."""

from __future__ import annotations

import datetime
import ipaddress
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flower_processes import as_flag, flower_env, free_ports, stage_app, start, stop, wait_for_port
from tiny_models import write_choice_tasks

pytest.importorskip("flwr")

from cryptography import x509  # noqa: E402  (a dependency of flwr)
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402

from asymlora.engines.flower import ROUNDS_FILE  # noqa: E402
from asymlora.engines.flower.accounting import CentralPrivacy  # noqa: E402

ROUNDS, Z, DELTA = 3, 1.0, 1e-3
REFUSED = ("anonymous", "unknown", "untrusting")
LIMIT_S = 420  # the run; on an idle machine the whole file takes about a minute


def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return path


def name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def certificate(subject: x509.Name, key, issuer: x509.Name, signer, ca: bool) -> x509.Certificate:
    """A certificate for ``subject`` signed by ``signer``: a CA's, or a server's for 127.0.0.1."""
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        usage = x509.KeyUsage(True, False, False, False, False, True, True, False, False)
        builder = builder.add_extension(usage, critical=True)
    else:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
    return builder.sign(signer, hashes.SHA256())


def make_certificates(folder: Path) -> dict[str, Path]:
    """A CA (ca.crt) and a certificate it signs for 127.0.0.1 and localhost (server.pem, server.key)."""
    folder.mkdir()
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = certificate(name("asymlora test CA"), ca_key, name("asymlora test CA"), ca_key, ca=True)
    server = certificate(name("127.0.0.1"), server_key, ca.subject, ca_key, ca=False)
    (folder / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (folder / "server.pem").write_bytes(server.public_bytes(serialization.Encoding.PEM))
    return {
        "ca": folder / "ca.crt",
        "cert": folder / "server.pem",
        "key": write_key(server_key, folder / "server.key"),
    }


def node_keys(path: Path) -> tuple[Path, Path]:
    """A SuperNode's EC key pair in OpenSSH format (what ``ssh-keygen -t ecdsa -b 384`` writes)."""
    key = ec.generate_private_key(ec.SECP384R1())
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
    )
    public = path.with_suffix(".pub")
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    return path, public


def run_config(tasks: list[str], out: Path) -> dict[str, object]:
    return {
        "federation.method": "fedit",
        "federation.rounds": ROUNDS,
        "federation.fraction": 0.5,  # one client per round: 0, 1, 0 with seed 3
        "federation.central_dp": "server",
        "federation.dp_noise_multiplier": Z,
        "federation.dp_clipping_norm": 0.1,
        "federation.dp_delta": DELTA,
        "model": "tiny-llama",
        "seed": 3,
        "clients.tasks": ",".join(tasks),
        "output_dir": str(out),
        "adapter.r": 4,
        "train.steps": 1,
        "train.batch_size": 2,
        "num-threads": 1,
        "timeout-s": 300,
        "save-adapters": False,
    }


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The SuperLink, the nodes and the run; every process stopped at the end."""
    root = tmp_path_factory.mktemp("secure")
    tls = make_certificates(root / "tls")
    logs = root / "logs"
    logs.mkdir()
    link, *runtime = free_ports(6)
    home = root / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink.secure]\naddress = "127.0.0.1:{link}"\nroot-certificates = "{tls["ca"]}"\n'
    )
    env = flower_env(FLWR_HOME=str(home))
    server_tls = ["--ssl-ca-certfile", str(tls["ca"]), "--ssl-certfile", str(tls["cert"])]
    server_tls += ["--ssl-keyfile", str(tls["key"])]
    procs: dict[str, subprocess.Popen] = {}
    started, registered = time.monotonic(), math.nan
    try:
        procs["superlink"] = start(
            ["flower-superlink", *server_tls, "--enable-supernode-auth", "--isolation", "process"]
            + ["--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(link)],
            logs / "superlink.log",
            env,
        )
        keys = {name: node_keys(root / f"{name}.key") for name in ("node0", "node1", "unknown")}
        wait_for_port(link)
        for name in ("node0", "node1"):  # the unknown node's key is never registered
            subprocess.run(
                ["flwr", "supernode", "register", str(keys[name][1]), "secure"],
                env=env, check=True, capture_output=True, timeout=120,
            )  # fmt: skip

        def supernode(name: str, port: int, *flags: str) -> None:
            args = ["flower-supernode", "--superlink", f"127.0.0.1:{link}", "--isolation", "process"]
            args += ["--host", "127.0.0.1", "--port", str(port), *server_tls, *flags]
            procs[name] = start(args, logs / f"{name}.log", env)

        trust = ["--root-certificates", str(tls["ca"])]
        for i in (0, 1):
            key = ["--auth-supernode-private-key", str(keys[f"node{i}"][0])]
            supernode(f"node{i}", runtime[i], *trust, *key, "--node-config", f"partition-id={i}")
        supernode("unknown", runtime[2], *trust, "--auth-supernode-private-key", str(keys["unknown"][0]))
        supernode("anonymous", runtime[3], *trust)
        supernode("untrusting", runtime[4])  # no --root-certificates: the system's CAs

        registered = time.monotonic() - started
        tasks = write_choice_tasks(root / "tasks", 2)
        config = run_config(tasks, root / "run")
        app = stage_app(root / "app")
        addresses = [f"127.0.0.1:{p}" for p in (link, runtime[0], runtime[1])]
        procs["exec"] = start(
            [sys.executable, "-m", "asymlora.engines.flower_exec", "--root-certificates", str(tls["ca"])]
            + ["--preload", "tiny-llama", *addresses, "--", str(app), "secure", "--stream"]
            + ["--run-config", as_flag(config)],
            logs / "run.log",
            env,
        )
        try:
            rc = procs["exec"].wait(LIMIT_S)
        except subprocess.TimeoutExpired:
            rc = None
        refused = {}
        for name in REFUSED:
            try:
                refused[name] = procs[name].wait(30)
            except subprocess.TimeoutExpired:
                refused[name] = None  # still running: not refused
    finally:
        for proc in procs.values():
            stop(proc)
    print(
        f"\nsecure deployment: {time.monotonic() - started:.0f} s ({registered:.0f} s to register the nodes)"
    )
    out = {p.stem: p.read_text(errors="replace") for p in logs.iterdir()}
    assert rc == 0, f"the run: {rc}\n{out['run'][-4000:]}\n{out['superlink'][-2000:]}"
    return {"refused": refused, "logs": out, "run": root / "run", "config": config}


def test_the_registered_nodes_train_over_tls(deployment: dict) -> None:
    lines = [json.loads(x) for x in (deployment["run"] / ROUNDS_FILE).read_text().splitlines()]
    assert [x["participants"] for x in lines] == [["task0"], ["task1"], ["task0"]]
    assert all(not x["dropped"] and not x["rejected"] for x in lines)
    for i in (0, 1):
        assert "Failed to initialize" not in deployment["logs"][f"node{i}"]
    assert "Uvicorn running on https://127.0.0.1:" in deployment["logs"]["superlink"]  # TLS only


def test_a_node_without_a_key_is_refused(deployment: dict) -> None:
    """Without a key a SuperNode registers itself, which SuperNode authentication forbids."""
    log = deployment["logs"]["anonymous"]
    assert deployment["refused"]["anonymous"] not in (0, None), log[-2000:]
    assert "Failed to initialize the connection to the SuperLink" in log
    assert "All SuperNodes must be registered via the CLI" in log, log[-2000:]


def test_a_node_whose_key_is_not_registered_is_refused(deployment: dict) -> None:
    log = deployment["logs"]["unknown"]
    assert deployment["refused"]["unknown"] not in (0, None), log[-2000:]
    assert "Failed to initialize the connection to the SuperLink" in log
    assert "Failed to activate SuperNode" in log, log[-2000:]
    assert "No SuperNode found with the given public key" in deployment["logs"]["superlink"]
    assert deployment["logs"]["superlink"].count("[Fleet.ActivateNode] Activated node_id=") == 2


def test_a_node_that_does_not_trust_the_ca_is_refused(deployment: dict) -> None:
    log = deployment["logs"]["untrusting"]
    assert deployment["refused"]["untrusting"] not in (0, None), log[-2000:]
    assert "CERTIFICATE_VERIFY_FAILED" in log or "certificate verify failed" in log, log[-2000:]


def test_each_round_reports_the_runs_epsilon_growing(deployment: dict) -> None:
    """One of 2 clients per round (q = 1/2), noise multiplier 1: ε after each round as the
    accountant composes it, growing every round; δ from the config."""
    lines = [json.loads(x) for x in (deployment["run"] / ROUNDS_FILE).read_text().splitlines()]
    expected = CentralPrivacy(Z, clients=2, sampled=1, delta=DELTA)
    for line in lines:
        assert line["epsilon"] == pytest.approx(expected.spend(1)["epsilon"], rel=1e-9)
        assert line["delta"] == DELTA
    epsilons = [x["epsilon"] for x in lines]
    assert all(0 < a < b for a, b in zip(epsilons, epsilons[1:], strict=False)), epsilons
    assert f"central DP: (ε, δ) = ({epsilons[-1]:.4g}, {DELTA:g}) for the run" in deployment["logs"]["run"]
