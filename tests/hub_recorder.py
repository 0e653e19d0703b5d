"""A local stand-in for the Hugging Face Hub's write API that records what a push uploads.

It answers the requests ``huggingface_hub`` 2.x makes for ``create_repo`` and ``create_commit``/``upload_folder``
(read from its ``hf_api.py``, ``_commit_api.py`` and ``_upload_pipeline.py``), on 127.0.0.1 only:

- ``POST /api/repos/create``: the repository's URL;
- ``POST /api/validate-yaml``: no errors (``create_commit`` checks a README.md's metadata first);
- ``POST /api/{type}s/{repo_id}/preupload/{revision}``: "regular" for every file, so that contents come inline in
  the commit (no LFS or Xet transfer);
- ``POST /api/{type}s/{repo_id}/commit/{revision}``: the NDJSON commit, whose base64 file contents are recorded;
- ``GET``/``HEAD /{repo_id}/resolve/{revision}/{path}``: 404 ``EntryNotFound`` (no file is served back: a push that
  looks for an existing README.md, as transformers' ``push_to_hub`` does, finds none).

Any other request gets a 404 and is listed in ``unhandled``. Write requests without the expected bearer token get a
401, as on the Hub.

Example::

    with RecordingHub(token="hf_fake") as hub:  # point HF_ENDPOINT / huggingface_hub.constants.ENDPOINT at hub.url
        HfApi(endpoint=hub.url, token="hf_fake").upload_folder(repo_id="user/repo", folder_path="out")
    hub.files["user/repo"]  # {"README.md": b"...", ...}
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

from typing_extensions import Self

REPO = r"(?P<repo_id>[^/]+/[^/]+)"
PREUPLOAD = re.compile(rf"^/api/(?P<type>models|datasets|spaces)/{REPO}/preupload/(?P<revision>[^/]+)$")
COMMIT = re.compile(rf"^/api/(?P<type>models|datasets|spaces)/{REPO}/commit/(?P<revision>[^/]+)$")
RESOLVE = re.compile(rf"^/{REPO}/resolve/(?P<revision>[^/]+)/(?P<path>.+)$")


@dataclass
class Commit:
    repo_id: str
    revision: str
    summary: str
    files: dict[str, bytes] = field(default_factory=dict)
    other_operations: list[dict] = field(default_factory=list)  # LFS pointers, deletions: none expected here


class RecordingHub:
    """An HTTP server in a background thread; ``files[repo_id]`` is each repository's content after its commits."""

    def __init__(self, token: str = "hf_fake") -> None:
        self.token = token
        self.created_repos: list[dict] = []
        self.commits: list[Commit] = []
        self.files: dict[str, dict[str, bytes]] = {}
        self.requests: list[str] = []
        self.unhandled: list[str] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="recording-hub", daemon=True
        )

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects; every answer carries Content-Length

            def log_message(self, *args) -> None:  # the test's output is not the place for an access log
                pass

            def do_GET(self) -> None:
                self._dispatch()

            def do_HEAD(self) -> None:
                self._dispatch()

            def do_POST(self) -> None:
                self._dispatch()

            def do_PUT(self) -> None:
                self._dispatch()

            def _dispatch(self) -> None:
                path = urlsplit(self.path).path
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with hub._lock:
                    hub.requests.append(f"{self.command} {path}")
                    # any failure of the stand-in is a 400, not a 500: the client retries 5xx answers with backoff
                    try:
                        status, payload, headers = hub._answer(self.command, path, body, self.headers)
                    except Exception as error:  # noqa: BLE001
                        status, payload, headers = 400, {"error": f"{type(error).__name__}: {error}"}, {}
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

        return Handler

    def _answer(self, method: str, path: str, body: bytes, headers) -> tuple[int, dict, dict]:
        if method == "POST" and headers.get("Authorization") != f"Bearer {self.token}":
            return 401, {"error": "Invalid credentials in Authorization header"}, {"X-Error-Code": "Unauthorized"}
        if method == "POST" and path == "/api/repos/create":
            request = json.loads(body)
            self.created_repos.append(request)
            repo_id = f"{request['organization']}/{request['name']}"
            return (
                200,
                {"url": f"{self.url}/{repo_id}", "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()},
                {},
            )
        if method == "POST" and path == "/api/validate-yaml":
            return 200, {"errors": [], "warnings": []}, {}
        if method == "POST" and PREUPLOAD.match(path):
            files = json.loads(body)["files"]
            return (
                200,
                {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]},
                {},
            )
        if method == "POST" and (match := COMMIT.match(path)):
            return 200, self._commit(match["repo_id"], unquote(match["revision"]), body), {}
        if method in ("GET", "HEAD") and RESOLVE.match(path):
            return 404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"}
        self.unhandled.append(f"{method} {path}")
        return 404, {"error": f"not implemented by RecordingHub: {method} {path}"}, {}

    def _commit(self, repo_id: str, revision: str, body: bytes) -> dict:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        commit = Commit(repo_id=repo_id, revision=revision, summary=header["summary"])
        for line in lines:
            if line["key"] == "file" and line["value"].get("encoding") == "base64":
                commit.files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
            elif line["key"] != "header":
                commit.other_operations.append(line)
        self.commits.append(commit)
        self.files.setdefault(repo_id, {}).update(commit.files)
        oid = hashlib.sha1(body).hexdigest()
        return {"commitUrl": f"{self.url}/{repo_id}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None}
