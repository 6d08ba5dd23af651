"""``tyr store serve``: the embedded SeaweedFS in the foreground, with the environment that points tyr at it."""

from __future__ import annotations

import argparse
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING

from tyr_core.errors import StoreError

from .common import EPILOG, add_command, err_console, positive_int, print_json, refusing, signals_as_interrupt

if TYPE_CHECKING:
    from tyr_runtime.seaweed import EmbeddedSeaweed


def cmd_store_serve(args: argparse.Namespace) -> int:
    from tyr_runtime.seaweed import EmbeddedSeaweed

    with refusing():
        server = EmbeddedSeaweed(Path(args.dir) if args.dir else None, args.port).start()
    with server, signals_as_interrupt(signal.SIGINT):  # Ctrl-C works even where a script's shell ignored SIGINT
        announce_server(server, args.json)
        try:
            while server.running():  # also a server that another command started and shares with us
                time.sleep(0.5)
        except KeyboardInterrupt:
            err_console.print(
                "leaving the embedded SeaweedFS to its other users"
                if server.joined
                else "stopping the embedded SeaweedFS"
            )
            return 0
        code = server.proc.poll() if server.proc is not None else None
    raise StoreError(f"the embedded SeaweedFS exited by itself (status {code}); its log is {server.log}")


def announce_server(server: EmbeddedSeaweed, as_json: bool) -> None:
    info = {
        "endpoint_url": server.endpoint_url,
        "store_url": server.store_url,
        "data_dir": str(server.data_dir),
        "credentials_file": str(server.credentials_file),
        "env": {"TYR_STORE_URL": server.store_url, "TYR_S3_ENDPOINT_URL": server.endpoint_url},
    }
    if as_json:
        print_json(info)
        return
    print(
        f"SeaweedFS S3 at {server.endpoint_url} (bucket {server.store_url}, data in {server.data_dir}).\n"
        "tyr commands with the same TYR_CACHE use it as they are. Elsewhere, in another shell:\n"
        f"  export TYR_STORE_URL={server.store_url} TYR_S3_ENDPOINT_URL={server.endpoint_url}\n"
        f"  export AWS_ACCESS_KEY_ID=$(jq -r .access_key {server.credentials_file})\n"
        f"  export AWS_SECRET_ACCESS_KEY=$(jq -r .secret_key {server.credentials_file})\n"
        "(the server requires that key pair; its file is readable by you only, and the secret is never printed)\n"
        "Ctrl-C stops it.",
        flush=True,
    )


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "store",
        help="the embedded S3 store",
        description="The embedded S3 store (SeaweedFS).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    store = p.add_subparsers(title="commands", metavar="{serve}", required=True)
    serve = add_command(
        store,
        "serve",
        cmd_store_serve,
        "run the embedded SeaweedFS in the foreground (Ctrl-C stops it)",
        "Run the embedded SeaweedFS on loopback until Ctrl-C, and print the environment that points tyr at it.",
    )
    serve.add_argument("--dir", help="data folder (default: ~/.cache/tyr/seaweedfs)")
    serve.add_argument("--port", type=positive_int, help="S3 port (default: a free one, the previous one if free)")
    serve.add_argument("--json", action="store_true", help="print the endpoint as JSON")
