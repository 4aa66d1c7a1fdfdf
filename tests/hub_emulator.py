"""A tiny offline stand-in for the Hugging Face Hub's file endpoint, on 127.0.0.1.

Stdlib only (``http.server`` + ``threading``).  It answers what
``huggingface_hub.hf_hub_download`` asks (read from huggingface_hub's
``file_download.py`` / ``utils/_http.py``): a ``HEAD`` on
``{endpoint}/{repo_id}/resolve/{revision}/{filename}`` for the file's metadata,
then a ``GET`` of the location that metadata names.

- Repos are given as ``{"owner/name": {"path/in/repo": bytes}}``; each repo has
  one commit, whose 40-hex id is a hash of its content, reachable as revision
  ``main`` or by that id.
- Small files (under ``lfs_threshold`` bytes, or named ``"owner/name/path"`` in
  ``git_paths``), as git-stored files on the Hub:
  the resolve URL answers ``307`` with a relative ``Location`` to
  ``/api/resolve-cache/models/{repo}/{commit}/{file}`` on the same host (which
  the client follows), and that answers ``200`` with ``X-Repo-Commit``,
  ``ETag`` (the git blob sha1) and ``Content-Length``.
- Large files, as LFS files on the Hub: the resolve URL answers ``302`` with an
  absolute ``Location`` on a second server (the "CDN", another port, so another
  origin: the client does not follow it during the HEAD), carrying
  ``X-Repo-Commit``, ``X-Linked-Etag`` (the sha256) and ``X-Linked-Size``; the
  CDN serves the bytes (``Range: bytes=N-`` answers 206).
- Errors as the Hub sends them, as ``X-Error-Code``: ``RepoNotFound`` (401),
  ``RevisionNotFound`` (404), ``EntryNotFound`` (404, with ``X-Repo-Commit`` so
  the client caches the file's absence).

Every request is recorded in ``requests`` as ``(server, method, path, range)``
with server ``"hub"`` or ``"cdn"``.

Usage (huggingface_hub reads ``HF_ENDPOINT`` when it is imported, so point a
subprocess at ``emu.endpoint``)::

    with HubEmulator({"cleanrl/Breakout-v5-dqn": {"dqn.cleanrl_model": data}}) as emu:
        env = {**os.environ, "HF_ENDPOINT": emu.endpoint, "HF_HUB_CACHE": str(cache)}
"""

from __future__ import annotations

