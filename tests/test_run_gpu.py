"""`bash bench/run_gpu.sh --smoke` runs every part of the device run on the CPU at tiny sizes, in a Python that sees
only what the GPU machine has (torch, transformers, safetensors, numpy, Pillow and what they need; not accelerate,
scipy nor the serving libraries): a session lent a GPU must not spend its minutes on a script that breaks on an
argument, an import or its output path. The device has transformers 5.17: with it first on PYTHONPATH (e.g.
`pip install --no-deps --target DIR transformers==5.17.0 huggingface_hub==1.33.0`) this runs against it."""

import importlib.util
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
# what the device image is known to hold for us (/work/.library/device/KINDS.md lists more, but the brief for
# bench/ is these and what they depend on)
DEVICE_PACKAGES = ("torch", "transformers", "safetensors", "numpy", "pillow")


def device_packages() -> dict[str, metadata.Distribution]:
    """`DEVICE_PACKAGES` and everything they require (no extras), as installed here."""
    found, todo = {}, list(DEVICE_PACKAGES)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in found:
            continue
        try:
            found[name] = dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:  # a requirement this platform does not install (CUDA libraries)
            continue
        for requirement in map(Requirement, dist.requires or []):
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return found


def device_site(folder: Path) -> dict[str, str]:
    """Environment variables for a Python whose site-packages is `folder/site`: links to `device_packages()`'s files
    only, put in place of the real one by a sitecustomize (so an `import accelerate` fails, and transformers' own
    checks see no accelerate)."""
    site = folder / "site"
    site.mkdir(parents=True)
    for dist in device_packages().values():
        root = Path(dist.locate_file(""))
        tops = {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")} - {"__pycache__"}
        for top in tops:
            if (root / top).exists() and not (site / top).exists():
                (site / top).symlink_to(root / top)
    (folder / "sitecustomize.py").write_text(
        "import sys\n"
        f"sys.path[:] = [{str(site)!r} if p.endswith('site-packages') else p for p in sys.path]\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in type(f).__module__]\n"
    )
    return dict(os.environ, PYTHONPATH=f"{folder}{os.pathsep}{ROOT}", PYTHON=sys.executable, OUT=str(folder))


@pytest.fixture(scope="module")
def device_env(tmp_path_factory):
    return device_site(tmp_path_factory.mktemp("device"))


def test_the_device_site_hides_what_the_device_lacks(device_env):
    hidden = ["accelerate", "scipy", "fastapi", "ray", "matplotlib", "pycocoevalcap"]
    code = (
        "import importlib.util, torch, transformers, PIL, numpy, safetensors\n"
        f"print([m for m in {hidden} if importlib.util.find_spec(m) is not None])"
    )
    run = subprocess.run([sys.executable, "-c", code], env=device_env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "[]", run.stdout + run.stderr
    assert all(importlib.util.find_spec(m) is not None for m in hidden)  # here they are installed


@pytest.mark.slow
def test_every_part_of_the_device_run_passes_on_the_cpu(device_env):
    run = subprocess.run(
        ["bash", "bench/run_gpu.sh", "--smoke"], cwd=ROOT, env=device_env, capture_output=True, text=True, timeout=300
    )
    log = run.stdout + run.stderr
    parts = [line for line in log.splitlines() if line.startswith("### ") and "bench/" in line]
    assert len(parts) == 6, log
    assert run.returncode == 0 and "### 0 part(s) failed" in log, log
    assert "FAIL" not in log and "checks passed" in log, log
    assert (Path(device_env["OUT"]) / "gpu_run.log").read_text() == run.stdout
