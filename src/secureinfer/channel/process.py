"""The device as a separate process (the default): frames over a Unix socketpair.

The child gets its end of the socketpair as an inherited file descriptor (`--fd N`) and announces
itself with a `ready` frame once torch is imported, so start-up cost and start-up failures (no
CUDA, say) surface in the constructor rather than as a slow or failed first request.

No device process outlives its channel: `close()`, a transport failure, garbage collection and
interpreter exit all end it. Closing our end first lets a live device write its view on EOF.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import weakref
from typing import IO, Sequence

from .base import Channel, DeviceDied, DeviceError, DeviceProtocolError, DeviceTimeout
from .wire import READY, SPIN_S, EncodedFrame, Frame, ProtocolError, SocketReader, read_frame, send_frame

EXIT_GRACE_S = 5.0  # how long a device that hung up may take to exit before it is killed
CLOSE_GRACE_S = 30.0  # how long a device may take to exit after `close`, or after EOF (writing a view)
STDERR_TAIL_BYTES = 2000
# Bytes in flight per direction. The default (~208 KiB) makes a 3 MiB frame a dozen sleep/wake
# hand-offs between the processes; 4 MiB makes it ~3x faster. Linux caps it at net.core.wmem_max.
SEND_BUFFER_BYTES = 4 << 20
STARTUP = "start-up"
# What ends a channel: no progress (TimeoutError), the device gone (EOFError, ConnectionError), a malformed frame.
TRANSPORT_ERRORS = (TimeoutError, EOFError, ConnectionError, ProtocolError)


class ProcessChannel(Channel):
    """`command` replaces the whole device command line (tests use fake devices); `--fd N` is appended."""

    def __init__(
        self,
        *,
        device: str = "cpu",
        record_view: str | os.PathLike | None = None,
        timeout_s: float = 60.0,
        threads: int | None = None,
        command: Sequence[str] | None = None,
        startup_timeout_s: float = 60.0,
    ):
        super().__init__()
        self.timeout_s = timeout_s
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        for end in (ours, theirs):
            end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        base_argv = command if command is not None else device_command(device, record_view, threads)
        argv = [*base_argv, "--fd", str(theirs.fileno())]
        self._stderr = tempfile.TemporaryFile()  # read back to say why a device died
        try:
            self.process = subprocess.Popen(
                # OpenMP's own wait policy, not PASSIVE: a device that runs a whole forward on every core (plain)
                # decoded at 22 tok/s with sleeping threads against 33 with ones that spin briefly between ops.
                # Plans that cross many times a token give each side its own cores (SecureLM), so a spinning
                # device thread takes none of the enclave's.
                argv, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stderr=self._stderr,
                start_new_session=True,  # Ctrl-C reaches the enclave only, which then closes the device in order
            )  # fmt: skip
        except OSError as error:
            ours.close()
            self._stderr.close()
            raise DeviceDied(
                f"cannot start the device process {argv[0]!r}: {error}", "check the device command and environment"
            ) from None
        finally:
            theirs.close()
        self._sock = ours
        self._finalizer = weakref.finalize(self, _shutdown, self.process, ours, self._stderr, CLOSE_GRACE_S)
        self._reader = SocketReader(ours, SPIN_S)
        try:
            ours.settimeout(startup_timeout_s)
            try:
                ready = read_frame(self._reader)
            except TRANSPORT_ERRORS as error:
                raise self._transport_error(error, STARTUP, startup_timeout_s) from None
            if ready.kind != READY:
                raise DeviceProtocolError(
                    f"device process {self.pid} began with a {ready.kind!r} frame instead of {READY!r}"
                )
            ours.settimeout(timeout_s)
        except BaseException:
            self._abandon()
            raise

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return not self._closed and self.process.poll() is None

    # try/except rather than a context manager: these run on each of a token's 121 trips, where a generator-based
    # context manager costs a few microseconds more.
    def _send(self, kind: str, request: EncodedFrame) -> None:
        try:
            send_frame(self._sock, request)
        except TRANSPORT_ERRORS as error:
            raise self._transport_error(error, f"request {kind!r}", self.timeout_s) from None

    def _receive(self, kind: str) -> Frame:
        try:
            return read_frame(self._reader)
        except TRANSPORT_ERRORS as error:
            raise self._transport_error(error, f"request {kind!r}", self.timeout_s) from None

    def _transport_error(self, error: Exception, during: str, limit_s: float) -> DeviceError:
        if isinstance(error, TimeoutError):
            return DeviceTimeout(
                f"device process {self.pid} made no progress for {limit_s:g} s (during {during}); it was stopped",
                "restart the device (SecureLM.restart_device()) and retry; if it is only slow, raise its timeout",
            )
        if isinstance(error, ProtocolError):
            return DeviceProtocolError(f"device process {self.pid} sent a malformed frame (during {during}): {error}")
        story = f"device process {self.pid} {self._exit_story()} (during {during})"
        if during == STARTUP:  # restarting would fail the same way: the set-up itself must change
            return DeviceDied(story, "fix what the device reported (for example, use --device cpu), then retry")
        return DeviceDied(story)

    def _exit_story(self) -> str:
        """How the process ended, waiting briefly for it: it hung up, so it is normally on its way out."""
        try:
            code = self.process.wait(timeout=EXIT_GRACE_S)
        except subprocess.TimeoutExpired:
            return "hung up but kept running (it was killed)"  # _abandon, which follows, kills it
        how = f"was killed by {_signal_name(-code)}" if code < 0 else f"exited with code {code}"
        self._stderr.seek(0, os.SEEK_END)
        self._stderr.seek(max(0, self._stderr.tell() - STDERR_TAIL_BYTES))
        lines = self._stderr.read().decode(errors="replace").strip().splitlines()
        return f"{how}: {lines[-1]}" if lines else how

    def _abandon(self) -> None:
        self._closed = True
        self._release(grace_s=0.0)

    def close(self) -> None:
        try:
            if self.alive:
                self.request("close")
        finally:
            self._closed = True
            self._release(grace_s=CLOSE_GRACE_S)

    def _release(self, grace_s: float) -> None:
        if self._finalizer.detach() is not None:  # None: already released
            _shutdown(self.process, self._sock, self._stderr, grace_s)


def device_command(device: str, record_view: str | os.PathLike | None, threads: int | None) -> list[str]:
    argv = [sys.executable, "-m", "secureinfer.device", "--device", device]
    if record_view is not None:
        argv += ["--record-view", os.fspath(record_view)]
    if threads is not None:
        argv += ["--threads", str(threads)]
    return argv


def _shutdown(process: subprocess.Popen, sock: socket.socket, stderr: IO[bytes], grace_s: float) -> None:
    """Hang up (a live device sees EOF, writes its view and exits), wait up to `grace_s`, then kill."""
    sock.close()
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()  # SIGKILL ends a stopped (SIGSTOP) process too
        process.wait()
    stderr.close()


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
