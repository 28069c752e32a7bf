"""``downpour server`` / ``downpour worker`` / ``downpour token``: roles started by hand on hosts of your own.

Every role of a run must agree on the dataset, model and seed (they fix the
parameter count and the initial values) and share the run's token.

Connections are plaintext unless TLS is given: a server with ``--tls-cert``
and ``--tls-key`` serves TLS, and with ``--tls-ca`` too it demands client
certificates that CA signed (mutual TLS); a worker with ``--tls-ca`` trusts
that CA for the servers and presents ``--tls-cert``/``--tls-key`` when given.
The token is checked either way. A server refuses to listen beyond loopback
in plaintext unless told ``--insecure``.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import secrets
import sys
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from downpour.cli import (
    add_option_flags,
    add_strategy_flags,
    refuse_other_strategies,
    strategy_options,
)

if TYPE_CHECKING:
    from downpour.flat import ShardRange
    from downpour.transport import Security
    from downpour.transport.security import PemKind

TOKEN_ENV = "DOWNPOUR_TOKEN"
# The strategy options a hand-started worker uses (the rest live on the servers' own flags).
WORKER_OPTIONS = {"downpour": ("fetch_every", "push_every", "compress"),
                  "sync": ("backup", "compress")}


def _token(args: argparse.Namespace) -> str:
    if args.token:
        return args.token
    if args.token_file:
        path = Path(args.token_file)
        if not path.is_file():
            raise FileNotFoundError(f"token file {path} does not exist")
        token = path.read_text(encoding="utf-8").strip()
        if not token:
            raise ValueError(f"token file {path} is empty")
        return token
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV]
    raise ValueError(f"no token: give --token, --token-file or ${TOKEN_ENV} (make one with `downpour token`)")


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT with a port in 0..65535, got {text!r}")
    return host.strip("[]"), int(port)


def _is_loopback(host: str) -> bool:
    """Whether a bind host is this machine alone: 127.0.0.0/8, ::1 or localhost (not 0.0.0.0 or ::)."""
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # any other name may resolve to an address others can reach
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def _pem(flag: str, path: str | None, kind: PemKind) -> bytes | None:
    """The PEM file given to ``flag``, checked; errors name the flag and the file."""
    from downpour.transport.security import read_pem

    return read_pem(path, kind, flag)


def _pair(args: argparse.Namespace, whose: str) -> tuple[bytes | None, bytes | None]:
    """``--tls-cert`` and ``--tls-key``, read; one without the other is an error."""
    if (args.tls_cert is None) != (args.tls_key is None):
        given, missing = ("--tls-cert", "--tls-key") if args.tls_key is None else ("--tls-key", "--tls-cert")
        raise ValueError(f"{given} needs {missing}: {whose} certificate and its private key go together")
    return _pem("--tls-cert", args.tls_cert, "certificate"), _pem("--tls-key", args.tls_key, "private key")


def _server_security(args: argparse.Namespace) -> Security | None:
    """TLS from the server's flags (mutual with ``--tls-ca``), or None for plaintext."""
    from downpour.transport import Security

    if args.tls_cert is None and args.tls_key is None and args.tls_ca is None:
        return None
    if args.tls_cert is None and args.tls_key is None:
        raise ValueError("--tls-ca (the CA of the workers' certificates, for mutual TLS) "
                         "needs the server's own --tls-cert and --tls-key")
    chain, key = _pair(args, "the server's")
    ca = _pem("--tls-ca", args.tls_ca, "certificate")
    return Security.with_tls(certificate_chain=chain, private_key=key, root_certificates=ca,
                             require_client_auth=ca is not None)


def _worker_security(args: argparse.Namespace) -> Security | None:
    """TLS from the worker's flags (a client certificate with ``--tls-cert``), or None for plaintext."""
    from downpour.transport import Security

    if args.tls_cert is None and args.tls_key is None and args.tls_ca is None:
        return None
    chain, key = _pair(args, "the worker's")
    return Security.with_tls(root_certificates=_pem("--tls-ca", args.tls_ca, "certificate"),
                             certificate_chain=chain, private_key=key)


def _refuse_plaintext_beyond_loopback(args: argparse.Namespace, host: str, security: Security | None) -> None:
    """The token would travel in the clear beyond this host: only with ``--insecure``."""
    if security is None and not args.insecure and not _is_loopback(host):
        raise ValueError(
            f"refusing to serve {args.bind} in plaintext: the token and the parameters would cross the network "
            "unencrypted; give --tls-cert and --tls-key (and --tls-ca to demand client certificates), "
            "or --insecure on a network you trust"
        )


