"""A tiny offline stand-in for the Hugging Face Hub, on 127.0.0.1: downloads and (legacy LFS) uploads.

Stdlib only (``http.server`` + ``threading``).  Two servers: the hub (``endpoint``) and a second origin standing
in for the Hub's storage (``cdn``, S3/CloudFront).  What each answers was read from huggingface_hub 2.4.0
(``file_download.py``, ``hf_api.py``, ``_commit_api.py``, ``lfs.py``, ``utils/_http.py``).

Downloads (``hf_hub_download``: a ``HEAD`` on ``{endpoint}/{repo_id}/resolve/{revision}/{filename}``, then a
``GET`` of the location it names):

- Repos are given as ``{"owner/name": {"path/in/repo": bytes}}``; each has one commit, whose 40-hex id is a hash
  of its content, reachable as revision ``main`` or by that id.  Commits made later through the API add new ids;
  earlier ones stay downloadable by id.
- Git-stored files (under ``lfs_threshold`` bytes, or named ``"owner/name/path"`` in ``git_paths``, or uploaded
  inline): the resolve URL answers ``307`` with a relative ``Location`` to
  ``/api/resolve-cache/models/{repo}/{commit}/{file}`` on the same host (which the client follows), and that
  answers ``200`` with ``X-Repo-Commit``, ``ETag`` (the git blob sha1) and ``Content-Length``.
- LFS files (large ones given at construction, or uploaded by LFS): the resolve URL answers ``302`` with an
  absolute ``Location`` on the CDN (another origin: the client does not follow it during the HEAD), carrying
  ``X-Repo-Commit``, ``X-Linked-Etag`` (the sha256) and ``X-Linked-Size``; the CDN serves the bytes of any stored
  blob (``Range: bytes=N-`` answers 206).
- Errors as the Hub sends them, as ``X-Error-Code``: ``RepoNotFound`` (401; also for a private repo without the
  token), ``RevisionNotFound`` (404), ``EntryNotFound`` (404, with ``X-Repo-Commit`` so the client caches the
  file's absence).  Public downloads ignore ``Authorization``.

Uploads (``HfApi.whoami`` / ``create_repo`` / ``create_commit`` / ``upload_folder`` with ``HF_HUB_DISABLE_XET=1``).
With ``token`` set, these need ``Authorization: Bearer <token>``: none answers 401 "Invalid username or
password.", another token 401 "Invalid credentials in Authorization header" (the Hub's wording; in the JSON
``error`` and in ``X-Error-Message``).  The token may write to the namespaces ``user`` and ``orgs``; elsewhere 403.

- ``GET /api/whoami-v2``: the user, its orgs and a write access token.
- ``POST /api/repos/create`` (``{"name", "organization", "type"?, "visibility"?}``): a model repo whose first
  commit holds the Hub's default ``.gitattributes``; ``{"url", "name", "id"}``.  An existing repo answers 409
  "You already created this model repo" (what ``exist_ok=True`` swallows).
- ``POST /api/validate-yaml`` (the client sends a README.md before committing it): 200 unless the front matter
  is never closed.
- ``GET /api/models/{repo}[/revision/{rev}]`` (``repo_info``), ``GET /api/models/{repo}/tree/{rev}[/{path}]``
  (``list_repo_tree``/``list_repo_files``) and ``POST /api/models/{repo}/paths-info/{rev}`` (``get_paths_info``).
- ``POST /api/models/{repo}/preupload/{rev}``: for each ``{path, size, sample}`` its ``uploadMode``: ``"lfs"``
  when ``size >= lfs_threshold``, when the repo's ``.gitattributes`` (else the Hub's default one) tracks the path
  by LFS, or when the 512-byte sample holds a NUL byte (binary); else ``"regular"``.  ``oid`` is the file now at
  that path (sha256 for LFS, git blob sha1 otherwise; equal oids make the client skip the file);
  ``shouldIgnore`` is always false (no .gitignore rules).
- ``POST /{repo}.git/info/lfs/objects/batch`` (Git LFS batch API, ``basic`` transfer): an object already stored
  gets no ``actions``; another gets an ``upload`` action, a ``PUT`` of the bytes to ``{cdn}/lfs-upload/{oid}``,
  and a ``verify`` action, a ``POST`` of ``{oid, size}`` to ``{endpoint}/{repo}.git/info/lfs/objects/verify``
  (200 when stored, else 404).
- ``PUT {cdn}/lfs-upload/{oid}``: stores the body only if its sha256 and size are those announced (else S3's
  400 ``BadDigest``; a PUT never announced by a batch answers 403).  While ``fail_lfs_puts > 0`` each PUT
  decrements it and fails, storing nothing: ``lfs_put_failure == "timeout"`` (default) answers S3's
  ``400 RequestTimeout``, which the client does not retry, so one failure fails the upload;
  ``"drop"`` reads half the body and resets the connection, which the client retries (5 times, 1+2+4+8+8 s
  apart), so the upload fails only when more than 5 PUTs in a row fail.
- ``POST /api/models/{repo}/commit/main`` (NDJSON: a ``header`` line with ``summary``, ``description``,
  ``parentCommit``?; then ``file`` (base64 content), ``lfsFile`` (``oid`` of a stored blob), ``deletedFile``,
  ``deletedFolder`` lines): applied all or nothing; an unknown blob answers 400, a missing deleted path 404
  ``EntryNotFound``, a stale ``parentCommit`` 412, ``create_pr`` 400 (no pull requests here).  An LFS path the
  ``.gitattributes`` does not track is added to it, as the Hub does.  On success ``repos``/``commits`` move to the
  new commit, ``commit_log`` gets ``(repo, summary, paths)``, and the answer is
  ``{"success", "commitOid", "commitUrl", "hookOutput"}``.

Every request is recorded in ``requests`` as ``(server, method, path, range)`` with server ``"hub"`` or ``"cdn"``
(the path with its query string).  ``preuploads`` records ``(repo, path, size, uploadMode)`` as answered.

Usage (huggingface_hub reads ``HF_ENDPOINT`` when it is imported, so point a subprocess at ``emu.endpoint``)::

    with HubEmulator({"cleanrl/Breakout-v5-dqn": {"dqn.cleanrl_model": data}}) as emu:
        env = {**os.environ, "HF_ENDPOINT": emu.endpoint, "HF_HUB_CACHE": str(cache)}

    with HubEmulator({}, token="hf_x", user="me", orgs=("lab",)) as emu:  # uploads: also HF_TOKEN, HF_HUB_DISABLE_XET=1
        ...
"""

