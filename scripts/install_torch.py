"""Install a CPU-only torch into the running Python's environment (scripts/setup.sh calls it).

A bare ``pip install torch`` on Linux takes the package index's CUDA build: on aarch64 (a Raspberry
Pi) that is torch plus cuda-toolkit, cuDNN, NCCL, NVSHMEM and triton, gigabytes a Pi cannot use.
So on Linux torch comes from PyTorch's own CPU wheel index when it answers; where it does not,
aarch64 stops with the command to run, and other machines take torch from the configured indexes
only if pip's install plan for it holds no CUDA package (a local CPU wheel, macOS). Every install
is planned first (``pip install --dry-run --report``) and refused if the plan holds nvidia, CUDA
or triton packages. Standard library only: it runs before anything else is installed.

    python scripts/install_torch.py            # install (what setup.sh does)
    python scripts/install_torch.py --print    # only print the pip command this machine would run
    RINGTUNE_MACHINE=aarch64 python scripts/install_torch.py --print   # the command a Pi would run
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

TORCH = "torch==2.13.0"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
PROBE_SECONDS = 10.0
CUDA_NAME = re.compile(r"^(nvidia-.*|cuda-.*|.*-cu\d+|triton)$")
"""Package names that only make sense with an NVIDIA GPU."""


class InstallStop(RuntimeError):
    """Installing torch here would pull CUDA, or cannot be done; the message says what to run."""


def cpu_index() -> str:
    return os.environ.get("RINGTUNE_TORCH_INDEX", CPU_INDEX).rstrip("/")


def index_reachable(index: str, timeout: float = PROBE_SECONDS) -> bool:
    """Whether the index answers for torch (a short request; no proxy settings are bypassed)."""
    try:
        with urllib.request.urlopen(f"{index}/torch/", timeout=timeout) as response:
            return response.status == 200
    except (OSError, ValueError):  # URLError, timeouts and refused connections are OSErrors
        return False


def pip_arguments(machine: str, system: str, reachable: bool, index: str) -> list[str]:
    """The ``pip install`` arguments for a CPU-only torch on this machine (after ``pip install``)."""
    if system == "Linux" and reachable:
        return [TORCH, "--index-url", index]
    if system == "Linux" and machine in ("aarch64", "arm64"):
        raise InstallStop(
            f"PyTorch's CPU wheel index ({index}) cannot be reached from here, and the package index's "
            f"{TORCH} for {machine} is a CUDA build (cuda-toolkit, cuDNN, NCCL, triton: gigabytes this "
            f"device cannot use). Connect to the internet and re-run, or install torch yourself, then "
            f"re-run scripts/setup.sh:\n    {shell_command([TORCH, '--index-url', index])}")
    return [TORCH]


def shell_command(arguments: list[str]) -> str:
    return shlex.join(["python", "-m", "pip", "install", *arguments])


def cuda_packages(report: dict) -> list[str]:
    """Names of CUDA-only packages in a ``pip install --report`` plan: planned installs, and the
    unconditional requirements of each (a ``--no-deps`` plan still shows what torch would pull)."""
    found = []
    for item in report.get("install", []):
        metadata = item.get("metadata", {})
        names = [metadata.get("name", "")]
        names += [re.split(r"[\s;<>=!~\[(]", requirement, maxsplit=1)[0]
                  for requirement in metadata.get("requires_dist") or [] if "extra ==" not in requirement]
        found += [name for name in names if CUDA_NAME.match(name.lower().replace("_", "-"))]
    return sorted(set(found))


def planned_cuda(arguments: list[str], extra: list[str] = ()) -> list[str]:
    """CUDA-only packages pip would install for these arguments (it downloads nothing but metadata)."""
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "report.json"
        command = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(report),
                   *extra, *arguments]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise InstallStop(f"pip cannot plan the torch install ({shell_command(arguments)}):\n"
                              f"{result.stderr.strip()}")
        return cuda_packages(json.loads(report.read_text()))


def install(arguments: list[str]) -> None:
    cuda = planned_cuda(arguments)
    if cuda:
        raise InstallStop(f"`{shell_command(arguments)}` would install CUDA packages ({', '.join(cuda)}): "
                          f"ringtune runs on CPUs. Install the CPU build instead:\n    "
                          f"{shell_command([TORCH, '--index-url', cpu_index()])}")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", *arguments], check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--print", action="store_true", help="print the pip command instead of running it")
    args = parser.parse_args(argv)
    machine = os.environ.get("RINGTUNE_MACHINE", platform.machine())
    system = os.environ.get("RINGTUNE_SYSTEM", platform.system())
    index = cpu_index()
    try:
        arguments = pip_arguments(machine, system, index_reachable(index) if system == "Linux" else False,
                                  index)
        if args.print:
            print(shell_command(arguments))
        else:
            install(arguments)
    except InstallStop as stop:
        print(f"ringtune setup: {stop}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
