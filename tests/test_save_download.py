"""Saving a download: bytes gathered in memory within a shared budget (else streamed to the temporary file), then
written, fsynced, checked and renamed in one worker-thread call; nothing half-written left behind, whatever fails."""

from __future__ import annotations

import asyncio
import errno
import io
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from PIL import Image

from batchrunner.errors import DownloadRejected, OutputError
from batchrunner.store import output
from batchrunner.store.output import OutputDir, save_download


def png(size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (10, 200, 30)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def out(tmp_path: Path) -> OutputDir:
    folder = OutputDir(tmp_path / "out")
    folder.create()
    folder.prepare()
    return folder


def fetcher(
    body: bytes, *, chunk: int = 7, after: Callable[[int], Awaitable[None]] | None = None
) -> Callable[[output._Spool], Awaitable[int]]:
    async def fetch(sink: output._Spool) -> int:
        for start in range(0, len(body), chunk):
            sink.write(body[start : start + chunk])
            if after is not None:
                await after(start + chunk)
            await asyncio.sleep(0)
        return len(body)

    return fetch


def leftovers(out: OutputDir) -> list[str]:
    return sorted(os.listdir(out.partial))


async def test_a_small_output_is_held_in_memory_and_written_at_once(out: OutputDir) -> None:
    body = png()
    seen: list[list[str]] = []

    async def look(_: int) -> None:
        seen.append(leftovers(out))

    assert await save_download(out, "job-1", fetcher(body, after=look)) == "job-1.png"
    assert (out.path / "job-1.png").read_bytes() == body
    assert all(names == [] for names in seen)  # no temporary file while the bytes came in
    assert leftovers(out) == [] and output._Spool.spooled == 0


async def test_past_the_budget_the_rest_streams_to_the_temporary_file(
    out: OutputDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = png(64)
    monkeypatch.setattr(output, "SPOOL_BUDGET", 20)
    seen: list[list[str]] = []

    async def look(_: int) -> None:
        seen.append(leftovers(out))

    assert await save_download(out, "big", fetcher(body, chunk=16, after=look)) == "big.png"
    assert seen[0] == [] and any(names for names in seen)  # 16 bytes in memory, then on disk as they came
    assert (out.path / "big.png").read_bytes() == body
    assert leftovers(out) == [] and output._Spool.spooled == 0


async def test_downloads_at_once_share_one_budget(out: OutputDir, monkeypatch: pytest.MonkeyPatch) -> None:
    body = png()
    monkeypatch.setattr(output, "SPOOL_BUDGET", len(body) + 5)
    gate, both = asyncio.Event(), asyncio.Event()
    peaks: list[int] = []

    async def hold(_: int) -> None:
        peaks.append(output._Spool.spooled)
        if len(peaks) == 2:
            both.set()
        await gate.wait()

    tasks = [
        asyncio.create_task(save_download(out, f"j{k}", fetcher(body, chunk=len(body), after=hold))) for k in (1, 2)
    ]
    await both.wait()
    assert max(peaks) <= len(body) + 5 and len(leftovers(out)) == 1  # the second went to its file
    gate.set()
    assert sorted(await asyncio.gather(*tasks)) == ["j1.png", "j2.png"]
    assert (out.path / "j1.png").read_bytes() == (out.path / "j2.png").read_bytes() == body
    assert output._Spool.spooled == 0


@pytest.mark.parametrize("budget", [output.SPOOL_BUDGET, 4])
async def test_not_an_image_is_rejected_and_leaves_nothing(
    out: OutputDir, monkeypatch: pytest.MonkeyPatch, budget: int
) -> None:
    monkeypatch.setattr(output, "SPOOL_BUDGET", budget)
    with pytest.raises(DownloadRejected, match="not a readable image"):
        await save_download(out, "bad", fetcher(b"<html>not a picture</html>"))
    assert leftovers(out) == [] and os.listdir(out.path) == [".partial"] and output._Spool.spooled == 0


@pytest.mark.parametrize("budget", [output.SPOOL_BUDGET, 4])
async def test_a_fetch_that_fails_midway_leaves_nothing(
    out: OutputDir, monkeypatch: pytest.MonkeyPatch, budget: int
) -> None:
    monkeypatch.setattr(output, "SPOOL_BUDGET", budget)

    async def boom(done: int) -> None:
        if done > 14:
            raise ConnectionResetError("cut")

    with pytest.raises(ConnectionResetError):
        await save_download(out, "cut", fetcher(png(), after=boom))
    assert leftovers(out) == [] and output._Spool.spooled == 0


@pytest.mark.parametrize("budget", [output.SPOOL_BUDGET, 4])
async def test_a_full_disk_is_one_output_error_naming_the_file(
    out: OutputDir, monkeypatch: pytest.MonkeyPatch, budget: int
) -> None:
    monkeypatch.setattr(output, "SPOOL_BUDGET", budget)

    def full(_: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OutputError, match=r"cannot write .*\.part: no space left on device"):
        await save_download(out, "full", fetcher(png()))
    monkeypatch.undo()
    assert leftovers(out) == [] and output._Spool.spooled == 0


async def test_a_failed_rename_names_the_final_file(out: OutputDir, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: object) -> None:
        raise OSError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OutputError, match=r"cannot write .*/final\.png: permission denied"):
        await save_download(out, "final", fetcher(png()))
    monkeypatch.undo()
    assert leftovers(out) == [] and output._Spool.spooled == 0
