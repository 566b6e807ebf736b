"""The control client's deadline: an agent that does not answer is unreachable, but a wait that ended long after
its deadline because the coordinator itself was stopped (Ctrl-Z, a paused VM) says nothing about the agent."""
import signal
import subprocess
import sys
import time

import pytest

CALL = """
from coordinator.client import AgentClient, AgentUnreachable
from ringtune.protocol import Status, Timeouts
client = AgentClient("tcp://127.0.0.1:9", Timeouts(heartbeat=3.0))  # nothing answers there
print("calling", flush=True)
try:
    client.request(Status())
except AgentUnreachable as error:
    print(type(error).__name__, error, flush=True)
"""


@pytest.mark.parametrize("stopped_seconds, outcome", [(0, "AgentUnreachable"), (8, "DeadlineMissed")])
def test_a_wait_that_outlived_its_deadline_while_stopped_is_not_blamed_on_the_agent(stopped_seconds, outcome):
    process = subprocess.Popen([sys.executable, "-c", CALL], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline() == "calling\n"
        if stopped_seconds:  # within the 3 s wait (it has begun): its deadline passes while the process is stopped
            time.sleep(0.5)
            process.send_signal(signal.SIGSTOP)
            time.sleep(stopped_seconds)
            process.send_signal(signal.SIGCONT)
        output = process.communicate(timeout=60)[0]
        assert output.split()[0] == outcome, output
    finally:
        process.kill()
