# SPDX-License-Identifier: GPL-3.0-or-later
"""A real ComfyUI server with this pack: started as a subprocess, driven over HTTP.

A product component: scripts/batch_render.py renders through it (one per Ray actor), and the
demo job runs on it. The test suite and the benchmarks use it too.

The pack is loaded from this repository through a temporary extra-model-paths
config (key ``custom_nodes``), with every other custom node disabled, so a
user's own ComfyUI (COMFYUI_PATH) is used without being modified.

A server never outlives the process that started it, however that process dies (SIGKILL by the
OOM killer included): on Linux the server is started with PR_SET_PDEATHSIG = SIGKILL, set by a
tiny launcher between fork and ComfyUI's exec, and ``stop`` kills its whole process group.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# The name the test suite's and the benchmarks' servers link the pack under.
TEST_PACK_NAME = "dpm-latent-under-test"


class PromptError(RuntimeError):
    """A prompt the server refused (HTTP 400) or that failed while running."""

    def __init__(self, message: str, payload):
        super().__init__(message)
        self.payload = payload


# Run by the server's own Python between fork and ComfyUI's main.py: ask the kernel to SIGKILL this
# process when the thread that forked it ends (PR_SET_PDEATHSIG survives exec), then make sure that
# parent had not already died before the request took effect (then its pid is no longer our parent).
_LAUNCHER = """
import ctypes, os, signal, sys
parent = int(sys.argv[1])
if sys.platform.startswith("linux"):
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(1, int(signal.SIGKILL), 0, 0, 0) != 0:  # 1 = PR_SET_PDEATHSIG
        sys.exit("PR_SET_PDEATHSIG failed: errno %d" % ctypes.get_errno())
    if os.getppid() != parent:
        sys.exit("the process that started this server is gone")
