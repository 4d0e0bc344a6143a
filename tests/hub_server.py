"""A local stand-in for the Hugging Face Hub's HTTP API, for tests that run the real ``huggingface_hub`` client.

It serves what the client calls to download and to upload:

* ``GET /api/{models,datasets}/OWNER/NAME[/revision/REV]``: repo info (``sha``, ``siblings``);
* ``GET /api/.../tree/REV[/PATH]``: the file listing, paginated with a ``Link: rel="next"`` header;
* ``GET``/``HEAD`` ``/[datasets/]OWNER/NAME/resolve/REV/FILE``: the file, with ``X-Repo-Commit`` and ``ETag``
  (the git blob id), ``Content-Length`` and ``Range``; errors carry the hub's ``X-Error-Code``;
* ``POST /api/repos/create``, ``/api/validate-yaml``, ``/api/.../branch/B``, ``/api/.../preupload/REV``
  (every file "regular", so no LFS or Xet transfer) and ``/api/.../commit/REV`` (NDJSON).

Repositories are git-like: each branch points at a commit, a commit is a full snapshot of files, so
revisions (branch names, ``refs/convert/parquet``, commit ids) resolve the way the hub resolves them.
No Xet headers are ever sent, so ``hf_xet`` is never used. Failures can be injected per path.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import yaml

REPO_TYPES = {"models": "model", "datasets": "dataset"}


def git_oid(content: bytes) -> str:
    """The git blob id of ``content`` (what the hub reports as a regular file's oid and ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool = False
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    messages: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> str | None:
        if revision in self.branches:
            return self.branches[revision]
        return revision if revision in self.commits else None


@dataclass
class Failure:
    pattern: re.Pattern
    status: int
    method: str | None
    remaining: int | None


class LocalHub:
    """The hub's state plus the HTTP server that serves it on 127.0.0.1 (a free port)."""

    def __init__(self, token: str | None = None, page_size: int = 1000) -> None:
        self.token = token
        """When set, uploads (and reads of private repos) need ``Authorization: Bearer <token>``."""
        self.page_size = page_size
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.unhandled: list[tuple[str, str]] = []
        self.failures: list[Failure] = []
        self._lock = threading.Lock()
        self._counter = 0
        self._server: ThreadingHTTPServer | None = None

    # --- lifecycle ---

    def start(self) -> LocalHub:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def url(self) -> str:
        assert self._server is not None, "the local hub is not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def reset(self) -> None:
        with self._lock:
            self.repos.clear()
            self.requests.clear()
            self.unhandled.clear()
            self.failures.clear()
            self.token = None
            self.page_size = 1000

    # --- content, for tests ---

    def _new_sha(self, files: Mapping[str, bytes], parent: str | None) -> str:
        self._counter += 1
        digest = hashlib.sha1(json.dumps([parent, self._counter, sorted((k, git_oid(v)) for k, v in files.items())])
                              .encode())
        return digest.hexdigest()

    def _commit(self, repo: Repo, branch: str, files: dict[str, bytes], message: str) -> str:
        sha = self._new_sha(files, repo.branches.get(branch))
        repo.commits[sha] = files
        repo.messages[sha] = message
        repo.branches[branch] = sha
        return sha

    def create_repo(self, repo_id: str, repo_type: str = "model", private: bool = False) -> Repo:
        with self._lock:
            key = (repo_type, repo_id)
            if key not in self.repos:
                repo = Repo(repo_type, repo_id, private)
                self._commit(repo, "main", {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"},
                             "initial commit")
                self.repos[key] = repo
            return self.repos[key]

    def put(self, repo_id: str, files: Mapping[str, bytes | str | Path] | Path, repo_type: str = "model",
            branch: str = "main", keep: bool = False, message: str = "test upload") -> str:
        """Commit ``files`` (path -> content, or a folder) to ``branch``; the branch then holds exactly those
        files (plus ``.gitattributes``), or the old ones too with ``keep``. Returns the commit id."""
        if isinstance(files, Path):
            files = {p.relative_to(files).as_posix(): p for p in sorted(files.rglob("*")) if p.is_file()}
        content = {name: (v.read_bytes() if isinstance(v, Path) else v.encode() if isinstance(v, str) else v)
                   for name, v in files.items()}
        repo = self.create_repo(repo_id, repo_type)
        with self._lock:
            base = repo.branches.get(branch) or repo.branches["main"]
            old = dict(repo.commits[base]) if keep else {".gitattributes": repo.commits[base].get(".gitattributes",
                                                                                              b"")}
            return self._commit(repo, branch, {**old, **content}, message)

    def files(self, repo_id: str, repo_type: str = "model", revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[(repo_type, repo_id)]
        sha = repo.resolve(revision)
        assert sha is not None, f"{repo_id} has no revision {revision}"
        return dict(repo.commits[sha])

    def fail(self, pattern: str, status: int, method: str | None = None, times: int | None = None) -> None:
        """Answer requests whose path matches the regex ``pattern`` with ``status`` (``times`` times, or always)."""
        self.failures.append(Failure(re.compile(pattern), status, method, times))

    def _injected(self, method: str, path: str) -> int | None:
        with self._lock:
            for failure in self.failures:
                if failure.pattern.search(unquote(path)) and failure.method in (None, method) \
                        and failure.remaining != 0:
                    if failure.remaining is not None:
                        failure.remaining -= 1
                    return failure.status
        return None


class _Handler(BaseHTTPRequestHandler):
    hub: LocalHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    # --- plumbing ---

    def _send(self, status: int, body: bytes = b"", headers: Mapping[str, str] | None = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, payload: Any, headers: Mapping[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), headers)

    def _error(self, status: int, code: str | None, message: str, headers: Mapping[str, str] | None = None) -> None:
        extra = {"X-Error-Message": message, **({"X-Error-Code": code} if code else {}), **(headers or {})}
        self._json(status, {"error": message}, extra)

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _authorized(self) -> bool:
        token = self.hub.token
        return token is None or self.headers.get("Authorization") == f"Bearer {token}"

    def _repo(self, repo_type: str, repo_id: str) -> Repo | None:
        repo = self.hub.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not self._authorized()):
            self._error(404, "RepoNotFound", f"Repository not found: {repo_id}")
            return None
        return repo

    def _revision(self, repo: Repo, revision: str) -> str | None:
        sha = repo.resolve(revision)
        if sha is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return sha

    def _route(self) -> None:
        url = urlsplit(self.path)
        self.hub.requests.append((self.command, url.path))
        status = self.hub._injected(self.command, url.path)
        if status is not None:
            self._body()
            headers = {"Retry-After": "0"} if status >= 500 else {}
            self._error(status, None, f"injected failure {status}", headers)
            return
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        handled = self._dispatch(parts, query)
        if not handled:
            self._body()
            self.hub.unhandled.append((self.command, url.path))
            self._error(404, None, f"the local hub does not implement {self.command} {url.path}")

    do_GET = do_HEAD = do_POST = _route

    def _dispatch(self, parts: list[str], query: dict[str, str]) -> bool:
        method = self.command
        if parts[:1] == ["api"]:
            rest = parts[1:]
            if method == "POST" and rest == ["repos", "create"]:
                self._create_repo()
            elif method == "POST" and rest == ["validate-yaml"]:
                self._validate_yaml()
            elif method == "GET" and rest == ["agent-harnesses"]:  # the client's user-agent registry
                self._json(200, {"standardEnvVars": [], "harnesses": {}})
            elif len(rest) >= 3 and rest[0] in REPO_TYPES:
                kind, repo_id, tail = REPO_TYPES[rest[0]], f"{rest[1]}/{rest[2]}", rest[3:]
                if method == "GET" and (not tail or tail[0] == "revision" and len(tail) == 2):
                    self._info(kind, repo_id, tail[1] if tail else "main")
                elif method == "GET" and len(tail) >= 2 and tail[0] == "tree":
                    self._tree(kind, repo_id, tail[1], "/".join(tail[2:]), query)
                elif method == "POST" and len(tail) == 2 and tail[0] == "preupload":
                    self._preupload(kind, repo_id, tail[1])
                elif method == "POST" and len(tail) == 2 and tail[0] == "commit":
                    self._commit(kind, repo_id, tail[1])
                elif method == "POST" and len(tail) == 2 and tail[0] == "branch":
                    self._branch(kind, repo_id, tail[1])
                else:
                    return False
            else:
                return False
            return True
        kind = "model"
        if parts[:1] == ["datasets"]:
            kind, parts = "dataset", parts[1:]
        if method in ("GET", "HEAD") and len(parts) >= 5 and parts[2] == "resolve":
            self._resolve(kind, f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
            return True
        return False

    # --- downloads ---

    def _info(self, kind: str, repo_id: str, revision: str) -> None:
        repo = self._repo(kind, repo_id)
        sha = repo and self._revision(repo, revision)
        if repo is None or sha is None:
            return
        self._json(200, {"id": repo_id, "sha": sha, "private": repo.private, "lastModified": "2024-01-01T00:00:00Z",
                         "siblings": [{"rfilename": name} for name in sorted(repo.commits[sha])]})

    def _tree(self, kind: str, repo_id: str, revision: str, path: str, query: dict[str, str]) -> None:
        repo = self._repo(kind, repo_id)
        sha = repo and self._revision(repo, revision)
        if repo is None or sha is None:
            return
        recursive = query.get("recursive", "false").lower() == "true"
        prefix = f"{path}/" if path else ""
        files = {name: content for name, content in repo.commits[sha].items() if name.startswith(prefix)}
        if path and not files:
            self._error(404, "EntryNotFound", f"{path} does not exist on {revision}", {"X-Repo-Commit": sha})
            return
        entries: dict[str, dict[str, Any]] = {}
        for name, content in sorted(files.items()):
            rel = name[len(prefix):].split("/")
            for depth in range(1, len(rel)):
                folder = prefix + "/".join(rel[:depth])
                if recursive or depth == 1:
                    entries.setdefault(folder, {"type": "directory", "oid": git_oid(folder.encode()), "size": 0,
                                                "path": folder})
            if recursive or len(rel) == 1:
                entries[name] = {"type": "file", "oid": git_oid(content), "size": len(content), "path": name}
        listing = [entries[k] for k in sorted(entries)]
        start = int(query.get("cursor", "0"))
        page = listing[start:start + self.hub.page_size]
        headers = {}
        if start + self.hub.page_size < len(listing):
            link = (f"{self.hub.url}/api/{kind}s/{repo_id}/tree/{quote(revision, safe='')}"
                    f"{'/' + quote(path, safe='') if path else ''}?recursive={str(recursive).lower()}"
                    f"&cursor={start + self.hub.page_size}")
            headers["Link"] = f'<{link}>; rel="next"'
        self._json(200, page, headers)

    def _resolve(self, kind: str, repo_id: str, revision: str, filename: str) -> None:
        repo = self._repo(kind, repo_id)
        sha = repo and self._revision(repo, revision)
        if repo is None or sha is None:
            return
        content = repo.commits[sha].get(filename)
        if content is None:
            self._error(404, "EntryNotFound", f"{filename} does not exist on {revision}", {"X-Repo-Commit": sha})
            return
        headers = {"X-Repo-Commit": sha, "ETag": f'"{git_oid(content)}"', "Accept-Ranges": "bytes"}
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if match and self.command == "GET":
            first = int(match.group(1))
            last = int(match.group(2)) if match.group(2) else len(content) - 1
            headers["Content-Range"] = f"bytes {first}-{last}/{len(content)}"
            self._send(206, content[first:last + 1], headers, "application/octet-stream")
            return
        self._send(200, content, headers, "application/octet-stream")

    # --- uploads ---

    def _write_access(self) -> bool:
        if not self._authorized():
            self._body()
            self._error(401, None, "Invalid credentials in Authorization header")
            return False
        return True

    def _create_repo(self) -> None:
        if not self._write_access():
            return
        payload = json.loads(self._body() or b"{}")
        organization, name = payload.get("organization"), payload.get("name")
        kind = payload.get("type") or "model"
        if not organization or not name:
            self._error(400, None, "the local hub needs organization and name")
            return
        repo_id = f"{organization}/{name}"
        url = f"{self.hub.url}/{'datasets/' if kind == 'dataset' else ''}{repo_id}"
        if (kind, repo_id) in self.hub.repos:
            self._json(409, {"error": "You already created this repo", "url": url})
            return
        private = payload.get("private") or payload.get("visibility") == "private"
        self.hub.create_repo(repo_id, kind, private=bool(private))
        self._json(200, {"url": url, "name": repo_id})

    def _validate_yaml(self) -> None:
        payload = json.loads(self._body() or b"{}")
        text = payload.get("content", "")
        match = re.match(r"---\n(.*?)\n---\n", text, flags=re.DOTALL)
        try:
            meta = yaml.safe_load(match.group(1)) if match else {}
        except yaml.YAMLError as err:
            self._json(400, {"errors": [{"message": f"invalid YAML: {err}"}]})
            return
        if meta is not None and not isinstance(meta, dict):
            self._json(400, {"errors": [{"message": "the metadata must be a YAML mapping"}]})
            return
        self._json(200, {"errors": [], "warnings": []})

    def _branch(self, kind: str, repo_id: str, branch: str) -> None:
        if not self._write_access():
            return
        body = json.loads(self._body() or b"{}")
        repo = self._repo(kind, repo_id)
        if repo is None:
            return
        if branch in repo.branches:
            self._error(409, None, f"Reference already exists: refs/heads/{branch}")
            return
        sha = self._revision(repo, body.get("startingPoint") or "main")
        if sha is None:
            return
        repo.branches[branch] = sha
        self._json(200, {})

    def _preupload(self, kind: str, repo_id: str, revision: str) -> None:
        if not self._write_access():
            return
        payload = json.loads(self._body() or b"{}")
        repo = self._repo(kind, repo_id)
        sha = repo and self._revision(repo, revision)
        if repo is None or sha is None:
            return
        current = repo.commits[sha]
        files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                  "oid": git_oid(current[f["path"]]) if f["path"] in current else None}
                 for f in payload.get("files", [])]
        self._json(200, {"files": files, "commitOid": sha})

    def _commit(self, kind: str, repo_id: str, revision: str) -> None:
        if not self._write_access():
            return
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        repo = self._repo(kind, repo_id)
        sha = repo and self._revision(repo, revision)
        if repo is None or sha is None:
            return
        files = dict(repo.commits[sha])
        summary = ""
        for item in lines:
            key, value = item["key"], item["value"]
            if key == "header":
                summary = value.get("summary", "")
                parent = value.get("parentCommit")
                if parent is not None and parent != sha:
                    self._error(412, None, f"parent commit {parent} is not the head {sha}")
                    return
            elif key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                if value["path"] not in files:
                    self._error(404, "EntryNotFound", f"A file with this name doesn't exist: {value['path']}")
                    return
                del files[value["path"]]
            elif key == "deletedFolder":
                folder = value["path"].rstrip("/") + "/"
                files = {k: v for k, v in files.items() if not k.startswith(folder)}
            else:  # lfsFile, copies: never asked for, since preupload answers "regular"
                self._error(400, None, f"the local hub does not accept {key} operations")
                return
        with self.hub._lock:
            new = self.hub._commit(repo, revision, files, summary)
        prefix = f"{self.hub.url}/{'datasets/' if kind == 'dataset' else ''}{repo_id}"
        self._json(200, {"success": True, "commitOid": new, "commitUrl": f"{prefix}/commit/{new}",
                         "pullRequestUrl": None})


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there once the socket is closed
