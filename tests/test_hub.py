"""Hub checkpoints through the real huggingface_hub client, against a fake Hub served on 127.0.0.1."""

import base64
import hashlib
import http.server
import importlib
import json
import re
import threading
from urllib.parse import unquote, urlsplit

import pytest
import yaml


class FakeHub(http.server.ThreadingHTTPServer):
    """The Hub endpoints that ``snapshot_download`` calls, for repos held in memory.

    ``repos[repo_id] = {"refs": {name: sha}, "commits": {sha: {path: bytes}}, "access": "public"|"private"|"gated"}``;
    private and gated repos need ``Authorization: Bearer <token>``.
    """

    def __init__(self, token="hf_good_token"):
        super().__init__(("127.0.0.1", 0), FakeHubHandler)
        self.repos, self.token, self.requests = {}, token, []
        self.url = f"http://127.0.0.1:{self.server_port}"

    def add_repo(self, repo_id, files, revision="main", access="public"):
        """Commit ``files`` (path -> bytes) as ``revision`` of ``repo_id``; returns the commit sha."""
        repo = self.repos.setdefault(repo_id, {"refs": {}, "commits": {}, "access": access})
        sha = hashlib.sha1(json.dumps([repo_id, revision, sorted(files)]).encode() + b"".join(
            files[k] for k in sorted(files))).hexdigest()
        repo["refs"][revision] = sha
        repo["commits"][sha] = dict(files)
        return sha


class FakeHubHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, status, body=b"", headers=None):
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def error(self, status, code):
        self.reply(status, json.dumps({"error": code}).encode(), {"X-Error-Code": code})

    def do_GET(self):
        hub = self.server
        path = unquote(urlsplit(self.path).path)
        hub.requests.append((self.command, path))
        route = (re.fullmatch(r"/api/models/([^/]+/[^/]+)/(revision|tree)/([^/]+)(?:/.*)?", path)
                 or re.fullmatch(r"/([^/]+/[^/]+)/(resolve)/([^/]+)/(.+)", path))
        if route is None:
            return self.error(404, "NotFound")
        repo_id, kind, revision = route.group(1, 2, 3)
        repo = hub.repos.get(repo_id)
        authorized = self.headers.get("Authorization") == f"Bearer {hub.token}"
        if repo is None or (repo["access"] == "private" and not authorized):
            return self.error(401 if repo is None or not authorized else 404, "RepoNotFound")
        sha = revision if revision in repo["commits"] else repo["refs"].get(revision)
        if sha is None:
            return self.error(404, "RevisionNotFound")
        files = repo["commits"][sha]
        if kind == "revision":
            siblings = [{"rfilename": name} for name in sorted(files)]
            return self.reply(200, json.dumps({"id": repo_id, "sha": sha, "siblings": siblings}).encode(),
                              {"Content-Type": "application/json"})
        if kind == "tree":
            tree = [{"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                    for name, data in sorted(files.items())]
            return self.reply(200, json.dumps(tree).encode(), {"Content-Type": "application/json"})
        if repo["access"] == "gated" and not authorized:
            return self.error(401, "GatedRepo")
        name = route.group(4)
        if name not in files:
            return self.error(404, "EntryNotFound")
        data = files[name]
        self.reply(200, data, {"X-Repo-Commit": sha, "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
                               "Content-Type": "application/octet-stream"})

    do_HEAD = do_GET

    def do_POST(self):
        """Writes (need the token): create a repo, preupload (every file "regular"), commit (ndjson, base64)."""
        hub = self.server
        path = urlsplit(self.path).path
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        hub.requests.append((self.command, path))
        if self.headers.get("Authorization") != f"Bearer {hub.token}":
            return self.error(401, "Unauthorized")
        if path == "/api/validate-yaml":  # the Hub checks a model card's front matter before a commit
            front = re.match(r"---\n(.*?)\n---\n", json.loads(body)["content"], re.S)
            ok = front is not None and isinstance(yaml.safe_load(front.group(1)), dict)
            return self.reply(200 if ok else 400, json.dumps(
                {"errors": [] if ok else [{"message": "no YAML front matter"}], "warnings": []}).encode())
        if path == "/api/repos/create":
            payload = json.loads(body)
            repo_id = f"{payload['organization']}/{payload['name']}"
            status = 409 if repo_id in hub.repos else 200
            hub.repos.setdefault(repo_id, {"refs": {}, "commits": {}, "access": payload.get("visibility", "public")})
            return self.reply(status, json.dumps({"url": f"{hub.url}/{repo_id}"}).encode())
        route = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit)/([^/]+)", path)
        if route is None or route.group(1) not in hub.repos:
            return self.error(404, "RepoNotFound")
        repo_id, kind, revision = route.groups()
        if kind == "preupload":
            files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                     for f in json.loads(body)["files"]]
            return self.reply(200, json.dumps({"files": files}).encode())
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        repo = hub.repos[repo_id]
        files = dict(repo["commits"].get(repo["refs"].get(revision), {}))
        files.update({line["value"]["path"]: base64.b64decode(line["value"]["content"])
                      for line in lines if line["key"] == "file"})
        sha = hub.add_repo(repo_id, files, revision)
        self.reply(200, json.dumps({"commitUrl": f"{hub.url}/{repo_id}/commit/{sha}", "commitOid": sha}).encode())
