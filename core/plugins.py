"""The plugin manager: hook specifications, markers and the provider registry.

Built-in providers and plugins load through the ``regionvault`` entry-point group, exactly as
an outside distribution's do. Every hook is documented in docs/hooks.md (a test checks it).
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import pluggy
from regionvault.core.errors import ConfigError, ProviderNotFound, RegionVaultError

if TYPE_CHECKING:
    from regionvault.core.interfaces import Capture, Provider
    from regionvault.core.types import Instance, RecoveryPoint, RegionConfig

__all__ = [
    "PROJECT",
    "ExecutorKind",
    "HookSpecs",
    "ProviderRegistry",
    "SdkGuard",
    "check_executor",
    "executor_kinds",
    "get_plugin_manager",
    "hookimpl",
    "hookspec",
    "make_plugin_manager",
]

PROJECT = "regionvault"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

_MISSING = re.compile(r"No module named '([^']+)'")


class SdkGuard:
    """Around the import of a provider's service module (which imports a cloud SDK): when
    one of the SDK's ``modules`` is missing, one :class:`RegionVaultError` naming the
    provider, the region and ``message`` (say, the extra to install) instead of an import
    traceback. A provider registers and validates settings without its SDK, so that the
    core runs where the SDK is not installed::

        _needs_sdk = SdkGuard("aws", "the aws provider needs boto3: pip install ...", {"boto3"})
        with _needs_sdk(region):
            from my_provider.s3 import S3Vault
    """

    def __init__(self, provider: str, message: str, modules: Iterable[str]) -> None:
        self.provider = provider
        self.message = message
        self.modules = frozenset(modules)

    @contextlib.contextmanager
    def __call__(self, region: RegionConfig) -> Iterator[None]:
        try:
            yield
        except ModuleNotFoundError as exc:
            missing = exc.name or (_MISSING.findall(str(exc)) or [""])[0]
            if missing.partition(".")[0] not in self.modules:
                raise
            raise RegionVaultError(
                self.message, provider=self.provider, region=region.name
            ) from None


@runtime_checkable
class ExecutorKind(Protocol):
    """A kind of executor a site may name in ``[executor] kind``, from a plugin
    (``regionvault_executor_kinds``): ``celery`` comes from plugins/celery. The engine, the
    executor, the site and the ledger are the pipeline's and the site's types, which sit
    above this module, so they are ``Any`` here; each method says which."""

    #: the value of ``[executor] kind`` that selects it
    name: str

    def validate(self, settings: Mapping[str, Any], source: str) -> None:
        """Check the ``[executor]`` table's other keys (``settings``, as written in the site
        file ``source``); raise :class:`~regionvault.core.errors.ConfigError` naming
        ``executor.<key>``."""
        ...

    def executor(self, engine: Any, *, stop: Any) -> AbstractContextManager[Any]:
        """A context manager giving the
        :class:`~regionvault.core.pipeline.executor.Executor` that runs ``engine``'s
        (a :class:`~regionvault.core.pipeline.Engine`) jobs for ``regionvault tick`` and
        ``run``, closed at its end; ``stop`` (a :class:`threading.Event`) is set to stop
        waiting. A distributed one says ``distributed = True`` (docs/jobs.md)."""
        ...

    def ledger(self, site: Any) -> Any:
        """The :class:`~regionvault.core.pipeline.ledger.Ledger` this kind's runners share,
        for ``site`` (a :class:`~regionvault.core.site.Site`): ``Engine.ledger()`` and
        ``status`` read it."""
        ...


#: the extra that installs each executor kind regionvault ships as a plugin
_KIND_EXTRAS = {"celery": "pip install 'regionvault[celery]'"}


def executor_kinds(pm: pluggy.PluginManager) -> dict[str, ExecutorKind]:
    """The executor kinds the plugins of ``pm`` give (``thread`` is the pipeline's own, and
    not among them), by name; a name given twice is an error."""
    found: dict[str, ExecutorKind] = {}
    for kinds in pm.hook.regionvault_executor_kinds():
        for kind in kinds or ():
            name = getattr(kind, "name", None)
            if not isinstance(name, str) or not name:
                raise RegionVaultError(f"executor kind {kind!r} has no name")
            if name == "thread" or (name in found and found[name] is not kind):
                raise RegionVaultError(f"executor kind {name!r} is given twice")
            found[name] = kind
    return found


def check_executor(
    name: str, settings: Mapping[str, Any], source: str, pm: pluggy.PluginManager
) -> ExecutorKind | None:
    """A site's ``[executor]`` (``kind = name`` and its other keys, ``settings``, in the
    site file ``source``) names a kind that is installed, with settings it takes: its
    :class:`ExecutorKind`, or None for the built-in ``thread`` (which takes no settings).
    :class:`~regionvault.core.errors.ConfigError` naming ``executor.kind`` or the key."""
    if name == "thread":
        if settings:
            raise ConfigError(
                "unknown key (the thread executor takes none but kind)",
                file=source,
                key=f"executor.{sorted(settings)[0]}",
            )
        return None
    kinds = executor_kinds(pm)
    kind = kinds.get(name)
    if kind is None:
        installed = ", ".join(["thread", *sorted(kinds)])
        extras = sorted(_KIND_EXTRAS.items())
        hints = "; ".join(f"{k}: {how}" for k, how in extras if k not in kinds)
        raise ConfigError(
            f"unknown executor kind {name!r} (installed: {installed}"
            + (f"; {hints}" if hints else "")
            + ")",
            file=source,
            key="executor.kind",
        )
    kind.validate(settings, source)
    return kind


class HookSpecs:
    """Hook specifications of the core. Each body is only its documentation. The
    conformance suite specifies its own hook (regionvault.core.conformance.support)."""

    @hookspec
    def regionvault_register_providers(self, registry: ProviderRegistry) -> None:
        """Called once when the plugin manager is built. Add Provider classes with
        ``registry.add(MyProvider)``. Returns nothing."""

    @hookspec
    def regionvault_before_capture(self, region: str, instance: Instance) -> None:
        """Called before an instance's data is captured for a backup, in the instance's home
        region: quiesce the workload here (flush, freeze). An exception aborts the backup,
        which is reported as a job failure. Returns nothing."""

    @hookspec
    def regionvault_after_capture(
        self, region: str, instance: Instance, capture: Capture, error: BaseException | None
    ) -> None:
        """Called after a capture was read (or failed, then ``error`` is set), always paired
        with ``regionvault_before_capture``: thaw the workload here. Returns nothing."""

    @hookspec
    def regionvault_after_backup(self, region: str, recovery_point: RecoveryPoint) -> None:
        """Called after a recovery point was committed to ``region``'s vault. An exception
        is logged and made a problem of the tick; it never fails the backup, which is done.
        Returns nothing."""

    # ``result``, ``outcome`` and ``report`` are values of the repository and the pipeline,
    # which sit above this module: the SPI imports nothing above it, so they are typed Any
    # here, and each docstring names the class.

    @hookspec
    def regionvault_after_copy(
        self,
        source_region: str,
        region: str,
        source: RecoveryPoint,
        copy: RecoveryPoint,
        result: Any,
    ) -> None:
        """Called after ``source`` was copied from ``source_region`` and committed in
        ``region`` as ``copy`` (re-encrypted under ``region``'s keys), not for a copy that
        was there already. ``result`` is what the copy did: a
        :class:`~regionvault.core.repository.CopyResult` (bytes and chunks moved) for a copy
        in one call or one ``copy`` job, a :class:`~regionvault.core.repository.CommitReport`
        (batches taken in) for a ``copy-commit`` job, whose bytes crossed in the jobs before
        it. An exception is logged and made a problem of the tick; it never fails the copy,
        which is committed. Returns nothing."""

    @hookspec(firstresult=True)
    def regionvault_health_check(self, region: str, instance: Instance) -> bool | None:
        """Called after a launch from a recovery point, repeatedly until it returns True or
        the launch's health timeout passes. Return True when ``instance`` serves, False when
        not yet, None when this plugin does not know the instance (the next plugin is
        asked; with no answer at all, a running instance counts as healthy)."""

    @hookspec
    def regionvault_after_launch(
        self,
        region: str,
        instance: Instance,
        recovery_point: RecoveryPoint,
        seconds_to_healthy: float | None,
    ) -> None:
        """Called after an instance was launched from ``recovery_point`` and health-checked;
        ``seconds_to_healthy`` is the measured RTO, None when it never became healthy. An
        exception is logged (a problem of the tick, in a tick); it never fails the launch.
        Returns nothing."""

    @hookspec
    def regionvault_on_job_failure(
        self, job: str, region: str | None, error: BaseException
    ) -> None:
        """Called when a job (tag, backup, copy, retention, verify, drill) fails; ``job`` is
        the job's stable key. Notify or count here; the error is still reported. Returns
        nothing."""

    @hookspec
    def regionvault_after_job(self, outcome: Any) -> None:
        """Called by the service once for each job of a tick, in the service's process, as
        the executor hands its outcome back: ``outcome`` is the
        :class:`~regionvault.core.pipeline.jobs.JobOutcome` (``key``, ``kind``, ``region``,
        ``status``: done, replayed, busy or failed; ``result``, ``error``, ``started_at``,
        ``finished_at``). Count or audit here. An exception is logged and becomes a problem
        of the tick; the tick's other jobs still run. Returns nothing."""

    @hookspec
    def regionvault_executor_kinds(self) -> Iterable[ExecutorKind] | None:
        """Called when a site is opened, to check its ``[executor]`` table, and when the
        site's executor or ledger is wanted. Return the executor kinds this plugin gives
        (objects with ``name``, ``validate``, ``executor`` and ``ledger``:
        :class:`ExecutorKind`), or nothing."""

    @hookspec
    def regionvault_after_tick(self, report: Any) -> None:
        """Called by the service at the end of each tick (a whole-site tick, or a region's
        own) with its :class:`~regionvault.core.pipeline.reports.TickReport`: every job's
        outcome, the schedules, the problems, ``outcome``. An exception is logged and added
        to the report's problems. Returns nothing."""

    @hookspec
    def regionvault_after_verify(self, region: str, report: Any, seconds: float) -> None:
        """Called after ``region``'s vault was verified (``regionvault verify``), whatever
        it found: ``report`` is the :class:`~regionvault.core.repository.VerifyReport`
        (``ok``, ``errors``, ``bytes_read``, ...), ``seconds`` how long it took. An
        exception is logged; it never changes the verify's result. Returns nothing."""

    @hookspec
    def regionvault_metrics(self, registry: Any) -> None:
        """Called once when a command's or daemon's Prometheus metrics are set up
        (docs/metrics.md), before any is read: ``registry`` is their
        :class:`prometheus_client.CollectorRegistry` (never the process-wide default one).
        Register this plugin's own metrics or collectors in it
        (``Counter(..., registry=registry)``, ``registry.register(collector)``) under names
        of its own. A hook that raises, or takes a name held already, leaves out this
        plugin's metrics with a warning; the command runs. Returns nothing."""


class ProviderRegistry:
    """Provider classes by name; filled through ``regionvault_register_providers``."""

    def __init__(self) -> None:
        self._providers: dict[str, type[Provider]] = {}
        self._instances: dict[str, Provider] = {}
        #: how many open sites use each provider (acquire, release)
        self._users: dict[str, int] = {}
        self._lock = threading.Lock()

    def add(self, provider: type[Provider]) -> None:
        name = getattr(provider, "name", None)
        if not isinstance(name, str) or not name:
            raise RegionVaultError(f"provider class {provider!r} has no name")
        existing = self._providers.get(name)
        if existing is not None and existing is not provider:
            raise RegionVaultError(
                f"provider name {name!r} registered twice: {existing!r} and {provider!r}"
            )
        self._providers[name] = provider

    def names(self) -> list[str]:
        return sorted(self._providers)

    def __contains__(self, name: object) -> bool:
        return name in self._providers

    def cls(self, name: str) -> type[Provider]:
        try:
            return self._providers[name]
        except KeyError:
            known = ", ".join(self.names()) or "none"
            raise ProviderNotFound(
                f"unknown provider {name!r} (registered: {known}; is its plugin installed?)"
            ) from None

    def get(self, name: str) -> Provider:
        """The shared Provider object for ``name`` (made on first use)."""
        with self._lock:
            found = self._instances.get(name)
            if found is None:
                found = self._instances[name] = self.cls(name)()
            return found

    def acquire(self, names: Iterable[str]) -> None:
        """An open :class:`~regionvault.core.site.Site` uses the providers ``names``: none
        of them is closed until the site gives them back (:meth:`release`)."""
        with self._lock:
            for name in set(names):
                self._users[name] = self._users.get(name, 0) + 1

    def release(self, names: Iterable[str]) -> None:
        """The end of an :meth:`acquire`: each provider no open site uses any more, and that
        was made, is closed (:meth:`Provider.close`). Providers are shared by every site of
        the process, so one site closing never closes them under another."""
        closing: list[Provider] = []
        with self._lock:
            for name in set(names):
                left = self._users.get(name, 0) - 1
                if left > 0:
                    self._users[name] = left
                    continue
                self._users.pop(name, None)
                found = self._instances.get(name)
                if found is not None:
                    closing.append(found)
        # every one is closed even when one fails; then the first failure is raised
        failures: list[BaseException] = []
        for provider in closing:
            try:
                provider.close()
            except Exception as exc:
                failures.append(exc)
        if failures:
            raise failures[0]


def make_plugin_manager(
    *,
    load_entry_points: bool = True,
    plugins: Iterable[object] = (),
    hookspecs: Iterable[type] = (),
) -> pluggy.PluginManager:
    """A fresh plugin manager with the core's specs and ``hookspecs`` (a part above the core,
    such as the conformance suite, brings its own), entry-point plugins and ``plugins``
    loaded. A hook implementation no specification knows is a :class:`RegionVaultError`
    naming the hook and the plugin, unless marked ``@hookimpl(optionalhook=True)``."""
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(HookSpecs)
    for specs in hookspecs:
        pm.add_hookspecs(specs)
    if load_entry_points:
        pm.load_setuptools_entrypoints(PROJECT)
    for plugin in plugins:
        pm.register(plugin)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        hint = (
            " (the conformance suite's hook: mark it @hookimpl(optionalhook=True))"
            if "'regionvault_conformance_support'" in str(exc)
            else ""
        )
        raise RegionVaultError(f"{exc}{hint}") from None
    return pm


def registry_from(pm: pluggy.PluginManager) -> ProviderRegistry:
    registry = ProviderRegistry()
    pm.hook.regionvault_register_providers(registry=registry)
    return registry


_default: tuple[pluggy.PluginManager, ProviderRegistry] | None = None
_default_lock = threading.Lock()


def get_plugin_manager() -> tuple[pluggy.PluginManager, ProviderRegistry]:
    """The process-wide plugin manager and provider registry, built on first use."""
    global _default
    with _default_lock:
        if _default is None:
            pm = make_plugin_manager()
            _default = (pm, registry_from(pm))
        return _default


def _reset_for_tests() -> None:
    global _default
    with _default_lock:
        _default = None


def call_hook(pm: pluggy.PluginManager, name: str, **kwargs: Any) -> Any:
    return getattr(pm.hook, name)(**kwargs)
