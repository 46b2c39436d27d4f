"""Running the ``regionvault`` command in-process for tests: ``run`` (any exit status) and
``ok`` (asserts exit 0), with the site taken from the working directory or ``--site``."""

from __future__ import annotations

import os

from click.testing import CliRunner, Result
from regionvault.core.cli import cli

__all__ = ["ok", "run"]


def run(*args: str | os.PathLike[str], env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], env=env, catch_exceptions=False)


def ok(*args: str | os.PathLike[str], env: dict[str, str] | None = None) -> Result:
    result = run(*args, env=env)
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return result
