# SPDX-License-Identifier: GPL-3.0-or-later
"""Run a ComfyUI workflow once per row of a table: resumable, and spread over a Ray cluster.

    python3 scripts/batch_render.py WORKFLOW.json TABLE.csv [--out DIR] [--server URL | --ray [ADDRESS]]

* WORKFLOW.json: a workflow as the web UI saves it (or an API-format prompt). It is converted to
  API form against the live server's /object_info.
* TABLE.csv: one row per render. A column ``<node title>.<input>`` sets that input of the node with
  that title (the title shown on the node; ``#<id>.<input>`` names a node by id), e.g.
  ``Target prompt.text``, ``DPM Encode.seed``. An input with an image upload (Load Image's
  ``image``) takes a file path (relative to the table's folder) that is uploaded to the server.
* A row is identified by what it renders: its key hashes the row's cells, the contents of the files
  they name and the workflow (without its canvas layout). An edited row gets a new key and is
  rendered anew; inserting or deleting rows leaves the other rows' results where they are.
* Output: ``DIR/row_0001_<key>/...`` (every image the workflow's output nodes save; the number is the
  row's position when it was rendered), ``DIR/manifest.jsonl`` (one line per render: row, key,
  parameters, the sha256 of the input files and of the workflow, files, score and label of a Rank
  Images by CLIP node, error) and ``DIR/contact_sheet.png`` (the first image of every row of the
  table, with its row number and score).
* Resumable: rows whose key is already in the manifest are skipped (``--retry-errors`` runs failed
  rows again). A row's line is appended in one write after all of its files are in place, so a crash
  mid-row redoes only that row. A bad row (missing file, invalid value, node error) is recorded with
  its error and the run goes on.
* Servers: by default the embedded host (scripts/comfy_host.py build) with this pack, on the CPU
  unless CUDA is there; ``--comfyui PATH`` (or $COMFYUI_PATH) starts that ComfyUI instead;
  ``--server URL`` uses a running one. A server this script starts is dpmtools.server's ComfyServer
  (tools/dpmtools/server.py), which loads this checkout as the pack ``dpm-latent-batch`` and no
  other custom node, and which dies with the process that started it, however that process dies.
* ``--ray [ADDRESS]``: one Ray actor per GPU (``num_gpus=1``; CPU actors where there is no GPU), each
  starting its own ComfyUI (or, with ``--server``, reusing that one). Without an ADDRESS a local Ray
  cluster is started on this machine (``ray.init()``), ``auto`` joins the running cluster. A row whose
  actor or server dies is retried on another actor; ``--actors N`` sets the number of actors.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import mimetypes
import os
import shutil
import signal
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))  # dpmtools (never the repository itself: its nodes/ would shadow ComfyUI's)
import dpmtools  # noqa: E402
from dpmtools import host as comfy_host  # noqa: E402
from dpmtools import workflow as workflow_api  # noqa: E402
from dpmtools.server import ComfyServer  # noqa: E402

MANIFEST = "manifest.jsonl"
# The name this checkout is linked under in the servers this script starts (see dpmtools.server).
PACK_NAME = "dpm-latent-batch"


class RowError(Exception):
    """This row cannot run (bad value, missing file, refused prompt, node error); recorded, run goes on."""


class ServerDown(Exception):
    """The server stopped answering: the row is retried elsewhere."""


# ---------------------------------------------------------------------------- table -> prompts
def read_table(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            raise SystemExit(f"{path}: the table has no header row")
        rows = [{k.strip(): (v if v is not None else "") for k, v in r.items() if k} for r in reader]
    return rows


# ---------------------------------------------------------------------------- what a row renders
# UI-workflow keys that only place things on the canvas: moving a node does not change a render
_LAYOUT_KEYS = {"pos", "size", "flags", "order", "color", "bgcolor", "shape", "selected"}
_LAYOUT_TOP_KEYS = {"extra", "groups", "id", "revision"}


def _sha256(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, ensure_ascii=False,
                                     separators=(",", ":")).encode()).hexdigest()


def workflow_digest(path: Path) -> str:
    """sha256 of the workflow as it renders (a UI workflow without its canvas layout)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SystemExit(f"{path}: cannot read the workflow: {e}") from None
    if isinstance(data, dict) and isinstance(data.get("nodes"), list):
        data = {k: v for k, v in data.items() if k not in _LAYOUT_TOP_KEYS}
        data["nodes"] = [{k: v for k, v in n.items() if k not in _LAYOUT_KEYS} if isinstance(n, dict) else n
                         for n in data["nodes"]]
    return _sha256(data)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def input_files(row: dict, table_dir: Path) -> dict[str, str]:
    """{column: sha256} of the cells that name a file (relative to the table's folder, or absolute):
    a replaced image makes a new render even under the same name."""
    files = {}
    for column, raw in sorted(row.items()):
        if not raw.strip():
            continue
        path = Path(raw) if Path(raw).is_absolute() else table_dir / raw
        try:
            if path.is_file():
                files[column] = _file_sha256(path)
        except (OSError, ValueError):  # a prompt too long or odd to be a file name
            continue
    return files


