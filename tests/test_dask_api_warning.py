"""Workers of a running Dask cluster are warned off a loopback Prefect API, which on their
machines is not this one; a local cluster's workers, on this machine, are not. No cluster is
started: the check runs where the runner opens, before any worker is asked for."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
from prefect.settings import PREFECT_API_URL, temporary_settings

from cpo_data.config import RunnerConfig
from pipelines import dask_runner

REMOTE = RunnerConfig(kind="dask", address="tcp://10.0.0.5:8786")
LOCAL = RunnerConfig(kind="dask")
LOOPBACK_URLS = ["http://127.0.0.1:4200/api", "http://localhost:4200/api",
                 "http://[::1]:4200/api", "http://127.0.1.1:4200/api"]


def warnings_from(config: RunnerConfig, caplog) -> list[str]:
    caplog.set_level(logging.WARNING, logger=dask_runner.__name__)
    with dask_runner._api_for_workers(config):
        pass
    return [r.getMessage() for r in caplog.records
            if r.name == dask_runner.__name__ and r.levelno == logging.WARNING]


@pytest.mark.parametrize("url", LOOPBACK_URLS)
def test_remote_workers_given_a_loopback_api_are_warned_with_what_to_do(url, caplog):
    with temporary_settings(updates={PREFECT_API_URL: url}):
        (warning,) = warnings_from(REMOTE, caplog)
    assert "tcp://10.0.0.5:8786" in warning and url in warning
    assert "cannot reach" in warning and "set PREFECT_API_URL to a Prefect server" in warning


@pytest.mark.parametrize("url", LOOPBACK_URLS)
def test_a_local_cluster_given_a_loopback_api_is_not_warned(url, caplog):
    with temporary_settings(updates={PREFECT_API_URL: url}):
        assert warnings_from(LOCAL, caplog) == []


@pytest.mark.parametrize("url", ["http://10.0.0.2:4200/api", "https://prefect.example.org/api"])
def test_remote_workers_given_a_reachable_api_are_not_warned(url, caplog):
    with temporary_settings(updates={PREFECT_API_URL: url}):
        assert warnings_from(REMOTE, caplog) == []


def test_without_prefect_api_url_the_flow_s_own_server_is_checked_and_sent(monkeypatch, caplog):
    """Called outside the CLI (which always sets the URL): the flow's temporary server, which
    the run context names, is what the workers get, and what is checked."""
    flow_server = "http://127.0.0.1:8123/api"
    context = SimpleNamespace(client=SimpleNamespace(api_url=flow_server))
    monkeypatch.setattr("prefect.context.get_run_context", lambda: context)
    caplog.set_level(logging.WARNING, logger=dask_runner.__name__)
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        with dask_runner._api_for_workers(REMOTE):
            assert PREFECT_API_URL.value() == flow_server
        assert not PREFECT_API_URL.value()  # put back as it was
    assert [r.getMessage() for r in caplog.records if flow_server in r.getMessage()]
