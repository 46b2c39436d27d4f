"""Where the ``regionvault`` command finds its commands: the ``regionvault.cli`` entry-point
group. Every command, the built-in ones included, is one entry point whose name is the
command's name and whose object is a :class:`click.Command` (or group)::

    [project.entry-points."regionvault.cli"]
    backup = "regionvault.core.cli.backup:backup"

Finding the names reads the installed distributions' metadata and imports nothing; a
command's module is imported only when that command is used or listed. A command that cannot
be loaded, or a name that two plugins claim, is an error naming the entry points, never a
traceback or a silent choice of one of them; a plugin claiming a built-in command's name is
ignored, with a warning naming it, so no installed package can take ``restore`` away."""

from __future__ import annotations

import importlib.metadata
import re
from dataclasses import dataclass

import click

__all__ = [
    "DISTRIBUTION",
    "GROUP",
    "CommandLoadError",
    "CommandSource",
    "clash_message",
    "find_command_sources",
    "shadowed_message",
]

#: the entry-point group the ``regionvault`` command takes its commands from
GROUP = "regionvault.cli"
#: the distribution whose commands are the built-in ones
DISTRIBUTION = "regionvault"


class CommandLoadError(Exception):
    """A command's entry point did not give a click command; the message is one line that
    names the command, the entry point and its distribution, ``summary`` a few words for
    the ``--help`` listing."""

    def __init__(self, message: str, summary: str) -> None:
        super().__init__(message)
        self.summary = summary


def _normalized(name: str) -> str:
    # distribution names compare as PEP 503 normalizes them
    return re.sub(r"[-_.]+", "-", name).lower()


def _folded(text: str) -> str:
    return " ".join(text.split())


@dataclass(frozen=True)
class CommandSource:
    """One claim on a command name: an entry point, or a command an embedder added to the
    root group in code."""

    name: str
    entry_point: importlib.metadata.EntryPoint | None = None
    command: click.Command | None = None

    @classmethod
    def of(cls, entry_point: importlib.metadata.EntryPoint) -> CommandSource:
        return cls(name=entry_point.name, entry_point=entry_point)

    @classmethod
    def added(cls, name: str, command: click.Command) -> CommandSource:
        return cls(name=name, command=command)

    @property
    def owner(self) -> str:
        """Who makes the claim: a distribution's name, or the function added in code.
        (Only messages ask: reading a distribution's name parses its metadata, which a
        command line that works has no need to pay for.)"""
        if self.entry_point is not None:
            dist = self.entry_point.dist
            return dist.name if dist is not None else "unknown distribution"
        assert self.command is not None
        callback = self.command.callback
        if callback is None:
            return type(self.command).__name__
        return f"{callback.__module__}.{callback.__qualname__}"

    @property
    def built_in(self) -> bool:
        """Whether this claim is one of regionvault's own commands."""
        if self.entry_point is None or self.entry_point.dist is None:
            return False
        return _normalized(self.entry_point.dist.name) == DISTRIBUTION

    @property
    def origin(self) -> str:
        """How messages name the claim: ``backup = pkg.cli:backup (pkg 1.0)``, or
        ``pkg.cli.backup (added with add_command)``."""
        if self.entry_point is None:
            return f"{self.owner} (added with add_command)"
        dist = self.entry_point.dist
        version = f" {dist.version}" if dist is not None else ""
        return f"{self.name} = {self.entry_point.value} ({self.owner}{version})"

    def load(self) -> click.Command:
        """The command; :class:`CommandLoadError` when its module or object cannot be had or
        is not a click command."""
        if self.command is not None:
            return self.command
        assert self.entry_point is not None
        problem = f"command {self.name!r} cannot be loaded from entry point {self.origin}"
        try:
            loaded = self.entry_point.load()
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # SystemExit too: a plugin must not end the command
            # whatever the plugin's import raised: the user needs the entry point and the
            # reason, not a traceback from inside someone else's package
            raise CommandLoadError(
                _folded(f"{problem} in group {GROUP}: {type(exc).__name__}: {exc}"),
                f"{type(exc).__name__} loading {self.entry_point.value}",
            ) from exc
        if not isinstance(loaded, click.Command):
            raise CommandLoadError(
                f"{problem} in group {GROUP}: {self.entry_point.value} is a "
                f"{type(loaded).__name__}, not a click command (decorate it with "
                f"@click.command())",
                f"{self.entry_point.value} is not a click command",
            )
        return loaded


def find_command_sources() -> dict[str, list[CommandSource]]:
    """Every name in the entry-point group, with every claim on it (more than one is a
    clash), from the installed distributions' metadata alone."""
    found: dict[str, list[CommandSource]] = {}
    for entry_point in importlib.metadata.entry_points(group=GROUP):
        found.setdefault(entry_point.name, []).append(CommandSource.of(entry_point))
    return found


def shadowed_message(name: str, ignored: list[CommandSource]) -> str:
    """One line for a built-in command's name that plugins claim too: theirs are ignored."""
    listed = " and ".join(claim.origin for claim in ignored)
    return (
        f"command {name!r} of {listed} is ignored: regionvault's own command of that name "
        f"runs; uninstall or rename the plugin's"
    )


def clash_message(name: str, claims: list[CommandSource]) -> str:
    """One line naming every claim on ``name``."""
    listed = " and ".join(claim.origin for claim in claims)
    return (
        f"command {name!r} is claimed {len(claims)} times in entry-point group {GROUP}: "
        f"{listed}; uninstall or rename all but one"
    )
