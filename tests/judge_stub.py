"""A local OpenAI-compatible judge endpoint on 127.0.0.1 that can fail on cue.

It prefers the answer that mentions 'banana' (replying "A" or "B"). ``faults`` lists what the next
requests get, in order, before it answers normally (or keeps failing with ``then``):

    "timeout"    no reply for longer than the client waits (``stall`` seconds)
    "429"        HTTP 429 with ``Retry-After: <retry_after>``
    "500", "503" that server error
    "malformed"  HTTP 200 whose body is not JSON
    "ok"         a normal chat completion
"""

from __future__ import annotations

import json
import threading
import time
from contextlib import suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class JudgeStub:
    def __init__(self, faults=(), then: str = "ok", retry_after: str = "0", stall: float = 1.0):
        self.faults, self.then, self.retry_after, self.stall = list(faults), then, retry_after, stall
        self.seen: list[tuple[str, str, str | None]] = []  # (what it answered, path, Authorization header)
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                what = stub.faults.pop(0) if stub.faults else stub.then
                stub.seen.append((what, self.path, self.headers.get("Authorization")))
                if what == "timeout":
                    time.sleep(stub.stall)
                    what = "ok"  # too late: the client has given up on this try
                if what in ("429", "500", "503"):
                    self.send_response(int(what))
                    if what == "429":
                        self.send_header("Retry-After", stub.retry_after)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if what == "malformed":
                    payload = b'{"choices": [{"message": '
                else:
                    prompt = body["messages"][-1]["content"]
                    reply = "A" if "banana" in prompt.split("Answer A:")[1].split("Answer B:")[0] else "B"
                    payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                with suppress(OSError):  # the client may have stopped waiting (timeout fault)
                    self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answered(self, what: str) -> int:
        return sum(1 for seen, _, _ in self.seen if seen == what)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> JudgeStub:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
