"""The build's shards on a Dask cluster, through Prefect's Dask task runner (prefect-dask).

    runner:
      kind: dask
      address: null     # tcp://scheduler:8786 for a running cluster; null: a local one
      workers: null     # local cluster size; null: one per visible GPU, else 1
      dashboard: 127.0.0.1:8787   # local cluster's dashboard; null: none

A local cluster lives for one build: one worker process per GPU, each with one thread and its
own GPU, so each worker loads its models once (`cpo_data.backends.loaded`) and runs one shard
at a time. Its scheduler, workers and dashboard listen on 127.0.0.1 only: nothing but this
machine's own processes needs them, and Dask's dashboard default (":8787") would open it to
every network the machine is on. A running cluster is used as it is: its workers must import
this package and reach the build's work_dir, publish.uri and the Prefect API.

Imported only when a config asks for Dask: importing distributed costs about a second.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import urllib.parse
from collections.abc import Callable, Iterator, Sequence

from distributed.diagnostics.plugin import WorkerPlugin

from cpo_data.config import ConfigError, RunnerConfig

log = logging.getLogger(__name__)

LOCAL_HOST = "127.0.0.1"
"""The interface a local cluster's scheduler and workers listen on."""

CONNECT_TIMEOUT_S = 10.0
"""How long to wait for the scheduler at runner.address, and then for its first worker."""


def visible_gpus(cuda_visible_devices: str | None, count: Callable[[], int]) -> list[str]:
    """The GPUs a process here may use, as CUDA_VISIBLE_DEVICES names them: its entries when
    it is set (an empty value hides every GPU), else 0..count()-1."""
    if cuda_visible_devices is not None:
        return [d.strip() for d in cuda_visible_devices.split(",") if d.strip()]
    return [str(i) for i in range(count())]


def worker_gpu(index: int, gpus: Sequence[str]) -> str:
    """The GPU of local worker `index`; with more workers than GPUs they take turns."""
    return gpus[index % len(gpus)]


def _torch_gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


class OneGPUPerWorker(WorkerPlugin):
    """Narrows each worker of a local cluster to one GPU, before its code touches CUDA.

    LocalCluster starts every worker with the same environment, so it cannot give each its
    own CUDA_VISIBLE_DEVICES. A worker plugin's `setup` runs in the new worker process before
    the worker takes a task, and CUDA reads the variable only when a process first uses it:
    set there, `cuda` and `auto` (torch, transformers, COMET alike) mean this worker's GPU.
    Local workers are named 0, 1, ... by LocalCluster.
    """

    def __init__(self, gpus: Sequence[str]):
        self.gpus = tuple(gpus)

    def setup(self, worker) -> None:  # noqa: ANN001 - a distributed.Worker
        os.environ["CUDA_VISIBLE_DEVICES"] = worker_gpu(int(worker.name), self.gpus)


def local_cluster_kwargs(config: RunnerConfig, gpus: Sequence[str]) -> dict:
    """LocalCluster settings: worker processes (not threads: each holds its own models and
    CUDA context), one thread each, and one GPU each where there are GPUs, listening on
    127.0.0.1, with the dashboard at runner.dashboard (None: no dashboard).

    No memory limit: Dask's budget (the machine's memory over the workers) is meant for its
    own data, and it would pause or restart a worker that reads a 13B model into memory before
    moving it to its GPU."""
    # host: where the scheduler and the workers listen (LocalCluster's own default today,
    # written out so a change of default cannot open them); worker dashboards stay off.
    kwargs = {"n_workers": config.workers or len(gpus) or 1, "threads_per_worker": 1,
              "processes": True, "memory_limit": 0, "host": LOCAL_HOST,
              "dashboard_address": config.dashboard}
    if gpus:
        kwargs["plugins"] = (OneGPUPerWorker(gpus),)
    return kwargs


def check_scheduler(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Fail fast, naming runner.address, when no scheduler answers there or no worker joins
    it: else the build would wait on the connection, or on tasks that no worker takes."""
    from distributed import Client

    try:
        client = Client(address, timeout=timeout, set_as_default=False)
    except (OSError, TimeoutError, ValueError) as error:
        raise ConfigError(
            f"runner.address: no Dask scheduler answers at {address} within {timeout:g} s "
            f"({type(error).__name__}: {error}); start one with `dask scheduler`, or set "
            "runner.address: null for a local cluster") from None
    with client:
        try:
            client.wait_for_workers(1, timeout=timeout)
        except TimeoutError:
            raise ConfigError(
                f"runner.address: the scheduler at {address} has no worker after "
                f"{timeout:g} s; start them with `dask worker {address} --nthreads 1`, one "
                "per GPU") from None


def is_loopback_url(url: str) -> bool:
    """Whether `url`'s host is this machine only (localhost, 127.0.0.0/8, ::1)."""
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: nothing here says where it points
        return False


def warn_if_workers_cannot_reach(config: RunnerConfig, url: str) -> None:
    """Warn when the workers of a running cluster are given a loopback Prefect API: on their
    machines that address is not this one, so their task runs could not report to it.

    Checked whatever set the URL: the CLI sets PREFECT_API_URL to a temporary server on
    127.0.0.1 when the user set none, so "PREFECT_API_URL is unset" no longer says it."""
    if config.address and is_loopback_url(url):
        log.warning("runner.address: the Dask workers at %s are given the Prefect API %s, a "
                    "loopback address that workers on other machines cannot reach; set "
                    "PREFECT_API_URL to a Prefect server they reach (e.g. `prefect server "
                    "start --host 0.0.0.0` here, then http://<this host>:4200/api)",
                    config.address, url)


@contextlib.contextmanager
def _api_for_workers(config: RunnerConfig) -> Iterator[None]:
    """Send the flow's Prefect API address with each task.

    Tasks carry the flow's settings to the workers. Without PREFECT_API_URL the flow talks to
    a temporary server it started itself, and each worker would start one more of its own (about
    11 s each, on the same database); pointing them at the flow's server avoids that.
    """
    from prefect.context import get_run_context
    from prefect.settings import PREFECT_API_URL, temporary_settings

    # Set again when already set: a no-op, and one path for both cases.
    url = PREFECT_API_URL.value() or str(get_run_context().client.api_url)
    warn_if_workers_cannot_reach(config, url)
    with temporary_settings(updates={PREFECT_API_URL: url}):
        yield


@contextlib.contextmanager
def open_runner(config: RunnerConfig, gpus: Sequence[str] | None = None) -> Iterator:
    """A started DaskTaskRunner on the configured cluster; a local cluster stops on exit.
    `gpus` defaults to the GPUs visible here."""
    from prefect_dask import DaskTaskRunner

    if config.address:
        check_scheduler(config.address, CONNECT_TIMEOUT_S)
        runner = DaskTaskRunner(address=config.address,
                                client_kwargs={"timeout": CONNECT_TIMEOUT_S})
    else:
        if gpus is None:
            gpus = visible_gpus(os.environ.get("CUDA_VISIBLE_DEVICES"), _torch_gpu_count)
        runner = DaskTaskRunner(cluster_kwargs=local_cluster_kwargs(config, gpus))
    with _api_for_workers(config), runner:
        yield runner
