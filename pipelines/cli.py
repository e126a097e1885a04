"""The `cpo-data` command: build triplets, inspect published versions, train, run the demo."""

from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager

from cpo_data import store
from cpo_data.errors import UserError
from pipelines.printing import (
    print_build_summary,
    print_demo_closing,
    print_inspect,
    print_preflight,
    print_run_lineage,
    print_training_summary,
    print_versions,
    run_manifest_path,
)

# Everything heavier is imported where a command needs it: `cpo-data --help`, `versions` and
# `inspect` never load torch, transformers or Prefect (seconds each).


def _cmd_versions(args: argparse.Namespace) -> None:
    print_versions(args.uri, args.name)


def _cmd_inspect(args: argparse.Namespace) -> None:
    run_manifest = run_manifest_path(args.uri) if "://" not in args.uri else None
    if run_manifest is not None:
        print_run_lineage(run_manifest)
    else:
        print_inspect(args.uri, args.version, args.name, args.rows)


def _cmd_report(args: argparse.Namespace) -> None:
    from cpo_data.report import published_report, write_report

    if args.uri is None:  # the demo's dataset, as `./run demo` publishes it
        from pipelines.demo import demo_config

        publish = demo_config().publish
        args.uri, args.name = store.dataset_uri(publish.uri, publish.name), None
    manifest = store.read_manifest(args.uri, args.version, name=args.name)
    listed = published_report(manifest)
    if listed:  # published with the version, so not rewritten
        path = f"{store.version_path(args.uri, manifest['version'], name=args.name)}/{listed}"
    else:
        path = write_report(args.uri, manifest["version"], name=args.name)
    print(f"report    {path}")


def _cmd_push(args: argparse.Namespace) -> None:
    from cpo_data.hub import push_version

    print(f"==> push {args.uri} version {args.version} to the dataset repo {args.repo_id}")
    url = push_version(args.uri, args.repo_id, args.version, name=args.name,
                       private=args.private, revision=args.revision)
    print(f"pushed    {url}")


# Without PREFECT_API_URL a flow starts Prefect's temporary server, which on a new PREFECT_HOME
# first creates and migrates its database: 14-16 s measured on an idle 2-core machine, 18.7 s
# beside two busy processes, against Prefect's default wait of 20 s; CI's run of the demo timed
# out ("Timed out while attempting to connect to ephemeral Prefect API server").
TEMPORARY_SERVER_WAIT_S = 120


@contextmanager
def _prefect_server():
    """The Prefect server the flows report to, checked before any work.

    With PREFECT_API_URL, that server must answer: if it does not, one line says so and how to
    fix it, instead of a 114-line traceback from inside the flow. Without it, Prefect's
    temporary server, waited for up to TEMPORARY_SERVER_WAIT_S and with its analytics off:
    offline, its telemetry logs an ERROR on every run, and with it 2 of 4 fresh runs printed
    a "database is locked" traceback (Prefect#18934); 5 of 5 were clean without. A wait or
    analytics setting the user chose is kept.
    """
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    if PREFECT_API_URL.value():
        from pipelines.deploy import check_server

        check_server()
        yield
        return
    with temporary_settings(updates=temporary_server_settings(get_current_settings())):
        with _temporary_server():
            yield


class _DyingWithParent:
    """Prefect's server module's `subprocess`, with every Popen of a command list tied to this
    process's life (`leftovers.dying_with_parent`): a parent-death signal (SIGTERM: uvicorn
    then shuts down cleanly) reaches the temporary server when this process dies, SIGKILL
    included, where otherwise it would run on."""

    def __init__(self, real) -> None:  # noqa: ANN001 - the subprocess module
        self._real = real

    def __getattr__(self, name: str):  # noqa: ANN204 - whatever subprocess has
        return getattr(self._real, name)

    def Popen(self, args, *rest, **kwargs):  # noqa: N802, ANN001, ANN002, ANN003, ANN201
        """subprocess.Popen, its command behind `dying_with_parent`."""
        import signal

        from cpo_data.leftovers import dying_with_parent

        # `args` by name too: Prefect passes `args=[...]`. A shell string, or a program named
        # by `executable=`, cannot be put behind the wrapper; Prefect uses neither.
        if (isinstance(args, list | tuple) and not kwargs.get("shell")
                and kwargs.get("executable") is None):
            args = dying_with_parent(list(args), signal.SIGTERM)
        return self._real.Popen(args, *rest, **kwargs)


