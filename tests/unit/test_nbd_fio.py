"""The tests' fio command (sheep/testing/nbd.py) leaves nothing in the current
directory: fio writes its verify state (``local-<job>-<n>-verify.state``) into
its working directory unless told where, and such files once got committed."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from sheep.testing.nbd import fio_command


def test_fio_writes_its_own_files_into_the_directory_it_is_given(tmp_path: Path) -> None:
    aux, cwd = tmp_path / "aux", tmp_path / "cwd"
    aux.mkdir()
    cwd.mkdir()
    command = fio_command("nbd://unused", aux_path=str(aux))
    # The same options on a plain file, small, and with the state saved, as fio does
    # by default: where it goes is what is checked.
    local = [arg for arg in command if not arg.startswith(("--ioengine", "--uri", "--size"))
             and arg != "--verify_state_save=0"]
    result = subprocess.run([*local, "--ioengine=psync", f"--filename={tmp_path / 'data'}",
                             "--size=256k"], cwd=cwd, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert os.listdir(cwd) == []
    assert os.listdir(aux) == ["local-continuity-0-verify.state"]
