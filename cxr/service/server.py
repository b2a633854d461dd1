"""Run the app under uvicorn in a background thread on a loopback port: for tests, benchmarks
and notebooks (`cxr serve` runs uvicorn in the foreground instead).

    with running_server(create_app(run, db)) as url:
        httpx.post(f"{url}/annotate", files={"file": open("chest.png", "rb")})
"""
from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def running_server(app, host: str = "127.0.0.1", port: int = 0, timeout: float = 120.0,
                   log_level: str = "warning") -> Iterator[str]:
    """Serve `app` until the block ends; yields its base URL. Port 0 takes a free one (the
    socket is bound here and handed to uvicorn, so there is no race for it)."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True,
                              name=f"uvicorn-{port}")
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive():
            sock.close()
            raise RuntimeError("the server stopped during start-up (see the log above)")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise TimeoutError(f"the server did not start within {timeout:g} s")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
