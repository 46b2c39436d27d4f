"""What osmohlr's installer and the demo leave behind when they are killed (review rev1, M1-M3):
nothing machine-wide, and nothing running."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from regionvault.core.pipeline import Engine
from regionvault.core.pipeline.hooks import HOOK_WORK_DIR
from regionvault.plugins.osmohlr import package
from site_support import open_site, site_toml

_HOLD = (
    "import sys, time\n"
    "from pathlib import Path\n"
    "from regionvault.plugins.osmohlr import package\n"
    "with package._no_service_starts(Path(sys.argv[1])):\n"
    "    print('in', flush=True)\n"
    "    time.sleep(60)\n"
)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_signalled_install_removes_its_policy_rc_d(tmp_path: Path, sig: signal.Signals) -> None:
    policy = tmp_path / "policy-rc.d"
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(policy)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "in\n"
        assert policy.read_text().splitlines()[-1] == "exit 101"
        proc.send_signal(sig)
        proc.communicate(timeout=20)
        assert proc.returncode == 128 + sig
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=20)
    assert not policy.exists()


def test_a_leftover_policy_rc_d_of_ours_is_removed_by_the_next_install(tmp_path: Path) -> None:
    # what a SIGKILLed install leaves: recognised by its content, reused, then removed
    policy = tmp_path / "policy-rc.d"
    policy.write_text(package._REFUSE_STARTS)
    with package._no_service_starts(policy):
        assert policy.read_text() == package._REFUSE_STARTS
    assert not policy.exists()
    # one line more is the machine's own: left as it is
    own = package._REFUSE_STARTS + "# kept\n"
    policy.write_text(own)
    with package._no_service_starts(policy):
        pass
    assert policy.read_text() == own


def test_opening_an_engine_removes_the_hook_copies_a_killed_backup_left(tmp_path: Path) -> None:
    # a backup killed mid-hook leaves its sqlite copy (K and OPc in plain text for osmo-hlr)
    # in the state directory: the next command that opens the site removes it, hooks or not
    path = tmp_path / "site" / "site.toml"
    path.parent.mkdir()
    path.write_text(site_toml({"local:east": "east"}, name="stale"))
    site = open_site(path)
    try:
        root = site.config.state_dir / HOOK_WORK_DIR
        (root / "999-dead" / "sqlite").mkdir(parents=True)
        (root / "999-dead" / "sqlite" / "0.db").write_bytes(b"K" * 100)
        (root / "999-dead.lock").touch()
        Engine(site)
        assert list(root.iterdir()) == []
    finally:
        site.close()
