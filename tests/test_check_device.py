"""bench/check_device.py, the correctness part of the device run (`bench/run_gpu.sh`), runs on the CPU as it will on
a GPU, and its scheduler check sees a wrong exit, an ignored stop sequence or cancellation and a request's images
read out of order: a session lent a GPU must not spend its minutes on a broken script, nor read a pass that could
not fail."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from freevlm import EarlyExitVLM, ExitConfig
from freevlm.serving import Handle, Scheduler, scheduler
from freevlm.tiny import tiny_model

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def load_check_device():
    spec = importlib.util.spec_from_file_location("check_device", ROOT / "bench" / "check_device.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_check_device_passes_on_the_cpu():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    command = [sys.executable, "bench/check_device.py", "--device", "cpu", "--families", "opt"]
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "FAIL" not in run.stdout and run.stdout.count("ok   scheduler") == 2, run.stdout


def test_the_scheduler_check_sees_requests_that_leave_otherwise(monkeypatch):
    check_device = load_check_device()
    ee = EarlyExitVLM.from_backbone(tiny_model("opt", seed=0), ExitConfig([1, 2]))
    wrong, early, _ = check_device.scheduler_mismatches(ee, "cpu", seed=1)
    assert not wrong and early > 0
    submit = Scheduler.submit
    monkeypatch.setattr(
        Scheduler, "submit", lambda self, *args, **options: submit(self, *args, **options | {"threshold": 1.0})
    )
    wrong, *_ = check_device.scheduler_mismatches(ee, "cpu", seed=1)
    assert wrong, "a scheduler whose rows never leave early passed the check"


@pytest.mark.parametrize("kind", ["cancel", "stop"])
def test_the_scheduler_check_sees_a_cancellation_or_stop_sequence_ignored(monkeypatch, kind):
    check_device = load_check_device()
    ee = EarlyExitVLM.from_backbone(tiny_model("opt", seed=0), ExitConfig([1, 2]))
    if kind == "cancel":
        monkeypatch.setattr(Handle, "cancel", lambda self: None)
    else:
        monkeypatch.setattr(scheduler, "_check_stop", lambda stop: ())
    wrong, *_ = check_device.scheduler_mismatches(ee, "cpu", seed=1)
    assert wrong and all(w.endswith(f"({kind})") for w in wrong), wrong


def test_the_scheduler_check_sees_a_requests_images_out_of_order(monkeypatch):
    """Gemma 3's requests with two images: the scheduler given them swapped answers otherwise (one image: the same).
    (The tiny InternVL's answers hardly depend on its images: swapped, 2 in 10 change.)"""
    check_device = load_check_device()
    ee = EarlyExitVLM.from_backbone(tiny_model("gemma3", seed=0), ExitConfig([1, 2]))
    wrong, *_ = check_device.scheduler_mismatches(ee, "cpu", seed=1)
    assert not wrong
    submit = Scheduler.submit
    monkeypatch.setattr(
        Scheduler, "submit", lambda self, pixel_values, *a, **o: submit(self, pixel_values.flip(0), *a, **o)
    )
    wrong, *_ = check_device.scheduler_mismatches(ee, "cpu", seed=1)
    assert wrong and all(w.endswith("(images)") for w in wrong), wrong
