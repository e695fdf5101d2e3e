"""loadtest.fuzz: the command line's exit codes, against fake servers on 127.0.0.1 (no Ray)."""

from __future__ import annotations

import json
import os

from loadtest import fuzz


def test_main_exit_codes(fakes, tmp_path, capsys) -> None:
    state, target, url = fakes
    assert fuzz.main([]) == 2
    assert fuzz.main(["--grpc", "10.1.2.3:9000"]) == 2
    out = tmp_path / "f.json"
    rc = fuzz.main(["--grpc", target, "--http", url, "--requests", "30", "--seed", "1", "--out", str(out)])
    assert rc == 0, capsys.readouterr().out  # the fakes answer every hostile case without a 5xx
    assert json.loads(out.read_text())["sent"] == 30
    assert fuzz.main(["--http", url, "--soak", "10", "--pid", str(os.getpid()), "--quiet"]) == 0
