"""A real multi-node Ray cluster on this machine (:func:`downpour.cluster.ray_nodes.loopback_ray`)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from downpour.cluster.ray_nodes import RayNodes, loopback_ray


@pytest.fixture(scope="module")
def ray_nodes() -> Iterator[RayNodes]:
    """A 3-node Ray cluster on loopback for this module's tests, stopped (only it) at the end.

    A throwaway cluster that only this machine reaches, so without token
    authentication (which Ray turns on for new clusters, keeping the token in
    ``~/.ray``): nothing is read from or written to the user's home.
    """
    pytest.importorskip("ray", reason="the Ray cluster tests need Ray: pip install 'downpour-sgd[ray]'")
    if not (Path(sys.executable).parent / "ray").exists():
        pytest.skip(f"the ray command is not beside {sys.executable}")
    import ray as ray_lib

    with loopback_ray() as nodes:
        # One driver connection for the module: the runs use it (as they use a user's own) instead of
        # connecting and disconnecting each time.
        ray_lib.init(address=nodes.address, configure_logging=False)
        try:
            yield nodes
        finally:
            ray_lib.shutdown()

