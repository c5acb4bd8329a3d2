"""Helpers for tests that run the real entry points: jobs in subprocesses, Ray heads, a moto S3 server.

Every process these helpers start runs in its own session (start_new_session=True), and is stopped by
killing exactly the processes of that session, so no other Ray cluster on the machine is touched.
Embedded Ray clusters of job subprocesses get a private, short RAY_TMPDIR (unix socket paths are
limited to ~107 bytes).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
JOB = REPO / "jobs" / "caption.py"


def free_ports(n: int) -> list[int]:
    """`n` distinct ports free on loopback right now (all held open while choosing)."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def short_tmpdir(prefix: str) -> str:
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


def job_env(**extra: str) -> dict[str, str]:
    """The environment the README asks for; no AWS_* variables (credentials come from flags) and no
    RAY_ADDRESS (a job started here must never join a cluster that happens to run on the machine)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "RAY_ADDRESS"}
    env.update(
        RAY_AUTH_MODE="disabled", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0",
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONUNBUFFERED="1",
        HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
    )
    env.update(extra)
    return env


# -- processes of one session ------------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw.rsplit(")", 1)[1].split()  # state, ppid, pgrp, session, ...


def session_pids(sid: int) -> list[int]:
    """Live (non-zombie) processes of session `sid`."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields and int(fields[3]) == sid and fields[0] != "Z":
                pids.append(int(entry))
    return pids


def kill_session(sid: int, timeout: float = 20) -> list[int]:
    """SIGKILL every process of session `sid` (never this test's own session). Returns those killed."""
    assert sid != os.getsid(0), "refusing to kill the test runner's own session"
    killed: list[int] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = session_pids(sid)
        if not pids:
            return killed
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    raise AssertionError(f"processes of session {sid} survive SIGKILL: {session_pids(sid)}")


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _proc_kib_field(pid: int, file: str, key: str) -> int:
    """A `key: N kB` line of /proc/<pid>/<file> in bytes, 0 if the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/{file}").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def pss_bytes(pid: int) -> int:
    """Proportional set size (shared pages split between their users), 0 if the process is gone."""
    return _proc_kib_field(pid, "smaps_rollup", "Pss:")


def rss_bytes(pid: int) -> int:
    return _proc_kib_field(pid, "status", "VmRSS:")


@dataclass
class MemorySampler:
    """Samples the memory of every process of one session in a thread: peak of the summed PSS, and the
    largest RSS of any single process (with its command line)."""

    sid: int
    interval: float = 0.1
    peak_total_pss: int = 0
    peak_process_rss: int = 0
    peak_process: str = ""
    samples: int = 0
    peak_breakdown: list[tuple[int, str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> MemorySampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            total, breakdown = 0, []
            for pid in session_pids(self.sid):
                pss = pss_bytes(pid)
                total += pss
                breakdown.append((pss, cmdline(pid)[:60].strip()))
                rss = rss_bytes(pid)
                if rss > self.peak_process_rss:
                    self.peak_process_rss, self.peak_process = rss, cmdline(pid)[:80].strip()
            if total > self.peak_total_pss:
                self.peak_total_pss, self.peak_breakdown = total, sorted(breakdown, reverse=True)
            self.samples += 1
            self._stop.wait(self.interval)

    def report(self) -> str:
        gib, mib = 1024**3, 1024**2
        top = ", ".join(f"{pss / mib:.0f} MiB {name}" for pss, name in self.peak_breakdown[:6])
        return (f"peak summed PSS {self.peak_total_pss / gib:.2f} GiB over {len(self.peak_breakdown)} processes "
                f"(largest: {top}); largest single-process RSS {self.peak_process_rss / gib:.2f} GiB "
                f"({self.peak_process}); {self.samples} samples")


# -- the caption job in a subprocess -------------------------------------------------------------------


class JobProcess:
    """`python jobs/caption.py ARGS` in its own session with a private Ray temp dir; output to a log file.

    Use as a context manager: on exit every process of the session (the driver and its embedded Ray
    cluster) is killed and the Ray temp dir removed.
    """

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None):
        self.ray_tmp = short_tmpdir("rj")
        self.log_path = Path(log_path)
        self.args = [str(a) for a in args]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(JOB), *self.args], cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
            env={**(env or job_env()), "RAY_TMPDIR": self.ray_tmp}, start_new_session=True,
        )

    @property
    def sid(self) -> int:
        return self.proc.pid

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"job did not finish in {timeout}s; log:\n{self.log()[-6000:]}") from None

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> list[int]:
        killed = kill_session(self.sid)
        self.proc.wait(timeout=10)
        return killed

    def __enter__(self) -> JobProcess:
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.stop()
        finally:
            self._log.close()
            shutil.rmtree(self.ray_tmp, ignore_errors=True)


def run_job(args: list[str], log_path: Path, timeout: float = 240, env: dict[str, str] | None = None,
            ) -> tuple[int, str]:
    """Run the caption job to completion; returns (exit code, combined stdout and stderr)."""
    with JobProcess(args, log_path, env) as job:
        rc = job.wait(timeout)
        return rc, job.log()


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


# -- a Ray head started with `ray start --head --block` ------------------------------------------------


@dataclass
class RayHead:
    proc: subprocess.Popen
    temp_dir: str
    dashboard_url: str
    gcs_address: str
    log_path: Path

    def stop(self) -> None:
        try:
            kill_session(self.proc.pid)
            self.proc.wait(timeout=10)
        finally:
            shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_ray_head(log_path: Path, num_cpus: int = 2, timeout: float = 120) -> RayHead:
    """A head node on loopback with every port chosen free here, the dashboard (job submission) on,
    and its own short --temp-dir. Returns once the dashboard answers and the node has its CPUs."""
    temp_dir = short_tmpdir("rh")
    names = ("port", "dashboard-port", "ray-client-server-port", "node-manager-port", "object-manager-port",
             "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port")
    ports = dict(zip(names, free_ports(len(names))))
    # Worker ports stay in Ray's default range (10002-19999), where each worker takes a port that is free.
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--num-cpus", str(num_cpus),
           "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1", "--include-dashboard", "true",
           "--temp-dir", temp_dir, "--disable-usage-stats", "--object-store-memory", str(768 * 1024**2)]
    for name, port in ports.items():
        cmd += [f"--{name}", str(port)]
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, env=job_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    url = f"http://127.0.0.1:{ports['dashboard-port']}"
    head = RayHead(proc, temp_dir, url, f"127.0.0.1:{ports['port']}", Path(log_path))

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"ray start exited with {proc.returncode}:\n{Path(log_path).read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/api/cluster_status", timeout=2) as r:
                return f"/{float(num_cpus)} CPU".encode() in r.read()
        except OSError:
            return False

    try:
        wait_for(ready, timeout, "the Ray head's dashboard", interval=0.5)
    except BaseException:
        head.stop()
        raise
    return head


# -- a moto S3 server on loopback ----------------------------------------------------------------------


@contextlib.contextmanager
def moto_s3_server(bucket: str, key: str, secret: str):
    """Yield (endpoint, s3fs filesystem) for a fresh moto server on 127.0.0.1 holding an empty `bucket`."""
    import boto3
    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=key, aws_secret_access_key=secret,
                     region_name="us-east-1").create_bucket(Bucket=bucket)
        fs = s3fs.S3FileSystem(key=key, secret=secret, skip_instance_cache=True,
                               client_kwargs={"endpoint_url": endpoint, "region_name": "us-east-1"})
        yield endpoint, fs
    finally:
        server.stop()