def row_key(workflow_sha256: str, row: dict, files: dict[str, str]) -> str:
    """What a row renders, as 16 hex digits: the same cells, files and workflow give the same key,
    wherever the row stands in the table."""
    return _sha256({"workflow": workflow_sha256, "params": row, "files": files})[:16]


class Job:
    """One row to render: its position in the table, its key and what the manifest records of it."""

    def __init__(self, row_no: int, row: dict, workflow: Path, workflow_sha256: str, table_dir: Path):
        self.row_no = row_no
        self.row = row
        self.files = input_files(row, table_dir)
        self.key = row_key(workflow_sha256, row, self.files)
        self.meta = {"workflow": str(workflow), "workflow_sha256": workflow_sha256, "input_files": self.files}


def load_workflow(path: Path, object_info: dict) -> dict:
    return workflow_api.load_prompt(path, object_info)  # a UI workflow is converted, an API prompt kept


def node_index(prompt: dict) -> dict[str, list[str]]:
    idx: dict[str, list[str]] = {}
    for nid, node in prompt.items():
        title = (node.get("_meta") or {}).get("title") or node["class_type"]
        idx.setdefault(title, []).append(nid)
        idx.setdefault(f"#{nid}", []).append(nid)
    return idx


def _input_spec(object_info: dict, class_type: str, name: str):
    groups = object_info.get(class_type, {}).get("input", {})
    for g in ("required", "optional"):
        if name in (groups.get(g) or {}):
            return groups[g][name]
    return None


def _convert(value: str, spec, column: str):
    typ = workflow_api._spec_type(spec)
    opts = workflow_api._spec_options(spec)
    try:
        if typ == "INT":
            v = int(float(value)) if value.strip().lower().endswith(".0") else int(value)
        elif typ == "FLOAT":
            v = float(value)
        elif typ == "BOOLEAN":
            low = value.strip().lower()
            if low not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return low in ("true", "1", "yes")
        else:
            v = value
    except ValueError:
        raise RowError(f"{column}: {value!r} is not a valid {typ}") from None
    if typ in ("INT", "FLOAT"):
        lo, hi = opts.get("min"), opts.get("max")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise RowError(f"{column}: {value} is outside [{lo}, {hi}]")
    return v


def is_upload(spec) -> bool:
    opts = workflow_api._spec_options(spec)
    return any(opts.get(f) for f in ("image_upload", "video_upload", "audio_upload"))


