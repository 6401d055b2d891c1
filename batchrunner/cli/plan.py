"""``plan``: what a run would do with the same options (no request, no key)."""

from __future__ import annotations

import argparse
import json

from batchrunner.cli.args import (
    EXIT_OK,
    load,
    output_dir,
    plan_of,
    price_of,
)
from batchrunner.errors import UsageError
from batchrunner.manifest import Manifest


def cmd_plan(args: argparse.Namespace, manifest: Manifest | None = None) -> int:
    manifest = manifest or load(args)
    out = output_dir(args)
    if args.budget is not None and price_of(args, manifest) is None:
        raise UsageError("--budget needs a price per prediction: pass --price or set `price:` in the manifest")
    plan = plan_of(args, manifest, out)
    print(json.dumps(plan.to_json()) if args.json else plan.describe(str(out.path)))
    return EXIT_OK
