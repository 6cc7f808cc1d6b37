"""A real SLURM cluster for the test session: `scripts/slurm_up.sh --nodes 2` brings up two
nodes on loopback (as root; it installs the packages when missing) and scripts/slurm_down.sh
stops it afterwards. The one-node tests run on it as one-node jobs; the multi-node tests
(slurm2_env) need its two nodes. A cluster that is already up (SLURM_CONF set, or
slurm_up.sh's state folder) is used and left running. Without one, the tests skip on a
developer machine and fail in CI (CI set), where they must run."""
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STATE = os.environ.get("MEXT_SLURM_DIR", "/tmp/mext-slurm")


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def _unavailable(reason: str):
    """Skip on a developer machine; fail in CI, where the SLURM tests must run."""
    if _in_ci():
        pytest.fail(reason)
    pytest.skip(reason)


def _responds(conf: str) -> bool:
    if not os.path.exists(conf):
        return False
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True,
                              timeout=10, env=dict(os.environ, SLURM_CONF=conf))
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0 and "idle" in proc.stdout


@pytest.fixture(scope="session")
def slurm_env():
    """os.environ plus the SLURM_CONF that reaches the session's cluster."""
    for conf in (os.environ.get("SLURM_CONF", ""), f"{STATE}/slurm.conf"):
        if conf and _responds(conf):
            yield dict(os.environ, SLURM_CONF=conf)
            return
    try:
        proc = subprocess.run(["bash", str(REPO / "scripts" / "slurm_up.sh"), "--nodes", "2"],
                              capture_output=True, text=True, timeout=600)
        ok, said = proc.returncode == 0, proc.stderr.strip().splitlines()[-3:]
    except (OSError, subprocess.TimeoutExpired) as err:
        ok, said = False, [str(err)]
    if not ok:
        _unavailable("scripts/slurm_up.sh could not bring SLURM up: " + " | ".join(said))
    conf = proc.stdout.strip().splitlines()[-1].removeprefix("export SLURM_CONF=")
    try:
        yield dict(os.environ, SLURM_CONF=conf)
    finally:
        subprocess.run(["bash", str(REPO / "scripts" / "slurm_down.sh")], timeout=60)


@pytest.fixture(scope="session")
def slurm2_env(slurm_env):
    """slurm_env, checked to be a two-node cluster that slurm_up.sh made (its state folder,
    which slurm_down.sh --node and slurm_up.sh --node need to take a node away and back, is
    slurm.conf's folder); MEXT_SLURM_DIR points there."""
    state = os.path.dirname(slurm_env["SLURM_CONF"])
    nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True,
                           timeout=10, env=slurm_env).stdout.split()
    if sorted(set(nodes))[:2] != ["node1", "node2"] or not os.path.exists(f"{state}/uts-node2"):
        _unavailable(f"the SLURM cluster of {slurm_env['SLURM_CONF']} has nodes {nodes}, not "
                     "node1 and node2 of `scripts/slurm_up.sh --nodes 2`; stop it "
                     "(scripts/slurm_down.sh) and start that one")
    return dict(slurm_env, MEXT_SLURM_DIR=state)