def row_prompt(base: dict, object_info: dict, row: dict, table_dir: Path, upload) -> tuple[dict, dict]:
    """(API prompt, parameters) of one row; ``upload(path) -> server file name``."""
    prompt = json.loads(json.dumps(base))
    idx = node_index(prompt)
    params = {}
    for column, raw in row.items():
        if "." not in column:
            raise RowError(f"column {column!r}: name it '<node title>.<input>', e.g. 'DPM Encode.seed'")
        title, name = column.rsplit(".", 1)
        ids = idx.get(title, [])
        if not ids:
            raise RowError(f"column {column!r}: no node titled {title!r} in the workflow "
                           f"(titles: {sorted(t for t in idx if not t.startswith('#'))})")
        if len(ids) > 1:
            raise RowError(f"column {column!r}: {len(ids)} nodes are titled {title!r} ({ids}); "
                           "give them distinct titles or use '#<id>.{name}'")
        node = prompt[ids[0]]
        spec = _input_spec(object_info, node["class_type"], name)
        if spec is None:
            raise RowError(f"column {column!r}: {node['class_type']} has no input {name!r}")
        params[column] = raw
        if is_upload(spec):
            path = Path(raw)
            if not path.is_absolute():
                path = table_dir / path
            if not path.is_file():
                raise RowError(f"column {column!r}: no file {str(path)!r}")
            node["inputs"][name] = upload(path)
        else:
            node["inputs"][name] = _convert(raw, spec, column)
    return prompt, params


