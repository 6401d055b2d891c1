"""clean-uploads: uploaded inputs deleted once no job needs them, recorded so that a later run uploads again; and
the presign asking the API to keep a file only as long as the runner reuses it."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from batchrunner.cli.main import main
from batchrunner.engine.cleanup import plan_cleanup
from batchrunner.engine.uploads import UPLOAD_TTL
from batchrunner.manifest import load_manifest
from batchrunner.sim.server import SimConfig, Simulator
from batchrunner.store.ledger import replay
from batchrunner.store.output import OutputDir
from tests.conftest import ThreadedSimulator, fast_sim, make_image, run_args, write_manifest

KEY = "test-key"


def events(out: Path, name: str) -> list[dict[str, Any]]:
    lines = (out / "ledger.jsonl").read_text(encoding="utf-8").splitlines()
    return [e for e in map(json.loads, lines) if e.get("event") == name]


def clean_args(manifest: Path, url: str, out: Path, *extra: str) -> list[str]:
    return ["clean-uploads", str(manifest), "--api-url", url, "--output", str(out), *extra]


def fetch_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:  # the simulator on loopback
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_presign_asks_for_an_image_kept_as_long_as_the_runner_reuses_it(
    tmp_path: Path, api_key: str, threaded_sim: Callable[[SimConfig], ThreadedSimulator]
) -> None:
    served = threaded_sim(fast_sim(api_key=api_key))
    manifest = write_manifest(tmp_path, 2)
    assert main(run_args(manifest, served.url, tmp_path / "out")) == 0
    bodies = served.stats()["presign_bodies"]
    assert bodies == [{"content_type": "image/png", "file_type": "image", "expires_in_seconds": int(UPLOAD_TTL)}]
    assert 60 <= UPLOAD_TTL <= 365 * 86400


def test_clean_uploads_deletes_finished_inputs_and_a_later_run_uploads_again(
    tmp_path: Path,
    api_key: str,
    threaded_sim: Callable[[SimConfig], ThreadedSimulator],
    capsys: pytest.CaptureFixture[str],
) -> None:
    served = threaded_sim(fast_sim(api_key=api_key))
    out = tmp_path / "out"
    manifest = write_manifest(tmp_path, 3)
    assert main(run_args(manifest, served.url, out)) == 0
    (uploaded,) = events(out, "uploaded")
    assert uploaded["id"]
    assert fetch_status(uploaded["public_url"]) == 200
    capsys.readouterr()

    assert main(clean_args(manifest, served.url, out)) == 0
    said = capsys.readouterr().out
    assert f"deleted in.png (file {uploaded['id']})" in said
    assert "1 deleted, 0 kept (still needed), 0 failed" in said
    assert served.stats()["deletes"] == 1
    assert fetch_status(uploaded["public_url"]) == 404
    (deleted,) = events(out, "upload_deleted")
    assert (deleted["sha256"], deleted["id"]) == (uploaded["sha256"], uploaded["id"])

    # Nothing left to delete: a second clean sends nothing.
    assert main(clean_args(manifest, served.url, out)) == 0
    assert served.stats()["deletes"] == 1

    # New jobs on the same image upload it again rather than send the deleted URL (which would fail them).
    more = write_manifest(tmp_path, 5)
    assert main(run_args(more, served.url, out)) == 0
    assert served.stats()["presigns"] == 2
    assert len(events(out, "uploaded")) == 2
    assert served.stats()["faults_injected"].get("input_error", 0) == 0


def test_an_image_unfinished_jobs_need_is_kept_and_named(
    tmp_path: Path,
    api_key: str,
    threaded_sim: Callable[[SimConfig], ThreadedSimulator],
    capsys: pytest.CaptureFixture[str],
) -> None:
    served = threaded_sim(fast_sim(api_key=api_key))
    out = tmp_path / "out"
    manifest = write_manifest(tmp_path, 3)
    assert main(run_args(manifest, served.url, out, "--max-jobs", "1")) == 75  # two jobs left pending
    capsys.readouterr()
    assert main(clean_args(manifest, served.url, out)) == 75
    said = capsys.readouterr().out
    assert "kept in.png: 2 job(s) not done yet need it" in said
    assert served.stats()["deletes"] == 0
    assert not events(out, "upload_deleted")


def test_dry_run_sends_nothing_and_needs_no_key(
    tmp_path: Path,
    api_key: str,
    threaded_sim: Callable[[SimConfig], ThreadedSimulator],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    served = threaded_sim(fast_sim(api_key=api_key))
    out = tmp_path / "out"
    manifest = write_manifest(tmp_path, 2)
    assert main(run_args(manifest, served.url, out)) == 0
    capsys.readouterr()
    monkeypatch.delenv("EACHLABS_API_KEY")
    before = served.stats()["requests"]
    assert main(clean_args(manifest, served.url, out, "--dry-run")) == 0
    said = capsys.readouterr().out
    assert "would delete in.png" in said
    assert "nothing was sent" in said
    assert served.stats()["requests"] == before
    assert not events(out, "upload_deleted")


def test_a_file_the_api_no_longer_has_is_recorded_as_deleted(
    tmp_path: Path,
    api_key: str,
    threaded_sim: Callable[[SimConfig], ThreadedSimulator],
    capsys: pytest.CaptureFixture[str],
) -> None:
    served = threaded_sim(fast_sim(api_key=api_key))
    out = tmp_path / "out"
    manifest = write_manifest(tmp_path, 1)
    assert main(run_args(manifest, served.url, out)) == 0
    served.call(served.sim._uploads.clear)  # expired, or deleted by hand
    capsys.readouterr()
    assert main(clean_args(manifest, served.url, out)) == 0
    assert "already gone" in capsys.readouterr().out
    assert len(events(out, "upload_deleted")) == 1


def test_a_running_batch_holds_the_folder(
    tmp_path: Path, api_key: str, threaded_sim: Callable[[SimConfig], ThreadedSimulator]
) -> None:
    from batchrunner.store.output import RunLock

    served = threaded_sim(fast_sim(api_key=api_key))
    out = tmp_path / "out"
    manifest = write_manifest(tmp_path, 1)
    assert main(run_args(manifest, served.url, out)) == 0
    with RunLock(OutputDir(out).lock):
        assert main(clean_args(manifest, served.url, out)) == 75
    assert served.stats()["deletes"] == 0


# --- the pure decision ----------------------------------------------------------------------------------------


def _ledger(*lines: dict[str, Any]) -> list[str]:
    return [json.dumps({"ts": "2030-01-01T00:00:00Z", **line}) for line in lines]


def test_plan_by_table(tmp_path: Path) -> None:
    make_image(tmp_path / "a.png", (10, 10, 10))
    make_image(tmp_path / "b.png", (20, 20, 20))
    (tmp_path / "m.yaml").write_text(
        "matrix:\n  input_image: [a.png, b.png]\n"
        "  prompt: [Turn the scene into a snowy winter evening]\n  seed: [1, 2]\n",
        encoding="utf-8",
    )
    manifest = load_manifest(tmp_path / "m.yaml")
    a_jobs = [j for j in manifest.jobs if j.image_path and j.image_path.name == "a.png"]
    b_jobs = [j for j in manifest.jobs if j.image_path and j.image_path.name == "b.png"]
    sha_a, sha_b = a_jobs[0].image_sha256, b_jobs[0].image_sha256
    out = OutputDir(tmp_path / "out")
    out.path.mkdir()
    (out.path / "a1.png").write_bytes(b"x")
    lines = _ledger(
        {"event": "uploaded", "sha256": sha_a, "public_url": "https://x/a", "file": "a.png", "id": "fa"},
        {"event": "uploaded", "sha256": sha_b, "public_url": "https://x/b", "file": "b.png", "id": "fb"},
        {"event": "uploaded", "sha256": "c" * 64, "public_url": "https://x/c", "file": "c.png"},  # an old ledger
        {"event": "uploaded", "sha256": "d" * 64, "public_url": "https://x/d", "file": "d.png", "id": "fd"},
        # a.png: one job done, the other failed for good
        {"event": "succeeded", "job": a_jobs[0].id, "fingerprint": a_jobs[0].fingerprint, "file": "a1.png"},
        {"event": "failed", "job": a_jobs[1].id, "fingerprint": a_jobs[1].fingerprint, "retryable": False},
        # b.png: one done, one failed but worth another attempt
        {"event": "succeeded", "job": b_jobs[0].id, "fingerprint": b_jobs[0].fingerprint, "file": "a1.png"},
        {"event": "failed", "job": b_jobs[1].id, "fingerprint": b_jobs[1].fingerprint, "retryable": True},
    )
    plan = plan_cleanup(manifest, replay(lines), out, max_attempts=3)
    actions = {v.name: (v.action, v.waiting) for v in plan.verdicts}
    assert actions == {
        "a.png": ("delete", ()),
        "b.png": ("keep", (b_jobs[1].id,)),
        "c.png": ("unknown", ()),
        "d.png": ("delete", ()),  # no job of the manifest uses it any more
    }
    # Out of attempts, the retryable failure is final too.
    assert {v.name for v in plan_cleanup(manifest, replay(lines), out, max_attempts=1).of("delete")} == {
        "a.png",
        "b.png",
        "d.png",
    }


def test_replay_forgets_only_the_upload_deleted() -> None:
    sha = "a" * 64
    first = {"event": "uploaded", "sha256": sha, "public_url": "https://x/1", "id": "f1"}
    second = {"event": "uploaded", "sha256": sha, "public_url": "https://x/2", "id": "f2"}
    deleted = {"event": "upload_deleted", "sha256": sha, "id": "f1"}
    assert sha not in replay(_ledger(first, deleted)).uploads
    assert replay(_ledger(first, second, deleted)).uploads[sha].public_url == "https://x/2"
    assert replay(_ledger(first, deleted, second)).uploads[sha].id == "f2"


# --- the simulator's DELETE ---------------------------------------------------------------------------------------


async def test_simulator_delete_removes_the_file_and_unknown_ids_404() -> None:
    sim = Simulator(fast_sim(api_key=KEY))
    await sim.start()
    headers = {"Authorization": f"Bearer {KEY}"}
    try:
        async with aiohttp.ClientSession(headers=headers) as http:
            async with http.post(f"{sim.base_url}/v1/upload/presign", json={"content_type": "image/png"}) as r:
                presigned = await r.json()
            put_headers = {"Content-Type": "image/png", **presigned["required_headers"]}
            async with http.put(presigned["presigned_url"], data=b"png", headers=put_headers) as r:
                assert r.status == 200
            async with http.get(presigned["public_url"]) as r:
                assert r.status == 200
            async with http.delete(f"{sim.base_url}/v1/files/{presigned['id']}") as r:
                assert r.status == 200
            async with http.get(presigned["public_url"]) as r:
                assert r.status == 404
            async with http.delete(f"{sim.base_url}/v1/files/{presigned['id']}") as r:
                assert r.status == 404
            async with http.delete(f"{sim.base_url}/v1/files/no-such-file") as r:
                assert r.status == 404
        assert sim.stats.deletes == 3
        assert sim.stats.presign_bodies == [{"content_type": "image/png"}]
    finally:
        await sim.stop()
