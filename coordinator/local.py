"""Start N agents on loopback as subprocesses (``ringtune train --local N``), and stop them."""
from __future__ import annotations

import os
import selectors
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from edge_runtime.commands.agent import READY
from ringtune.lifetime import end_with_parent

START_TIMEOUT = 300.0
"""Seconds a local agent may take to start (imports torch and transformers: over 2 min on a loaded 2-core machine)."""


class LocalAgentError(RuntimeError):
    """A local agent failed to start; the message carries its own error output."""


@dataclass
class LocalAgent:
    name: str
    url: str
    process: subprocess.Popen
    log_path: Path
    command: list[str]
    """How it was started (listening on port 0)."""
    token: str
    """Its pairing token (given through the environment, never on the command line)."""

    def restart(self) -> None:
        """Start it again at the same address (after it was killed): what a device rebooting does."""
        if self.process.poll() is None:
            raise ValueError(f"local agent {self.name} is still running")
        self.process.stdout.close()
        command = [self.url if arg == "tcp://127.0.0.1:0" else arg for arg in self.command]
        self.process = _spawn(command, self.log_path, self.token, "a")
        _wait_ready(self)

    def log_tail(self, lines: int = 5) -> str:
        text = self.log_path.read_text(errors="replace").strip().splitlines() if self.log_path.exists() else []
        return "\n".join(text[-lines:])

    def exit_status(self) -> str | None:
        """None while running, else how it ended."""
        code = self.process.poll()
        if code is None:
            return None
        return f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"


def local_names(count: int) -> list[str]:
    """The owner first, then the other devices."""
    return ["owner"] + [f"node{i}" for i in range(1, count)]


def start_local_agents(count: int, data: str, log_dir: Path, token: str, threads: int | None = None,
                       extra_args: tuple[str, ...] = (), runtimes: tuple[str, ...] = ("torch",)) -> list[LocalAgent]:
    """The first agent is the data owner; each agent's log goes to log_dir/NAME.log.
    Threads default to an even share of this machine's cores. ``runtimes``: one for every agent,
    or one per agent in ring order (owner first)."""
    runtimes = agent_runtimes(runtimes, count)
    log_dir.mkdir(parents=True, exist_ok=True)
    threads = threads or max(1, (os.cpu_count() or 1) // count)
    agents: list[LocalAgent] = []
    try:
        for name, runtime in zip(local_names(count), runtimes):
            # Local agents never advertise on the network; the token goes through the environment
            # (not the command line, which other users can read).
            command = [sys.executable, "-m", "ringtune.cli", "agent", "--name", name, "--no-advertise",
                       "--listen", "tcp://127.0.0.1:0", "--threads", str(threads), "--runtime", runtime, *extra_args]
            if name == "owner":
                command += ["--data", data]
            log_path = log_dir / f"{name}.log"
            agents.append(LocalAgent(name, "", _spawn(command, log_path, token, "w"), log_path, command, token))
        for agent in agents:  # started together: their imports overlap
            agent.url = _wait_ready(agent)
    except BaseException:
        stop_local_agents(agents)
        raise
    return agents


def _spawn(command: list[str], log_path: Path, token: str, mode: str) -> subprocess.Popen:
    with log_path.open(mode) as log:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True,
                                env={**os.environ, "RINGTUNE_AGENT_TOKEN": token}, preexec_fn=end_with_parent)


def agent_runtimes(runtimes: tuple[str, ...], count: int) -> tuple[str, ...]:
    """One runtime per local agent: a single one is used for all."""
    if len(runtimes) == 1:
        return runtimes * count
    if len(runtimes) != count:
        raise ValueError(f"--runtime lists {len(runtimes)} runtimes for {count} local agents: give one, or one "
                         f"per agent (owner first), e.g. torch,executorch,executorch")
    return runtimes


def _wait_ready(agent: LocalAgent) -> str:
    process = agent.process
    deadline = time.monotonic() + START_TIMEOUT
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    while time.monotonic() < deadline:
        if selector.select(timeout=0.2):
            line = process.stdout.readline()
            match = READY.search(line)
            if match:
                return match.group(2)
            if not line and process.poll() is not None:
                break
    process.kill()
    process.wait()
    reason = agent.log_tail(1) or f"no start-up line within {START_TIMEOUT:.0f} s"
    raise LocalAgentError(f"local agent {agent.name} did not start: {reason}")


def stop_local_agents(agents: list[LocalAgent], grace: float = 10.0) -> None:
    for agent in agents:
        if agent.process.poll() is None:
            agent.process.terminate()
    deadline = time.monotonic() + grace
    for agent in agents:
        try:
            agent.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            agent.process.kill()
            agent.process.wait()
        agent.process.stdout.close()
