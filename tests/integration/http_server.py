"""A real nginx on 127.0.0.1 serving a directory (static files with HTTP Range support), for remote-shard tests.

tests/run.sh installs nginx (Debian's nginx-light) when it is missing; under CI a missing nginx fails the test
instead of skipping it.
"""

import contextlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from megatron_mmpl.parallel.ports import free_port

CONF = """daemon off;
master_process off;
error_log {prefix}/error.log;
pid {prefix}/nginx.pid;
events {{ worker_connections 1024; }}
http {{
  log_format ranges '$status $http_range';
  access_log {prefix}/access.log ranges;
  client_body_temp_path {prefix}/tmp; proxy_temp_path {prefix}/tmp; fastcgi_temp_path {prefix}/tmp;
  uwsgi_temp_path {prefix}/tmp; scgi_temp_path {prefix}/tmp;
  server {{ listen 127.0.0.1:{port}; root {root}; location / {{ }} }}
}}
"""


def need(binary: str) -> str:
    path = shutil.which(binary) or (f"/usr/sbin/{binary}" if os.path.exists(f"/usr/sbin/{binary}") else None)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{binary} is not installed; tests/run.sh installs it (apt-get install nginx-light)")
        pytest.skip(f"{binary} is not installed (bash tests/run.sh installs it)")
    return path


def _wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 20.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening on port {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout} s")


@contextlib.contextmanager
def nginx(root: Path, workdir: Path):
    """Yield the base URL of an nginx serving `root` on a free loopback port; stopped on exit."""
    binary = need("nginx")
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "tmp").mkdir(exist_ok=True)
    port = free_port()
    conf = workdir / "nginx.conf"
    conf.write_text(CONF.format(prefix=workdir, port=port, root=Path(root).resolve()))
    proc = subprocess.Popen([binary, "-p", str(workdir), "-c", str(conf), "-e", str(workdir / "error.log")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    with _serving(proc, port, "nginx") as url:
        yield url


@contextlib.contextmanager
def python_http_server(root: Path):
    """Python's http.server (no Range support) serving `root`: the server a user must not rely on."""
    import sys

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory",
                             str(root)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with _serving(proc, port, "http.server") as url:
        yield url


@contextlib.contextmanager
def _serving(proc: subprocess.Popen, port: int, what: str):
    """The server's base URL once it listens; the process is stopped on exit."""
    try:
        _wait_port(port, proc, what)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
