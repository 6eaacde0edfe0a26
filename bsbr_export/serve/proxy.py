"""nginx in front of several `serve-openai` servers: the smallest real scale-out.

`nginx_config` writes an nginx.conf that spreads requests over upstream servers with
`least_conn` (a generation holds its connection for its whole length, so open connections
are the load) and passes server-sent events through unbuffered, as they are made.
`NginxProxy` runs Debian's nginx on it from a temporary prefix directory, in the
foreground, as a child process this project starts and stops by pid (as `TritonServer`
does tritonserver), so tests can kill an upstream and watch what clients see.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bsbr_export.errors import UserError
from bsbr_export.serve.serve import ServerProcess, check_port

STOP_TIMEOUT_S = 10
NGINX_FALLBACK = Path("/usr/sbin/nginx")  # Debian's, off PATH for users without sbin


def nginx_config(upstreams: list[str], port: int, prefix: Path) -> str:
    """An nginx.conf proxying 127.0.0.1:`port` to `upstreams` ("host:port" strings) with
    least_conn, every path it writes inside `prefix` (its pid file `nginx.pid` among
    them); run with `-g "daemon off;"`."""
    if not upstreams:
        raise UserError("nginx needs at least one upstream server (host:port)")
    prefix = Path(prefix)
    servers = "\n".join(f"        server {upstream} max_fails=1 fail_timeout=10s;" for upstream in upstreams)
    return f"""\
worker_processes 1;
pid {prefix / "nginx.pid"};
error_log {prefix / "error.log"} warn;

events {{
    worker_connections 256;
}}

http {{
    access_log {prefix / "access.log"};
    client_body_temp_path {prefix / "client_body"};
    proxy_temp_path {prefix / "proxy"};
    fastcgi_temp_path {prefix / "fastcgi"};
    uwsgi_temp_path {prefix / "uwsgi"};
    scgi_temp_path {prefix / "scgi"};

    upstream bsbr {{
        least_conn;
{servers}
    }}

    server {{
        listen 127.0.0.1:{port};

        location / {{
            proxy_pass http://bsbr;
            proxy_http_version 1.1;
            # Server-sent events reach the client token by token, not when the response ends.
            proxy_buffering off;
            proxy_cache off;
            # Between tokens a stream is silent only briefly, but its first token can
            # wait behind the prefill of a full batch.
            proxy_read_timeout 300s;
            # Another server is tried only when the request could not be sent; nginx never
            # re-sends a POST already sent, so a generation never runs twice.
            proxy_next_upstream error timeout;
        }}
    }}
}}
"""


def find_nginx() -> str:
    """The nginx binary: on PATH, else Debian's /usr/sbin/nginx, else a UserError."""
    found = shutil.which("nginx") or (str(NGINX_FALLBACK) if os.access(NGINX_FALLBACK, os.X_OK) else None)
    if found is None:
        raise UserError("nginx is not installed: apt-get install nginx")
    return found


class NginxProxy(ServerProcess):
    """nginx on 127.0.0.1:`port` (0: a free one) over `upstreams` (a context manager):
    `start()` returns once it accepts connections (or raises UserError with the end of
    its log); `stop()` ends it by its pid and removes its prefix directory."""

    def __init__(self, upstreams: Sequence[str], port: int = 0, timeout_s: float = 30):
        self.nginx = find_nginx()
        self.upstreams, self.timeout_s = list(upstreams), timeout_s
        self.port = check_port(port, "port")
        self.process: subprocess.Popen | None = None
        self.prefix: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> NginxProxy:
        """Write the config into a fresh prefix directory, start nginx and wait until its port accepts."""
        self.prefix = Path(tempfile.mkdtemp(prefix="bsbr-nginx-"))
        # Run as root, nginx's worker drops to nobody, which must reach its temp paths in here.
        self.prefix.chmod(0o755)
        config = self.prefix / "nginx.conf"
        config.write_text(nginx_config(self.upstreams, self.port, self.prefix))
        # -e: before it reads the config, nginx would log to its compiled-in /var/log path.
        command = [self.nginx, "-p", str(self.prefix), "-c", str(config), "-e", str(self.prefix / "error.log")]
        command += ["-g", "daemon off;"]
        with open(self.prefix / "nginx.out", "wb") as log:
            # Its own session: a SIGKILL to the group must reach its worker, which outlives the master.
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise UserError(f"nginx exited with status {self.process.returncode}: {self.log_tail()}")
            # nginx writes its pid file once it has bound its port: a connect alone could
            # reach another process on the port while this one still retries its bind.
            with contextlib.suppress(OSError):
                if (self.prefix / "nginx.pid").read_text().strip() == str(self.process.pid):
                    with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                        return
            time.sleep(0.05)
        raise UserError(f"nginx did not accept connections within {self.timeout_s:g} s: {self.log_tail()}")

    def log_tail(self, lines: int = 5) -> str:
        """The last lines of nginx's output and error log, joined on one line."""
        text = ""
        for name in ("nginx.out", "error.log"):
            with contextlib.suppress(OSError):
                text += (self.prefix / name).read_text(errors="replace")
        return " | ".join(text.strip().splitlines()[-lines:]) or "(its log is empty)"

    def cleanup(self) -> None:
        if self.prefix is not None:
            shutil.rmtree(self.prefix, ignore_errors=True)
