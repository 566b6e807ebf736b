"""scripts/install_torch.py: a CPU-only torch on every device, never the package index's CUDA build."""
from __future__ import annotations

import functools
import http.server
import importlib.util
import os
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "scripts" / "install_torch.py"
spec = importlib.util.spec_from_file_location("install_torch", SCRIPT)
install_torch = importlib.util.module_from_spec(spec)
spec.loader.exec_module(install_torch)
AARCH64 = [arg for glibc in (17, 28, 36) for arg in ("--platform", f"manylinux_2_{glibc}_aarch64")]


def run_script(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


@pytest.fixture
def local_index(tmp_path):
    """A simple-API index on 127.0.0.1 that lists torch (what the probe asks for)."""
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "index.html").write_text("<html><body></body></html>")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_linux_takes_the_cpu_index_when_it_answers():
    arguments = install_torch.pip_arguments("aarch64", "Linux", True, install_torch.CPU_INDEX)
    assert arguments == ["torch==2.13.0", "--index-url", "https://download.pytorch.org/whl/cpu"]
    assert install_torch.pip_arguments("x86_64", "Linux", True, "I") == ["torch==2.13.0", "--index-url", "I"]


def test_aarch64_without_the_cpu_index_stops_with_the_command():
    with pytest.raises(install_torch.InstallStop) as stop:
        install_torch.pip_arguments("aarch64", "Linux", False, install_torch.CPU_INDEX)
    assert "CUDA build" in str(stop.value)
    assert "python -m pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in str(stop.value)


def test_elsewhere_the_configured_index_is_planned_then_checked():
    assert install_torch.pip_arguments("x86_64", "Linux", False, "I") == ["torch==2.13.0"]
    assert install_torch.pip_arguments("arm64", "Darwin", False, "I") == ["torch==2.13.0"]


def test_the_script_probes_the_index(local_index):
    result = run_script("--print", RINGTUNE_MACHINE="aarch64", RINGTUNE_SYSTEM="Linux",
                        RINGTUNE_TORCH_INDEX=local_index)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"python -m pip install torch==2.13.0 --index-url {local_index}"


def test_the_script_stops_when_the_index_is_unreachable(local_index):
    unreachable = local_index.rsplit(":", 1)[0] + ":9"  # discard port: nothing listens
    result = run_script("--print", RINGTUNE_MACHINE="aarch64", RINGTUNE_SYSTEM="Linux",
                        RINGTUNE_TORCH_INDEX=unreachable)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith("ringtune setup: PyTorch's CPU wheel index")
    assert f"python -m pip install torch==2.13.0 --index-url {unreachable}" in result.stderr


def test_cuda_packages_reads_planned_installs_and_their_requirements():
    report = {"install": [
        {"metadata": {"name": "torch", "requires_dist": [
            "filelock", "nvidia-cudnn-cu13==9.20.0.48; platform_system == \"Linux\"",
            "cuda-toolkit[cublas]==13.0.3; platform_system == \"Linux\"", "triton==3.7.1",
            "optree>=0.13.0; extra == \"optree\""]}},
        {"metadata": {"name": "nvidia_nccl_cu13"}}, {"metadata": {"name": "sympy"}}]}
    assert install_torch.cuda_packages(report) == ["cuda-toolkit", "nvidia-cudnn-cu13", "nvidia_nccl_cu13",
                                                   "triton"]


def _reachable(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=10).close()
        return True
    except OSError:
        return False


@pytest.mark.slow
def test_the_package_index_torch_for_aarch64_is_a_cuda_build(tmp_path):
    """Why the CPU index: pip's plan for a Pi from the package index (metadata only, nothing installed)."""
    if not _reachable("https://pypi.org/simple/torch/"):
        pytest.skip("the package index is not reachable from here")
    cuda = install_torch.planned_cuda(["torch==2.13.0", "--no-deps"], extra=[
        "--target", str(tmp_path / "target"), *AARCH64, "--python-version", "3.11", "--only-binary=:all:",
        "--index-url", "https://pypi.org/simple"])
    assert "triton" in cuda and any(name.startswith("nvidia-") for name in cuda)


@pytest.mark.slow
def test_the_cpu_index_plan_for_aarch64_holds_no_cuda_package(tmp_path):
    if not install_torch.index_reachable(install_torch.CPU_INDEX):
        pytest.skip(f"{install_torch.CPU_INDEX} is not reachable from here (README shows the command)")
    arguments = install_torch.pip_arguments("aarch64", "Linux", True, install_torch.CPU_INDEX)
    assert install_torch.planned_cuda(arguments, extra=[
        "--target", str(tmp_path / "target"), *AARCH64, "--python-version", "3.11", "--only-binary=:all:"]) == []
