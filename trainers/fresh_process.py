"""Run Python code in a fresh interpreter in which this project's packages cannot be imported.

That is what a Hub user gets who installed only transformers: a saved folder must load from its own code files
with `trust_remote_code=True`. The demo, the tests and release checks load saved folders this way. The child's
code runs after a preamble that blocks `PROJECT_PACKAGES` (any import of them raises `ModuleNotFoundError`) and
defines `project_modules()`, the project modules that were imported anyway (it must stay empty).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path


PROJECT_PACKAGES = ("hf_models", "trainers", "conversion")
REPO_ROOT = str(Path(__file__).resolve().parents[1])

_PREAMBLE = """
import importlib.abc as _abc
import sys as _sys

PROJECT_PACKAGES = {packages!r}


class _BlockProject(_abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in PROJECT_PACKAGES:
            raise ModuleNotFoundError(f"{{name}} is blocked: a Hub folder must load without this project")
        return None


def project_modules():
    return sorted(m for m in _sys.modules if m.split(".")[0] in PROJECT_PACKAGES)


_sys.meta_path.insert(0, _BlockProject())
_sys.path = [p for p in _sys.path if p not in ("", ".", {root!r})]
# Installed packages the child must do without (as if not installed: `import` fails, `find_spec` finds nothing).
for _name in {uninstalled!r}:
    _sys.modules[_name] = None
"""


def run_without_project(
    code: str,
    *args: str | os.PathLike,
    cwd: str | os.PathLike,
    timeout: float = 600,
    env: dict | None = None,
    uninstalled: tuple[str, ...] = (),
) -> subprocess.CompletedProcess:
    """Run `code` (`sys.argv[1:]` = `args`) in a fresh `python -c` with the project's packages blocked.

    The child runs offline (`HF_HUB_OFFLINE=1`) without `PYTHONPATH`; `env` adds variables (e.g. `HF_MODULES_CACHE`);
    the packages in `uninstalled` (e.g. `("peft",)`) behave as if they were not installed.
    Returns the finished process (stdout/stderr captured as text); the caller checks `returncode`.
    """
    child_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    child_env.pop("PYTHONPATH", None)
    script = _PREAMBLE.format(packages=PROJECT_PACKAGES, root=REPO_ROOT, uninstalled=tuple(uninstalled))
    script += textwrap.dedent(code)
    return subprocess.run(
        [sys.executable, "-c", script, *(str(a) for a in args)],
        cwd=cwd,
        env=child_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
