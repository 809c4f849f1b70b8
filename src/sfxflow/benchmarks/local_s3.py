"""A throw-away S3-protocol server on 127.0.0.1 for the benchmarks that compare S3 with disk.

moto's server mode is a development dependency: where it is absent (the container image) the
S3 part of a benchmark is skipped with a line saying so instead of failing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sfxflow.benchmarks.localhost import free_port

__all__ = ["local_s3"]


@contextmanager
def local_s3(*buckets: str) -> Iterator[dict[str, Any] | None]:
    """Start moto's S3 server on a free local port with ``buckets``; yield s3fs storage options.

    Yields ``None`` (after printing why) when moto (a development dependency) is not installed.
    The credentials are dummy values that only this server accepts.
    """
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        print("  (S3 part skipped: moto, a development dependency, is not installed)")
        yield None
        return
    import botocore.session

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's request log
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        opts = {"key": "bench", "secret": "bench",
                "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
        client = botocore.session.get_session().create_client(
            "s3", endpoint_url=endpoint, region_name="us-east-1",
            aws_access_key_id=opts["key"], aws_secret_access_key=opts["secret"])
        for bucket in buckets:
            client.create_bucket(Bucket=bucket)
        yield opts
    finally:
        server.stop()
