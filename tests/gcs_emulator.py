"""A tiny offline emulator of the public Google Cloud Storage endpoints.

Stdlib only (``http.server`` + ``threading``) plus ``google_crc32c`` for the
listing's ``crc32c`` field.  It serves a local folder whose relative file paths
are the bucket's object names, e.g. ``root/DQN_400/Breakout/1/checkpoints/ckpt.5``
is object ``DQN_400/Breakout/1/checkpoints/ckpt.5``.

Endpoints (the ones ``teacher_utils`` uses):

- ``GET /storage/v1/b/<bucket>/o?prefix=<p>[&pageToken=<t>]`` -- JSON listing,
  ``page_size`` items per page (default 2, so pagination is always exercised),
  ``items`` omitted when empty, ``size`` a string, ``md5Hash``/``crc32c`` base64.
- ``GET /<bucket>/<percent-encoded object name>`` -- the object's bytes;
  ``Range: bytes=<start>-`` and ``bytes=<start>-<end>`` answer 206 with
  ``Content-Range``; a missing object answers 404 with a JSON error.

Fault injection, per object name (set by the test before downloading):

- ``cut_after[name] = n`` -- the first GET of ``name`` sends its headers (full
  ``Content-Length``), ``n`` bytes of body, then closes the connection.  Later
  GETs succeed.
- ``corrupt_listing_md5[name] = True`` (or a base64 string to report) -- the
  listing reports a wrong ``md5Hash``; the object itself is served correctly.
- ``hide_object[name] = True`` -- listed, but GET answers 404.

Every request is recorded in ``requests`` (a list of :class:`Request`).

Usage::

    with GcsEmulator(root_dir, bucket="rl_checkpoints") as emu:
        download(..., base_url=emu.base_url)
        assert emu.object_gets(name)[-1].range == "bytes=1000-"
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import http.server
import json
import os
import re
import socket
import threading
import urllib.parse
from pathlib import Path
from typing import Any

import google_crc32c


@dataclasses.dataclass(frozen=True)
class Request:
    """One request the emulator answered."""

    method: str
    path: str  # raw request path as sent, query included (e.g. "/rl_checkpoints/a/%24store%24_x")
    range: str | None  # the Range header, if any
    kind: str  # "list", "object" or "other"
    object_name: str | None  # decoded object name for object requests / prefix for listings
    status: int = 0  # HTTP status answered


def _md5_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def _crc32c_b64(data: bytes) -> str:
    return base64.b64encode(google_crc32c.value(data).to_bytes(4, "big")).decode()


class GcsEmulator:
    """Serve ``root_dir`` as GCS bucket ``bucket`` on ``http://127.0.0.1:<free port>``."""

    def __init__(self, root_dir: str | os.PathLike, bucket: str = "rl_checkpoints", page_size: int = 2):
        self.root = Path(root_dir)
        self.bucket = bucket
        self.page_size = page_size
        self.cut_after: dict[str, int] = {}
        self.corrupt_listing_md5: dict[str, Any] = {}
        self.hide_object: dict[str, Any] = {}
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ life cycle
    def start(self) -> "GcsEmulator":
        emu = self

        class Handler(_Handler):
            emulator = emu

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="gcs-emulator", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> "GcsEmulator":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "emulator not started"
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ------------------------------------------------------------------ helpers for tests
    def object_names(self, prefix: str = "") -> list[str]:
        """Every object name under ``prefix``, in GCS (lexicographic) order."""
        names = []
        if self.root.is_dir():
            for p in self.root.rglob("*"):
                if p.is_file():
                    names.append(p.relative_to(self.root).as_posix())
        return sorted(n for n in names if n.startswith(prefix))

    def object_url(self, name: str) -> str:
        return f"{self.base_url}/{self.bucket}/{urllib.parse.quote(name, safe='/')}"

    def metadata(self, name: str) -> dict[str, Any]:
        """The listing entry for ``name`` (honouring ``corrupt_listing_md5``)."""
        data = (self.root / name).read_bytes()
        md5 = _md5_b64(data)
        if name in self.corrupt_listing_md5:
            fake = self.corrupt_listing_md5[name]
            md5 = fake if isinstance(fake, str) else _md5_b64(b"corrupted:" + data)
        quoted = urllib.parse.quote(name, safe="")
        return {
            "kind": "storage#object",
            "id": f"{self.bucket}/{name}/1",
            "selfLink": f"{self.base_url}/storage/v1/b/{self.bucket}/o/{quoted}",
            "mediaLink": f"{self.base_url}/download/storage/v1/b/{self.bucket}/o/{quoted}?generation=1&alt=media",
            "name": name,
            "bucket": self.bucket,
            "generation": "1",
            "metageneration": "1",
            "contentType": "application/octet-stream",
            "storageClass": "STANDARD",
            "size": str(len(data)),
            "md5Hash": md5,
            "crc32c": _crc32c_b64(data),
            "etag": "CAE=",
            "timeCreated": "2020-01-01T00:00:00.000Z",
            "updated": "2020-01-01T00:00:00.000Z",
        }

    def list_requests(self) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.kind == "list"]

    def object_gets(self, name: str | None = None) -> list[Request]:
        """GETs of objects (of ``name`` only, if given), in order."""
        with self._lock:
            return [r for r in self.requests if r.kind == "object" and r.method == "GET" and (name is None or r.object_name == name)]

    def clear_requests(self) -> None:
        with self._lock:
            self.requests.clear()

    def _record(self, req: Request) -> None:
        with self._lock:
            self.requests.append(req)