def _wait_for_servers(addresses: list[str], ranges: list[ShardRange], token: str, security: Security | None,
                      timeout: float) -> None:
    """Wait until every server accepts this worker's connection; on timeout, say what TLS may be missing."""
    from downpour.errors import PeerTimeout, TransportError
    from downpour.transport import ParameterClient

    with ParameterClient(addresses, ranges, token, security=security, timeout=timeout) as client:
        try:
            client.wait_ready(timeout=timeout)
        except PeerTimeout as error:
            # A failed TLS handshake looks like a server that never answers; say what to check.
            if security is None:
                hint = ("if the servers use TLS, give --tls-ca (and --tls-cert and --tls-key if they demand "
                        "client certificates)")
            elif security.certificate_chain is None:
                hint = ("is it up? with TLS: did the CA in --tls-ca sign its certificate, and does it demand "
                        "a client certificate (then give --tls-cert and --tls-key)?")
            else:
                hint = ("is it up? with TLS: did the CA in --tls-ca sign its certificate, and did the CA in "
                        "its --tls-ca sign this --tls-cert?")
            raise TransportError(f"{error}; {hint}") from None


# The run options every hand-started role takes, from RunConfig with their defaults there, so that
# a run started by hand trains as one `downpour train` starts; a worker also takes its length.
ROLE_OPTIONS = ("dataset", "data_dir", "data_path", "test_path", "model", "l2", "bias_lr", "seed",
                "optimizer", "lr")
WORKER_LENGTH = ("batch_size", "epochs")


def _workload(args: argparse.Namespace, strategy: Any, **counts: int):
    """The job every role of a hand-started run rebuilds identically from the same flags."""
    from downpour import models
    from downpour.run import RunConfig

    given = {name: getattr(args, name) for name in (*ROLE_OPTIONS, *WORKER_LENGTH)
             if hasattr(args, name)}
    config = RunConfig.of(strategy=strategy, **counts, **given)
    data = config.data.load()
    name = config.model.name
    factory = partial(models.build, name, data.input_shape, data.num_classes,
                      **config.model.options())
    return config.job(model=factory, loss=models.default_loss(name), data=data)


def _common(p: argparse.ArgumentParser) -> None:
    add_option_flags(p, ROLE_OPTIONS, defaults=True)
    p.add_argument("--token", help=f"the run's token (or --token-file, or ${TOKEN_ENV})")
    p.add_argument("--token-file", help="file holding the run's token")
    p.add_argument("--events", help="append this role's events to this JSON-lines file")


def _sinks(args: argparse.Namespace) -> list[Any]:
    from downpour.metrics import JsonlSink

    return [JsonlSink(args.events, flush_every=1)] if args.events else []


def _server(args: argparse.Namespace) -> int:
    from downpour.cluster.role import StandaloneContext
    from downpour.flat import FlatParams, shard_ranges
    from downpour.server import ApplyAtOnce, BoundedStaleness, Synchronous
    from downpour.server.role import ServerRole

    token = _token(args)
    host, port = _address(args.bind)
    security = _server_security(args)
    _refuse_plaintext_beyond_loopback(args, host, security)
    from downpour import strategies

    job = _workload(args, strategies.get("sync" if args.policy == "sync" else "downpour"),
                    servers=args.of)
    flat = FlatParams(job.build_model())
    if not 0 <= args.shard < args.of:
        raise ValueError(f"--shard must be in [0, {args.of - 1}] for --of {args.of}, got {args.shard}")
    shard = shard_ranges(flat.numel, args.of)[args.shard]
    if args.policy == "sync":
        policy = Synchronous(num_required=args.num_required or 1, late=args.late)
    elif args.max_staleness is not None:
        policy = BoundedStaleness(max_staleness=args.max_staleness, scale_lr_by_staleness=args.scale_lr)
    else:
        policy = ApplyAtOnce(scale_lr_by_staleness=args.scale_lr)
    role = ServerRole(rank=args.shard, shard=shard, initial=flat.params[shard.start : shard.stop].clone(),
                      optimizer=job.optimizer, policy=policy, token=token, host=host, port=port,
                      ema_decay=args.ema_decay, security=security, threads=args.threads)

    def announce(key: str, value: Any) -> None:
        if key == "address":
            print(f"shard {args.shard}/{args.of} [{shard.start}, {shard.stop}) listening on {value}", flush=True)

    role.run(StandaloneContext.standalone("server", args.shard, _sinks(args), announce))
    return 0