@contextmanager
def _temporary_server():
    """Prefect's temporary server, started here, from the main thread, and pointed at for the
    block through PREFECT_API_URL; stopped after it.

    Started lazily, Prefect would start it from whichever thread first needs the API, and a
    parent-death signal fires when the thread that started the child ends, not the process.
    The server, its settings and its database are Prefect's own (`SubprocessASGIServer`)."""
    from prefect.server.api import server as prefect_server
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if not isinstance(prefect_server.subprocess, _DyingWithParent):
        prefect_server.subprocess = _DyingWithParent(prefect_server.subprocess)
    server = prefect_server.SubprocessASGIServer()
    server.start()
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            try:
                yield
            finally:
                _send_pending()
    finally:
        server.stop()


PENDING_SEND_WAIT_S = 30


def _send_pending() -> None:
    """Send the run logs and events still queued to the server, while it is up.

    Prefect sends them in batches (every 2 s) and otherwise only at interpreter exit, by when
    the temporary server is gone: the exit then retried each batch against a closed port, a
    minute or more (14 minutes after a 10k-source build) before "Error logging to API"."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=PENDING_SEND_WAIT_S)


def temporary_server_settings(settings) -> dict:  # noqa: ANN001 - Prefect's Settings
    """The settings a temporary server runs with, over `settings`: a longer start-up wait
    and no analytics, each unless the user set it (environment, profile or .env)."""
    from prefect.settings import (
        PREFECT_SERVER_ANALYTICS_ENABLED,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
    )

    server = settings.server
    updates = {}
    if "startup_timeout_seconds" not in server.ephemeral.model_fields_set:
        updates[PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS] = TEMPORARY_SERVER_WAIT_S
    if "analytics_enabled" not in server.model_fields_set:
        updates[PREFECT_SERVER_ANALYTICS_ENABLED] = False
    return updates


def _run_build(config, rows: int) -> dict:
    from pipelines.build import build_triplets

    with _prefect_server():
        summary = build_triplets(config)
    print_build_summary(summary, rows)
    return summary


def _cmd_check(args: argparse.Namespace) -> None:
    from pipelines.project import load_project

    project = load_project(args.config)
    print(f"==> check {args.config}")
    report = project.preflight()
    print_preflight(report)
    if not report.ok:  # listed above
        raise UserError(f"{args.config}: {len(report.problems)} problem(s) before any work "
                        "started (listed above)")


def _cmd_download(args: argparse.Namespace) -> None:
    from cpo_data.preflight import download
    from pipelines.project import load_project

    project = load_project(args.config)
    print(f"==> download {args.config} into the Hugging Face cache")
    report = download(project.needs(),
                      progress=lambda line: print(f"==> {line}", flush=True))
    print_preflight(report)
    if not report.ok:
        raise UserError(f"{args.config}: {len(report.problems)} problem(s) (listed above)")
    print("everything is in the Hugging Face cache: runs may now set HF_HUB_OFFLINE=1")


def _cmd_build(args: argparse.Namespace) -> None:
    from pipelines.project import load_project

    # Every section of the file, and every file and model the build reads, is checked
    # before Prefect starts (about 11 s).
    project = load_project(args.config)
    project.require_ready(train=False)
    _run_build(project.need_build(), args.rows)


def _run_train(config, version: str | None) -> None:
    from pipelines.train import train_cpo

    with _prefect_server():
        record = train_cpo(config, version)
    print_training_summary(record)


def _cmd_train(args: argparse.Namespace) -> None:
    from pipelines.project import load_project

    project = load_project(args.config)
    config = project.need_train()
    project.require_ready(build=False)
    # A missing dataset or version is named before Prefect's server starts (about 11 s).
    store.resolve_version(config.dataset, args.version or config.version)
    _run_train(config, args.version)


def _cmd_serve(args: argparse.Namespace) -> None:
    from pipelines import deploy
    from pipelines.project import load_project

    project = load_project(args.config)
    project.require_ready()
    deploy.serve(project)


def _cmd_demo(args: argparse.Namespace) -> None:
    from pipelines import demo

    print(f"==> demo: {demo.DEMO_CONFIG}")
    from cpo_data.preflight import PreflightError, build_needs, check
    from training.config import train_needs

    def require(needs) -> None:  # noqa: ANN001
        report = check(needs)
        if not report.ok:
            raise PreflightError(report, str(demo.DEMO_CONFIG))

    build_config, train_config = demo.demo_configs(args.store)
    require(build_needs(build_config))
    summary = _run_build(build_config, args.rows)
    if not args.skip_training:
        print("\n==> demo training: a short CPO run with a tiny local model")
        demo.ensure_demo_model(train_config.model)
        require(train_needs(train_config))
        _run_train(train_config, None)
    print_demo_closing(summary, trained=not args.skip_training)


def build_parser() -> argparse.ArgumentParser:
    from cpo_data import __version__

    parser = argparse.ArgumentParser(
        prog="cpo-data",
        description="Build machine-translation preference data and train on it.",
    )
    parser.add_argument("--version", action="version", version=f"cpo-data {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    versions = commands.add_parser("versions", help="list the published versions of a dataset")
    versions.add_argument("uri", help="dataset URI ({store}/{name}), or the store with --name")
    versions.add_argument("--name", help="dataset name inside the store at URI")
    versions.set_defaults(run=_cmd_versions)

    inspect = commands.add_parser("inspect", help="versions, counts, a few rows and the runs "
                                  "trained on them; or, for a training run, what produced it")
    inspect.add_argument("uri", help="dataset URI ({store}/{name}), the store with --name, or "
                         "a training run's folder (or its final/ model)")
    inspect.add_argument("--version", default="latest", help="version id (default: latest)")
    inspect.add_argument("--name", help="dataset name inside the store at URI")
    inspect.add_argument("--rows", type=int, default=3, help="rows to show per language pair")
    inspect.set_defaults(run=_cmd_inspect)

    report = commands.add_parser("report", help="the HTML report of a version (written at "
                                 "publishing; rendered now for older versions)")
    report.add_argument("uri", nargs="?", help="dataset URI ({store}/{name}), or the store "
                        "with --name (default: the demo's dataset)")
    report.add_argument("--version", default="latest", help="version id (default: latest)")
    report.add_argument("--name", help="dataset name inside the store at URI")
    report.set_defaults(run=_cmd_report)

    push = commands.add_parser("push", help="upload a version to a Hugging Face dataset repo "
                               "(token: HF_TOKEN or `hf auth login`)")
    push.add_argument("uri", help="dataset URI ({store}/{name}), or the store with --name")
    push.add_argument("repo_id", help="dataset repository, e.g. my-org/alma-r-pairs")
    push.add_argument("--version", default="latest", help="version id (default: latest)")
    push.add_argument("--name", help="dataset name inside the store at URI")
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.add_argument("--revision", help="branch to push to (created when missing)")
    push.set_defaults(run=_cmd_push)

    build = commands.add_parser("build", help="build and publish triplets from a YAML config")
    build.add_argument("config", help="build config (YAML), e.g. configs/demo.yaml")
    build.add_argument("--rows", type=int, default=2, help="rows to show per language pair")
    build.set_defaults(run=_cmd_build)

    train = commands.add_parser("train", help="train on a published version (the YAML's "
                                "train section)")
    train.add_argument("config", help="config (YAML) with a train section, e.g. "
                       "configs/demo.yaml")
    train.add_argument("--version", help="dataset version (default: the config's, latest)")
    train.set_defaults(run=_cmd_train)

    serve = commands.add_parser(
        "serve", help="serve the build on the config's schedule and the training on each "
        "published version (needs a Prefect server: PREFECT_API_URL)")
    serve.add_argument("config", help="config (YAML) with publish, train and deploy sections")
    serve.set_defaults(run=_cmd_serve)

    for name, run, what in (
            ("check", _cmd_check, "check, before any work, every file and model the config's "
             "build and training read (hub ids: commit, gated, licence, size); exit 2 on any "
             "problem"),
            ("download", _cmd_download, "fetch every hub model the config's build and "
             "training read (COMET encoders included) into the Hugging Face cache, for a "
             "machine without network")):
        command = commands.add_parser(name, help=what)
        command.add_argument("config", help="config (YAML), e.g. configs/alma-r.yaml")
        command.set_defaults(run=run)

    demo = commands.add_parser("demo", help="run the offline demo on the demo corpus")
    demo.add_argument("--store", help="store URI to publish into (default: .cpo-data/store)")
    demo.add_argument("--rows", type=int, default=2, help="rows to show per language pair")
    demo.add_argument("--skip-training", action="store_true",
                      help="stop after publishing the triplets")
    demo.set_defaults(run=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import pandas as pd

    pd.set_option("display.width", 120)
    try:
        args.run(args)
    except UserError as error:  # input, config or environment: one line, not a traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def console() -> None:
    """The `cpo-data` console script: `main()`, then exit without interpreter teardown.

    pyarrow 21 sometimes aborts a finished process during teardown ("terminate called without
    an active exception", exit 134; apache/arrow#34314): seen here in 1-3% of short processes
    under load. The work is done and flushed by then; `os._exit` keeps the exit code honest.
    The exit hooks are run first, by hand, so that Prefect stops the temporary server it
    started for a build instead of leaving it running.
    """
    import atexit
    import logging
    import os

    code = main()
    # Flush log handlers first (Prefect's sends the run's logs to its server), then the exit
    # hooks, one of which stops the temporary server Prefect started for a build.
    logging.shutdown()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    console()