class _Handler(http.server.BaseHTTPRequestHandler):
    emulator: GcsEmulator
    protocol_version = "HTTP/1.1"
    server_version = "gcs-emulator/1"

    def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
        pass

    # ------------------------------------------------------------------ plumbing
    def _send(self, status: int, body: bytes, content_type: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, message: str) -> None:
        body = json.dumps({"error": {"code": status, "message": message, "errors": [{"message": message, "reason": "notFound" if status == 404 else "invalid"}]}})
        self._send(status, body.encode(), "application/json; charset=UTF-8")

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        emu = self.emulator
        split = urllib.parse.urlsplit(self.path)
        rng = self.headers.get("Range")
        list_match = re.fullmatch(r"/storage/v1/b/([^/]+)/o/?", split.path)
        if list_match:
            self._listing(urllib.parse.unquote(list_match[1]), urllib.parse.parse_qs(split.query), rng)
            return
        parts = split.path.lstrip("/").split("/", 1)
        if len(parts) == 2 and parts[1]:
            self._object(urllib.parse.unquote(parts[0]), urllib.parse.unquote(parts[1]), rng)
            return
        emu._record(Request(self.command, self.path, rng, "other", None, 404))
        self._error(404, f"no such endpoint: {split.path}")

    # ------------------------------------------------------------------ listing
    def _listing(self, bucket: str, query: dict[str, list[str]], rng: str | None) -> None:
        emu = self.emulator
        prefix = query.get("prefix", [""])[0]
        if bucket != emu.bucket:
            emu._record(Request(self.command, self.path, rng, "list", prefix, 404))
            self._error(404, "The specified bucket does not exist.")
            return
        start = 0
        if "pageToken" in query:
            try:
                start = int(base64.urlsafe_b64decode(query["pageToken"][0].encode()).decode())
            except ValueError:
                emu._record(Request(self.command, self.path, rng, "list", prefix, 400))
                self._error(400, "Invalid pageToken")
                return
        names = emu.object_names(prefix)
        page = names[start : start + emu.page_size]
        body: dict[str, Any] = {"kind": "storage#objects"}
        if start + emu.page_size < len(names):
            body["nextPageToken"] = base64.urlsafe_b64encode(str(start + emu.page_size).encode()).decode()
        if page:  # GCS omits "items" for an empty result
            body["items"] = [emu.metadata(n) for n in page]
        emu._record(Request(self.command, self.path, rng, "list", prefix, 200))
        self._send(200, json.dumps(body).encode(), "application/json; charset=UTF-8")

    # ------------------------------------------------------------------ objects
    def _object(self, bucket: str, name: str, rng: str | None) -> None:
        emu = self.emulator
        path = emu.root / name
        if bucket != emu.bucket or name in emu.hide_object or not path.is_file() or ".." in name.split("/"):
            emu._record(Request(self.command, self.path, rng, "object", name, 404))
            self._error(404, f"No such object: {bucket}/{name}")
            return
        data = path.read_bytes()
        size = len(data)
        status, start, end = 200, 0, size - 1
        extra = {"Accept-Ranges": "bytes", "x-goog-hash": f"crc32c={_crc32c_b64(data)},md5={_md5_b64(data)}"}
        if rng:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
            if not m:
                emu._record(Request(self.command, self.path, rng, "object", name, 400))
                self._error(400, f"bad Range header {rng!r}")
                return
            start = int(m[1])
            end = min(int(m[2]), size - 1) if m[2] else size - 1
            if start >= size or end < start:
                emu._record(Request(self.command, self.path, rng, "object", name, 416))
                self._send(416, b"", "text/plain", {"Content-Range": f"bytes */{size}"})
                return
            status = 206
            extra["Content-Range"] = f"bytes {start}-{end}/{size}"
        body = data[start : end + 1]
        cut = None
        with emu._lock:
            if self.command == "GET" and name in emu.cut_after:
                cut = emu.cut_after.pop(name)  # only the first request is cut
        emu._record(Request(self.command, self.path, rng, "object", name, status))
        if cut is None:
            self._send(status, body, "application/octet-stream", extra)
            return
        # Headers promise the whole body; send `cut` bytes of it and hang up.
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        for k, v in extra.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body[:cut])
        self.wfile.flush()
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_WR)
        except OSError:
            pass
