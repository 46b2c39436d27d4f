"""The provider conformance suite: one pytest command tells a provider author whether a cloud
works with regionvault::

    pytest --pyargs regionvault.core.conformance --regionvault-provider=NAME

Tests are grouped by interface in mixin classes (:class:`ComputeSuite`,
:class:`KeyServiceSuite`, :class:`VaultSuite`, :class:`TransitSuite`, :class:`PipelineSuite`)
that need only fixtures; the suite's own test modules bind them to the provider under test
through :class:`ProviderFixtures`, and an author may bind them to fixtures of their own.
Tests a provider's declared :class:`~regionvault.core.types.Capabilities` do not cover are
skipped with the reason. A provider plugin helps the suite through the
``regionvault_conformance_support`` hook, returning a :class:`ConformanceSupport`.

Names are loaded on first use: importing this package imports neither pytest nor the suites
(the pytest plugin is a module of it, loaded before pytest may rewrite their assertions).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from regionvault.core.conformance.compute import ComputeSuite
    from regionvault.core.conformance.fixtures import InstanceFactory, ProviderFixtures, SuiteBase
    from regionvault.core.conformance.keys import KeyServiceSuite
    from regionvault.core.conformance.support import (
        RUN_TAG,
        ConformanceHookSpecs,
        ConformanceSupport,
        ConformanceTarget,
        env_name,
        open_target,
        write_tree,
    )
    from regionvault.core.conformance.test_pipeline import PipelineSuite
    from regionvault.core.conformance.transit import TransitSuite
    from regionvault.core.conformance.vault import VaultSuite

__all__ = [
    "RUN_TAG",
    "ComputeSuite",
    "ConformanceHookSpecs",
    "ConformanceSupport",
    "ConformanceTarget",
    "InstanceFactory",
    "KeyServiceSuite",
    "PipelineSuite",
    "ProviderFixtures",
    "SuiteBase",
    "TransitSuite",
    "VaultSuite",
    "env_name",
    "open_target",
    "write_tree",
]

_HOMES = {
    "ComputeSuite": "compute",
    "InstanceFactory": "fixtures",
    "ProviderFixtures": "fixtures",
    "SuiteBase": "fixtures",
    "KeyServiceSuite": "keys",
    "RUN_TAG": "support",
    "ConformanceHookSpecs": "support",
    "ConformanceSupport": "support",
    "ConformanceTarget": "support",
    "env_name": "support",
    "open_target": "support",
    "write_tree": "support",
    "PipelineSuite": "test_pipeline",
    "TransitSuite": "transit",
    "VaultSuite": "vault",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
