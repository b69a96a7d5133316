"""A small stand-in for the Hugging Face Hub on 127.0.0.1, for testing uploads without a network.

It answers the requests `HfApi.create_repo` and `HfApi.upload_folder` send (huggingface_hub 2.x, `hf_api.py` and
`_commit_api.py`):

- `POST /api/repos/create` (JSON `{"name", "organization", "visibility" | "private", ...}`): 200 with the repository
  URL, or 409 when the repository exists;
- `POST /api/validate-yaml` (sent when a README.md is uploaded): no errors, no warnings;
- `POST /api/models/{repo}/preupload/{revision}` (JSON `{"files": [{"path", "sample", "size"}]}`): every file is to be
  uploaded as "regular" (base64 inside the commit), none ignored, none on the server yet;
- `POST /api/models/{repo}/commit/{revision}` (ndjson: a `header` line, then one `file` line per file with base64
  `content`): the decoded files are recorded; any other kind of line (LFS, deletion) is refused with 400.

Every request is recorded. A request whose `Authorization` header is not `Bearer <token>` gets 401, as the Hub
answers a bad token; with `fail_with=STATUS`, every other request gets that status (e.g. 500, a Hub outage). The
server serves at most `max_requests` requests (then 400) and waits at most 10 seconds on a client, so that a
misbehaving client can neither loop nor hang it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

_REPO_ENDPOINT = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/(?P<action>preupload|commit)/(?P<revision>[^/?]+)$")


@dataclass
class RecordedRequest:
    """One request the fake Hub received: method, path (with query), headers (lower-case names) and body."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class FakeHubState:
    """What the fake Hub has seen and stores, shared by its handler threads (guarded by `lock`)."""

    token: str
    max_requests: int
    fail_with: int | None = None
    endpoint: str = ""
    requests: list[RecordedRequest] = field(default_factory=list)
    created: dict[str, dict[str, Any]] = field(default_factory=dict)
    files: dict[str, dict[str, bytes]] = field(default_factory=dict)
    commits: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class FakeHubHandler(BaseHTTPRequestHandler):
    """Answers one request against the `FakeHubState` of its server (`self.server.state`)."""

    server_version = "FakeHub/1.0"
    timeout = 10.0

    def log_message(self, format: str, *args: Any) -> None:
        """Keep the test output quiet: requests are recorded in the state instead of logged."""

    def do_GET(self) -> None:
        """Answer a GET: the fake holds no repository metadata, so every GET that passes authentication is a 404."""
        if self._record_and_authorize(b""):
            self._send_json(404, {"error": f"Not found: {self.path}"})

    def do_POST(self) -> None:
        """Answer a POST to one of the endpoints `create_repo` and `upload_folder` use (see the module docstring).

        A malformed request gets 400 (not a dropped connection, which the client would retry with backoff).
        """
        length = self.headers.get("Content-Length")
        if length is None:
            self._send_json(411, {"error": "The fake Hub needs a Content-Length."})
            return
        body = self.rfile.read(int(length))
        if not self._record_and_authorize(body):
            return
        path = urlsplit(self.path).path
        match = _REPO_ENDPOINT.match(path)
        try:
            if path == "/api/repos/create":
                self._create_repo(json.loads(body))
            elif path == "/api/validate-yaml":
                self._validate_yaml(json.loads(body))
            elif match and match["action"] == "preupload":
                self._preupload(json.loads(body))
            elif match and match["action"] == "commit":
                self._commit(match["repo"], body)
            else:
                self._send_json(404, {"error": f"The fake Hub has no endpoint {path}"})
        except (KeyError, TypeError, ValueError) as error:
            self._send_json(400, {"error": f"Malformed request to {path}: {error!r}"})

    @property
    def state(self) -> FakeHubState:
        """The state shared by all requests to this server."""
        return self.server.state  # type: ignore[attr-defined]

    def _record_and_authorize(self, body: bytes) -> bool:
        """Record the request; answer it with 400 (request budget spent) or 401 (bad token) and return False."""
        with self.state.lock:
            self.state.requests.append(
                RecordedRequest(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body)
            )
            count = len(self.state.requests)
        if count > self.state.max_requests:
            self._send_json(400, {"error": f"The fake Hub serves at most {self.state.max_requests} requests."})
            return False
        if self.headers.get("Authorization") != f"Bearer {self.state.token}":
            message = "Invalid credentials in Authorization header"
            self._send_json(401, {"error": message}, extra_headers={"X-Error-Message": message})
            return False
        if self.state.fail_with is not None:
            self._send_json(self.state.fail_with, {"error": "The fake Hub is told to fail."})
            return False
        return True

    def _create_repo(self, payload: dict[str, Any]) -> None:
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        url = f"{self.state.endpoint}/{repo_id}"
        with self.state.lock:
            exists = repo_id in self.state.created
            if not exists:
                self.state.created[repo_id] = payload
                self.state.files[repo_id] = {}
        if exists:
            self._send_json(409, {"error": "You already created this model repo", "url": url})
        else:
            self._send_json(200, {"url": url, "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24]})

    def _validate_yaml(self, payload: dict[str, Any]) -> None:
        if not isinstance(payload["content"], str):
            raise TypeError("content must be the README text")
        self._send_json(200, {"errors": [], "warnings": []})

    def _preupload(self, payload: dict[str, Any]) -> None:
        files = []
        for entry in payload["files"]:
            if (
                not isinstance(entry["size"], int)
                or len(base64.b64decode(entry["sample"], validate=True)) > entry["size"]
            ):
                raise ValueError(f"bad size or sample for {entry['path']}")
            files.append({"path": entry["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None})
        self._send_json(200, {"files": files})

    def _commit(self, repo_id: str, body: bytes) -> None:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0]["key"] != "header":
            self._send_json(400, {"error": "A commit starts with a header line."})
            return
        received: dict[str, bytes] = {}
        for line in lines[1:]:
            value = line["value"]
            if line["key"] != "file" or value.get("encoding") != "base64":
                self._send_json(400, {"error": f"The fake Hub only takes base64 regular files, got {line['key']}."})
                return
            received[value["path"]] = base64.b64decode(value["content"], validate=True)
        oid = hashlib.sha1(body).hexdigest()
        with self.state.lock:
            missing = repo_id not in self.state.files
            if not missing:
                self.state.files[repo_id].update(received)
                self.state.commits.append({"repo_id": repo_id, "oid": oid, **lines[0]["value"]})
        if missing:
            self._send_json(
                404, {"error": f"Repository {repo_id} not found"}, extra_headers={"X-Error-Code": "RepoNotFound"}
            )
            return
        self._send_json(
            200, {"commitUrl": f"{self.state.endpoint}/{repo_id}/commit/{oid}", "commitOid": oid, "success": True}
        )

    def _send_json(self, status: int, payload: dict[str, Any], extra_headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (extra_headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)


class FakeHub:
    """The fake Hub server, started on a free port of 127.0.0.1 for the duration of a `with` block.

    Attributes:
        endpoint: the URL to pass as the Hub endpoint, `http://127.0.0.1:PORT`.
        state: what the server received (`requests`), created (`created`, repo id -> create payload), and stores
            (`files`, repo id -> path -> bytes; `commits`).
    """

    def __init__(self, *, token: str, max_requests: int = 32, fail_with: int | None = None) -> None:
        self.state = FakeHubState(token=token, max_requests=max_requests, fail_with=fail_with)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHubHandler)
        self._server.state = self.state  # type: ignore[attr-defined]
        host, port = self._server.server_address[:2]
        self.endpoint = f"http://{host}:{port}"
        self.state.endpoint = self.endpoint
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
