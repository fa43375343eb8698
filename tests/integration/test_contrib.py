"""contrib/: the systemd units pass systemd-analyze verify, and the logrotate snippet
makes a running sheep move on to a new sheep.log.

The units name /usr/bin/sheep and /usr/bin/dog; they are verified as copies that
name this virtualenv's, in a temporary unit directory (SYSTEMD_UNIT_PATH), so the
check reads every line, the ZooKeeper drop-in's included. The logrotate snippet
runs against a real sheep with /var/lib/sheepdog replaced by its cluster's
directory: through logrotate itself where it is installed, else its postrotate
script after a rename, as logrotate would run it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sheep.testing.cluster import LocalCluster

ROOT = Path(__file__).resolve().parents[2]
CONTRIB = ROOT / "contrib"
UNITS = ("sheep@store0.service", "dog-nbd@store0.service")


def verify(unit_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", "verify", *UNITS], capture_output=True,
                          text=True, timeout=60, cwd=unit_dir,
                          env={**os.environ, "SYSTEMD_UNIT_PATH": f"{unit_dir}:"})


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="needs systemd-analyze (Debian: systemd)")
def test_the_systemd_units_verify(tmp_path):
    units = tmp_path / "units"
    shutil.copytree(CONTRIB, units, ignore=shutil.ignore_patterns("logrotate"))
    bin_dir = Path(sys.executable).parent
    for name in ("sheep@.service", "dog-nbd@.service"):
        text = (units / name).read_text()
        real = re.sub(r"/usr/bin/(sheep|dog) ", lambda found: f"{bin_dir / found[1]} ", text)
        assert real != text and (bin_dir / "sheep").exists() and (bin_dir / "dog").exists()
        (units / name).write_text(real)
    result = verify(units)
    assert (result.returncode, result.stdout + result.stderr) == (0, ""), result

    # The check has teeth: a key systemd does not know, in the drop-in, is reported.
    with open(units / "sheep@.service.d" / "zookeeper.conf", "a") as drop_in:
        drop_in.write("Wnats=zookeeper.service\n")
    assert "Unknown key 'Wnats'" in verify(units).stderr


def logrotate_script(base: str) -> str:
    return (CONTRIB / "logrotate" / "sheepdog").read_text().replace("/var/lib/sheepdog", base)


def test_logrotate_makes_a_running_sheep_reopen_its_log(make_cluster, tmp_path):
    cluster: LocalCluster = make_cluster(1)
    cluster.format(copies=1)
    node = cluster.sheep[0]
    log = Path(node.log_path)
    assert node.process is not None
    assert int((Path(node.directory) / "sheep.pid").read_text()) == node.process.pid
    started = log.read_text()
    assert "joined at epoch" in started

    config = logrotate_script(cluster.base)
    if shutil.which("logrotate"):
        (tmp_path / "logrotate.conf").write_text(config)
        rotate = subprocess.run(["logrotate", "-f", "-s", str(tmp_path / "state"),
                                 str(tmp_path / "logrotate.conf")],
                                capture_output=True, text=True, timeout=60)
        assert rotate.returncode == 0, rotate.stderr
    else:  # what logrotate would do: move the log, then run the postrotate script
        log.rename(log.with_name("sheep.log.1"))
        script = config.split("postrotate\n", 1)[1].split("endscript", 1)[0]
        subprocess.run(["sh", "-c", script], check=True, timeout=60)
    rotated = log.with_name("sheep.log.1")
    assert rotated.read_text().startswith(started)

    deadline = time.monotonic() + 10
    while "SIGHUP: log file reopened" not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline, "no new sheep.log after SIGHUP"
        time.sleep(0.05)
    assert node.alive
    # The sheep logs on, in the new file only, to its last line.
    subprocess.run([sys.executable, "-m", "dog", "-p", str(node.port), "cluster", "shutdown"],
                   check=True, capture_output=True, timeout=60)
    assert node.process.wait(timeout=30) == 0
    after = log.read_text()
    assert "cluster shutdown requested" in after and "sheep stopped" in after, after
    before = rotated.read_text()
    assert before.startswith(started) and "SIGHUP" not in before and "shutdown" not in before
