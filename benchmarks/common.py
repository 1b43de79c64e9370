"""
What the benchmarks share: measuring a child process's peak memory, waiting
for an idle CPU, running a child that reports JSON, and describing the machine.
"""

import json
import os
import platform
import resource
import subprocess
import time
from pathlib import Path
from typing import Tuple

REPO = Path(__file__).resolve().parents[1]


def rss_kb(field: str) -> int:
    """A ``/proc/self/status`` field in kB, e.g. VmRSS (resident now) or VmHWM (peak resident)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> bool:
    """Resets VmHWM to the current resident size; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def busy_and_total_jiffies(cpu_line: str) -> Tuple[int, int]:
    """
    Args:
        cpu_line (str): /proc/stat's ``cpu`` line; its first 8 fields are read (user, nice,
            system, idle, iowait, irq, softirq, steal), the guest fields after them are not.

    Returns:
        tuple[int, int]: busy jiffies (all 8 but idle and iowait) and their total.
    """
    values = [int(v) for v in cpu_line.split()[1:9]]
    return sum(values) - values[3] - values[4], sum(values)


def _cpu_jiffies():
    """(busy, total) CPU jiffies of the whole machine; busy counts steal time."""
    with open("/proc/stat") as f:
        return busy_and_total_jiffies(f.readline())


def _cpu_busy_fraction(interval: float = 1.0) -> float:
    busy0, total0 = _cpu_jiffies()
    time.sleep(interval)
    busy1, total1 = _cpu_jiffies()
    return (busy1 - busy0) / max(total1 - total0, 1)


def wait_for_idle_cpu(max_wait: float, busy_limit: float = 0.1) -> float:
    """Waits until the CPU is busy less than ``busy_limit`` of a second; returns the last busy fraction."""
    if max_wait <= 0 or not os.path.exists("/proc/stat"):
        return float("nan")
    deadline = time.time() + max_wait
    busy = _cpu_busy_fraction()
    while busy > busy_limit and time.time() < deadline:
        busy = _cpu_busy_fraction()
    return busy


def run_child_once(cmd, env) -> dict:
    """
    Runs one child that prints a JSON object on its last stdout line and returns
    that object, with ``other_load`` added: the CPU share other processes used meanwhile.
    """
    has_stat = os.path.exists("/proc/stat")
    busy0, total0 = _cpu_jiffies() if has_stat else (0, 0)
    usage0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    usage1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy1, total1 = _cpu_jiffies() if has_stat else (0, 0)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if has_stat:
        hz = os.sysconf("SC_CLK_TCK")
        child_cpu = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
        other = max((busy1 - busy0) / hz - child_cpu, 0.0)
        result["other_load"] = round(other * hz / max(total1 - total0, 1), 3)
    return result


def require_cuda(script: str):
    """Exit, naming ``script``, before measuring anything where PyTorch sees no CUDA device."""
    import torch

    if not torch.cuda.is_available():
        raise SystemExit(
            f"{script} --device cuda: PyTorch sees no CUDA device here "
            "(torch.cuda.is_available() is False); nothing was measured."
        )


def machine_info() -> dict:
    """CPU, cores, torch and its threads and CPU capability, GPU if any, and the git commit."""
    import torch

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:

        def git(*a):
            return subprocess.run(
                ["git", *a], cwd=REPO, capture_output=True, text=True
            ).stdout.strip()

        commit = git("rev-parse", "--short", "HEAD")
        if commit and git("status", "--porcelain", "--untracked-files=no"):
            commit += " + uncommitted changes"
    except OSError:
        commit = ""
    # A copy of the tree sent to another machine (a GPU's) is told its commit by the environment.
    commit = os.environ.get("FOCAL_DET2_COMMIT") or commit
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "commit": commit,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
