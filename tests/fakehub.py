"""A fake Hugging Face Hub for the provisioning tests: a real HTTP server on 127.0.0.1.

It speaks the endpoints huggingface_hub 2.4 uses (build_and_ecosystem.md §6.1):

- ``GET /api/models/{org}/{name}[/revision/{rev}]`` (``?blobs=true`` adds sizes, blob ids
  and LFS checksums to ``siblings``);
- ``GET /api/models/{org}/{name}/tree/{rev}[/{path}]``;
- ``HEAD``/``GET /{org}/{name}/resolve/{rev}/{path}`` with ``X-Repo-Commit``, ``ETag``
  (sha256 for LFS files, the Git blob id otherwise), ``Content-Length`` and ``Range``;
- gated repositories answer ``resolve`` with 401 (no token) or 403 (wrong token) and
  ``X-Error-Code: GatedRepo``; anything unknown is a JSON 404.

Every request is logged (:attr:`FakeHub.requests`) and faults can be injected per file
(:meth:`FakeHub.fault`): drop the connection mid-body, serve corrupted bytes, or stall.

Run as a script, it is the client side of a test: ``python fakehub.py '<json calls>'``
makes ``pid_native.provision()`` calls in a fresh interpreter (so huggingface_hub reads
``HF_ENDPOINT``/``HF_HOME`` from the environment the test set) and prints one JSON line
with, per call, the result or the error and every progress event.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

_LFS_SUFFIXES = (".safetensors", ".bin", ".model", ".pth")


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


@dataclass
class FakeRepo:
    """A model repository at a single commit.

    Attributes:
        files: path -> content.
        gated: ``resolve`` needs the hub's token.
        declared_sizes: sizes to announce instead of the real ones (to simulate huge files).
    """

    files: dict[str, bytes]
    gated: bool = False
    declared_sizes: dict[str, int] = field(default_factory=dict)

    @property
    def sha(self) -> str:
        h = hashlib.sha1(usedforsecurity=False)
        for name in sorted(self.files):
            h.update(name.encode() + b"\0" + hashlib.sha256(self.files[name]).digest())
        return h.hexdigest()

    def is_lfs(self, path: str) -> bool:
        return path.endswith(_LFS_SUFFIXES) or path == "tokenizer.json"

    def size(self, path: str) -> int:
        return self.declared_sizes.get(path, len(self.files[path]))

    def etag(self, path: str) -> str:
        data = self.files[path]
        return hashlib.sha256(data).hexdigest() if self.is_lfs(path) else git_blob_id(data)

    def entry(self, path: str) -> dict[str, Any]:
        """The ``siblings``/tree metadata of one file, as the real Hub sends it."""
        data = self.files[path]
        if not self.is_lfs(path):
            return {"size": self.size(path), "blobId": git_blob_id(data)}
        sha256 = hashlib.sha256(data).hexdigest()
        pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {self.size(path)}\n"
        return {
            "size": self.size(path),
            "blobId": git_blob_id(pointer.encode()),
            "lfs": {"sha256": sha256, "size": self.size(path), "pointerSize": len(pointer)},
        }


@dataclass
class Fault:
    kind: str  # "drop" (close mid-body), "corrupt" (flip bytes), "stall" (half, then wait)
    times: int


class FakeHub:
    """The server. ``with FakeHub(repos) as hub:`` serves on ``hub.url``."""

    def __init__(self, repos: dict[str, FakeRepo], token: str = "hf_fake_token") -> None:
        self.repos = repos
        self.token = token
        self.requests: list[tuple[str, str, dict[str, str]]] = []  # method, path, range/authorization
        self.faults: dict[tuple[str, str], Fault] = {}
        self.release = threading.Event()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()

    def fault(self, repo: str, path: str, kind: str, times: int = 1) -> None:
        """Make the next ``times`` GETs of ``repo``/``path`` misbehave."""
        self.faults[(repo, path)] = Fault(kind, times)

    def gets(self, suffix: str = "") -> list[tuple[str, str, dict[str, str]]]:
        """Logged GETs of files (``resolve``) whose path ends with ``suffix``."""
        return [r for r in self.requests if r[0] == "GET" and "/resolve/" in r[1] and r[1].endswith(suffix)]

    def _take_fault(self, repo: str, path: str) -> str | None:
        with self._lock:
            fault = self.faults.get((repo, path))
            if fault is None or fault.times == 0:
                return None
            fault.times -= 1
            return fault.kind


_API = re.compile(r"/api/models/([^/]+/[^/]+?)(?:/revision/([^/]+))?/?$")
_TREE = re.compile(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?$")
_RESOLVE = re.compile(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_HEAD(self) -> None:
            self._route(head=True)

        def do_GET(self) -> None:
            self._route(head=False)

        def _route(self, head: bool) -> None:
            url = urlsplit(self.path)
            path = unquote(url.path)
            headers = {
                k.lower(): v for k, v in self.headers.items() if k.lower() in ("range", "authorization")
            }
            hub.requests.append((self.command, path, headers))
            if m := _RESOLVE.fullmatch(path):
                self._resolve(m.group(1), m.group(2), m.group(3), head)
            elif m := _TREE.fullmatch(path):
                self._tree(m.group(1), m.group(2), m.group(3) or "")
            elif m := _API.fullmatch(path):
                self._info(m.group(1), m.group(2) or "main", parse_qs(url.query).get("blobs") == ["true"])
            else:
                self._error(404, "NotFound", "no such endpoint")

        def _send(self, status: int, headers: dict[str, str], body: bytes = b"", head: bool = False) -> None:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            if "Content-Length" not in headers:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:  # a body after HEAD would corrupt the keep-alive stream
                self.wfile.write(body)

        def _json(self, obj: Any) -> None:
            self._send(200, {"Content-Type": "application/json"}, json.dumps(obj).encode())

        def _error(self, status: int, code: str, message: str, extra: dict[str, str] | None = None) -> None:
            body = json.dumps({"error": message}).encode()
            headers = {"Content-Type": "application/json", "X-Error-Code": code, "X-Error-Message": message}
            self._send(status, {**headers, **(extra or {})}, body, head=self.command == "HEAD")

        def _repo(self, repo_id: str, revision: str) -> FakeRepo | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
            elif revision not in ("main", repo.sha):
                self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                return None
            return repo

        def _info(self, repo_id: str, revision: str, blobs: bool) -> None:
            repo = self._repo(repo_id, revision)
            if repo is None:
                return
            siblings = [{"rfilename": p, **(repo.entry(p) if blobs else {})} for p in sorted(repo.files)]
            self._json(
                {
                    "id": repo_id,
                    "modelId": repo_id,
                    "sha": repo.sha,
                    "private": False,
                    "gated": "manual" if repo.gated else False,
                    "siblings": siblings,
                }
            )

        def _tree(self, repo_id: str, revision: str, prefix: str) -> None:
            repo = self._repo(repo_id, revision)
            if repo is None:
                return
            items = []
            for p in sorted(repo.files):
                if prefix and not p.startswith(prefix.rstrip("/") + "/"):
                    continue
                e = repo.entry(p)
                item = {"type": "file", "oid": e["blobId"], "size": e["size"], "path": p}
                if "lfs" in e:
                    item["lfs"] = {
                        "oid": e["lfs"]["sha256"],
                        "size": e["size"],
                        "pointerSize": e["lfs"]["pointerSize"],
                    }
                items.append(item)
            self._json(items)

        def _resolve(self, repo_id: str, revision: str, path: str, head: bool) -> None:
            repo = self._repo(repo_id, revision)
            if repo is None:
                return
            if repo.gated and self.headers.get("Authorization") != f"Bearer {hub.token}":
                status = 403 if self.headers.get("Authorization") else 401
                self._error(
                    status,
                    "GatedRepo",
                    f"Access to model {repo_id} is restricted and you are not in the authorized list.",
                )
                return
            if path not in repo.files:
                self._error(404, "EntryNotFound", f"{path} does not exist", {"X-Repo-Commit": repo.sha})
                return
            data = repo.files[path]
            common = {
                "X-Repo-Commit": repo.sha,
                "ETag": f'"{repo.etag(path)}"',
                "Accept-Ranges": "bytes",
                "Content-Type": "application/octet-stream",
            }
            if head:
                self._send(200, {**common, "Content-Length": str(repo.size(path))}, head=True)
                return
            start = 0
            if m := re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", "")):
                start = int(m.group(1))
            body = data[start:]
            status = 206 if start else 200
            if start:
                common["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            fault = hub._take_fault(repo_id, path)
            if fault == "corrupt":
                body = bytes(b ^ 0xFF for b in body[:64]) + body[64:]
            if fault in ("drop", "stall"):
                self.send_response(status)
                for k, v in {**common, "Content-Length": str(len(body))}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                if fault == "stall":
                    hub.release.wait(60)
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:  # the client is already gone
                    pass
                return
            self._send(status, {**common, "Content-Length": str(len(body))}, body)

    return Handler


def _event_log(events: list[dict[str, Any]]) -> Any:
    return lambda e: events.append(e.model_dump(mode="json"))


def _client(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one ``provision()`` or ``provisioning.plan()`` call; ``spec`` has ``call`` and ``kwargs``."""
    from pid_native import PidError, provision, provisioning

    events: list[dict[str, Any]] = []
    kwargs = dict(spec.get("kwargs", {}))
    try:
        if spec["call"] == "provision":
            result: Any = str(provision(progress=_event_log(events), **kwargs))
        elif spec["call"] == "plan":
            result = provisioning.plan(**kwargs).model_dump(mode="json")
        else:
            raise ValueError(f"unknown call {spec['call']!r}")
    except PidError as exc:
        return {
            "ok": False,
            "type": type(exc).__name__,
            "code": exc.code,
            "message": exc.message,
            "events": events,
        }
    return {"ok": True, "result": result, "events": events}


if __name__ == "__main__":
    # argv[1]: a JSON list of calls, run in order in this interpreter; prints a JSON list of outcomes.
    outcomes = [_client(spec) for spec in json.loads(sys.argv[1])]
    sys.stdout.write("\n" + json.dumps(outcomes) + "\n")
