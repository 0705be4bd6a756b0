"""Ray is optional: with `import ray` failing (as on a machine without it), `ldm-batch` still runs in-process and
`--ray` (batch and service) is one line saying what to install, exit code 2, no traceback; and nothing outside
`ldm.batch.ray_data` / `ldm.serve.ray_serve` imports Ray."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from .conftest import REPO

DIGITS = str(REPO / "configs" / "demo" / "digits.yaml")
HINT = 'pip install -e ".[ray]"'


def without_ray(tmp_path) -> dict[str, str]:
    """An environment whose Python cannot import ray (a sitecustomize that blocks it), as if it were not installed."""
    shim = tmp_path / "noray"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text("import sys\nsys.modules['ray'] = None  # `import ray` -> ImportError\n")
    path = os.pathsep.join([str(shim), str(REPO), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


def test_batch_runs_without_ray_and_ray_flags_say_what_to_install(tmp_path):
    env = without_ray(tmp_path)
    probe = subprocess.run([sys.executable, "-c", "import ray"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0  # the shim works: Ray cannot be imported
    prompts = tmp_path / "p.txt"
    prompts.write_text("a handwritten digit 1\na handwritten digit 2\n")
    base = [sys.executable, str(REPO / "scripts" / "batch.py"), "--config", DIGITS, "--from-file", str(prompts),
            "--n_samples", "1", "--ddim_steps", "2", "--quiet"]  # fmt: skip
    done = subprocess.run([*base, "--outdir", str(tmp_path / "local")], env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert len((tmp_path / "local" / "manifest.jsonl").read_text().splitlines()) == 2
    for argv in ([*base, "--outdir", str(tmp_path / "ray"), "--ray"],
                 [sys.executable, str(REPO / "scripts" / "serve.py"), "--ray", "--data_dir", str(tmp_path / "d")]):
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stderr
        assert done.stderr.count("\n") == 1 and HINT in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "ray").exists()


def test_only_the_ray_modules_import_ray():
    code = ("import sys, ldm.batch.run, ldm.batch.make, ldm.batch.manifest, ldm.serve.main, ldm.serve.app, "
            "ldm.serve.store, ldm.serve.settings; assert 'ray' not in sys.modules, 'ray was imported'")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    imports_ray = re.compile(r"^\s*(import ray|from ray)\b", re.MULTILINE)
    ray_importers = sorted(str(p.relative_to(REPO)) for p in (REPO / "ldm").rglob("*.py")
                           if imports_ray.search(p.read_text()))  # fmt: skip
    assert ray_importers == ["ldm/batch/ray_data.py", "ldm/serve/ray_serve.py"]
