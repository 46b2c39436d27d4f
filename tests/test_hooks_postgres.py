"""The PostgreSQL recipe of docs/hooks.md, run as written there against a real cluster
under writes: backed up through the hook with the local provider, restored, started on a new
socket and checked consistent (a committed counter).

PostgreSQL comes from scripts/setup-postgres (apt-get where it is missing); the test is
skipped only where there is no apt-get to install it with. The clusters run as the
``postgres`` user, on unix sockets in a private directory (no TCP), and are stopped at the end.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from regionvault.core.pipeline import Engine
from regionvault.core.repository import RepositorySettings
from site_support import open_site, site_toml

ROOT = Path(__file__).resolve().parents[1]
#: the recipe, between these markers in docs/hooks.md, is the one tested
RECIPE = re.compile(
    r"<!-- postgres-recipe -->\s*```toml\n(.*?)```\s*<!-- /postgres-recipe -->", re.DOTALL
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="runs PostgreSQL as its own user")


@pytest.fixture(scope="module")
def bindir() -> Path:
    done = subprocess.run(
        [ROOT / "scripts" / "setup-postgres"], capture_output=True, text=True, timeout=600
    )
    if done.returncode == 3:
        pytest.skip(done.stderr.strip())
    assert done.returncode == 0, done.stderr
    return Path(done.stdout.strip().splitlines()[-1])


class Cluster:
    """A PostgreSQL cluster in ``data``, served on a unix socket in ``sock`` only."""

    def __init__(self, bindir: Path, base: Path, name: str, port: int) -> None:
        self.bindir = bindir
        self.data = base / name
        self.sock = base / f"{name}.sock"
        self.log = base / f"{name}.log"
        self.port = port
        self.sock.mkdir()
        shutil.chown(self.sock, "postgres", "postgres")

    def as_postgres(self, *argv: str | Path, timeout: float = 60) -> str:
        done = subprocess.run(
            ["runuser", "-u", "postgres", "--", *map(str, argv)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert done.returncode == 0, f"{argv[0]}: {done.stderr or done.stdout}"
        return done.stdout

    def initdb(self) -> None:
        self.as_postgres(
            self.bindir / "initdb", "-D", self.data, "-A", "trust", "-U", "postgres", "-N"
        )

    def start(self) -> None:
        opts = f"-k {self.sock} -p {self.port} -c listen_addresses='' -c fsync=off"
        self.as_postgres(
            self.bindir / "pg_ctl", "-D", self.data, "-l", self.log, "-o", opts, "-w", "-t",
            "60", "start",
        )  # fmt: skip

    def stop(self) -> None:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", str(self.bindir / "pg_ctl"), "-D",
             str(self.data), "-m", "immediate", "-w", "-t", "30", "stop"],
            capture_output=True,
            timeout=60,
        )  # fmt: skip

    def psql_argv(self, *commands: str) -> list[str]:
        """psql running each of ``commands`` in a transaction of its own."""
        return [
            str(self.bindir / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
            "-h", str(self.sock), "-p", str(self.port), "-U", "postgres",
            *(arg for command in commands for arg in ("-c", command)),
        ]  # fmt: skip

    def sql(self, sql: str) -> str:
        return self.as_postgres(*self.psql_argv(sql)).strip()


SCHEMA = """
CREATE TABLE counter (n integer PRIMARY KEY, pad text);
CREATE TABLE total (k integer PRIMARY KEY, n integer);
INSERT INTO total VALUES (1, 0);
CREATE PROCEDURE write(count integer) LANGUAGE plpgsql AS $$
DECLARE
    next integer;
BEGIN
    FOR i IN 1..count LOOP
        UPDATE total SET n = n + 1 RETURNING n INTO next;
        INSERT INTO counter VALUES (next, repeat(md5(next::text), 64));
        COMMIT;
    END LOOP;
END $$;
"""


@pytest.fixture
def base() -> Iterator[Path]:
    # not pytest's tmp_path: its directories are root's alone, and the server runs as postgres
    path = Path(tempfile.mkdtemp(prefix="regionvault-pg-"))
    shutil.chown(path, "postgres", "postgres")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_the_postgres_recipe_backs_up_a_cluster_under_writes_consistent(
    bindir: Path, base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = RECIPE.search((ROOT / "docs" / "hooks.md").read_text())
    assert recipe is not None, "docs/hooks.md lost its postgres recipe markers"
    live = Cluster(bindir, base, "live", 55432)
    restored = Cluster(bindir, base, "restored", 55433)
    live.initdb()
    live.start()
    writer: subprocess.Popen[bytes] | None = None
    writer_log = (base / "writer.log").open("wb")
    try:
        live.sql(SCHEMA)
        # bounded: a count, and the statement timeout
        writer = subprocess.Popen(
            ["runuser", "-u", "postgres", "--",
             *live.psql_argv("SET statement_timeout = '90s'", "CALL write(1000000)")],
            stdout=subprocess.DEVNULL,
            stderr=writer_log,
        )  # fmt: skip
        for _ in range(600):  # at most 30 s for the first 500 transactions
            if int(live.sql("SELECT n FROM total")) >= 500 or writer.poll() is not None:
                break
            time.sleep(0.05)

        # the service's environment tells the recipe's commands where the cluster is
        monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
        monkeypatch.setenv("PGHOST", str(live.sock))
        monkeypatch.setenv("PGPORT", str(live.port))
        monkeypatch.setenv("PGUSER", "postgres")
        site_dir = base / "site"
        site_dir.mkdir()
        (site_dir / "site.toml").write_text(
            site_toml({"local:east": "east"}, name=None, extra=recipe.group(1))
        )
        stage = base / "stage"
        stage.mkdir()
        with open_site(site_dir / "site.toml") as site:
            engine = Engine(site, settings=RepositorySettings(pack_size=4 << 20, workers=2))
            east = site.region("east")
            inst = east.compute.register_instance("pg-1", stage, tags={"backup-hook": "postgres"})
            point = engine.backup(inst.id)
            assert writer.poll() is None, (base / "writer.log").read_text()
            assert point.issues == 0
            # the recipe's after removed the staging copy once it was read
            assert list(stage.iterdir()) == []
            target = base / "restore"
            engine.restore(point.id, region="east", target=target)
        shutil.move(target / "pgdata", restored.data)
        subprocess.run(["chown", "-R", "postgres:postgres", str(restored.data)], check=True)
        restored.data.chmod(0o700)
        restored.start()
        try:
            count, low, high, total = restored.sql(
                "SELECT count(*), min(n), max(n), (SELECT n FROM total) FROM counter"
            ).split("|")
            # a committed state: rows 1..total, every transaction whole
            assert int(count) >= 500
            assert (int(low), int(high), int(total)) == (1, int(count), int(count))
            assert (
                restored.sql("SELECT count(*) FROM counter WHERE pad <> repeat(md5(n::text), 64)")
                == "0"
            )
        finally:
            restored.stop()
    finally:
        if writer is not None and writer.poll() is None:
            writer.kill()
            writer.wait(timeout=30)
        writer_log.close()
        live.stop()
