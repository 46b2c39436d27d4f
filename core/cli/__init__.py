"""The ``regionvault`` command.

Every command comes from the ``regionvault.cli`` entry-point group, the built-in ones
exactly as a plugin's: an entry point named after the command, whose object is a
:class:`click.Command` (or group) that takes what it needs from this package::

    # my_plugin/cli.py
    import click
    from regionvault.core.cli import CliState, pass_state

    @click.command()
    @click.argument("instance")
    @pass_state
    def inventory(state: CliState, instance: str) -> None:
        '''Inventory INSTANCE (its first line is its line in --help).'''
        site = state.site()  # --site, $REGIONVAULT_SITE or ./site.toml, loaded once

    # the plugin distribution's pyproject.toml
    [project.entry-points."regionvault.cli"]
    inventory = "my_plugin.cli:inventory"

The root group (:mod:`.root`) looks a command up only when it is used or listed
(:mod:`.entrypoints`); a command whose entry point does not load, or a name two entry points
claim, is unavailable and says why in one line (docs/commands.md). The built-in commands
live by concern: :mod:`.site` (init, regions, instances, status), :mod:`.backup` (backup,
restore, points), :mod:`.copy`, :mod:`.maintenance` (verify, prune, rebuild-index) and
:mod:`.tick` (tag, tick, run); what they share is :mod:`.output` and :mod:`.options`.

Exit codes: 0 ok; 1 for an expected error (any :class:`RegionVaultError`, printed as one line
``regionvault: error: ...`` on standard error, without a traceback; nothing is committed); 2
for a usage error; 3 (:data:`EXIT_INCOMPLETE`) when the command did its work but not whole: a
recovery point was committed that names entries the capture could not take whole (unreadable,
vanished, or changed while it was read), each named on standard error as
``regionvault: warning: <path>: <message>`` (the first few, then ``... and N more``), and
recorded in the point (``backup``; ``tick`` and ``run`` when one of their backups was, and no
step failed).
"""

from __future__ import annotations

from regionvault.core.cli.entrypoints import GROUP
from regionvault.core.cli.options import json_option, parse_tag_options, resolve_instance
from regionvault.core.cli.output import instance_json, print_json, print_table
from regionvault.core.cli.root import (
    EXIT_INCOMPLETE,
    CliState,
    ExpectedError,
    cli,
    main,
    one_line,
    pass_state,
)

__all__ = [
    "EXIT_INCOMPLETE",
    "GROUP",
    "CliState",
    "ExpectedError",
    "cli",
    "instance_json",
    "json_option",
    "main",
    "one_line",
    "parse_tag_options",
    "pass_state",
    "print_json",
    "print_table",
    "resolve_instance",
]
