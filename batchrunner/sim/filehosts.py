"""The simulator's storage side: presign and delete on the API host; the presigned upload PUT, the public files and
the output images on the other hosts (no key, outside the window). The upload rules themselves are ``files.py``.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Mapping
from typing import Any, Final

from aiohttp import web
from PIL import Image

from batchrunner.sim.files import (
    UPLOAD_URL_LIFETIME,
    Upload,
    file_id,
    missing_file,
    retention_seconds,
    s3_error,
    upload_refusal,
)
from batchrunner.sim.gateway import Answer, Gateway, drop, json_answer
from batchrunner.sim.images import decode_data_uri, decode_image, render_output, synthetic_image
from batchrunner.sim.listing import format_time
from batchrunner.sim.state import Prediction

__all__ = ["MAX_UPLOAD_BYTES", "FileHosts"]

MAX_UPLOAD_BYTES: Final = 100 * 1024 * 1024
_INPUT_CACHE_SIZE: Final = 64


def xml_error(status: int, code: str, message: str, resource: str = "") -> web.Response:
    return web.Response(status=status, text=s3_error(code, message, resource), content_type="application/xml")


def _too_large(resource: str) -> web.Response:
    return xml_error(413, "EntityTooLarge", "Your proposed upload exceeds the maximum allowed size", resource)


class FileHosts(Gateway):
    """Routes of the stored files: presign, delete, the upload PUT, public files, output images."""

    def _own_file_id(self, ref: Any) -> str | None:
        """The upload id when ``ref`` is a ``/files/{id}`` URL of this server."""
        return file_id(ref, {self._host, "127.0.0.1", "localhost", "::1"}, self._port)

    def _missing_upload(self, ref: Any, now: float) -> str | None:
        upload_id = self._own_file_id(ref)
        if upload_id is None:
            return None
        return missing_file(self._uploads.get(upload_id), ref, now)

    async def _presign(self, request: web.Request) -> Answer:
        try:
            body = await request.json()
        except ValueError:
            return Answer(400, {"error": "Request body is not valid JSON"})
        if not isinstance(body, dict):
            return Answer(400, {"error": "Request body must be a JSON object"})
        content_type = body.get("content_type")
        if not isinstance(content_type, str) or not content_type.strip():
            return Answer(400, {"error": "content_type is required"})
        if body.get("file_type") is not None and not isinstance(body["file_type"], str):
            return Answer(400, {"error": "file_type must be a string"})
        self.stats.presign_bodies.append(dict(body))
        retention = retention_seconds(body.get("expires_in_seconds"))
        if retention is None:
            return Answer(400, {"error": "expires_in_seconds must be a number of seconds"})
        self.stats.presigns += 1
        upload_id = self._new_id()
        now = self._clock()
        empty = self._inject("presign_empty_headers", self.config.faults.presign_empty_headers)
        required = {} if empty else {"x-amz-meta-file-id": upload_id}
        self._uploads[upload_id] = Upload(content_type, required, now + UPLOAD_URL_LIFETIME, now + retention)
        return Answer(
            200,
            {
                "id": upload_id,
                "presigned_url": f"{self.base_url}/_upload/{upload_id}",
                "public_url": f"{self.base_url}/files/{upload_id}",
                "expires_at": format_time(self.wall_time(now + retention)),
                "required_headers": dict(required),
            },
        )

    async def _delete_file(self, request: web.Request) -> Answer:
        self.stats.deletes += 1
        upload_id = request.match_info["id"]
        if self._uploads.pop(upload_id, None) is None:
            return Answer(404, {"error": "File not found"})
        return Answer(200, {"status": "success", "message": "File deleted", "id": upload_id})

    async def _upload(self, request: web.Request) -> web.StreamResponse:
        resource = request.path
        upload = self._uploads.get(request.match_info["id"])
        if upload is None:
            # A URL this server never signed: S3 refuses it rather than saying it does not exist.
            return xml_error(403, "AccessDenied", "Access Denied", resource)
        refusal = upload_refusal(request.headers, upload, self._clock())
        if refusal is not None:
            return xml_error(403, *refusal, resource)
        if (request.content_length or 0) > MAX_UPLOAD_BYTES:
            return _too_large(resource)
        if self._inject("upload_reset", self.config.faults.upload_reset):
            # Read part of the body, then drop the connection: the upload never completes.
            await request.content.read(16)
            return drop(request)
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.content.iter_chunked(1 << 16):
            size += len(chunk)
            if size > MAX_UPLOAD_BYTES:
                return xml_error(
                    413, "EntityTooLarge", "Your proposed upload exceeds the maximum allowed size", resource
                )
            chunks.append(chunk)
        upload.data = b"".join(chunks)
        self.stats.uploads += 1
        etag = hashlib.md5(upload.data, usedforsecurity=False).hexdigest()
        # S3 answers a PUT with an empty 200 and an ETag.
        return web.Response(status=200, headers={"ETag": f'"{etag}"'})

    async def _file(self, request: web.Request) -> web.StreamResponse:
        upload = self._uploads.get(request.match_info["id"])
        if upload is None or upload.data is None or self._clock() > upload.retained_until:
            return json_answer({"error": "File not found"}, 404)
        return web.Response(body=upload.data, headers={"Content-Type": upload.content_type})

    async def _output(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        prediction = self._predictions.get(name.removesuffix(".png")) if name.endswith(".png") else None
        now = self._clock()
        if prediction is None or prediction.status(now) != "success":
            return json_answer({"error": "Not found"}, 404)
        if now < prediction.finish_at + self.config.faults.download_404_seconds:
            self.stats.faults_injected["download_404"] = self.stats.faults_injected.get("download_404", 0) + 1
            return json_answer({"error": "Not found"}, 404)
        data = await self._output_bytes(prediction)
        self.stats.downloads += 1
        if self._inject("truncated_download", self.config.faults.truncated_download):
            response = web.StreamResponse(status=200, headers={"Content-Type": "image/png"})
            response.content_length = len(data)
            await response.prepare(request)
            await response.write(data[: len(data) // 2])
            drop(request)
            return response
        return web.Response(body=data, content_type="image/png")

    async def _output_bytes(self, prediction: Prediction) -> bytes:
        cached = self._outputs.get(prediction.id)
        if cached is not None:
            return cached
        pending = self._rendering.get(prediction.id)
        if pending is None:
            loop = asyncio.get_running_loop()
            # Rendering takes ms: one worker thread keeps it off the loop and serialises PIL's font use.
            pending = loop.run_in_executor(self._executor, self._render, prediction.input)
            self._rendering[prediction.id] = pending
        try:
            data = await asyncio.shield(pending)
        finally:
            self._rendering.pop(prediction.id, None)
        self._outputs[prediction.id] = data
        return data

    def _render(self, inputs: Mapping[str, Any]) -> bytes:
        source, ratio = self._source(inputs)
        return render_output(source, ratio, inputs, self.config.image_size)

    def _source(self, inputs: Mapping[str, Any]) -> tuple[Image.Image, float]:
        """The decoded input image (cached by content), or a synthetic one seeded by what names it."""
        longest = self.config.image_size
        ref = inputs.get("input_image")
        if not isinstance(ref, str) or not ref:
            return synthetic_image(f"prompt:{inputs.get('prompt', '')}", longest)
        data: bytes | None = None
        upload_id = self._own_file_id(ref)
        if upload_id is not None and upload_id in self._uploads:
            data = self._uploads[upload_id].data
        elif ref.startswith("data:"):
            try:
                data = decode_data_uri(ref)
            except ValueError:
                data = None
        if data is None:
            # No network: an external URL becomes a picture seeded by the URL.
            return synthetic_image(ref, longest)
        key = hashlib.sha256(data).hexdigest()
        found = self._inputs.get(key)
        if found is None:
            try:
                found = decode_image(data, longest)
            except Exception:  # any undecodable input still yields a picture, as documented above
                found = synthetic_image(key, longest)
            self._inputs[key] = found
            if len(self._inputs) > _INPUT_CACHE_SIZE:
                self._inputs.popitem(last=False)
        return found
