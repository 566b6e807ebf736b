"""``ringtune doctor`` run for real on this machine (mDNS only on loopback), with a clock server."""
from __future__ import annotations

import json
import socket
import subprocess

import pytest

from helpers import ringtune_command

pytestmark = pytest.mark.slow
EXPECTED = ["torch build", "torch import", "memory", "swap", "temperature", "governor", "matmul speed",
            "multicast lo", "mDNS lo", "port", "token file", "clock"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_doctor_checks_this_machine_against_a_clock_server(tmp_path):
    url = f"tcp://127.0.0.1:{free_port()}"
    server = subprocess.Popen(ringtune_command("doctor", "--serve-clock", url), stdout=subprocess.PIPE, text=True)
    try:
        assert "serving the time" in server.stdout.readline()
        result = subprocess.run(ringtune_command("doctor", "--json", "--interface", "127.0.0.1", "--state-dir",
                                                 str(tmp_path / "state"), "--listen", f"tcp://127.0.0.1:{free_port()}",
                                                 "--seconds", "0.2", "--threads", "1", "--coordinator", url),
                                capture_output=True, text=True, timeout=300)
    finally:
        server.terminate()
        server.wait(10)
    findings = json.loads(result.stdout)
    assert result.returncode == (1 if any(f["status"] == "fail" for f in findings) else 0), result.stderr
    found = {f["check"].split()[0] if f["check"].startswith("port") else f["check"]: f for f in findings}
    assert [c for c in EXPECTED if c not in found] == []
    assert found["torch build"]["status"] == "ok" and "CPU only" in found["torch build"]["detail"]
    assert found["mDNS lo"]["status"] == "ok" and found["port"]["status"] == "ok"
    assert found["clock"]["status"] == "ok" and "round trip" in found["clock"]["detail"]
    assert "GFLOP/s fp32 matmul on 1 thread(s)" in found["matmul speed"]["detail"]
    assert all(f["fix"] for f in findings if f["status"] in ("warn", "fail"))  # every problem says what to do
    assert result.stderr == ""  # no library noise


def test_doctor_prints_a_table_and_refuses_an_unknown_profile(tmp_path):
    args = ["--interface", "127.0.0.1", "--state-dir", str(tmp_path), "--listen", "tcp://127.0.0.1:0",
            "--seconds", "0.2"]
    table = subprocess.run(ringtune_command("doctor", *args), capture_output=True, text=True, timeout=300)
    assert table.stdout.splitlines()[0].split()[:4] == ["check", "status", "measured", "fix"]
    assert "mDNS lo" in table.stdout
    unknown = subprocess.run(ringtune_command("doctor", *args, "--profile", "rpi9"), capture_output=True, text=True,
                             timeout=300)
    assert unknown.returncode == 2 and "unknown profile 'rpi9': use one of rpi4-4gb" in unknown.stderr
