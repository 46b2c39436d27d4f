"""The plugin manager: built-ins and outside plugins load the same way; hooks are documented."""

from __future__ import annotations

import importlib.metadata
import inspect
import re
import sys
import textwrap
from pathlib import Path
from typing import ClassVar

import pluggy
import pytest
from regionvault.core.conformance.support import ConformanceHookSpecs
from regionvault.core.errors import ProviderNotFound, RegionVaultError
from regionvault.core.interfaces import Compute, KeyService, Provider, Sealer, Transit, Vault
from regionvault.core.plugins import (
    PROJECT,
    HookSpecs,
    ProviderRegistry,
    call_hook,
    hookimpl,
    make_plugin_manager,
    registry_from,
)
from regionvault.core.types import Capabilities, RegionConfig

DOCS = Path(__file__).resolve().parent.parent / "docs"


def make_provider(provider_name: str) -> type[Provider]:
    """A provider class that can be registered but builds nothing."""

    class _Provider(Provider):
        name: ClassVar[str] = provider_name
        capabilities: ClassVar[Capabilities] = Capabilities()

        def compute(self, region: RegionConfig) -> Compute:
            raise AssertionError("not used")

        def key_service(self, region: RegionConfig) -> KeyService:
            raise AssertionError("not used")

        def vault(self, region: RegionConfig) -> Vault:
            raise AssertionError("not used")

        def sealer(self, region: RegionConfig) -> Sealer:
            raise AssertionError("not used")

        def transit(self, source: RegionConfig, destination: RegionConfig) -> Transit:
            raise AssertionError("not used")

    _Provider.__name__ = _Provider.__qualname__ = f"{provider_name.title()}Provider"
    return _Provider


class RegistersProviders:
    """An outside plugin object registering the given provider classes."""

    def __init__(self, *providers: type[Provider]) -> None:
        self.providers = providers

    @hookimpl
    def regionvault_register_providers(self, registry: ProviderRegistry) -> None:
        for provider in self.providers:
            registry.add(provider)


# --------------------------------------------------------------------------- built-ins


def test_local_provider_is_declared_in_the_entry_point_group() -> None:
    found = {ep.name: ep.value for ep in importlib.metadata.entry_points(group=PROJECT)}
    assert found.get("local") == "regionvault.providers.local.plugin"


def test_plugin_manager_loads_the_local_provider_through_its_entry_point() -> None:
    pm = make_plugin_manager()
    plugin = pm.get_plugin("local")
    assert plugin is not None
    assert plugin.__name__ == "regionvault.providers.local.plugin"
    dists = {dist.project_name for _, dist in pm.list_plugin_distinfo()}
    assert "regionvault" in dists
    registry = registry_from(pm)
    assert "local" in registry.names()
    local = registry.cls("local")
    assert local.__module__.startswith("regionvault.providers.local")
    assert local.name == "local"
    assert registry.get("local") is registry.get("local")


def test_without_entry_points_nothing_is_registered() -> None:
    registry = registry_from(make_plugin_manager(load_entry_points=False))
    assert registry.names() == []
    with pytest.raises(ProviderNotFound, match=r"registered: none"):
        registry.cls("local")


# --------------------------------------------------------------------------- outside plugins


def test_outside_plugin_object_registers_a_provider() -> None:
    edge = make_provider("edge")
    pm = make_plugin_manager(plugins=[RegistersProviders(edge)])
    registry = registry_from(pm)
    assert registry.cls("edge") is edge
    assert {"edge", "local"} <= set(registry.names())
    assert isinstance(registry.get("edge"), edge)


