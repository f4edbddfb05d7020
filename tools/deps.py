"""The dependency lock: write it (``make lock``) and turn it into pip constraints (set-up).

``requirements.lock`` pins every distribution of a green environment, direct and transitive
(torch, pip and the build tools included). It is a ``pip freeze`` of a fresh virtualenv without
system packages in which ``pip install torch==<pin> -e .[dev,plot]`` took the newest releases
that pyproject.toml's ranges allow. The set-up installs with ``pip install -c <constraints>``:

* the lock as it is, when torch comes from the lock (no torch yet, or the same version);
* when the Python already has another torch (a CUDA build, say), that torch is kept: the
  constraints pin it and every distribution it requires, recursively (its triton, its
  ``nvidia-*`` libraries, sympy...), at the versions installed, in place of the lock's lines, so
  pip neither replaces nor upgrades the user's torch stack. A torch below pyproject.toml's floor
  is an error, never a silent download of another one;
* on another Python minor version or platform than the lock's, pip resolves from the ranges
  and the lock's torch version alone, and says so (the pins of one Python do not all exist for
  another).

Standard library only (plus pip's vendored ``packaging``): it runs in a venv with nothing
installed yet. Usage::

    python tools/deps.py constraints requirements.lock      # constraints on stdout
    python tools/deps.py freeze > requirements.lock         # in the lock venv (make lock)
"""

from __future__ import annotations

import importlib.metadata as md
import platform
import re
import subprocess
import sys
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.version import Version
except ImportError:  # a bare venv: pip carries its own copy
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
# Distributions the lock never pins: the project itself.
NOT_LOCKED = {"qwenrl"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def environment_tag() -> str:
    """What a lock is valid for: the interpreter's minor version and the platform."""
    impl = platform.python_implementation()
    return (
        f"{impl} {sys.version_info[0]}.{sys.version_info[1]}, {sys.platform} {platform.machine()}"
    )


def read_lock(path: Path) -> tuple[str | None, dict[str, str]]:
    """(the environment the lock was made in, {canonical name: 'name==version'})."""
    env, pins = None, {}
    for line in path.read_text().splitlines():
        if line.startswith("# environment:"):
            env = line.split(":", 1)[1].strip()
        line = line.split("#", 1)[0].strip()
        if line:
            pins[canonical(Requirement(line).name)] = line
    return env, pins


def torch_floor() -> str:
    """The torch requirement of pyproject.toml's dependencies, e.g. 'torch>=2.13'."""
    text = (ROOT / "pyproject.toml").read_text()
    match = re.search(r'^\s*"(torch\s*[<>=!~][^";]*)', text, re.MULTILINE)
    if not match:
        sys.exit("tools/deps.py: pyproject.toml lists no torch requirement")
    return match.group(1)


def installed_closure(name: str) -> dict[str, str]:
    """{canonical name: installed version} of ``name`` and everything it requires, recursively
    (only what applies to this environment and is installed)."""
    seen: dict[str, str] = {}
    todo = [name]
    while todo:
        dist_name = todo.pop()
        key = canonical(dist_name)
        if key in seen:
            continue
        try:
            dist = md.distribution(dist_name)
        except md.PackageNotFoundError:
            continue
        seen[key] = dist.version
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def constraints(lock: Path) -> str:
    lock_env, pins = read_lock(lock)
    here = environment_tag()
    header = [f"# constraints for {here}, from {lock.name}"]
    if lock_env != here:
        print(
            f"tools/deps.py: {lock.name} was made on {lock_env}; this is {here}: installing "
            "from pyproject.toml's ranges and the lock's torch version only (run `make lock` "
            "to make a lock here)",
            file=sys.stderr,
        )
        pins = {k: v for k, v in pins.items() if k == "torch"}
    try:
        torch_version = md.version("torch")
    except md.PackageNotFoundError:
        torch_version = None
    locked = pins.get("torch", "").partition("==")[2]
    if torch_version is not None and Version(torch_version).public != locked:
        floor = Requirement(torch_floor())
        if not floor.specifier.contains(Version(torch_version).public, prereleases=True):
            sys.exit(
                f"tools/deps.py: the installed torch {torch_version} is older than qwenrl's "
                f"requirement {floor}; upgrade it (a CUDA build: from the PyTorch index), or "
                "use a Python without torch and the lock's CPU build is installed"
            )
        kept = installed_closure("torch")
        header.append(
            f"# the installed torch {torch_version} is kept, with the versions it requires"
        )
        for key, version in sorted(kept.items()):
            pins[key] = f"{key}=={version}"
    return "\n".join(header + [pins[k] for k in sorted(pins)]) + "\n"


def freeze() -> str:
    """The lock of the running (fresh) environment."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "freeze", "--all", "--exclude-editable"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    lines = []
    for line in out.splitlines():
        req = Requirement(line)
        if canonical(req.name) in NOT_LOCKED:
            continue
        if canonical(req.name) == "torch":
            # The version, not the build: `+cpu` exists only on the PyTorch index or a local
            # wheel; `==2.13.0` takes that wheel where pip can see it, PyPI's build elsewhere.
            (spec,) = req.specifier
            line = f"torch=={Version(spec.version).public}"
        lines.append(line)
    header = [
        "# Exact versions of every dependency of qwenrl[dev,plot], direct and transitive.",
        "# Generated by `make lock` (tools/deps.py freeze: pip freeze of a fresh virtualenv);",
        "# do not edit by hand. Installed with `pip install -c` (see tools/deps.py).",
        f"# environment: {environment_tag()}",
    ]
    return "\n".join(header + sorted(lines, key=str.lower)) + "\n"


def main(argv: list[str]) -> None:
    if argv[:1] == ["constraints"] and len(argv) == 2:
        sys.stdout.write(constraints(Path(argv[1])))
    elif argv == ["freeze"]:
        sys.stdout.write(freeze())
    else:
        sys.exit(__doc__.rsplit("Usage::", 1)[1])


if __name__ == "__main__":
    main(sys.argv[1:])
