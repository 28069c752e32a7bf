"""TLS on hand-started roles: `downpour server` / `downpour worker` with --tls-cert, --tls-key, --tls-ca.

The certificates are made by the test (see ``make_pki``); a server listening
beyond loopback in plaintext must be told ``--insecure``.
"""

import subprocess

import pytest

from downpour.cli import main
from tests.integration.cli.test_by_hand import DOWNPOUR, WORKLOAD, _stop
from tests.integration.transport.test_tls import make_pki

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def pem(tmp_path_factory):
    """Paths of the test PKI's PEM files, by name (``ca``, ``server_cert``, ``client_key``, ...)."""
    pytest.importorskip("cryptography")
    return make_pki().write(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("token") / "token"
    path.write_text("a-token-for-the-tls-tests\n", encoding="utf-8")
    return path


def _start_server(token_file, *flags):
    """A `downpour server` process and the address it announced (stopped by the caller)."""
    proc = subprocess.Popen([*DOWNPOUR, "server", "--shard", "0", "--of", "1", "--token-file", str(token_file),
                             *WORKLOAD, *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if "listening on" not in line:
        _stop([proc])
        pytest.fail(f"the server did not start: {line!r} {proc.stderr.read()}")
    return proc, line.rsplit(" ", 1)[1].strip()


def _worker(address, token_file, *flags):
    """Run one `downpour worker` to its end; returns the finished process."""
    return subprocess.run([*DOWNPOUR, "worker", "--servers", address, "--rank", "0", "--of", "1", "--epochs", "0.2",
                           "--batch-size", "32", "--timeout", "3", "--token-file", str(token_file), *WORKLOAD,
                           *flags], capture_output=True, text=True, timeout=90, check=False)


def _cli_error(capsys, *argv) -> str:
    """Run the CLI in this process, expect exit status 2, return its one-line error."""
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("downpour: error: ") and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("bind", ["0.0.0.0:0", "[::]:0", "10.1.2.3:0", "myhost:0"])
def test_a_plaintext_server_beyond_loopback_refuses_to_start(capsys, token_file, bind):
    err = _cli_error(capsys, "server", "--shard", "0", "--of", "1", "--bind", bind, "--token-file", str(token_file))
    assert "plaintext" in err and "--tls-cert" in err and "--tls-key" in err and "--insecure" in err


@pytest.mark.parametrize("flags, words", [
    (["--tls-key", "{server_key}"], ["--tls-key needs --tls-cert"]),
    (["--tls-cert", "{server_cert}"], ["--tls-cert needs --tls-key"]),
    (["--tls-ca", "{ca}"], ["--tls-ca", "needs the server's own --tls-cert and --tls-key"]),
    (["--tls-cert", "{server_key}", "--tls-key", "{server_key}"],
     ["--tls-cert:", "server_key.pem", "not a PEM certificate"]),
    (["--tls-cert", "{server_cert}", "--tls-key", "{missing}"], ["--tls-key:", "missing.pem does not exist"]),
    (["--tls-cert", "{server_cert}", "--tls-key", "{server_key}", "--tls-ca", "{server_key}"],
     ["--tls-ca:", "server_key.pem", "not a PEM certificate"]),
], ids=["key-alone", "cert-alone", "ca-alone", "key-as-cert", "missing-key", "key-as-ca"])
def test_bad_server_tls_flags_name_the_flag_and_the_file(capsys, token_file, pem, flags, words):
    paths = {name: str(path) for name, path in pem.items()} | {"missing": str(pem["ca"].parent / "missing.pem")}
    err = _cli_error(capsys, "server", "--shard", "0", "--of", "1", "--token-file", str(token_file),
                     *(flag.format(**paths) for flag in flags))
    assert all(word in err for word in words), err


def test_bad_worker_tls_flags_name_the_flag_and_the_file(capsys, token_file, pem):
    worker = ["worker", "--servers", "127.0.0.1:1", "--rank", "0", "--of", "1", "--token-file", str(token_file)]
    err = _cli_error(capsys, *worker, "--tls-ca", str(pem["ca"]), "--tls-cert", str(pem["client_cert"]))
    assert "--tls-cert needs --tls-key" in err
    err = _cli_error(capsys, *worker, "--tls-ca", str(pem["ca"].parent / "nope.pem"))
    assert "--tls-ca:" in err and "nope.pem does not exist" in err


def test_an_insecure_server_beyond_loopback_starts(token_file):
    server, address = _start_server(token_file, "--bind", "0.0.0.0:0", "--insecure")
    try:
        assert address.startswith("0.0.0.0:") and server.poll() is None
    finally:
        _stop([server])
    assert server.returncode == 0


def test_a_mutual_tls_server_and_worker_train_and_strangers_are_refused(capsys, token_file, pem):
    # Bound beyond loopback, which TLS allows without --insecure; the worker dials 127.0.0.1.
    server, address = _start_server(token_file, "--bind", "0.0.0.0:0", "--tls-cert", str(pem["server_cert"]),
                                    "--tls-key", str(pem["server_key"]), "--tls-ca", str(pem["ca"]))
    address = address.replace("0.0.0.0", "127.0.0.1")
    try:
        # The refused workers run in this process: they fail before training, and save two start-ups.
        worker = ["worker", "--servers", address, "--rank", "0", "--of", "1", "--timeout", "1",
                  "--token-file", str(token_file), *WORKLOAD]
        err = _cli_error(capsys, *worker, "--tls-ca", str(pem["ca"]))
        assert "did not accept a connection" in err and "give --tls-cert and --tls-key" in err
        err = _cli_error(capsys, *worker, "--tls-ca", str(pem["ca"]), "--tls-cert", str(pem["other_cert"]),
                         "--tls-key", str(pem["other_key"]))
        assert "did not accept a connection" in err and "sign this --tls-cert" in err
        err = _cli_error(capsys, *worker)
        assert "if the servers use TLS, give --tls-ca" in err

        trusted = _worker(address, token_file, "--tls-ca", str(pem["ca"]), "--tls-cert", str(pem["client_cert"]),
                          "--tls-key", str(pem["client_key"]), "--evaluate", "--shutdown-servers")
        assert trusted.returncode == 0, trusted.stderr
        assert " steps" in trusted.stdout and "test accuracy" in trusted.stdout
        server.wait(timeout=20)  # --shutdown-servers stopped it, over mutual TLS
    finally:
        _stop([server])
    assert server.returncode == 0
