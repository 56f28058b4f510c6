"""A service stops on SIGTERM however the signals come: a storm of SIGTERMs and SIGINTs (a pod deleted twice,
a parent-death signal on top of a Ctrl-C) still drains once and exits 0, never hangs.

The handler runs in the main thread between bytecodes. When it took a lock (``threading.Event.set``), a signal
arriving while the main thread held that lock (in ``Event.wait``, or in an earlier handler's ``set``) deadlocked
it for good: CI once left a rollout worker alive, SIGTERM'd by its killed parent, with four handler frames
stacked on that lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

# The child serves an empty gRPC server until a signal. A thread prints "ready" once both handlers are
# installed; the drain prints "stopping", then waits a little so that signals still on their way find the
# service's handler (after it, the default ones would kill the process).
CHILD = """
import signal, sys, threading, time
from tlt.rpc.server import serve_until_signal, start_server

def installed(sig):  # Python's own SIGINT handler is callable too
    return callable(signal.getsignal(sig)) and signal.getsignal(sig) is not signal.default_int_handler

def announce():
    while not (installed(signal.SIGTERM) and installed(signal.SIGINT)):
        time.sleep(0.01)
    print("ready", flush=True)

def on_stop():
    print("stopping", flush=True)
    time.sleep(0.2)

threading.Thread(target=announce, daemon=True).start()
serve_until_signal(start_server([]), on_stop, 1.0)
print("drained", flush=True)
"""

ROUNDS = 10
HANG_S = 10.0


def _storm(child: subprocess.Popen) -> bool:
    """Signal ``child`` without pause until it starts draining; whether it did within HANG_S."""
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(child.stdout), daemon=True)
    reader.start()
    deadline, i = time.monotonic() + HANG_S, 0
    while "stopping\n" not in lines and time.monotonic() < deadline:
        os.kill(child.pid, signal.SIGTERM if i % 2 == 0 else signal.SIGINT)
        i += 1
    return "stopping\n" in lines


def test_a_storm_of_signals_drains_once_and_exits_every_time():
    for _ in range(ROUNDS):
        child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline() == "ready\n"
            assert _storm(child), "the service hung in its signal handler"
            assert child.wait(timeout=20) == 0
        finally:
            if child.poll() is None:
                child.kill()
            child.wait()