from __future__ import annotations

import base64
import binascii
import datetime
import fnmatch
import hashlib
import http.server
import json
import os
import re
import socket
import struct
import threading
import urllib.parse
from typing import Any, Mapping


def client_env(home, endpoint: str, token: str | None = None) -> dict:
    """The environment of a subprocess whose huggingface_hub talks to the emulator at ``endpoint`` (it reads
    ``HF_ENDPOINT`` at import): its own HF home and cache under ``home`` (so no stored login is found), the legacy
    LFS uploads (``HF_HUB_DISABLE_XET``: Xet is not emulated), no proxy for 127.0.0.1, and ``HF_TOKEN`` = ``token``."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and k != "HUGGING_FACE_HUB_TOKEN"}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=f"{home}/hf_home", HF_HUB_CACHE=f"{home}/hub_cache", HF_HUB_DISABLE_XET="1",
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1", NO_PROXY="127.0.0.1,localhost",
               no_proxy="127.0.0.1,localhost", JAX_PLATFORMS="cpu")
    if token:
        env["HF_TOKEN"] = token
    return env


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(data: bytes) -> bytes:
    return b"version https://git-lfs.github.com/spec/v1\noid sha256:%s\nsize %d\n" % (hashlib.sha256(data).hexdigest().encode(), len(data))


_LFS_ATTRS = "filter=lfs diff=lfs merge=lfs -text"
# The .gitattributes the Hub puts in a new model repo.
DEFAULT_GITATTRIBUTES = "".join(f"{p} {_LFS_ATTRS}\n" for p in (
    "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib", "*.lfs.*", "*.mlmodel", "*.model",
    "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb", "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar",
    "*.safetensors", "saved_model/**/*", "*.tar.*", "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst", "*tfevents*"))

_REPO_NAME = re.compile(r"(?!.*(--|\.\.))[A-Za-z0-9_](?:[\w.-]{0,94}[A-Za-z0-9_])?")


def _lfs_tracked(gitattributes: str, path: str) -> bool:
    """Whether ``gitattributes`` puts ``path`` under ``filter=lfs`` (the last matching line that sets filter wins)."""
    tracked = False
    for line in gitattributes.splitlines():
        fields = line.strip().split()
        if not fields or fields[0].startswith("#"):
            continue
        pattern, attrs = fields[0].replace("[[:space:]]", "[ ]"), fields[1:]
        if "/" in pattern.rstrip("/"):
            hit = fnmatch.fnmatchcase(path, pattern.lstrip("/"))
        else:
            hit = fnmatch.fnmatchcase(path.rsplit("/", 1)[-1], pattern)
        if hit:
            for attr in attrs:
                if attr == "filter=lfs":
                    tracked = True
                elif attr.startswith(("filter=", "-filter", "!filter")):
                    tracked = False
    return tracked


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


class HubEmulator:
    """Serve ``repos`` from two local servers (hub and CDN) while the context is open, and take uploads."""

    def __init__(self, repos: Mapping[str, Mapping[str, bytes]], lfs_threshold: int = 10_000, git_paths: tuple[str, ...] = (), *,
                 token: str | None = None, user: str = "me", orgs: tuple[str, ...] = ()):
        self.repos = {r: dict(files) for r, files in repos.items()}
        self.lfs_threshold = lfs_threshold
        self.git_paths = set(git_paths)
        self.commits = {r: hashlib.sha1(repr(sorted((k, hashlib.sha256(v).hexdigest()) for k, v in files.items())).encode()
                                        + r.encode()).hexdigest() for r, files in self.repos.items()}
        self.requests: list[tuple[str, str, str, str | None]] = []
        self.token, self.user, self.orgs = token, user, tuple(orgs)
        self.private: set[str] = set()  # repos created private: downloads and API reads need the token
        self.lfs_blobs: dict[str, bytes] = {}  # the LFS store: sha256 -> bytes, filled by the CDN PUTs
        self.fail_lfs_puts = 0
        self.lfs_put_failure = "timeout"  # or "drop"
        self.commit_log: list[tuple[str, str, list[str]]] = []
        self.preuploads: list[tuple[str, str, int, str]] = []
        self._history: dict[str, dict[str, dict[str, bytes]]] = {r: {} for r in self.repos}  # repo -> old commit -> files
        self._modes: dict[tuple[str, str, str], str] = {}  # (repo, path, sha256) -> "lfs" | "regular", for uploaded files
        self._announced: dict[str, int] = {}  # oid -> size, from LFS batch answers: what the CDN accepts a PUT for
        self._commit_dates = {c: _now() for c in self.commits.values()}
        self._seq = 0
        self._lock = threading.RLock()
        self._servers: list[http.server.ThreadingHTTPServer] = []
        self.endpoint = self.cdn = ""

    # ------------------------------------------------------------------ state helpers (call with the lock held)
    def _is_lfs(self, repo: str, path: str, data: bytes) -> bool:
        mode = self._modes.get((repo, path, hashlib.sha256(data).hexdigest()))
        if mode is not None:
            return mode == "lfs"
        return len(data) >= self.lfs_threshold and f"{repo}/{path}" not in self.git_paths

    def _oid(self, repo: str, path: str, data: bytes) -> str:
        """The oid the preupload endpoint reports for a file: sha256 of an LFS file, git blob sha1 of another."""
        return hashlib.sha256(data).hexdigest() if self._is_lfs(repo, path, data) else _git_blob_sha1(data)

    def _files_at(self, repo: str, revision: str) -> tuple[str, dict[str, bytes]] | None:
        if revision in ("main", self.commits[repo]):
            return self.commits[repo], self.repos[repo]
        if revision in self._history.get(repo, {}):
            return revision, self._history[repo][revision]
        return None

    def _find_blob(self, oid: str) -> bytes | None:
        if oid in self.lfs_blobs:
            return self.lfs_blobs[oid]
        for files in [*self.repos.values(), *(f for h in self._history.values() for f in h.values())]:
            for data in files.values():
                if hashlib.sha256(data).hexdigest() == oid:
                    return data
        return None

    def _new_commit(self, repo: str, parent: str | None, summary: str, files: Mapping[str, bytes]) -> str:
        self._seq += 1
        listing = repr(sorted((k, hashlib.sha256(v).hexdigest()) for k, v in files.items()))
        commit = hashlib.sha1(f"{repo}\n{parent}\n{summary}\n{listing}\n{self._seq}".encode()).hexdigest()
        self._commit_dates[commit] = _now()
        return commit

    def _entry(self, repo: str, path: str, data: bytes) -> dict[str, Any]:
        if self._is_lfs(repo, path, data):
            pointer = _lfs_pointer(data)
            return {"type": "file", "oid": _git_blob_sha1(pointer), "size": len(data), "path": path,
                    "lfs": {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": len(pointer)}}
        return {"type": "file", "oid": _git_blob_sha1(data), "size": len(data), "path": path}

    def _folder(self, repo: str, files: Mapping[str, bytes], folder: str) -> dict[str, Any]:
        inside = sorted((p, self._entry(repo, p, d)["oid"]) for p, d in files.items() if p.startswith(folder + "/"))
        return {"type": "directory", "oid": hashlib.sha1(repr(inside).encode()).hexdigest(), "size": 0, "path": folder}

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

            def _error(self, status: int, code: str | None, message: str, extra: Mapping[str, str] | None = None) -> None:
                body = json.dumps({"error": message}).encode()
                self._reply(status, {**({"X-Error-Code": code} if code else {}), "X-Error-Message": message,
                                     "Content-Type": "application/json", **(extra or {})}, body)

            def _json(self, obj: Any, status: int = 200, content_type: str = "application/json") -> None:
                self._reply(status, {"Content-Type": content_type}, json.dumps(obj).encode())

            def _s3_error(self, status: int, code: str, message: str, close: bool = False) -> None:
                body = f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message></Error>'.encode()
                if close:
                    self.close_connection = True
                self._reply(status, {"Content-Type": "application/xml", **({"Connection": "close"} if close else {})}, body)

            def _read_body(self) -> bytes:
                if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                                pass
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n > 0 else b""

            # -------------------------------------------------------------- auth
            def _auth(self) -> bool:
                """True when the request may act as ``emu.user``; else a 401 has been sent."""
                if emu.token is None:
                    return True
                header = self.headers.get("Authorization")
                if header == f"Bearer {emu.token}":
                    return True
                self._error(401, None, "Invalid credentials in Authorization header" if header else "Invalid username or password.")
                return False

            def _authorized(self) -> bool:  # without answering
                return emu.token is None or self.headers.get("Authorization") == f"Bearer {emu.token}"

            def _may_write(self, namespace: str) -> bool:
                return namespace in (emu.user, *emu.orgs)

            def _readable(self, repo: str) -> bool:
                return repo in emu.repos and (repo not in emu.private or self._authorized())

            def _repo_missing(self) -> None:
                self._error(404 if self._authorized() else 401, "RepoNotFound", "Repository not found")

            def _writable_repo(self, repo: str) -> bool:
                """Auth, existence and write permission for an upload endpoint; False once an error was sent."""
                if not self._auth():
                    return False
                if not self._readable(repo):
                    self._repo_missing()
                    return False
                if not self._may_write(repo.split("/")[0]):
                    self._error(403, None, f"You don't have the rights to write to {repo}")
                    return False
                return True

            # -------------------------------------------------------------- dispatch
            def _handle(self) -> None:
                with emu._lock:
                    emu.requests.append((role, self.command, self.path, self.headers.get("Range")))
                split = urllib.parse.urlsplit(self.path)
                path, query = split.path, urllib.parse.parse_qs(split.query)
                if role == "cdn":
                    if self.command == "PUT":
                        return self._cdn_put(path)
                    if self.command == "POST":
                        self._read_body()
                    return self._serve_cdn(path)
                body = self._read_body() if self.command in ("POST", "PUT") else b""
                if self.command in ("HEAD", "GET"):
                    if m := re.fullmatch(r"/api/resolve-cache/models/([^/]+/[^/]+)/([0-9a-f]{40})/(.+)", path):
                        return self._serve_file(urllib.parse.unquote(m[1]), m[2], urllib.parse.unquote(m[3]), direct=True)
                    if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
                        return self._serve_file(urllib.parse.unquote(m[1]), urllib.parse.unquote(m[2]), urllib.parse.unquote(m[3]), direct=False)
                    if path == "/api/whoami-v2":
                        return self._whoami()
                    if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path):
                        return self._model_info(urllib.parse.unquote(m[1]), urllib.parse.unquote(m[2] or "main"), query)
                    if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", path):
                        return self._tree(urllib.parse.unquote(m[1]), urllib.parse.unquote(m[2]), urllib.parse.unquote(m[3] or "").strip("/"), query)
                elif self.command == "POST":
                    if path == "/api/repos/create":
                        return self._create_repo(body)
                    if path == "/api/validate-yaml":
                        return self._validate_yaml(body)
                    if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/([^/]+)", path):
                        return self._preupload(urllib.parse.unquote(m[1]), urllib.parse.unquote(m[2]), body)
                    if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/paths-info/([^/]+)", path):
                        return self._paths_info(urllib.parse.unquote(m[1]), urllib.parse.unquote(m[2]), body)
                    if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/([^/]+)", path):
                        return self._commit(urllib.parse.unquote(m[1]), urllib.parse.unquote(m[2]), query, body)
                    if m := re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path):
                        return self._lfs_batch(urllib.parse.unquote(m[1]), body)
                    if m := re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/verify", path):
                        return self._lfs_verify(urllib.parse.unquote(m[1]), body)
                self._error(404, "NotFound", "not an endpoint of this emulator")

            # -------------------------------------------------------------- downloads
            def _serve_file(self, repo: str, revision: str, filename: str, direct: bool) -> None:
                with emu._lock:
                    if not self._readable(repo):
                        return self._error(401, "RepoNotFound", "Repository not found")
                    found = emu._files_at(repo, revision)
                    if found is None:
                        return self._error(404, "RevisionNotFound", "Invalid rev id: " + revision)
                    commit, files = found
                    data = files.get(filename)
                    if data is None:
                        return self._error(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": commit})
                    lfs = emu._is_lfs(repo, filename, data)
                common = {"X-Repo-Commit": commit, "Accept-Ranges": "bytes"}
                if lfs:  # LFS: metadata here, bytes on the CDN
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
                with emu._lock:
                    data = emu._find_blob(m[1]) if m and self.command in ("GET", "HEAD") else None
                if data is None:
                    return self._reply(403, {"Content-Type": "text/plain"}, b"AccessDenied")
                rng = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
                if rng:
                    start = int(rng[1])
                    end = int(rng[2]) if rng[2] else len(data) - 1
                    part = data[start : end + 1]
                    return self._reply(206, {"Content-Range": f"bytes {start}-{start + len(part) - 1}/{len(data)}",
                                             "Content-Type": "application/octet-stream"}, part)
                self._reply(200, {"Content-Type": "application/octet-stream", "ETag": f'"{m[1]}"'}, data)

            # -------------------------------------------------------------- account, repos, reads
            def _whoami(self) -> None:
                if not self._auth():
                    return
                ident = lambda name: hashlib.sha1(name.encode()).hexdigest()[:24]  # noqa: E731
                self._json({
                    "type": "user", "id": ident(emu.user), "name": emu.user, "fullname": emu.user, "email": f"{emu.user}@example.com",
                    "emailVerified": True, "canPay": False, "periodEnd": None, "isPro": False, "avatarUrl": "/avatars/none.svg",
                    "orgs": [{"type": "org", "id": ident(o), "name": o, "fullname": o, "email": None, "canPay": False, "periodEnd": None,
                              "avatarUrl": "/avatars/none.svg", "roleInOrg": "write", "isEnterprise": False} for o in emu.orgs],
                    "auth": {"type": "access_token", "accessToken": {"displayName": "hub-emulator", "role": "write", "createdAt": "2024-01-01T00:00:00.000Z"}},
                })

            def _create_repo(self, body: bytes) -> None:
                if not self._auth():
                    return
                try:
                    payload = json.loads(body or b"{}")
                    name, organization = payload["name"], payload.get("organization")
                except (ValueError, KeyError, TypeError):
                    return self._error(400, None, "Invalid create request: expected JSON with name")
                if payload.get("type", "model") not in (None, "model"):
                    return self._error(400, None, "this emulator serves model repos only")
                if "/" in name and not organization:
                    organization, name = name.split("/", 1)
                namespace = organization or emu.user
                if not isinstance(name, str) or not _REPO_NAME.fullmatch(name):
                    return self._error(400, None, f"Invalid repo name {name!r}")
                repo = f"{namespace}/{name}"
                url = f"{emu.endpoint}/{repo}"
                if not self._may_write(namespace):
                    return self._error(403, None, "You don't have the rights to create a model under this namespace")
                with emu._lock:
                    if repo in emu.repos:
                        return self._reply(409, {"Content-Type": "application/json", "X-Error-Message": "You already created this model repo"},
                                           json.dumps({"error": "You already created this model repo", "url": url}).encode())
                    files = {".gitattributes": DEFAULT_GITATTRIBUTES.encode()}
                    emu.repos[repo] = files
                    emu._history[repo] = {}
                    emu.commits[repo] = emu._new_commit(repo, None, "initial commit", files)
                    if payload.get("private") is True or payload.get("visibility") == "private":
                        emu.private.add(repo)
                self._json({"url": url, "name": repo, "id": hashlib.sha1(repo.encode()).hexdigest()[:24]})

            def _validate_yaml(self, body: bytes) -> None:
                try:
                    content = json.loads(body or b"{}").get("content", "")
                except (ValueError, AttributeError):
                    return self._json({"errors": [{"message": "expected JSON with content"}], "warnings": []}, 400)
                lines = content.splitlines()
                if lines and lines[0].strip() == "---" and not any(line.strip() == "---" for line in lines[1:]):
                    return self._json({"errors": [{"message": "metadata front matter is not closed by ---"}], "warnings": []}, 400)
                self._json({"errors": [], "warnings": []})

            def _resolve(self, repo: str, revision: str) -> tuple[str, dict[str, bytes]] | None:
                """Commit and files of a readable repo's revision; None once an error was sent."""
                if not self._readable(repo):
                    self._repo_missing()
                    return None
                found = emu._files_at(repo, revision)
                if found is None:
                    self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                return found

            def _model_info(self, repo: str, revision: str, query: Mapping[str, list[str]]) -> None:
                with emu._lock:
                    if (found := self._resolve(repo, revision)) is None:
                        return
                    commit, files = found
                    blobs = query.get("blobs", [""])[0].lower() in ("1", "true")
                    siblings = []
                    for path, data in sorted(files.items()):
                        sibling: dict[str, Any] = {"rfilename": path}
                        if blobs:
                            entry = emu._entry(repo, path, data)
                            sibling.update(size=len(data), blobId=entry["oid"])
                            if "lfs" in entry:
                                sibling["lfs"] = {"sha256": entry["lfs"]["oid"], "size": len(data), "pointerSize": entry["lfs"]["pointerSize"]}
                        siblings.append(sibling)
                    date = emu._commit_dates.get(commit, _now())
                    info = {"_id": hashlib.sha1(repo.encode()).hexdigest()[:24], "id": repo, "modelId": repo, "author": repo.split("/")[0],
                            "sha": commit, "lastModified": date, "createdAt": date, "private": repo in emu.private, "disabled": False,
                            "gated": False, "downloads": 0, "likes": 0, "tags": [], "siblings": siblings}
                self._json(info)

            def _tree(self, repo: str, revision: str, folder: str, query: Mapping[str, list[str]]) -> None:
                recursive = query.get("recursive", [""])[0].lower() in ("1", "true")
                with emu._lock:
                    if (found := self._resolve(repo, revision)) is None:
                        return
                    commit, files = found
                    under = {p: d for p, d in files.items() if not folder or p.startswith(folder + "/")}
                    if folder and not under:
                        return self._error(404, "EntryNotFound", f"{folder} does not exist on \"{revision}\"", {"X-Repo-Commit": commit})
                    entries: dict[str, dict[str, Any]] = {}
                    for path, data in sorted(under.items()):
                        parts = path[len(folder) + 1 if folder else 0 :].split("/")
                        for depth in range(1, len(parts) if recursive else min(2, len(parts))):
                            sub = "/".join([folder, *parts[:depth]] if folder else parts[:depth])
                            entries.setdefault(sub, emu._folder(repo, files, sub))
                        if recursive or len(parts) == 1:
                            entries[path] = emu._entry(repo, path, data)
                listing = sorted(entries.values(), key=lambda e: (e["type"] != "directory", e["path"]))
                self._json(listing)

            def _paths_info(self, repo: str, revision: str, body: bytes) -> None:
                form = urllib.parse.parse_qs(body.decode("utf-8", "replace"))
                with emu._lock:
                    if (found := self._resolve(repo, revision)) is None:
                        return
                    _, files = found
                    out = []
                    for path in form.get("paths", []):
                        path = path.strip("/")
                        if path in files:
                            out.append(emu._entry(repo, path, files[path]))
                        elif any(p.startswith(path + "/") for p in files):
                            out.append(emu._folder(repo, files, path))
                self._json(out)

            # -------------------------------------------------------------- uploads
            def _preupload(self, repo: str, revision: str, body: bytes) -> None:
                with emu._lock:
                    if not self._writable_repo(repo):
                        return
                    found = emu._files_at(repo, revision)
                    if found is None:
                        return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                    _, files = found
                    try:
                        asked = json.loads(body)["files"]
                        assert isinstance(asked, list)
                    except (ValueError, KeyError, TypeError, AssertionError):
                        return self._error(400, None, "Invalid preupload request: expected JSON with files")
                    attributes = files.get(".gitattributes", DEFAULT_GITATTRIBUTES.encode()).decode("utf-8", "replace")
                    answer = []
                    for item in asked:
                        path, size = item.get("path"), item.get("size")
                        if not isinstance(path, str) or not isinstance(size, int):
                            return self._error(400, None, "Invalid preupload request: each file needs path and size")
                        try:
                            sample = base64.b64decode(item.get("sample") or "", validate=True)
                        except (binascii.Error, ValueError):
                            return self._error(400, None, f"Invalid sample for {path}: not base64")
                        lfs = size >= emu.lfs_threshold or _lfs_tracked(attributes, path) or b"\0" in sample
                        mode = "lfs" if lfs else "regular"
                        emu.preuploads.append((repo, path, size, mode))
                        existing = files.get(path)
                        answer.append({"path": path, "uploadMode": mode, "shouldIgnore": False,
                                       "oid": emu._oid(repo, path, existing) if existing is not None else None})
                self._json({"files": answer, "commitOid": found[0]})

            def _lfs_batch(self, repo: str, body: bytes) -> None:
                try:
                    request = json.loads(body)
                    objects, operation = request["objects"], request.get("operation")
                    assert isinstance(objects, list) and operation in ("upload", "download")
                except (ValueError, KeyError, TypeError, AssertionError):
                    objects = operation = None
                if operation != "download" and not self._auth():  # anonymous LFS downloads of public repos are fine
                    return
                if objects is None:
                    return self._error(400, None, "Invalid LFS batch request")
                with emu._lock:
                    if operation == "download" and not self._readable(repo):
                        return self._repo_missing()
                    if operation == "upload" and not self._writable_repo(repo):
                        return
                    if "basic" not in request.get("transfers", ["basic"]):
                        return self._error(400, None, "this emulator speaks the basic transfer only")
                    expires = (datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
                    answer = []
                    for obj in objects:
                        oid, size = obj.get("oid"), obj.get("size")
                        if not (isinstance(oid, str) and re.fullmatch(r"[0-9a-f]{64}", oid) and isinstance(size, int) and size >= 0):
                            answer.append({"oid": str(oid), "size": size if isinstance(size, int) else 0,
                                           "error": {"code": 422, "message": "invalid oid or size"}})
                            continue
                        stored = emu._find_blob(oid)
                        item: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
                        if operation == "download":
                            if stored is None:
                                item["error"] = {"code": 404, "message": "Object does not exist"}
                            else:
                                item["actions"] = {"download": {"href": f"{emu.cdn}/lfs/{oid}", "expires_at": expires}}
                        elif stored is None or len(stored) != size:
                            emu._announced[oid] = size
                            item["actions"] = {
                                "upload": {"href": f"{emu.cdn}/lfs-upload/{oid}?size={size}&X-Amz-Signature=emulated", "expires_at": expires},
                                "verify": {"href": f"{emu.endpoint}/{repo}.git/info/lfs/objects/verify", "expires_at": expires},
                            }
                        answer.append(item)
                self._json({"transfer": "basic", "objects": answer, "hash_algo": "sha256"}, content_type="application/vnd.git-lfs+json")

            def _cdn_put(self, path: str) -> None:
                m = re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", path)
                with emu._lock:
                    expected = emu._announced.get(m[1]) if m else None
                    fail = emu.fail_lfs_puts > 0
                    if fail:
                        emu.fail_lfs_puts -= 1
                if fail and emu.lfs_put_failure == "drop":  # read part of the body, then reset the connection
                    n = int(self.headers.get("Content-Length") or 0)
                    if n:
                        self.rfile.read(max(1, n // 2))
                    else:
                        self.rfile.read1(1024)
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    return
                body = self._read_body()
                if fail:
                    return self._s3_error(400, "RequestTimeout", "Your socket connection to the server was not read from or written to "
                                          "within the timeout period. Idle connections will be closed.", close=True)
                if expected is None:
                    return self._s3_error(403, "AccessDenied", "Request has expired or was never signed")
                if len(body) != expected or hashlib.sha256(body).hexdigest() != m[1]:
                    return self._s3_error(400, "BadDigest", "The sha256 or size of the body does not match the signed object")
                with emu._lock:
                    emu.lfs_blobs[m[1]] = body
                self._reply(200, {"ETag": f'"{hashlib.md5(body).hexdigest()}"'})

            def _lfs_verify(self, repo: str, body: bytes) -> None:
                with emu._lock:
                    if not self._writable_repo(repo):
                        return
                    try:
                        request = json.loads(body)
                        oid, size = request["oid"], request["size"]
                    except (ValueError, KeyError, TypeError):
                        return self._error(400, None, "Invalid LFS verify request")
                    stored = emu._find_blob(oid) if isinstance(oid, str) else None
                if stored is None or len(stored) != size:
                    return self._error(404, None, f"Object {oid} was not uploaded")
                self._json({"success": True}, content_type="application/vnd.git-lfs+json")

            def _commit(self, repo: str, revision: str, query: Mapping[str, list[str]], body: bytes) -> None:
                with emu._lock:  # validate everything, then apply: all or nothing
                    if not self._writable_repo(repo):
                        return
                    if query.get("create_pr", ["0"])[0] not in ("0", "", "false"):
                        return self._error(400, None, "this emulator does not open pull requests (create_pr)")
                    if revision != "main":
                        return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision} (this emulator commits to main only)")
                    try:
                        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                        assert lines and all(isinstance(x, dict) and isinstance(x.get("value"), dict) for x in lines)
                    except (ValueError, AssertionError):
                        return self._error(400, None, "Invalid commit payload: expected NDJSON of {key, value}")
                    header, operations = lines[0], lines[1:]
                    summary = header["value"].get("summary")
                    if header.get("key") != "header" or not isinstance(summary, str) or not summary.strip():
                        return self._error(400, None, "Invalid commit payload: the first line must be the header with a summary")
                    parent_commit = emu.commits[repo]
                    parent = header["value"].get("parentCommit")
                    if parent is not None and parent != parent_commit:
                        return self._error(412, None, "A commit has happened since. Please refresh and try again.")
                    files = dict(emu.repos[repo])
                    modes: dict[tuple[str, str, str], str] = {}
                    paths: list[str] = []
                    for op in operations:
                        key, value = op.get("key"), op["value"]
                        path = value.get("path")
                        if not isinstance(path, str) or not path.strip("/"):
                            return self._error(400, None, f"Invalid commit payload: {key} without a path")
                        paths.append(path)
                        if key == "file":
                            try:
                                data = (base64.b64decode(value.get("content", ""), validate=True) if value.get("encoding", "base64") == "base64"
                                        else str(value.get("content", "")).encode())
                            except (binascii.Error, ValueError):
                                return self._error(400, None, f"Invalid base64 content for {path}")
                            files[path] = data
                            modes[(repo, path, hashlib.sha256(data).hexdigest())] = "regular"
                        elif key == "lfsFile":
                            oid = value.get("oid")
                            data = emu._find_blob(oid) if value.get("algo", "sha256") == "sha256" and isinstance(oid, str) else None
                            if data is None or ("size" in value and value["size"] != len(data)):
                                return self._error(400, None, "Your push was rejected because an LFS pointer pointed to a file that "
                                                   f"does not exist. Offending file: - {path}")
                            files[path] = data
                            modes[(repo, path, oid)] = "lfs"
                        elif key == "deletedFile":
                            if files.pop(path, None) is None:
                                return self._error(404, "EntryNotFound", f"A file with this name doesn't exist: {path}")
                        elif key == "deletedFolder":
                            folder = path.strip("/") + "/"
                            gone = [p for p in files if p.startswith(folder)]
                            if not gone:
                                return self._error(404, "EntryNotFound", f"A folder with this name doesn't exist: {path}")
                            for p in gone:
                                del files[p]
                        else:
                            return self._error(400, None, f"Invalid commit payload: unknown key {key!r}")
                    # The Hub tracks an LFS file that .gitattributes does not cover by adding its path there.
                    if ".gitattributes" in files:
                        attributes = files[".gitattributes"].decode("utf-8", "replace")
                        untracked = sorted({p for (_, p, oid), mode in modes.items() if mode == "lfs" and files.get(p) is not None
                                            and hashlib.sha256(files[p]).hexdigest() == oid and not _lfs_tracked(attributes, p)})
                        if untracked:
                            attributes += "" if attributes.endswith("\n") or not attributes else "\n"
                            attributes += "".join(f"{p.replace(' ', '[[:space:]]')} {_LFS_ATTRS}\n" for p in untracked)
                            files[".gitattributes"] = attributes.encode()
                            modes[(repo, ".gitattributes", hashlib.sha256(files[".gitattributes"]).hexdigest())] = "regular"
                    commit = emu._new_commit(repo, parent_commit, summary, files)
                    emu._history.setdefault(repo, {})[parent_commit] = emu.repos[repo]
                    emu._modes.update(modes)
                    emu.repos[repo] = files
                    emu.commits[repo] = commit
                    emu.commit_log.append((repo, summary, paths))
                self._json({"success": True, "commitOid": commit, "commitUrl": f"{emu.endpoint}/{repo}/commit/{commit}", "hookOutput": ""})

            def do_HEAD(self):
                self._handle()

            def do_GET(self):
                self._handle()

            def do_POST(self):
                self._handle()

            def do_PUT(self):
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
