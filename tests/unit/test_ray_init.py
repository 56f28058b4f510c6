"""ray.init is retried when a Ray head process misses its startup window, and only then."""

from __future__ import annotations

import pytest

from tlt.trainer.distributed import RAY_INIT_ATTEMPTS, _init_ray


class FakeRay:
    """Fails ``init`` with each of ``errors`` in turn, then succeeds."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.inits = self.shutdowns = 0

    def init(self, **options) -> None:
        self.inits += 1
        if self.errors:
            raise self.errors.pop(0)

    def shutdown(self) -> None:
        self.shutdowns += 1


@pytest.mark.parametrize("error", [
    Exception("The current node timed out during startup. This could happen because ..."),
    RuntimeError("Timed out waiting for file /tmp/ray/session_x/gcs_server_port_abc"),
])
def test_startup_timeouts_are_retried(error):
    ray = FakeRay(error)
    _init_ray(ray, {"num_cpus": 2})
    assert (ray.inits, ray.shutdowns) == (2, 1)


def test_other_errors_and_the_last_attempt_are_raised():
    with pytest.raises(ValueError, match="bad option"):
        _init_ray(FakeRay(ValueError("bad option")), {})
    timeouts = [RuntimeError("Timed out waiting for file x") for _ in range(RAY_INIT_ATTEMPTS)]
    ray = FakeRay(*timeouts)
    with pytest.raises(RuntimeError, match="Timed out waiting for file"):
        _init_ray(ray, {})
    assert ray.inits == RAY_INIT_ATTEMPTS
