"""``simulate``: serve the built-in simulator of the API until Ctrl-C."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys

from batchrunner.cli.args import (
    EXIT_OK,
)
from batchrunner.cli.options import sim_config
from batchrunner.errors import UsageError
from batchrunner.sim.server import serve_forever
from batchrunner.store.output import describe_os_error


def cmd_simulate(args: argparse.Namespace) -> int:
    config = sim_config(args)

    def ready(url: str) -> None:
        print(f"simulator listening on {url} (Ctrl-C to stop)", file=sys.stderr, flush=True)

    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve_forever(config, args.host, args.port, ready=ready))
    except OSError as exc:  # a busy port, a host that is not this machine's, a privileged port
        # asyncio words a bind error at length, address included: the errno says it in the usual words.
        reason = os.strerror(exc.errno) if isinstance(exc.errno, int) and exc.errno > 0 else describe_os_error(exc)
        raise UsageError(f"cannot listen on {args.host}:{args.port}: {reason}") from None
    return EXIT_OK