# ---------------------------------------------------------------------------- one server
class Client:
    """HTTP client of one ComfyUI server."""

    def __init__(self, url: str, proc_alive=None):
        self.url = url.rstrip("/")
        self.proc_alive = proc_alive or (lambda: True)

    def _open(self, req, timeout=60):
        try:
            return urllib.request.urlopen(req, timeout=timeout)
        except urllib.error.HTTPError:
            raise
        except (urllib.error.URLError, ConnectionError, OSError) as e:
            raise ServerDown(f"{self.url}: {e}") from None

    def get_json(self, path: str, timeout=60):
        with self._open(self.url + path, timeout) as r:
            return json.loads(r.read())

    def get_bytes(self, path: str, timeout=60) -> bytes:
        with self._open(self.url + path, timeout) as r:
            return r.read()

    def post_json(self, path: str, payload):
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with self._open(req) as r:
                body = r.read()
                return json.loads(body) if body else None
        except urllib.error.HTTPError as e:
            body = e.read().decode(errors="replace")
            raise RowError(f"the server refused the prompt: {_short_error(body)}") from None

    def upload(self, path: Path) -> str:
        boundary = uuid.uuid4().hex
        data = path.read_bytes()
        ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"overwrite\"\r\n\r\ntrue\r\n"
                f"--{boundary}\r\nContent-Disposition: form-data; name=\"subfolder\"\r\n\r\nbatch_render\r\n"
                f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{path.name}\"\r\n"
                f"Content-Type: {ctype}\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
        req = urllib.request.Request(self.url + "/upload/image", data=body,
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        try:
            with self._open(req) as r:
                res = json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise RowError(f"upload of {path.name} refused: HTTP {e.code}") from None
        return f"{res['subfolder']}/{res['name']}" if res.get("subfolder") else res["name"]

    def run(self, prompt: dict, timeout: float = 3600) -> dict:
        res = self.post_json("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})
        pid = res["prompt_id"]
        if res.get("node_errors"):
            self._wait(pid, timeout)
            raise RowError(f"invalid inputs: {_short_error(res['node_errors'])}")
        return self._wait(pid, timeout)

    def _wait(self, pid: str, timeout: float) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if not self.proc_alive():
                raise ServerDown(f"{self.url}: the server process exited")
            hist = self.get_json(f"/history/{pid}")
            entry = hist.get(pid)
            status = (entry or {}).get("status", {})
            if entry and (status.get("completed") or status.get("status_str") in ("success", "error")):
                if status.get("status_str") == "error":
                    msgs = [m[1] for m in status.get("messages", []) if m[0] == "execution_error"]
                    d = msgs[0] if msgs else {}
                    raise RowError(f"{d.get('node_type', 'a node')} failed: {d.get('exception_message', status)}".strip())
                return entry
            time.sleep(0.1)
        raise RowError(f"the prompt did not finish in {timeout} s")


def _short_error(body, limit: int = 600) -> str:
    text = body if isinstance(body, str) else json.dumps(body)
    return text if len(text) <= limit else text[:limit] + "..."


def render_row(client: Client, base: dict, object_info: dict, row_no: int, row: dict, table_dir: Path) -> dict:
    """Run one row on one server. Returns {row, params, images: [(name, bytes)], score, label, error}.
    Raises ServerDown when the server is gone (the row must run elsewhere)."""
    result = {"row": row_no, "params": dict(row), "images": [], "error": None}
    try:
        prompt, result["params"] = row_prompt(base, object_info, row, table_dir, client.upload)
        entry = client.run(prompt)
        for nid in sorted(entry.get("outputs", {}), key=lambda k: (len(k), k)):
            out = entry["outputs"][nid]
            for rank in out.get("dpm_rank") or []:
                result["score"], result["label"] = rank.get("best_score"), rank.get("best_label")
            for k, f in enumerate(out.get("images") or []):
                if f.get("type", "output") != "output":
                    continue
                q = urllib.parse.urlencode({"filename": f["filename"], "subfolder": f.get("subfolder", ""),
                                            "type": "output"})
                ext = os.path.splitext(f["filename"])[1] or ".png"
                result["images"].append((f"node{nid}_{k:03d}{ext}", client.get_bytes(f"/view?{q}")))
    except RowError as e:
        result["error"] = str(e)
        result["images"] = []
    return result


# ---------------------------------------------------------------------------- output folder
class Output:
    """The output folder: one sub-folder per row and the manifest (the single writer)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / MANIFEST
        self.lock = threading.Lock()
        self._repair()

    def _repair(self) -> None:
        """Drop a torn last line (a crash in the middle of an append)."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            with open(self.path, "r+b") as f:
                f.truncate(cut)

    def entries(self) -> dict[str, dict]:
        """{key: the latest manifest line of that key}. Lines without a key (written before rows had
        keys) identify nothing: those rows are rendered again."""
        done = {}
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    e = json.loads(line)
                except ValueError:
                    continue
                if isinstance(e, dict) and e.get("key"):
                    done[e["key"]] = e
        return done

    def row_dir(self, row_no: int, key: str) -> Path:
        return self.folder / f"row_{row_no:04d}_{key}"

    def commit(self, result: dict, job: Job) -> dict:
        """Write the row's files, then its manifest line in one append."""
        with self.lock:
            d = self.row_dir(job.row_no, job.key)
            if d.exists():
                shutil.rmtree(d)  # what a crashed earlier attempt left
            files = []
            if result["images"]:
                tmp = d.with_name(d.name + ".partial")
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
                for name, data in result["images"]:
                    (tmp / name).write_bytes(data)
                    files.append(f"{d.name}/{name}")
                os.replace(tmp, d)
            entry = {"row": job.row_no, "key": job.key, "params": result["params"], **job.meta, "files": files,
                     "score": result.get("score"), "label": result.get("label"), "error": result["error"],
                     "finished": round(time.time(), 3)}
            line = (json.dumps(entry, ensure_ascii=False) + "\n").encode()
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
            return entry

    def contact_sheet(self, jobs: list[Job], cell: int = 160, cols: int = 6) -> Path | None:
        """The first image of every row of the table (in table order) that has one."""
        from PIL import Image, ImageDraw

        done = self.entries()
        entries = [(j.row_no, done[j.key]) for j in jobs if done.get(j.key, {}).get("files")]
        if not entries:
            return None
        rows = (len(entries) + cols - 1) // cols
        cols = min(cols, len(entries))
        sheet = Image.new("RGB", (cols * cell, rows * (cell + 18)), (24, 24, 24))
        draw = ImageDraw.Draw(sheet)
        for i, (row_no, e) in enumerate(entries):
            with Image.open(self.folder / e["files"][0]) as im:
                im = im.convert("RGB")
                im.thumbnail((cell, cell))
                r, c = divmod(i, cols)
                x, y = c * cell, r * (cell + 18)
                sheet.paste(im, (x + (cell - im.width) // 2, y + (cell - im.height) // 2))
            cap = f"row {row_no}" + (f"  {e['score']:.4f}" if isinstance(e.get("score"), (int, float)) else "")
            draw.text((x + 4, y + cell + 3), cap, fill=(235, 235, 235))
        path = self.folder / "contact_sheet.png"
        sheet.save(path)
        return path


# ---------------------------------------------------------------------------- servers
def host_comfy(comfyui: str | None) -> tuple[Path, str]:
    """(ComfyUI folder, python) of the server to start."""
    path = comfyui or os.environ.get("COMFYUI_PATH")
    if path:
        return Path(path), sys.executable
    comfy, python = comfy_host.build()
    return comfy, str(python)


def start_server(comfy: Path, python: str, workdir: Path, models: str | None, cpu: bool | None = None,
                 threads: int | None = None):
    """A ComfyUI server with this pack (the product's render server), in its own work folder; returns the
    started dpmtools.server.ComfyServer."""
    model_dirs = {}
    if models:
        for sub in Path(models).resolve().iterdir():
            if sub.is_dir():
                model_dirs[sub.name] = sub
    if cpu is None:
        cpu = not _cuda()
    if cpu and threads and "OMP_NUM_THREADS" not in os.environ:
        # CPU servers sharing a machine: torch's thread pools fighting each other cost far more
        # than they give (measured up to 20x slower in the tests), so split the cores between them
        os.environ["OMP_NUM_THREADS"] = str(threads)
    srv = ComfyServer(comfy, workdir, python=python, model_dirs=model_dirs, cpu=cpu, pack_name=PACK_NAME)
    return srv.start()


def _cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def _progress(total: int, initial: int = 0):
    try:
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, unit="row", dynamic_ncols=True)
    except ImportError:
        class Bar:
            n = 0

            def update(self, k=1):
                self.n += k
                print(f"{self.n}/{total} rows", file=sys.stderr, flush=True)

            def set_postfix_str(self, s):
                pass

            def close(self):
                pass

        return Bar()


# ---------------------------------------------------------------------------- runs
def run_local(args, jobs: list[Job], out: Output, table_dir: Path) -> None:
    srv = None
    if args.server:
        client = Client(args.server)
    else:
        comfy, python = host_comfy(args.comfyui)
        srv = start_server(comfy, python, out.folder / ".server" / "0", args.models, threads=os.cpu_count() or 1)
        client = Client(srv.url, srv.alive)
    try:
        object_info = client.get_json("/object_info", timeout=120)
        base = load_workflow(args.workflow, object_info)
        bar = _progress(len(jobs))
        for job in jobs:
            res = render_row(client, base, object_info, job.row_no, job.row, table_dir)
            entry = out.commit(res, job)
            bar.update(1)
            if entry["error"]:
                bar.set_postfix_str(f"row {job.row_no}: error")
        bar.close()
    finally:
        if srv is not None:
            srv.stop()


class Worker:
    """The body of a Ray actor: its own ComfyUI server (or a shared URL) and the workflow."""

    def __init__(self, index: int, workflow: str, table_dir: str, out_dir: str, server: str | None,
                 comfyui: str | None, models: str | None, use_gpu: bool, threads: int = 1):
        self.index = index
        self.srv = None
        if server:
            self.client = Client(server)
        else:
            comfy, python = host_comfy(comfyui)
            workdir = Path(out_dir) / ".server" / f"actor{index}_{uuid.uuid4().hex[:6]}"
            self.srv = start_server(comfy, python, workdir, models, cpu=not use_gpu, threads=threads)
            (Path(out_dir) / ".server" / f"actor{index}.pid").write_text(str(self.srv.proc.pid))
            self.client = Client(self.srv.url, self.srv.alive)
        self.object_info = self.client.get_json("/object_info", timeout=120)
        self.base = load_workflow(Path(workflow), self.object_info)
        self.table_dir = Path(table_dir)

    def ready(self) -> int:
        return self.index

    def render(self, row_no: int, row: dict) -> dict:
        return render_row(self.client, self.base, self.object_info, row_no, row, self.table_dir)

    def stop(self) -> None:
        if self.srv is not None:
            self.srv.stop()


def run_ray(args, jobs: list[Job], out: Output, table_dir: Path) -> None:
    import ray
    from ray import cloudpickle

    # the actors run this file's Worker and the dpmtools it calls: ship both by value (neither is importable
    # in an actor, whose sys.path has this script's folder and the working directory, not tools/)
    if Worker.__module__ != "__main__":
        cloudpickle.register_pickle_by_value(sys.modules[Worker.__module__])
    cloudpickle.register_pickle_by_value(dpmtools)
    if args.ray in ("", "local"):
        ray.init(num_cpus=args.ray_cpus, include_dashboard=False,
                 object_store_memory=args.object_store_mb * 1024 ** 2 if args.object_store_mb else None,
                 logging_level="warning", log_to_driver=False)
    else:
        ray.init(address=args.ray, logging_level="warning", log_to_driver=False)
    try:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        n = args.actors or max(1, gpus or int(ray.cluster_resources().get("CPU", 1)) // 2)
        opts = {"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": 1}
        Actor = ray.remote(max_restarts=0, max_task_retries=0)(Worker).options(**opts)

        def spawn(i):
            return Actor.remote(i, str(Path(args.workflow).resolve()), str(table_dir), str(out.folder.resolve()),
                                args.server, args.comfyui, args.models, bool(gpus),
                                max(1, int(ray.cluster_resources().get("CPU", 1)) // n))

        actors = {i: spawn(i) for i in range(n)}
        ready = {}
        for i, a in list(actors.items()):
            try:
                ray.get(a.ready.remote())
                ready[i] = a
            except Exception as e:  # noqa: BLE001  (an actor that cannot start its server)
                print(f"actor {i} failed to start: {e}", file=sys.stderr)
        if not ready:
            raise SystemExit("no Ray actor could start a ComfyUI server")
        todo = list(jobs)
        attempts: dict[str, int] = {}
        bar = _progress(len(todo))
        running = {}  # object ref -> (actor index, job)
        idle = list(ready)

        def submit():
            while todo and idle:
                i = idle.pop(0)
                job = todo.pop(0)
                running[ready[i].render.remote(job.row_no, job.row)] = (i, job)

        submit()
        while running:
            done, _ = ray.wait(list(running), num_returns=1)
            ref = done[0]
            i, job = running.pop(ref)
            try:
                res = ray.get(ref)
            except Exception as e:  # noqa: BLE001  the actor or its server died: retry elsewhere
                attempts[job.key] = attempts.get(job.key, 0) + 1
                print(f"\nactor {i} lost ({type(e).__name__}); row {job.row_no} goes to another actor",
                      file=sys.stderr, flush=True)
                try:
                    ray.kill(ready.pop(i))
                except Exception:  # noqa: BLE001
                    pass
                if attempts[job.key] > args.max_retries or not ready:
                    out.commit({"row": job.row_no, "params": job.row, "images": [],
                                "error": f"lost with its worker {attempts[job.key]} times: {type(e).__name__}: {e}"},
                               job)
                    bar.update(1)
                else:
                    todo.insert(0, job)
                if not ready and todo:
                    raise SystemExit("every Ray actor died; run again to resume")
                submit()
                continue
            out.commit(res, job)
            bar.update(1)
            idle.append(i)
            submit()
        bar.close()
        for a in ready.values():
            try:
                ray.get(a.stop.remote(), timeout=60)
            except Exception:  # noqa: BLE001
                pass
    finally:
        ray.shutdown()


def _reexec_in_host(argv) -> None:
    """Without --comfyui/COMFYUI_PATH the embedded host runs the servers: run this script with the
    host's Python too (it has Pillow, tqdm and Ray), building the host if needed."""
    if os.environ.get("DPM_LATENT_BATCH_IN_HOST") == "1":
        return
    _comfy, python = comfy_host.build()
    if Path(sys.prefix).resolve() == Path(python).parent.parent.resolve():  # already the host's venv
        return
    env = dict(os.environ, DPM_LATENT_BATCH_IN_HOST="1")
    os.execve(str(python), [str(python), str(Path(__file__).resolve()), *argv], env)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workflow", type=Path, help="workflow JSON (UI format as saved by ComfyUI, or API format)")
    ap.add_argument("table", type=Path, help="CSV table: one row per render, columns '<node title>.<input>'")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: <table>_renders)")
    ap.add_argument("--server", default=None, help="use this running ComfyUI (e.g. http://127.0.0.1:8188)")
    ap.add_argument("--comfyui", default=None, help="start this ComfyUI folder (default $COMFYUI_PATH, else the "
                                                     "embedded host)")
    ap.add_argument("--models", default=None, help="a models folder (checkpoints/, clip_energy/, ...) for the "
                                                   "servers this script starts")
    ap.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                    help="spread rows over Ray: no ADDRESS starts a local cluster, 'auto' joins a running one")
    ap.add_argument("--actors", type=int, default=0, help="Ray actors (default: one per GPU, else CPUs/2)")
    ap.add_argument("--ray-cpus", type=int, default=None, help="CPUs of a local Ray cluster")
    ap.add_argument("--object-store-mb", type=int, default=0, help="object store of a local Ray cluster (MB)")
    ap.add_argument("--max-retries", type=int, default=2, help="times a row is retried after its worker died")
    ap.add_argument("--retry-errors", action="store_true", help="run rows again that the manifest records as failed")
    args = ap.parse_args(argv)
    if threading.current_thread() is not threading.main_thread():
        return _run(args, argv)
    old = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # SIGTERM stops the servers we started
    try:
        return _run(args, argv)
    finally:
        signal.signal(signal.SIGTERM, old)


def _run(args, argv) -> int:
    if __name__ == "__main__" and not args.comfyui and not os.environ.get("COMFYUI_PATH"):
        _reexec_in_host(sys.argv[1:] if argv is None else list(argv))

    _absolute_paths(args)
    table = read_table(args.table)
    table_dir = args.table.parent
    wf_sha = workflow_digest(args.workflow)
    jobs = [Job(k, row, args.workflow, wf_sha, table_dir) for k, row in enumerate(table, start=1)]
    out = Output(args.out or args.table.with_name(args.table.stem + "_renders"))
    done = out.entries()
    todo: dict[str, Job] = {}  # one render per key (identical rows render the same image)
    for job in jobs:
        prev = done.get(job.key)
        if (prev is None or (args.retry_errors and prev.get("error"))) and job.key not in todo:
            todo[job.key] = job
    print(f"{len(table)} rows, {sum(1 for j in jobs if j.key in done)} already rendered in {out.path}, "
          f"{len(todo)} to render", file=sys.stderr, flush=True)
    if todo:
        if args.ray is not None:
            run_ray(args, list(todo.values()), out, table_dir)
        else:
            run_local(args, list(todo.values()), out, table_dir)
    sheet = out.contact_sheet(jobs)
    done = out.entries()
    rendered = [done[j.key] for j in jobs if j.key in done]
    errors = sum(1 for e in rendered if e.get("error"))
    print(f"done: {len(rendered)} of {len(jobs)} rows in {out.path} ({errors} with errors)"
          + (f"; contact sheet {sheet}" if sheet else ""), file=sys.stderr, flush=True)
    return 0


def _absolute_paths(args) -> None:
    """Every path argument made absolute against the working directory here: the servers run in
    ComfyUI's folder and Ray actors wherever Ray puts them, where a relative path means something else."""
    for name in ("workflow", "table", "out", "comfyui", "models"):
        value = getattr(args, name)
        if value is not None and str(value) != "":
            setattr(args, name, type(value)(Path(value).expanduser().resolve()))
    if not args.workflow.is_file():
        raise SystemExit(f"workflow {args.workflow}: no such file")
    if not args.table.is_file():
        raise SystemExit(f"table {args.table}: no such file")
    if args.models is not None and not Path(args.models).is_dir():
        raise SystemExit(f"--models {args.models}: no such folder (give the folder that holds checkpoints/, "
                         "clip_energy/, ...; e.g. demo/models)")
    if args.comfyui is not None and not (Path(args.comfyui) / "main.py").is_file():
        raise SystemExit(f"--comfyui {args.comfyui}: no ComfyUI there (no main.py)")


if __name__ == "__main__":
    sys.exit(main())
