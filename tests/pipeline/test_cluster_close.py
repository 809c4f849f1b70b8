"""A local cluster's close: in the background after a run that ended, inside
``closing_in_background`` (the CLI); here and now otherwise."""

from __future__ import annotations

import pytest

from sfxflow.pipeline import cluster as cluster_mod
from sfxflow.pipeline.cluster import closing_in_background, open_cluster, start_worker_forkserver
from sfxflow.pipeline.config import ClusterConfig

LOCAL = ClusterConfig(kind="local", n_workers=1)


def _status(client):
    return client.cluster.status.name


@pytest.mark.slow
def test_the_close_goes_on_beside_the_caller_and_is_waited_for():
    with closing_in_background():
        with open_cluster(LOCAL) as (client, info):
            assert info.n_workers == 1
        pending = list(cluster_mod._background_closes or [])
        assert len(pending) == 1 and pending[0].name == "sfxflow-cluster-close"
    assert not pending[0].is_alive()
    assert _status(client) == "closed" and client.status == "closed"
    assert cluster_mod._background_closes is None


@pytest.mark.slow
def test_a_run_that_raises_closes_its_cluster_before_the_exception_goes_on():
    with closing_in_background():
        with pytest.raises(KeyboardInterrupt), open_cluster(LOCAL) as (client, _):
            raise KeyboardInterrupt
        assert cluster_mod._background_closes == []
        assert _status(client) == "closed" and client.status == "closed"


@pytest.mark.slow
def test_outside_the_cluster_is_closed_on_return():
    with open_cluster(LOCAL) as (client, _):
        pass
    assert _status(client) == "closed" and client.status == "closed"


def test_no_fork_server_for_a_cluster_that_is_not_local():
    assert not start_worker_forkserver(ClusterConfig(kind="synchronous"))
    assert not start_worker_forkserver(ClusterConfig(scheduler="tcp://127.0.0.1:8786"))


@pytest.mark.slow
def test_local_workers_are_forked_from_the_server_started_early(monkeypatch):
    import os
    import signal

    def probe():
        import os
        import signal
        return os.getppid(), os.environ.get("SFXFLOW_SET_LATE"), signal.getsignal(signal.SIGINT)

    assert start_worker_forkserver(LOCAL)
    monkeypatch.setenv("SFXFLOW_SET_LATE", "yes")  # after the server started
    with open_cluster(LOCAL) as (client, _):
        ((parent, late, on_sigint),) = client.run(probe).values()
    assert parent != os.getpid()  # a spawned worker's parent is this process (its nanny's)
    assert late == "yes"  # the environment of now, not the server's
    assert on_sigint == signal.SIG_IGN  # Ctrl-C is for the client alone, as before


@pytest.mark.parametrize(("argv", "started"), [
    (["process", "a.cxi", "--out", "r", "--workers", "2"], True),
    (["process", "a.cxi", "--out", "r", "--scheduler", "tcp://h:8786"], False),
    (["process", "a.cxi", "--out", "r", "--cluster=slurm"], False),
    (["process", "a.cxi", "--out", "r", "--set", "cluster.kind=pbs"], False),
    (["process", "--help"], False),
    (["process", "a.cxi", "--dry-run"], False),
    (["process", "--print-config"], False),
])
def test_the_fork_server_starts_before_parsing_only_for_a_local_cluster(monkeypatch, argv,
                                                                        started):
    from sfxflow.cli.process import start_workers_early
    from sfxflow.pipeline import forkserver

    calls = []
    monkeypatch.setattr(forkserver, "start", lambda: calls.append(1) or True)
    start_workers_early(argv)
    assert bool(calls) is started
