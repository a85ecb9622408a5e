"""Hugging Face Hub stand-ins for the ``--ckpt_dir`` tests, built from tiny model folders.

* :func:`fill_hf_cache` lays a folder out as ``huggingface_hub`` caches a repository:
  ``models--ORG--NAME/blobs/<sha256>``, ``snapshots/<commit>/<path>`` as relative symlinks to the
  blobs, and ``refs/main`` holding the commit.
* :class:`FixtureHub` serves folders over HTTP on 127.0.0.1 the way the Hub's file endpoint does
  (``HEAD``/``GET /{repo}/resolve/{revision}/{path}`` with ``X-Repo-Commit``, ``ETag`` and
  ``Content-Length``, byte ranges, ``X-Error-Code: EntryNotFound`` for a missing file), so
  ``hf_hub_download`` runs its real download path with ``HF_ENDPOINT`` pointed at it. It records
  every request (method, path, ``Range``) and can break a download off halfway once
  (``cut_once``) to show that it resumes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _files(folder: Path) -> dict[str, Path]:
    return {f.relative_to(folder).as_posix(): f for f in sorted(folder.rglob("*")) if f.is_file()}


def fill_hf_cache(cache_dir: Path, repo_id: str, folder: Path, commit: str = COMMIT,
                  skip: tuple[str, ...] = ()) -> Path:
    """Put every file of ``folder`` (except the paths in ``skip``) into a Hub cache at
    ``cache_dir``; returns the snapshot folder."""
    repo = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for rel, src in _files(Path(folder)).items():
        if rel in skip:
            continue
        data = src.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        if not blob.exists():
            blob.write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


class FixtureHub:
    """A local HTTP server with the Hub's file-resolve protocol for a few repositories."""

    def __init__(self, repos: dict[str, Path], commit: str = COMMIT, cut_once: tuple[str, ...] = ()):
        self.repos = {rid: _files(Path(f)) for rid, f in repos.items()}
        self.commit = commit
        self.cut_once = set(cut_once)  # repo paths whose first GET breaks off halfway
        self.requests: list[tuple[str, str, str | None]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _lookup(self):
                for rid, files in hub.repos.items():
                    prefix = f"/{rid}/resolve/"
                    if self.path.startswith(prefix):
                        rest = self.path[len(prefix):].split("?")[0]
                        _, _, rel = rest.partition("/")
                        return files.get(rel)
                return None

            def _answer(self, body: bool):
                hub.requests.append((self.command, self.path, self.headers.get("Range")))
                f = self._lookup()
                if f is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = f.read_bytes()
                start = 0
                rng = self.headers.get("Range")
                if rng and rng.startswith("bytes="):
                    start = int(rng[len("bytes="):].split("-")[0])
                self.send_response(206 if start else 200)
                self.send_header("X-Repo-Commit", hub.commit)
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                rel = self.path.split("/resolve/", 1)[1].split("/", 1)[1]
                if body and rel in hub.cut_once:  # a dropped connection: half the promised bytes
                    hub.cut_once.discard(rel)
                    self.wfile.write(data[start:start + (len(data) - start) // 2])
                    self.close_connection = True
                elif body:
                    self.wfile.write(data[start:])

            def do_HEAD(self):
                self._answer(body=False)

            def do_GET(self):
                self._answer(body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FixtureHub":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def fetched(self) -> set[str]:
        """Repository paths that were downloaded (GET)."""
        out = set()
        for method, path, _ in self.requests:
            if method == "GET":
                for rid in self.repos:
                    prefix = f"/{rid}/resolve/"
                    if path.startswith(prefix):
                        out.add(path[len(prefix):].split("/", 1)[1])
        return out


def copy_without(src: Path, dst: Path, *drop: str) -> Path:
    """Copy a folder, leaving out the relative paths in ``drop``."""
    shutil.copytree(src, dst, ignore=lambda d, names: [n for n in names
                    if (Path(d) / n).relative_to(src).as_posix() in drop])
    return dst
