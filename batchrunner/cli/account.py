"""``account``: the runs now sharing the key's limits, from the limits store."""

from __future__ import annotations

import argparse
import asyncio
import json
import os

from batchrunner.api.client import DEFAULT_API_URL
from batchrunner.cli.args import (
    EXIT_OK,
    limits_store,
    read_api_key,
)
from batchrunner.errors import UsageError
from batchrunner.views.account import account_report, describe_account


def cmd_account(args: argparse.Namespace) -> int:
    spec = limits_store(args)
    if spec == "local":
        raise UsageError("--limits-store local keeps no account: each run has its own limits")
    key = read_api_key(False)
    api_url = args.api_url or os.environ.get("EACHLABS_API_URL") or DEFAULT_API_URL
    report = asyncio.run(account_report(spec, api_url=api_url, api_key=key))
    print(json.dumps(report) if args.json else describe_account(report))
    return EXIT_OK
