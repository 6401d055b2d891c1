"""``validate``: every check a run makes before spending, each problem named, not only the first.

A run stops at the first problem (it must spend nothing); ``validate`` is for fixing a manifest, so it goes on and
names them all, up to ``limit``: the manifest's fields and jobs (``load_manifest(collect=...)``), each local image,
each input URL's host, and every output name that would land on a paid image or an input.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os

from batchrunner.api.client import DEFAULT_API_URL
from batchrunner.cli.args import load, output_dir
from batchrunner.cli.plan import cmd_plan
from batchrunner.engine.runner import check_input_urls
from batchrunner.errors import ManifestError, Problems, UsageError
from batchrunner.manifest import Job, Manifest
from batchrunner.manifest.images import check_url_hosts, local_images, url_inputs
from batchrunner.store.filenames import output_conflicts
from batchrunner.store.ledger import LedgerState, read_ledger
from batchrunner.store.output import OutputDir

__all__ = ["MAX_PROBLEMS", "check_all", "cmd_validate"]

MAX_PROBLEMS = 20


def check_all(
    manifest: Manifest, out: OutputDir, state: LedgerState, api_url: str, *, limit: int = MAX_PROBLEMS
) -> int:
    """Run every check of a parsed manifest; raise ``Problems`` naming each one found (up to ``limit``).

    Returns the number of distinct local images checked."""
    problems: list[UsageError] = []
    images = 0
    by_image: dict[str, list[Job]] = {}
    for job in manifest.jobs:
        if job.image_sha256 is not None:
            by_image.setdefault(job.image_sha256, []).append(job)
    for jobs in by_image.values():
        images += 1
        try:
            local_images(dataclasses.replace(manifest, jobs=tuple(jobs)))
        except UsageError as exc:
            problems.append(exc)
    by_id = {job.id: job for job in manifest.jobs}
    for users in url_inputs(manifest).values():
        try:
            check_url_hosts(dataclasses.replace(manifest, jobs=(by_id[users[0]],)), api_url)
        except UsageError as exc:
            problems.append(exc)
    for conflict in output_conflicts(manifest.jobs, state, out.path, has_file=out.has_file):
        problems.append(
            ManifestError(conflict.message, file=manifest.path, job=conflict.job, field="id", line=conflict.line)
        )
    if problems:
        raise Problems(problems[:limit], more=len(problems) > limit)
    return images


def cmd_validate(args: argparse.Namespace) -> int:
    manifest = load(args, collect=MAX_PROBLEMS)
    out = output_dir(args)
    api_url = args.api_url or os.environ.get("EACHLABS_API_URL") or DEFAULT_API_URL
    images = check_all(manifest, out, read_ledger(out.ledger), api_url)
    if args.check_urls:
        asyncio.run(check_input_urls(manifest))
    what = f"OK: {len(manifest.jobs)} jobs, {images} local images checked"
    if not args.json:
        print(what + (", input URLs answer" if args.check_urls else ""))
    return cmd_plan(args, manifest)
