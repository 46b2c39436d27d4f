"""``regionvault worker --region R``: a Celery worker of region R (entry point ``worker`` of
the ``regionvault.cli`` group). It consumes R's queue of its site alone
(``<namespace>.region.<R>``) and runs each job with the site file given (``--site``), which
on a worker's host holds R's credentials alone (docs/distributed.md); it builds only the
services the jobs of R need: R's own, and of the other regions their seal-only handles and
inboxes.

The pool is ``threads`` by default: one process per worker, so a worker killed (SIGKILL, a
lost machine) takes its jobs with it, and nothing is left behind holding a lock or a
half-written object (a prefork pool's children can outlive a killed parent); its jobs are
then delivered to another worker of R after ``visibility_timeout``. The data plane's
compression, encryption and hashing release the GIL, so threads run jobs side by side as
the thread executor does. ``--pool prefork`` is there for handlers that hold the GIL."""

from __future__ import annotations

import os
import socket

import click
from regionvault.core.cli.root import CliState, ExpectedError, pass_state

__all__ = ["worker"]


@click.command()
@click.option("--region", "-r", required=True, metavar="REGION", help="The region to serve.")
@click.option(
    "--concurrency",
    "-c",
    type=click.IntRange(min=1),
    default=None,
    help="Jobs run at once (default: [executor] concurrency, else 1).",
)
@click.option(
    "--pool",
    type=click.Choice(["threads", "prefork", "solo"]),
    default="threads",
    show_default=True,
    help="Celery's pool: threads keeps a worker one process (see docs/distributed.md).",
)
@click.option(
    "--name",
    metavar="NAME",
    help="The worker's Celery node name (default: <region>-<pid>@<host>).",
)
@click.option(
    "--loglevel",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    default="INFO",
    show_default=True,
)
@pass_state
def worker(
    state: CliState,
    region: str,
    concurrency: int | None,
    pool: str,
    name: str | None,
    loglevel: str,
) -> None:
    """Run a Celery worker of one region (the site's [executor] must be celery)."""
    site = state.site()
    kind = site.config.executor.kind
    if kind != "celery":
        raise ExpectedError(
            f"{site.config.source}: [executor] kind is {kind!r}, not 'celery': a worker "
            "serves a site whose jobs go to Celery queues (docs/distributed.md)"
        )
    from regionvault.plugins.celery.kind import needs_celery, site_settings

    settings = site_settings(site)
    here = site.region(region).name
    site_path = state.site_path.resolve()
    with needs_celery():
        from regionvault.plugins.celery.app import serve_region
    node = name or f"{here.replace(':', '-')}-{os.getpid()}@{socket.gethostname()}"
    serve_region(
        site_path,
        here,
        settings,
        concurrency=concurrency or settings.concurrency,
        pool=pool,
        name=node,
        loglevel=loglevel.upper(),
    )