import hashlib
import http.server
import re
import threading
import urllib.parse
from typing import Mapping


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubEmulator:
    """Serve ``repos`` from two local servers (hub and CDN) while the context is open."""

    def __init__(self, repos: Mapping[str, Mapping[str, bytes]], lfs_threshold: int = 10_000, git_paths: tuple[str, ...] = ()):
        self.repos = {r: dict(files) for r, files in repos.items()}
        self.lfs_threshold = lfs_threshold
        self.git_paths = set(git_paths)
        self.commits = {r: hashlib.sha1(repr(sorted((k, hashlib.sha256(v).hexdigest()) for k, v in files.items())).encode()
                                        + r.encode()).hexdigest() for r, files in self.repos.items()}
        self.requests: list[tuple[str, str, str, str | None]] = []
        self._lock = threading.Lock()
        self._servers: list[http.server.ThreadingHTTPServer] = []
        self.endpoint = self.cdn = ""

    # ------------------------------------------------------------------ serving
    def _handler(self, role: str) -> type[http.server.BaseHTTPRequestHandler]:
        emu = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the client expects; every answer has a Content-Length

            def log_message(self, *args):  # quiet
                pass

            def _reply(self, status: int, headers: Mapping[str, str], body: bytes = b"") -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", headers.get("Content-Length", str(len(body))))
                self.end_headers()
                if self.command != "HEAD" and body:
                    self.wfile.write(body)

            def _error(self, status: int, code: str, message: str, extra: Mapping[str, str] | None = None) -> None:
                body = ('{"error": "%s"}' % message).encode()
                self._reply(status, {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json", **(extra or {})}, body)

            def _handle(self) -> None:
                with emu._lock:
                    emu.requests.append((role, self.command, self.path, self.headers.get("Range")))
                path = urllib.parse.urlsplit(self.path).path
                if role == "cdn":
                    return self._serve_cdn(path)
                if m := re.fullmatch(r"/api/resolve-cache/models/([^/]+/[^/]+)/([0-9a-f]{40})/(.+)", path):
                    return self._serve_file(urllib.parse.unquote(m[1]), m[2], urllib.parse.unquote(m[3]), direct=True)
                if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
                    return self._serve_file(urllib.parse.unquote(m[1]), urllib.parse.unquote(m[2]), urllib.parse.unquote(m[3]), direct=False)
                self._error(404, "NotFound", "not an endpoint of this emulator")

            def _serve_file(self, repo: str, revision: str, filename: str, direct: bool) -> None:
                if repo not in emu.repos:
                    return self._error(401, "RepoNotFound", "Repository not found")
                commit = emu.commits[repo]
                if revision not in ("main", commit):
                    return self._error(404, "RevisionNotFound", "Invalid rev id: " + revision)
                data = emu.repos[repo].get(filename)
                if data is None:
                    return self._error(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": commit})
                common = {"X-Repo-Commit": commit, "Accept-Ranges": "bytes"}
                if len(data) >= emu.lfs_threshold and f"{repo}/{filename}" not in emu.git_paths:  # LFS: metadata here, bytes on the CDN
                    sha256 = hashlib.sha256(data).hexdigest()
                    location = f"{emu.cdn}/lfs/{sha256}?filename={urllib.parse.quote(filename.rsplit('/', 1)[-1])}&signature=x"
                    return self._reply(302, {**common, "Location": location, "ETag": f'"{_git_blob_sha1(data)}"',
                                             "X-Linked-Etag": f'"{sha256}"', "X-Linked-Size": str(len(data))})
                if not direct:  # git file: the Hub redirects to its resolve cache on the same host
                    target = f"/api/resolve-cache/models/{repo}/{commit}/{urllib.parse.quote(filename)}"
                    return self._reply(307, {**common, "Location": target})
                self._reply(200, {**common, "ETag": f'"{_git_blob_sha1(data)}"', "Content-Type": "application/octet-stream"}, data)

            def _serve_cdn(self, path: str) -> None:
                m = re.fullmatch(r"/lfs/([0-9a-f]{64})", path)
                blobs = {hashlib.sha256(d).hexdigest(): d for files in emu.repos.values() for d in files.values()}
                if not m or m[1] not in blobs:
                    return self._reply(403, {"Content-Type": "text/plain"}, b"AccessDenied")
                data = blobs[m[1]]
                rng = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
                if rng:
                    start = int(rng[1])
                    end = int(rng[2]) if rng[2] else len(data) - 1
                    part = data[start : end + 1]
                    return self._reply(206, {"Content-Range": f"bytes {start}-{start + len(part) - 1}/{len(data)}",
                                             "Content-Type": "application/octet-stream"}, part)
                self._reply(200, {"Content-Type": "application/octet-stream", "ETag": f'"{m[1]}"'}, data)

            def do_HEAD(self):
                self._handle()

            def do_GET(self):
                self._handle()

        return Handler

    def __enter__(self) -> "HubEmulator":
        for role in ("hub", "cdn"):
            server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler(role))
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, daemon=True).start()
            self._servers.append(server)
        self.endpoint = f"http://127.0.0.1:{self._servers[0].server_address[1]}"
        self.cdn = f"http://127.0.0.1:{self._servers[1].server_address[1]}"
        return self

    def __exit__(self, *exc) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers.clear()

    # ------------------------------------------------------------------ queries
    def calls(self, server: str | None = None, method: str | None = None) -> list[tuple[str, str, str, str | None]]:
        with self._lock:
            return [r for r in self.requests if (server is None or r[0] == server) and (method is None or r[1] == method)]
