"""A gRPC service given a taken port fails with one clear error (no port sharing, no traceback)."""

from __future__ import annotations

import pytest

from tlt.errors import PortInUseError, TLTError
from tlt.rpc.server import start_server


def test_a_taken_port_is_a_clear_error_not_a_shared_port():
    first = start_server([])
    try:
        with pytest.raises(PortInUseError, match=rf"cannot listen on 127\.0\.0\.1:{first.port}.*pass --port") as info:
            start_server([], port=first.port)
        assert isinstance(info.value, TLTError)  # `tlt serve` prints it as one line and exits 2
    finally:
        first.stop(0)