def _worker(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from downpour import strategies
    from downpour.cluster.role import StandaloneContext
    from downpour.flat import FlatParams, shard_ranges
    from downpour.metrics import evaluate
    from downpour.strategies.downpour import DownpourWorker
    from downpour.strategies.sync import SyncWorker
    from downpour.transport import ParameterClient

    token = _token(args)
    security = _worker_security(args)
    addresses = [a.strip() for a in args.servers.split(",") if a.strip()]
    for address in addresses:
        _address(address)
    if not 0 <= args.rank < args.of:
        raise ValueError(f"--rank must be in [0, {args.of - 1}] for --of {args.of}, got {args.rank}")
    given = strategy_options(vars(args))
    refuse_other_strategies(given, args, [args.strategy], f"but --strategy is {args.strategy!r}")
    # The strategy's config checks the options: a bad compress spec fails before anything connects.
    config = strategies.get(args.strategy, **given.get(args.strategy, {}))
    job = _workload(args, config, workers=args.of)
    model = job.build_model()
    flat = FlatParams(model)
    ranges = shard_ranges(flat.numel, len(addresses))
    mine = replace(job, data=job.data.shard(args.rank, args.of, seed=job.seed).train_only())
    _wait_for_servers(addresses, ranges, token, security, args.timeout)
    common: dict[str, Any] = {"rank": args.rank, "num_workers": args.of, "job": mine,
                              "addresses": addresses, "ranges": ranges, "token": token,
                              "security": security, "timeout": args.timeout,
                              "compress": config.compress}
    if args.strategy == "sync":
        required = args.of - config.backup
        worker = SyncWorker(total_steps=job.total_steps(job.data.num_train // required), **common)
    else:
        worker = DownpourWorker(total_steps=job.total_steps(mine.data.num_train),
                                fetch_every=config.fetch_every, push_every=config.push_every,
                                **common)
    worker.run(StandaloneContext.standalone("worker", args.rank, _sinks(args)))
    print(f"worker {args.rank}/{args.of}: {worker.steps} steps, {worker.samples} samples, "
          f"{worker.client.bytes_sent} bytes sent, {worker.client.bytes_received} received", flush=True)
    if args.evaluate or args.shutdown_servers:
        with ParameterClient(addresses, ranges, token, security=security, timeout=args.timeout) as client:
            if args.evaluate:
                client.pull_all(out=flat.params)
                result = evaluate(model, job.loss, job.data.x_test, job.data.y_test)
                print(f"test accuracy {result['eval/accuracy']:.4f} loss {result['eval/loss']:.4f}", flush=True)
            if args.shutdown_servers:
                client.shutdown_all(reason=f"worker {args.rank} is done")
    return 0


def _new_token(args: argparse.Namespace) -> int:
    token = secrets.token_urlsafe(32)
    if args.file:
        path = Path(args.file)
        path.write_text(token + "\n", encoding="utf-8")
        path.chmod(0o600)
    else:
        sys.stdout.write(token + "\n")
    return 0


def add_role_commands(sub) -> None:
    server = sub.add_parser("server", help="run one parameter-server shard by hand",
                            description="Serve shard i of S of the parameter vector over gRPC until stopped "
                                        "(Ctrl-C, SIGTERM, or a worker's --shutdown-servers).")
    server.add_argument("--shard", type=int, required=True, help="this shard's index i")
    server.add_argument("--of", type=int, required=True, help="number of shards S")
    server.add_argument("--bind", default="127.0.0.1:0", metavar="HOST:PORT",
                        help="address to listen on (default 127.0.0.1:0, a free port)")
    server.add_argument("--policy", choices=("async", "sync"), default="async",
                        help="apply pushes at once (Downpour) or in synchronous rounds (default async)")
    server.add_argument("--num-required", type=int, help="sync: gradients per round, N of N+b")
    server.add_argument("--late", choices=("drop", "fold"), default="drop", help="sync: late gradients")
    server.add_argument("--max-staleness", type=int, help="async: refuse pushes staler than this")
    server.add_argument("--scale-lr", action="store_true", help="async: divide the lr by the staleness")
    server.add_argument("--ema-decay", type=float, help="keep a moving average of the parameters")
    server.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    server.add_argument("--tls-cert", metavar="PEM", help="serve TLS with this certificate chain (needs --tls-key)")
    server.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert (unencrypted)")
    server.add_argument("--tls-ca", metavar="PEM",
                        help="mutual TLS: refuse workers without a certificate this CA signed")
    server.add_argument("--insecure", action="store_true",
                        help="allow plaintext on an address beyond loopback (a network you trust)")
    _common(server)
    server.set_defaults(func=_server)

    worker = sub.add_parser("worker", help="run one worker by hand against running servers",
                            description="Train on this worker's shard of the data against parameter servers.")
    worker.add_argument("--servers", required=True, metavar="ADDR,...", help="the shards' HOST:PORT, in order")
    worker.add_argument("--rank", type=int, required=True, help="this worker's rank r")
    worker.add_argument("--of", type=int, required=True, help="number of workers W")
    worker.add_argument("--strategy", choices=tuple(WORKER_OPTIONS), default="downpour",
                        help="downpour (servers with --policy async) or sync (default downpour)")
    add_option_flags(worker, WORKER_LENGTH, defaults=True)
    worker.add_argument("--timeout", type=float, default=60.0, help="seconds any server may take to answer")
    worker.add_argument("--evaluate", action="store_true", help="print test accuracy of the served model at the end")
    worker.add_argument("--shutdown-servers", action="store_true", help="stop the servers at the end")
    worker.add_argument("--tls-ca", metavar="PEM",
                        help="use TLS, trusting servers whose certificates this CA signed (else the system's CAs)")
    worker.add_argument("--tls-cert", metavar="PEM",
                        help="use TLS and present this client certificate chain (mutual TLS; needs --tls-key)")
    worker.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert (unencrypted)")
    _common(worker)
    add_strategy_flags(worker, only=WORKER_OPTIONS)
    worker.set_defaults(func=_worker)

    token = sub.add_parser("token", help="print (or write) a new random run token")
    token.add_argument("--file", help="write it to this file (mode 600) instead")
    token.set_defaults(func=_new_token)
