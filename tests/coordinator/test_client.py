"""The control client's deadline: an agent that does not answer is unreachable, but a deadline that passed while the
coordinator itself was stopped (Ctrl-Z, a paused VM) says nothing about the agent."""
import signal
import subprocess
import sys
import time

import pytest

CALL = """
import sys
from coordinator.client import AgentClient, AgentUnreachable
from ringtune.protocol import Status, Timeouts
client = AgentClient("tcp://127.0.0.1:9", Timeouts(heartbeat=float(sys.argv[1])))  # nothing answers there
print("calling", flush=True)
try:
    client.request(Status())
except AgentUnreachable as error:
    print(type(error).__name__, error, flush=True)
"""


@pytest.mark.parametrize("wait, stopped_seconds, outcome", [
    (3, 0, "AgentUnreachable"),
    (3, 4, "DeadlineMissed"),  # continued at 4.5 s, less than two waits: the timer fires at once, not late
    (3, 8, "DeadlineMissed"),
    (6, 2, "AgentUnreachable"),  # continued at 2.5 s: the agent kept running, and a reply had 3.5 s to be read
])
def test_a_deadline_that_passed_while_stopped_is_not_blamed_on_the_agent(wait, stopped_seconds, outcome):
    process = subprocess.Popen([sys.executable, "-c", CALL, str(wait)], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline() == "calling\n"
        if stopped_seconds:  # the wait has begun
            time.sleep(0.5)
            process.send_signal(signal.SIGSTOP)
            time.sleep(stopped_seconds)
            process.send_signal(signal.SIGCONT)
        output = process.communicate(timeout=60)[0]
        assert output.split()[0] == outcome, output
    finally:
        process.kill()
