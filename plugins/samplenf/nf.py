"""The sample network function: subscriber state on disk, a health check on loopback."""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from regionvault.plugins.samplenf.layout import PORT_FILE

__all__ = ["PORT_FILE", "NetworkFunction", "read_state", "state_digest"]

_SUBSCRIBERS = Path("db") / "subscribers.json"
_SESSIONS = Path("db") / "sessions.jsonl"


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def read_state(data_dir: Path) -> dict[str, Any]:
    """The subscribers and sessions stored under ``data_dir``."""
    subs_file = data_dir / _SUBSCRIBERS
    subscribers: dict[str, Any] = (
        json.loads(subs_file.read_text("utf-8")) if subs_file.exists() else {}
    )
    sessions: list[dict[str, Any]] = []
    sess_file = data_dir / _SESSIONS
    if sess_file.exists():
        for line in sess_file.read_text("utf-8").splitlines():
            if line.strip():
                sessions.append(json.loads(line))
    return {"subscribers": subscribers, "sessions": sessions}


def state_digest(state: dict[str, Any]) -> str:
    canonical = json.dumps(state, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(canonical).hexdigest()


class NetworkFunction:
    """Holds the state in memory, writes every change through to disk."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self._lock = threading.Lock()
        self.state = read_state(data_dir)

    def seed(self, count: int, *, seed: int = 5) -> None:
        """Provision ``count`` subscribers with a session each (deterministic)."""
        rng = random.Random(seed)
        for i in range(count):
            imsi = f"00101{rng.randrange(10**10):010d}"
            self.attach(imsi, apn="internet" if i % 3 else "ims")

    def attach(self, imsi: str, *, apn: str = "internet") -> dict[str, Any]:
        if not (imsi.isdigit() and 6 <= len(imsi) <= 15):
            raise ValueError(f"bad IMSI {imsi!r}: 6 to 15 digits")
        with self._lock:
            subs = self.state["subscribers"]
            sub = subs.setdefault(imsi, {"imsi": imsi, "apn": apn, "attaches": 0})
            sub["attaches"] += 1
            session = {"imsi": imsi, "apn": apn, "seq": len(self.state["sessions"]) + 1}
            self.state["sessions"].append(session)
            _atomic_write(
                self.data_dir / _SUBSCRIBERS,
                json.dumps(subs, sort_keys=True, indent=1).encode(),
            )
            with (self.data_dir / _SESSIONS).open("a", encoding="utf-8") as f:
                f.write(json.dumps(session, sort_keys=True) + "\n")
                f.flush()
                os.fsync(f.fileno())
            return session

    def serve(self, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
        nf = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                """Quiet: the instance log is for the function's own events."""

            def _reply(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body, sort_keys=True).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                path = urlparse(self.path).path
                if path == "/health":
                    self._reply(200, {"ok": True})
                elif path == "/state":
                    with nf._lock:
                        state = json.loads(json.dumps(nf.state))
                    self._reply(200, {**state, "digest": state_digest(state)})
                else:
                    self._reply(404, {"error": f"no such path {path}"})

            def do_POST(self) -> None:
                url = urlparse(self.path)
                if url.path != "/attach":
                    self._reply(404, {"error": f"no such path {url.path}"})
                    return
                imsi = parse_qs(url.query).get("imsi", [""])[0]
                try:
                    self._reply(200, nf.attach(imsi))
                except ValueError as exc:
                    self._reply(400, {"error": str(exc)})

        server = ThreadingHTTPServer((host, port), Handler)
        # the pid lets a health check tell this process from the one whose data was restored
        endpoint = {"port": server.server_address[1], "pid": os.getpid()}
        _atomic_write(self.data_dir / PORT_FILE, json.dumps(endpoint).encode())
        return server
