"""Shared test helpers (tests/ is on the path)."""
import json
import random
import sys
from pathlib import Path


ARCHITECTURES = ["tiny-llama", "tiny-gpt2", "tiny-gemma3"]
WORDS = "the cat sat on a mat and dog ran far away into green fields while birds sang".split()


def write_text_data(path: Path, records: int = 48, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(records):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14)))}) + "\n")
    return path


def ringtune_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "ringtune.cli", *args]


TOKEN = "test-token-0123456789abcdef"


def files_holding(root: Path, secret: str, allowed: tuple[str, ...] = ()) -> list[Path]:
    """Every file under root whose bytes contain secret (names in allowed are skipped, e.g. "token")."""
    return [path for path in root.rglob("*")
            if path.is_file() and path.name not in allowed and secret.encode() in path.read_bytes()]


def hello_reply(**fields):
    """An agent's hello (ringtune.protocol.HelloReply) with plausible values, overridden by fields."""
    from ringtune.protocol import PROTOCOL_VERSION, HelloReply

    defaults = dict(protocol=PROTOCOL_VERSION, name="pi-a", agent_id="pi-a@host", version="0", has_data=False,
                    pid=1, cores=4, threads=4, ram_bytes=8 << 30, ram_available=6 << 30, rss=450 << 20,
                    baseline_bytes=440 << 20, runtime="torch",
                    export_dir=False, gflops=10.0, busy=None, probe_port=7721)
    return HelloReply(**{**defaults, **fields})


class AgentProcess:
    """A real `ringtune agent` subprocess, started at once; its url waits for its ready line (so agents created
    one after another import torch at the same time). stop() terminates it (also when a test fails)."""

    def __init__(self, name: str, state_dir: Path, *, data: Path | None = None, listen: str = "tcp://127.0.0.1:0",
                 interfaces: tuple[str, ...] = (), prefix: tuple[str, ...] = (), token: str = TOKEN,
                 threads: int = 1, extra: tuple[str, ...] = ()) -> None:
        import os
        import subprocess

        command = [*prefix, *ringtune_command("agent", "--name", name, "--listen", listen, "--token", token,
                                              "--state-dir", str(state_dir), "--threads", str(threads), *extra)]
        command += ["--data", str(data)] if data else []
        command += [a for ip in interfaces for a in ("--interface", ip)] if interfaces else ["--no-advertise"]
        self.name = name
        self.log = state_dir / f"{name}.log"
        state_dir.mkdir(parents=True, exist_ok=True)
        with self.log.open("w") as log:
            self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True,
                                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
        self._url: str | None = None

    @property
    def url(self) -> str:
        """The agent's control address, once it is listening."""
        return self.ready()._url

    def ready(self) -> "AgentProcess":
        """This agent, once it is listening (and advertising, if it does)."""
        if self._url is None:
            import select

            from coordinator.local import START_TIMEOUT
            from edge_runtime.commands.agent import READY

            started, _, _ = select.select([self.process.stdout], [], [], START_TIMEOUT)  # an agent may hang
            match = READY.search(self.process.stdout.readline()) if started else None
            if not match:
                self.stop()
                raise RuntimeError(f"agent {self.name} did not start within {START_TIMEOUT:.0f} s: "
                                   f"{self.log.read_text()[-2000:]}")
            self._url = match.group(2)
        return self

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except Exception:
                self.process.kill()
                self.process.wait()
        self.process.stdout.close()