sys.argv = sys.argv[2:]
os.execv(sys.executable, [sys.executable] + sys.argv)
"""


def _spawn(make):
    """``make()`` (a Popen), forked by a thread that lives as long as the child does.

    PR_SET_PDEATHSIG fires when the *thread* that forked the child ends, not the process: a server
    started from a short-lived thread (a thread pool, a Ray actor's executor) would die with that
    thread. The main thread ends only with the process; any other caller has the fork done by a
    daemon thread of its own that then waits for the server to exit (and dies with the process).
    No module state: Ray ships this module by value to its actors.
    """
    if threading.current_thread() is threading.main_thread():
        return make()
    got: list = []
    ready = threading.Event()

    def hold():
        try:
            proc = make()
        except BaseException as e:  # noqa: BLE001  handed back to the caller
            got.append(e)
            ready.set()
            return
        got.append(proc)
        ready.set()
        proc.wait()

    threading.Thread(target=hold, name="dpm-server-parent", daemon=True).start()
    ready.wait()
    if isinstance(got[0], BaseException):
        raise got[0]
    return got[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """ComfyUI's ``main.py`` in ``comfy_dir`` with this pack, on a free port of 127.0.0.1.

    ``workdir`` holds the server's input, output, temp and user folders, its log and its
    custom_nodes folder, where the pack is linked as ``pack_name``: the only custom node it loads.
    That name must not be a folder of ComfyUI's own ``custom_nodes/`` (ComfyUI would load both):
    never ``dpm-latent``, under which scripts/comfy_host.py links a checkout into the host for
    ``serve``. ``model_dirs`` maps model folder keys (``checkpoints``, ``clip_energy``, ...) to
    extra folders; ``cpu`` passes ``--cpu``; ``python`` runs main.py (default: this Python).
    ``extra_nodes`` maps more custom node folder names to folders it loads too (the tests' tiny model
    node, ``dpmtools/test_server_nodes``).
    """

    def __init__(self, comfy_dir: Path, workdir: Path, python: str | None = None,
                 model_dirs: dict[str, Path] | None = None, extra_args: list[str] | None = None,
                 cpu: bool = True, *, pack_name: str, extra_nodes: dict[str, Path] | None = None):
        # absolute paths only: ComfyUI runs in comfy_dir and would read a relative one from there
        self.comfy_dir = Path(comfy_dir).resolve()
        self.pack_name = pack_name
        if (self.comfy_dir / "custom_nodes" / pack_name).exists():
            raise ValueError(f"{self.comfy_dir / 'custom_nodes' / pack_name} exists: ComfyUI would load it as well "
                             "as this checkout; give the server another pack_name")
        self.workdir = Path(workdir).resolve()
        self.python = python or sys.executable
        self.model_dirs = {key: Path(path).resolve() for key, path in (model_dirs or {}).items()}
        self.extra_args = extra_args or []
        self.extra_nodes = {name: Path(path).resolve() for name, path in (extra_nodes or {}).items()}
        self.cpu = cpu
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.input_dir = self.workdir / "input"
        self.output_dir = self.workdir / "output"
        self.log_path = self.workdir / "server.log"

    # ------------------------------------------------------------------ life cycle
    def start(self, timeout: float = 180.0) -> "ComfyServer":
        for d in ("input", "output", "temp", "user", "custom_nodes"):
            (self.workdir / d).mkdir(parents=True, exist_ok=True)
        for name, target in {self.pack_name: REPO, **self.extra_nodes}.items():
            link = self.workdir / "custom_nodes" / name
            if not link.exists():
                link.symlink_to(target, target_is_directory=True)
        # paths as JSON strings (valid YAML double-quoted scalars): any character in a path is safe
        lines = ["dpm_latent_server:", f"  custom_nodes: {json.dumps(str(self.workdir / 'custom_nodes'))}"]
        for key, path in self.model_dirs.items():
            path.mkdir(parents=True, exist_ok=True)
            lines.append(f"  {key}: {json.dumps(str(path))}")
        cfg = self.workdir / "extra_model_paths.yaml"
        cfg.write_text("\n".join(lines) + "\n")
        cmd = [self.python, "-c", _LAUNCHER, str(os.getpid()),  # then ComfyUI:
               "main.py", *(["--cpu"] if self.cpu else []), "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-auto-launch", "--dont-print-server",
               "--input-directory", str(self.input_dir), "--output-directory", str(self.output_dir),
               "--temp-directory", str(self.workdir / "temp"), "--user-directory", str(self.workdir / "user"),
               "--extra-model-paths-config", str(cfg),
               "--disable-all-custom-nodes", "--whitelist-custom-nodes", self.pack_name, *self.extra_nodes,
               "--database-url", "sqlite:///:memory:", "--preview-method", "latent2rgb",
               *self.extra_args]
        self._log = open(self.log_path, "wb")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        # its own session (stop kills the group), and see _LAUNCHER: it dies with this process
        self.proc = _spawn(lambda: subprocess.Popen(cmd, cwd=self.comfy_dir, stdout=self._log,
                                                    stderr=subprocess.STDOUT, env=env, start_new_session=True))
        (self.workdir / "server.pid").write_text(f"{self.proc.pid}\n")
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.stop()  # closes the log
                raise RuntimeError(f"ComfyUI exited with {code}:\n{self.log_tail()}")
            try:
                self.get("/system_stats", timeout=2)
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {timeout}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(timeout=20)
        except ProcessLookupError:  # it ended between poll() and the signal
            pass
        finally:
            self._log.close()
            self.proc = None

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # ------------------------------------------------------------------ HTTP
    def get(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def post(self, path: str, payload, timeout: float = 30):
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                body = r.read()
                return json.loads(body) if body else None
        except urllib.error.HTTPError as e:
            body = e.read()
            try:
                data = json.loads(body)
            except ValueError:
                data = body.decode(errors="replace")
            raise PromptError(f"HTTP {e.code} from {path}: {data}", data) from None

    def object_info(self) -> dict:
        return self.get("/object_info", timeout=60)

    def queue(self, prompt: dict) -> str:
        res = self.post("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})
        if res.get("node_errors"):
            # ComfyUI runs the valid outputs of a partly invalid prompt; a test wants all of it.
            self.wait(res["prompt_id"])
            raise PromptError(f"prompt partly refused: {res['node_errors']}", res["node_errors"])
        return res["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            hist = self.get(f"/history/{prompt_id}")
            if prompt_id in hist:
                entry = hist[prompt_id]
                status = entry.get("status", {})
                if status.get("completed") or status.get("status_str") in ("success", "error"):
                    if status.get("status_str") == "error":
                        msgs = [m for m in status.get("messages", []) if m[0] == "execution_error"]
                        detail = msgs[0][1] if msgs else status
                        raise PromptError(
                            f"prompt failed in {detail.get('node_type', '?')}: {detail.get('exception_message', detail)}",
                            detail)
                    return entry
            if not self.alive():
                raise RuntimeError(f"ComfyUI died while running a prompt:\n{self.log_tail()}")
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout}s")

    def run(self, prompt: dict, timeout: float = 600) -> dict:
        return self.wait(self.queue(prompt), timeout=timeout)

    def run_watched(self, prompt: dict, timeout: float = 600) -> tuple[dict, list[tuple[int, bytes]]]:
        """Run a prompt as an API client does: over ComfyUI's websocket (``/ws?clientId=``, no feature
        flags sent, as comfy-api-simplified and most scripts connect), queued under that client id.

        Returns the history entry and every binary frame the server sent this client while the prompt
        ran, as (event type, payload after the 4-byte type): 1 is a preview image, whose payload is a
        4-byte image type (1 JPEG, 2 PNG) and the encoded picture."""
        import asyncio

        import aiohttp

        client_id = uuid.uuid4().hex
        frames: list[tuple[int, bytes]] = []

        async def watch() -> str:
            async with aiohttp.ClientSession() as session:
                async with session.ws_connect(f"{self.url}/ws?clientId={client_id}", max_msg_size=0) as ws:
                    res = self.post("/prompt", {"prompt": prompt, "client_id": client_id})
                    if res.get("node_errors"):
                        raise PromptError(f"prompt partly refused: {res['node_errors']}", res["node_errors"])
                    prompt_id = res["prompt_id"]
                    async for msg in ws:
                        if msg.type == aiohttp.WSMsgType.BINARY:
                            frames.append((int.from_bytes(msg.data[:4], "big"), bytes(msg.data[4:])))
                        elif msg.type == aiohttp.WSMsgType.TEXT:
                            event = json.loads(msg.data)
                            data = event.get("data") or {}
                            if data.get("prompt_id") != prompt_id:
                                continue
                            if event["type"] == "execution_error" or (
                                    event["type"] == "executing" and data.get("node") is None):
                                return prompt_id
                        else:
                            raise RuntimeError(f"the websocket closed while prompt {prompt_id} ran:\n{self.log_tail()}")
            raise RuntimeError("the websocket closed")

        prompt_id = asyncio.run(asyncio.wait_for(watch(), timeout))
        return self.wait(prompt_id, timeout=60), frames

    def interrupt(self) -> None:
        self.post("/interrupt", {})
