"""The command line's security (docs/security.md): the options every client command
shares, given before the command (``meshstore --tls-ca ca.pem --token ... list``, or
their environment variables), and ``meshstore token hash``, which turns a token into
the SHA-256 an auth file keeps.

    meshstore --tls-ca ca.pem --tls-cert me.pem --tls-key me.key approve t1
    MESHSTORE_TOKEN=... meshstore pending
    meshstore token hash < token.txt            # -> token_sha256 for the auth file
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from meshstore.cli.common import EXIT_USAGE, CliError

__all__ = ["TlsCaOpt", "TlsCertOpt", "TlsKeyOpt", "TokenOpt", "register", "use_client_security"]

token_app = typer.Typer(help="Bearer tokens: make the hash an auth file keeps.", no_args_is_help=True)


TlsCaOpt = Annotated[str | None, typer.Option(
    "--tls-ca", envvar="MESHSTORE_TLS_CA", show_envvar=True, metavar="PEM",
    help="Use TLS; the store's certificate must chain to this CA.")]
TlsCertOpt = Annotated[str | None, typer.Option(
    "--tls-cert", envvar="MESHSTORE_TLS_CERT", show_envvar=True, metavar="PEM",
    help="This client's certificate, for stores that require mutual TLS (with --tls-key).")]
TlsKeyOpt = Annotated[str | None, typer.Option(
    "--tls-key", envvar="MESHSTORE_TLS_KEY", show_envvar=True, metavar="PEM", help="The key of --tls-cert.")]
TokenOpt = Annotated[str | None, typer.Option(
    "--token", envvar="MESHSTORE_TOKEN", show_envvar=True, metavar="TOKEN",
    help="Bearer token to present (better from MESHSTORE_TOKEN: a command line is visible to "
         "other users). Without TLS it is only sent to a store on this machine.")]


def use_client_security(tls_ca: str | None, tls_cert: str | None, tls_key: str | None, token: str | None) -> None:
    """Makes the ``meshstore`` options how every command dials a store (the process's
    ``meshstore.grpc.client.use_security``). A file that cannot be read: exit 2."""
    # grpc's C core prints a failed TLS handshake as several lines on stderr; a command
    # reports its failures as one line of its own (set before grpc is first imported).
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    from meshstore.grpc.client import ClientSecurity, use_security

    try:
        use_security(ClientSecurity.load(tls_ca, tls_cert, tls_key, token))
    except ValueError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None


@token_app.command("hash")
def hash_cmd() -> None:
    """Read a token from stdin (first line) and print its SHA-256, the auth file's
    token_sha256. The token itself is never printed."""
    from meshstore.security import hash_token

    if sys.stdin.isatty():
        import getpass

        token = getpass.getpass("token: ")
    else:
        token = sys.stdin.readline()
    if not token.strip():
        raise CliError("no token given on stdin", EXIT_USAGE)
    print(hash_token(token))


def register(app: typer.Typer) -> None:
    """Adds ``token`` to ``app`` (the options are ``meshstore``'s own: see cli/__init__)."""
    app.add_typer(token_app, name="token")
