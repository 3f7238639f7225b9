"""Test automation for the ev monorepo.

Packages are discovered from ``packages/*/pyproject.toml`` (adding one needs no edit here).

Default sessions (what ``nox`` runs, and what CI runs):

* ``tests-<package>(<torch>)``: a fresh venv holding only that package (installed from its
  built wheel, never editable), its declared dependencies and the test tools, then its tests.
  Proves that ``pip install <package>`` alone works. Parametrized over ``shared/torch-matrix.toml``;
  CUDA entries are skipped, with the reason, on machines without an NVIDIA GPU.
* ``integration(<torch>)``: every package installed together, ``integration_tests/``.
* ``lint``, ``typecheck``, ``build``.

Other sessions: ``demo`` (the main job: ``ev demo``), ``bench`` (every package's benchmarks).

Environments are made by uv (its cache makes the multi-GB torch install a hard-link copy after
the first session). uv does not read pip's configuration, so a local wheelhouse configured for
pip (``find-links`` / ``file://`` extra indexes, as on this project's machines) is handed to uv.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import nox

ROOT = Path(__file__).resolve().parent
PACKAGES_DIR = ROOT / "packages"
SHARED = ROOT / "shared"
WHEELHOUSE = ROOT / ".nox" / "_wheels"
# Material for developers beside the repository (never a dependency): tests must not read it
# (ev-testing's EV_FORBIDDEN_PATHS check); optional local wheels (pytorch3d) come from it.
OUTSIDE_SHARED = ROOT.parent / "shared"

nox.needs_version = ">=2024.4.15"
nox.options.default_venv_backend = "uv"
nox.options.error_on_missing_interpreters = True

TEST_TOOLS = ["pytest>=8", "pytest-timeout>=2.3"]
PYTHON = "3.11"


# --------------------------------------------------------------------------------------
# discovery
# --------------------------------------------------------------------------------------
def _read_pyproject(path: Path) -> dict:
    with path.open("rb") as fh:
        return tomllib.load(fh)


def _discover_packages() -> dict[str, dict]:
    found = {}
    for pyproject in sorted(PACKAGES_DIR.glob("*/pyproject.toml")):
        data = _read_pyproject(pyproject)
        name = data["project"]["name"]
        found[name] = {
            "dir": pyproject.parent,
            "module": name.replace("-", "_"),
            "data": data,
            "publish": data.get("tool", {}).get("ev", {}).get("publish", True),
            "test_extras": data.get("tool", {}).get("ev", {}).get("test", {}).get("extras", []),
            "local_wheels": data.get("tool", {})
            .get("ev", {})
            .get("test", {})
            .get("local-wheels", []),
        }
    return found


PACKAGES = _discover_packages()
MATRIX: dict[str, dict] = tomllib.loads((SHARED / "torch-matrix.toml").read_text())
MATRIX_IDS = list(MATRIX)


def _ev_requirements(name: str) -> list[str]:
    """Names of the ev sibling distributions ``name`` depends on (transitively)."""
    deps: list[str] = []
    for req in PACKAGES[name]["data"]["project"].get("dependencies", []):
        dep = req.split(";")[0].strip()
        for sep in "<>=!~[ ":
            dep = dep.split(sep)[0]
        if dep in PACKAGES and dep not in deps:
            deps.append(dep)
            deps.extend(d for d in _ev_requirements(dep) if d not in deps)
    return deps


# --------------------------------------------------------------------------------------
# environment plumbing
# --------------------------------------------------------------------------------------
@functools.cache
def _uv_env() -> dict[str, str]:
    """Environment for uv: the local wheelhouse pip is configured with, if any."""
    env: dict[str, str] = {}
    try:
        out = subprocess.run(
            [sys.executable, "-m", "pip", "config", "list"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    find_links: list[str] = []
    indexes: list[str] = []
    for line in out.splitlines():
        key, _, value = line.partition("=")
        values = value.strip().strip("'\"").split()
        if key.endswith("find-links"):
            find_links += [v for v in values if Path(v.removeprefix("file://")).is_dir()]
        elif key.endswith("extra-index-url"):
            indexes += [v for v in values if v.startswith("file://") and Path(v[7:]).is_dir()]
    find_links, indexes = list(dict.fromkeys(find_links)), list(dict.fromkeys(indexes))
    if find_links:
        env["UV_FIND_LINKS"] = ",".join(find_links)  # uv: comma-separated
    if indexes:
        env["UV_EXTRA_INDEX_URL"] = " ".join(indexes)  # uv: space-separated
    if find_links or indexes:
        # local copies of e.g. torch compete with PyPI's: pick the best version anywhere
        env["UV_INDEX_STRATEGY"] = "unsafe-best-match"
    return env


def _gpu_available() -> tuple[bool, str]:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False, "no NVIDIA GPU on this machine (nvidia-smi not found)"
    result = subprocess.run([smi, "-L"], capture_output=True, text=True, check=False)
    if result.returncode != 0 or "GPU" not in result.stdout:
        return False, f"no NVIDIA GPU visible (nvidia-smi -L: {result.stdout or result.stderr})"
    return True, result.stdout.strip()


_BUILT: dict[str, Path] = {}


def _wheel(session: nox.Session, name: str) -> Path:
    """Build (once per nox run) the wheel of package ``name``."""
    if name not in _BUILT:
        if not _BUILT and WHEELHOUSE.exists():
            shutil.rmtree(WHEELHOUSE)
        out = WHEELHOUSE / name
        session.run(
            "uv", "build", "--wheel", "--quiet", "--out-dir", str(out),
            str(PACKAGES[name]["dir"]), external=True, env=_uv_env(),
        )  # fmt: skip
        (wheel,) = out.glob("*.whl")
        _BUILT[name] = wheel
    return _BUILT[name]


def _install_torch_args(entry: dict) -> list[str]:
    args = ["-c", str(SHARED / entry["constraints"])]
    if entry["index_url"]:
        args += ["--extra-index-url", entry["index_url"]]
    return args


def _install_packages(session: nox.Session, names: list[str], torch_id: str) -> None:
    """Install the wheels of ``names`` (with their test extras) plus ev-testing and the tools."""
    entry = MATRIX[torch_id]
    reqs = []
    for name in names:
        wheel = _wheel(session, name)
        extras = PACKAGES[name]["test_extras"]
        reqs.append(f"{name}[{','.join(extras)}] @ {wheel.as_uri()}" if extras else str(wheel))
    session.install(
        *reqs,
        *TEST_TOOLS,
        f"torch=={entry['torch']}",
        f"torchvision=={entry['torchvision']}",
        *_install_torch_args(entry),
        env=_uv_env(),
    )


def _check_torch(session: nox.Session, torch_id: str) -> None:
    entry = MATRIX[torch_id]
    code = (
        "import torch, torchvision, sys\n"
        f"want = ({entry['torch']!r}, {entry['torchvision']!r}, {entry['cuda']!r})\n"
        "got = (torch.__version__.split('+')[0], torchvision.__version__.split('+')[0], "
        "torch.version.cuda or '')\n"
        "ok = got[:2] == want[:2] and (not want[2] or got[2] == want[2])\n"
        "print('torch', torch.__version__, 'torchvision', torchvision.__version__, "
        "'cuda', torch.version.cuda)\n"
        "sys.exit(0 if ok else f'torch matrix entry wants {want}, installed {got}')\n"
    )
    session.run("python", "-c", code, silent=False)


def _skip_unrunnable(session: nox.Session, torch_id: str) -> None:
    if MATRIX[torch_id]["needs_gpu"]:
        ok, why = _gpu_available()
        if not ok:
            session.skip(f"matrix entry {torch_id!r} needs a CUDA GPU: {why}")


def _pytest(session: nox.Session, *paths: str) -> None:
    args = ["pytest", *paths, "-p", "no:cacheprovider", "--rootdir", str(ROOT)]
    args += ["-c", str(ROOT / "pyproject.toml"), *session.posargs]
    env = {
        "EV_QUIET": "1",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
        "EV_FORBIDDEN_PATHS": str(OUTSIDE_SHARED),
    }
    session.run(*args, env=env)


def _install_local_wheels(session: nox.Session, name: str) -> None:
    """Install the optional wheels a package's tests can use, when ``../shared/wheels`` has them.

    Declared as ``[tool.ev.test] local-wheels = ["pytorch3d"]``; what such a wheel needs at
    run time (iopath for pytorch3d) belongs in the package's test extras. Without the folder
    (a user's clone) nothing is installed and the tests that need them skip with their reason.
    """
    for dist_name in PACKAGES[name]["local_wheels"]:
        found = sorted((OUTSIDE_SHARED / "wheels").glob(f"{dist_name}-*.whl"))
        if not found:
            session.log(
                f"{dist_name}: no local wheel in {OUTSIDE_SHARED / 'wheels'}; its tests skip"
            )
            continue
        session.install(str(found[-1]), env=_uv_env())


# --------------------------------------------------------------------------------------
# sessions
# --------------------------------------------------------------------------------------
def _make_tests_session(name: str) -> None:
    @nox.session(name=f"tests-{name}", python=PYTHON)
    @nox.parametrize("torch_id", MATRIX_IDS, ids=MATRIX_IDS)
    def tests(session: nox.Session, torch_id: str) -> None:
        _skip_unrunnable(session, torch_id)
        ev_deps = _ev_requirements(name)
        _install_packages(session, [name, *ev_deps, "ev-testing"], torch_id)
        _install_local_wheels(session, name)
        _check_torch(session, torch_id)
        # only this package, its declared ev siblings and the test helper may be present
        allowed = sorted({name, "ev-testing", *ev_deps})
        session.run(
            "python", "-c",
            "import json, sys; from importlib.metadata import distributions as d\n"
            "ev = sorted({x.metadata['Name'] for x in d() if x.metadata['Name'].startswith('ev-')})\n"
            f"allowed = {json.dumps(allowed)}\n"
            "sys.exit(0 if ev == allowed else f'unexpected ev packages installed: {ev} != {allowed}')",
        )  # fmt: skip
        _pytest(session, str(PACKAGES[name]["dir"] / "tests"))


for _name in PACKAGES:
    _make_tests_session(_name)


@nox.session(python=PYTHON)
@nox.parametrize("torch_id", MATRIX_IDS, ids=MATRIX_IDS)
def integration(session: nox.Session, torch_id: str) -> None:
    """Every package installed together; tests that compose packages."""
    _skip_unrunnable(session, torch_id)
    _install_packages(session, list(PACKAGES), torch_id)
    for name in PACKAGES:
        _install_local_wheels(session, name)
    _check_torch(session, torch_id)
    _pytest(session, str(ROOT / "integration_tests"))


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff check + ruff format --check over the whole repository."""
    session.install("ruff>=0.12", env=_uv_env())
    session.run("ruff", "check", str(ROOT))
    session.run("ruff", "format", "--check", str(ROOT))


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    """mypy on the packages' sources (ev-core's public API at least)."""
    _install_packages(session, list(PACKAGES), "cpu")
    session.install("mypy>=1.15", env=_uv_env())
    targets = [str(p["dir"] / "src") for p in PACKAGES.values()]
    session.run("mypy", "--config-file", str(ROOT / "pyproject.toml"), *targets)


@nox.session(python=PYTHON)
def build(session: nox.Session) -> None:
    """Wheel + sdist of every package; twine check; metadata rules (bounded ev pins, py.typed)."""
    session.install("twine>=6", env=_uv_env())
    dist = ROOT / "dist"
    shutil.rmtree(dist, ignore_errors=True)
    for name, pkg in PACKAGES.items():
        session.run(
            "uv", "build", "--quiet", "--out-dir", str(dist / name), str(pkg["dir"]),
            external=True, env=_uv_env(),
        )  # fmt: skip
    session.run(
        "twine",
        "check",
        "--strict",
        *map(str, sorted(dist.glob("*/*.whl"))),
        *map(str, sorted(dist.glob("*/*.tar.gz"))),
    )
    problems = _check_wheel_metadata(dist)
    if problems:
        session.error("wheel metadata problems:\n  " + "\n  ".join(problems))
    session.log(f"wheel metadata OK for {len(PACKAGES)} packages")


def _check_wheel_metadata(dist: Path) -> list[str]:
    """Each wheel ships py.typed; ev sibling requirements are bounded ranges, never pins."""
    import zipfile
    from email.parser import Parser

    problems = []
    for name, pkg in PACKAGES.items():
        wheels = list((dist / name).glob("*.whl"))
        if len(wheels) != 1 or not list((dist / name).glob("*.tar.gz")):
            problems.append(f"{name}: expected one wheel and one sdist in {dist / name}")
            continue
        with zipfile.ZipFile(wheels[0]) as zf:
            names = zf.namelist()
            meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
            meta = Parser().parsestr(zf.read(meta_name).decode())
        if f"{pkg['module']}/py.typed" not in names:
            problems.append(f"{name}: wheel lacks {pkg['module']}/py.typed")
        for req in meta.get_all("Requires-Dist") or []:
            dep = req.split(";")[0]
            base = dep.split("<")[0].split(">")[0].split("=")[0].split("[")[0].strip()
            if base in PACKAGES and ("==" in dep or "<" not in dep or ">=" not in dep):
                problems.append(f"{name}: ev sibling requirement must be a bounded range: {dep}")
    return problems


@nox.session(python=PYTHON, default=False)
def demo(session: nox.Session) -> None:
    """The main job: `ev demo` over every package, on generated/shipped data."""
    _install_packages(session, [n for n, p in PACKAGES.items() if p["publish"]], "cpu")
    out = ROOT / "ev-demo-output"
    session.run("ev", "demo", "--out", str(out), *session.posargs)


@nox.session(name="gpu-bench", python=PYTHON, default=False)
def gpu_bench(session: nox.Session) -> None:
    """Every package's GPU benchmark rows within 8 minutes: one JSON + markdown table.

    Same as ``python benchmarks/gpu_bench.py``; on a machine without an NVIDIA GPU the session
    is skipped with the reason.
    """
    ok, why = _gpu_available()
    if not ok:
        session.skip(f"gpu-bench needs a CUDA GPU: {why}")
    _install_packages(session, list(PACKAGES), "cu130")
    session.run("python", str(ROOT / "benchmarks" / "gpu_bench.py"), *session.posargs)


@nox.session(python=PYTHON, default=False)
def bench(session: nox.Session) -> None:
    """Run every package's benchmarks (results: benchmark-results/*.json)."""
    _install_packages(session, list(PACKAGES), "cpu")
    scripts = sorted(PACKAGES_DIR.glob("*/benchmarks/bench_*.py"))
    if not scripts:
        session.skip("no benchmark scripts found")
    for script in scripts:
        session.run("python", str(script), *session.posargs)