def test_outside_distribution_registers_through_the_same_entry_point_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A distribution that is not regionvault, found on sys.path by its dist-info alone."""
    module = "rv_outside_plugin_for_tests"
    (tmp_path / f"{module}.py").write_text(
        textwrap.dedent(
            """
            from regionvault.core import Capabilities, Provider, hookimpl


            class OutsideProvider(Provider):
                name = "outside"
                capabilities = Capabilities(worm_lock=True)
                required_settings = frozenset({"endpoint"})

                def compute(self, region):
                    raise RuntimeError("not used")

                key_service = vault = sealer = compute

                def transit(self, source, destination):
                    raise RuntimeError("not used")


            @hookimpl
            def regionvault_register_providers(registry):
                registry.add(OutsideProvider)
            """
        ),
        encoding="utf-8",
    )
    info = tmp_path / f"{module}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: rv-outside-plugin-for-tests\nVersion: 1.0\n",
        encoding="utf-8",
    )
    (info / "entry_points.txt").write_text(f"[regionvault]\noutside = {module}\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, module, raising=False)
    try:
        pm = make_plugin_manager()
        assert pm.get_plugin("outside") is not None
        dists = {dist.project_name for _, dist in pm.list_plugin_distinfo()}
        assert {"regionvault", "rv-outside-plugin-for-tests"} <= dists
        registry = registry_from(pm)
        assert {"local", "outside"} <= set(registry.names())
        outside = registry.cls("outside")
        assert outside.__module__ == module
        assert outside.capabilities.worm_lock
    finally:
        sys.modules.pop(module, None)


def test_duplicate_provider_names_are_rejected() -> None:
    first, second = make_provider("twin"), make_provider("twin")
    pm = make_plugin_manager(
        load_entry_points=False, plugins=[RegistersProviders(first), RegistersProviders(second)]
    )
    with pytest.raises(RegionVaultError, match=r"provider name 'twin' registered twice"):
        registry_from(pm)


def test_an_outside_plugin_cannot_take_the_local_name() -> None:
    pm = make_plugin_manager(plugins=[RegistersProviders(make_provider("local"))])
    with pytest.raises(RegionVaultError, match=r"'local' registered twice"):
        registry_from(pm)


def test_registering_the_same_class_twice_is_harmless() -> None:
    edge = make_provider("edge")
    registry = ProviderRegistry()
    registry.add(edge)
    registry.add(edge)
    assert registry.names() == ["edge"]


def test_provider_without_a_name_is_rejected() -> None:
    nameless = make_provider("x")
    del nameless.name
    with pytest.raises(RegionVaultError, match="has no name"):
        ProviderRegistry().add(nameless)


def test_unknown_provider_error_lists_the_registered_ones() -> None:
    pm = make_plugin_manager(
        plugins=[RegistersProviders(make_provider("zeta"), make_provider("alpha"))]
    )
    registry = registry_from(pm)
    with pytest.raises(ProviderNotFound) as info:
        registry.cls("nosuch")
    message = str(info.value)
    names = registry.names()
    assert {"alpha", "local", "zeta"} <= set(names)
    assert names == sorted(names)
    assert "unknown provider 'nosuch'" in message
    assert f"(registered: {', '.join(names)};" in message
    assert "plugin installed" in message


# --------------------------------------------------------------------------- hooks


def test_the_conformance_hook_needs_optionalhook_outside_the_suite() -> None:
    class Plain:
        @hookimpl
        def regionvault_conformance_support(self, provider: str) -> None:
            return None

    # the core does not specify the suite's hook: a plain implementation is refused, saying how
    with pytest.raises(RegionVaultError) as refused:
        make_plugin_manager(load_entry_points=False, plugins=[Plain()])
    message = str(refused.value)
    assert "'regionvault_conformance_support'" in message and "optionalhook=True" in message
    assert "\n" not in message
    # the suite's plugin manager, which brings the specification, takes it
    pm = make_plugin_manager(
        load_entry_points=False, plugins=[Plain()], hookspecs=[ConformanceHookSpecs]
    )
    assert pm.hook.regionvault_conformance_support(provider="local") is None


def test_hook_implementation_with_a_misspelt_argument_is_refused() -> None:
    class Bad:
        @hookimpl
        def regionvault_after_backup(self, region: str, recoverypoint: object) -> None:
            raise AssertionError("never called")

    with pytest.raises(pluggy.PluginValidationError, match="recoverypoint"):
        make_plugin_manager(load_entry_points=False, plugins=[Bad()])


def test_lifecycle_hooks_reach_every_plugin_and_health_check_takes_the_first_answer() -> None:
    calls: list[tuple[str, str]] = []

    class Records:
        @hookimpl
        def regionvault_on_job_failure(
            self, job: str, region: str | None, error: BaseException
        ) -> None:
            calls.append(("records", f"{job}:{region}:{error}"))

        @hookimpl
        def regionvault_health_check(self, region: str, instance: object) -> bool | None:
            return None  # does not know this instance

    class Knows:
        @hookimpl
        def regionvault_on_job_failure(
            self, job: str, region: str | None, error: BaseException
        ) -> None:
            calls.append(("knows", job))

        @hookimpl
        def regionvault_health_check(self, region: str, instance: object) -> bool | None:
            return False

    pm = make_plugin_manager(load_entry_points=False, plugins=[Records(), Knows()])
    call_hook(
        pm, "regionvault_on_job_failure", job="backup/x", region="local:east", error=OSError("x")
    )
    assert sorted(calls) == [("knows", "backup/x"), ("records", "backup/x:local:east:x")]
    assert call_hook(pm, "regionvault_health_check", region="local:east", instance=None) is False
    empty = make_plugin_manager(load_entry_points=False)
    assert call_hook(empty, "regionvault_health_check", region="r", instance=None) is None


#: the core's hook specifications and the conformance suite's own
SPECS = (HookSpecs, ConformanceHookSpecs)


def _hook_names() -> list[str]:
    return sorted(name for specs in SPECS for name in vars(specs) if name.startswith(f"{PROJECT}_"))


def _spec(hook: str) -> object:
    return next(getattr(specs, hook) for specs in SPECS if hook in vars(specs))


def _doc_sections(text: str) -> dict[str, str]:
    """Hook name -> its section of docs/hooks.md (a heading naming it, up to the next)."""
    sections: dict[str, str] = {}
    parts = re.split(r"^(#{2,4} .*)$", text, flags=re.MULTILINE)
    for heading, body in zip(parts[1::2], parts[2::2], strict=True):
        m = re.search(rf"`({PROJECT}_\w+)\(", heading)
        if m:
            sections[m.group(1)] = heading + body
    return sections


def test_hookspecs_exist() -> None:
    assert "regionvault_register_providers" in _hook_names()
    assert len(_hook_names()) >= 7


@pytest.mark.parametrize("hook", _hook_names())
def test_every_hook_is_documented_with_its_arguments(hook: str) -> None:
    sections = _doc_sections((DOCS / "hooks.md").read_text(encoding="utf-8"))
    assert hook in sections, f"docs/hooks.md has no section for {hook}"
    section = sections[hook]
    args = [p for p in inspect.signature(_spec(hook)).parameters if p != "self"]
    heading = section.splitlines()[0]
    assert f"{hook}({', '.join(args)})" in heading, f"heading should list {args}: {heading}"
    for arg in args:
        assert f"`{arg}`" in section, f"docs/hooks.md: {hook} does not describe `{arg}`"


def test_docs_describe_no_hook_that_does_not_exist() -> None:
    sections = _doc_sections((DOCS / "hooks.md").read_text(encoding="utf-8"))
    assert sorted(sections) == _hook_names()
