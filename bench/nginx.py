"""nginx as the compiled-limit row: the same fake upstream behind a C reverse proxy.

One worker, no master process, in the foreground (``daemon off;``), on an
unprivileged port, with every path it writes (pid, error log, temp dirs) in a
directory the bench owns, so it runs without root and without touching the
system's nginx setup. Upstream connections are kept alive (``keepalive`` in
the upstream block, HTTP/1.1, the ``Connection`` header cleared) and responses
are relayed unbuffered, so an event stream reaches the client as it arrives,
the way the proxy and the pass-through relay it.

Readiness: with ``error_log stderr notice`` nginx logs its start-up notices;
the ``getrlimit(RLIMIT_NOFILE)`` line comes after the listening sockets are
open (``ngx_init_cycle`` then ``ngx_os_status``), so connections from then on
queue in the backlog until the worker accepts them.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from bench.procs import Service, start_service

NGINX_CANDIDATES = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")
READY_MARK = "getrlimit(RLIMIT_NOFILE)"
WORKER_CONNECTIONS = 16384
UPSTREAM_KEEPALIVE = 256  # idle upstream connections kept per worker (>= the bench's 32 conns)
TEMP_DIRS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
CHECK_TIMEOUT = 20.0


def nginx_path() -> str | None:
    """The nginx binary: on PATH, or where Debian puts it (/usr/sbin is not on every PATH)."""
    found = shutil.which("nginx")
    if found:
        return found
    for candidate in NGINX_CANDIDATES:
        if Path(candidate).is_file():
            return candidate
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (nginx cannot be told to pick one itself)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def render_nginx_conf(workdir: Path, listen_port: int, upstream_url: str) -> str:
    """The config for one foreground nginx on 127.0.0.1:``listen_port`` in front of the fake."""
    upstream = urlsplit(upstream_url).netloc
    temp = "\n".join(f"    {kind}_temp_path {workdir / ('tmp_' + kind)};" for kind in TEMP_DIRS)
    return f"""\
# Written by bench/nginx.py for `make bench`; everything nginx writes stays in {workdir}.
daemon off;
master_process off;
worker_processes 1;
pid {workdir / "nginx.pid"};
error_log stderr notice;

events {{
    worker_connections {WORKER_CONNECTIONS};
}}

http {{
    access_log off;
{temp}
    keepalive_requests 1000000;
    keepalive_timeout 75s;

    upstream fake_upstream {{
        server {upstream};
        keepalive {UPSTREAM_KEEPALIVE};
        keepalive_requests 1000000;
    }}

    server {{
        listen 127.0.0.1:{listen_port} backlog=1024;

        location / {{
            proxy_pass http://fake_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 600s;
        }}
    }}
}}
"""


def write_nginx_conf(workdir: Path, listen_port: int, upstream_url: str) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "nginx.conf"
    conf.write_text(render_nginx_conf(workdir, listen_port, upstream_url))
    return conf


def _cmd(exe: str, workdir: Path, conf: Path, *extra: str) -> list[str]:
    # -e: the error log used before the config is read (the default is under /var/log).
    return [exe, "-p", str(workdir), "-c", str(conf), "-e", "stderr", *extra]


def check_nginx_conf(exe: str, workdir: Path, conf: Path) -> tuple[bool, str]:
    """``nginx -t`` on the config: (accepted, what nginx said)."""
    proc = subprocess.run(
        _cmd(exe, workdir, conf, "-t"),
        capture_output=True,
        text=True,
        timeout=CHECK_TIMEOUT,
        check=False,
    )
    return proc.returncode == 0, (proc.stderr + proc.stdout).strip()


def start_nginx(
    workdir: Path, upstream_url: str, logdir: Path, *, cpus: Sequence[int] = ()
) -> Service:
    """A foreground nginx relaying to ``upstream_url``; BenchError when it does not start."""
    exe = nginx_path()
    if exe is None:
        raise FileNotFoundError("nginx is not installed (make tools installs the Debian package)")
    port = free_port()
    conf = write_nginx_conf(workdir, port, upstream_url)
    url = f"http://127.0.0.1:{port}"
    return start_service(
        "nginx",
        _cmd(exe, workdir, conf),
        lambda line: READY_MARK in line,
        lambda _line: url,
        logdir,
        cpus=cpus,
        ready_on_stderr=True,
    )
