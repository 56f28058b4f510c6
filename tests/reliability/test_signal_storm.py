"""A service stops on SIGTERM however the signals come: a storm of SIGTERMs and SIGINTs (a pod deleted twice,
a parent-death signal on top of a Ctrl-C) still drains and exits 0, never hangs.

The handler runs in the main thread between bytecodes. When it took a lock (``threading.Event.set``), a second
signal arriving while the first handler held that lock deadlocked the main thread for good: CI once left a
rollout worker alive, ``SIGTERM``'d by its killed parent, with four handler frames stacked on that lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

# The child serves an empty gRPC server until a signal; a thread prints "ready" once the handlers are installed.
CHILD = """
import signal, sys, threading, time
from tlt.rpc.server import serve_until_signal, start_server

def announce():
    while not callable(signal.getsignal(signal.SIGTERM)) or signal.getsignal(signal.SIGTERM) in (
            signal.SIG_DFL, signal.SIG_IGN):
        time.sleep(0.01)
    print("ready", flush=True)

threading.Thread(target=announce, daemon=True).start()
serve_until_signal(start_server([]), None, 1.0)
print("drained", flush=True)
"""

ROUNDS = 5
SIGNALS = 300


def test_a_storm_of_signals_drains_and_exits_every_time():
    for _ in range(ROUNDS):
        child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline().strip() == "ready"
            for i in range(SIGNALS):
                try:
                    os.kill(child.pid, signal.SIGTERM if i % 2 == 0 else signal.SIGINT)
                except ProcessLookupError:
                    break  # it already finished draining and exited
            deadline = time.monotonic() + 20
            while child.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert child.poll() is not None, "the service hung in its signal handler"
            assert child.returncode == 0 and "drained" in child.stdout.read()
        finally:
            if child.poll() is None:
                child.kill()
            child.wait()
