"""A restoration page: `python -m minirestore.demo`, then open the address it prints (127.0.0.1 only).

Drop or pick an image, tick one or more degradations (a mix averages their prompts' velocities, as
sample.py does), choose T0 (auto: from the input's estimated strength, for prompts with a T0 curve) and
the sampler steps, watch the progress, compare input and output side by side and with a before/after
slider, download the result. The default backbone is the tiny one, so it runs on a laptop's CPU;
--model takes what sample.py takes.

A standard-library server (http.server) and one HTML file (demo.html), no Gradio: see the README.
    GET  /                  the page
    GET  /api/info          backbone, degradations (their T0, whether they can pick T0 themselves), limits
    POST /api/restore?degradations=noise,blur&t0=auto&steps=20   body: the image file -> {"job": id}
    GET  /api/job/<id>      {"state": "running" | "done" | "error", "progress": 0..1, "message", "note"}
    GET  /api/input/<id>, /api/result/<id>    the input and the restored image as PNG
A bad upload (not an image, too many bytes or pixels, an unknown degradation) is answered 400 or 413 with
a one-line message that the page shows; the server goes on serving.
"""
import argparse
import io
import json
import tempfile
import threading
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import torch

from . import UserError
from .cli import Help, run
from .data import frame_count, load_image, to_pil
from .restore import at_input, bridge_for, load_prompts, restore, sampler_defaults, tile_for, tile_starts

ROOT = Path(__file__).resolve().parents[1]
PAGE = Path(__file__).with_name("demo.html")
KEEP_JOBS = 16  # finished jobs whose images stay in memory


def available_prompts(name, extra=()):
    """degradation -> prompt file: the shipped weights/<model>/prompts/*, your weights/<model>-*.safetensors
    (preferred, as in sample.py), then each --prompt file under its stored degradation."""
    from .prompts import load_prompt

    found = {f.stem: f for f in sorted((ROOT / "weights" / name / "prompts").glob("*.safetensors"))}
    found.update({f.stem[len(name) + 1:]: f for f in sorted(Path("weights").glob(f"{name}-*.safetensors"))})
    for f in map(Path, extra):
        found[load_prompt(f).meta.get("degradation", f.stem)] = f
    if not found:
        raise UserError(f"no prompts for {name}: train one (python train.py --model {name} ...) or pass --prompt")
    return found


class Counting:
    """The backbone, counting its velocity calls: the page's progress bar."""

    def __init__(self, backbone, tick):
        self._backbone, self._tick = backbone, tick

    def __getattr__(self, name):
        return getattr(self._backbone, name)

    def velocity(self, *args, **kwargs):
        self._tick()
        return self._backbone.velocity(*args, **kwargs)


class Restorer:
    """Holds the backbone and its prompts; runs one restoration at a time, each in its own thread."""

    def __init__(self, model="tiny", device="cpu", dtype=torch.float32, prompts=(), max_size=1024,
                 max_bytes=20_000_000, seed=0):
        from .backbone import load_backbone

        self.backbone = load_backbone(model, device, dtype)
        self.steps, self.samples, self.spin = sampler_defaults(self.backbone.name)  # sample.py's sampler
        self.files = available_prompts(self.backbone.name, prompts)
        self.prepared = {}  # degradation set -> (prompts, bridge, auto)
        self.max_size, self.max_bytes, self.seed = max_size, max_bytes, seed
        self.jobs, self.lock, self.run_lock = {}, threading.Lock(), threading.Lock()
        self.tile = tile_for(self.backbone.name)  # as sample.py tiles

    def info(self):
        from .prompts import load_prompt

        degs = []
        for name, f in self.files.items():
            meta = load_prompt(f).meta
            degs.append({"name": name, "T0": float(meta.get("T0", 0.4)), "auto": "T0_curve" in meta})
        return {"model": self.backbone.name, "degradations": degs, "max_size": self.max_size,
                "max_bytes": self.max_bytes, "default_steps": self.steps}

    def submit(self, data, degradations, t0, steps):
        """Check an upload and start restoring it -> job id. UserError (the page's message) when it is bad."""
        if not data:
            raise UserError("no file was sent: drop or pick an image")
        if len(data) > self.max_bytes:
            raise UserError(f"the file is {len(data) / 1e6:.1f} MB, more than this page takes "
                            f"({self.max_bytes / 1e6:.0f} MB; start it with a larger --max-bytes)")
        unknown = [d for d in degradations if d not in self.files]
        if not degradations or unknown:
            raise UserError(f"choose degradations among {', '.join(self.files)}"
                            + (f" ({', '.join(unknown)} is not one)" if unknown else ""))
        if not 1 <= steps <= 200:
            raise UserError("steps must be between 1 and 200")
        if t0 != "auto" and not 0 < t0 <= 1:
            raise UserError("T0 must be in (0, 1]")
        with tempfile.NamedTemporaryFile(suffix=".upload") as f:
            f.write(data)
            f.flush()
            try:
                x, info = load_image(f.name)
                frames = frame_count(f.name)
            except UserError:
                raise UserError("that file is not a readable image: drop a PNG, JPEG, WebP, TIFF, BMP or GIF") from None
        note = (f"an animated image of {frames} frames: only its first frame is restored here "
                "(python sample.py restores every frame)") if frames > 1 else ""
        if max(x.shape[-2:]) > self.max_size:
            raise UserError(f"the image is {x.shape[-1]}x{x.shape[-2]}, larger than this page takes "
                            f"({self.max_size} px a side; start it with a larger --max-size)")
        job = uuid.uuid4().hex[:12]
        with self.lock:
            self.jobs[job] = {"state": "running", "progress": 0.0, "message": "", "note": note, "calls": 0,
                              "input": png(x, info), "result": None, "size": list(info["size"])}
            for old in [k for k, j in self.jobs.items() if j["state"] != "running"][:-KEEP_JOBS]:
                del self.jobs[old]
        threading.Thread(target=self._run, args=(job, x, info, tuple(degradations), t0, steps), daemon=True).start()
        return job

    def _run(self, job, x, info, degradations, t0, steps):
        state = self.jobs[job]
        try:
            with self.run_lock:  # one at a time: the backbone is shared
                if (degradations, t0) not in self.prepared:
                    files = [self.files[d] for d in degradations]
                    prompts = load_prompts(self.backbone, files)
                    self.prepared[degradations, t0] = (prompts, *bridge_for(prompts, t0, files[0]))
                prompts, bridge, auto = self.prepared[degradations, t0]
                bridge, note = at_input(bridge, auto, prompts[0].meta, x)
                total = steps * self.samples * len(prompts) * self._batches(x)

                def tick():
                    state["calls"] += 1
                    state["progress"] = min(0.99, state["calls"] / total)

                with torch.no_grad():
                    out = restore(Counting(self.backbone, tick), prompts, bridge, x, steps, self.seed,
                                  tile=self.tile, samples=self.samples, spin=self.spin)
            state.update(result=png(out, info), progress=1.0, state="done",
                         note="; ".join(n for n in (state["note"], note) if n))
        except UserError as e:
            state.update(state="error", message=str(e))
        except Exception as e:  # keep serving; say what happened in one line
            state.update(state="error", message=f"restoration failed ({type(e).__name__}: {e})")

    def _batches(self, x):
        """How many sampler runs restore() makes for x: one, or one per batch of tiles."""
        if not self.tile:
            return 1
        m = self.backbone.multiple
        H, W = (s + (-s) % m for s in x.shape[-2:])
        th, tw = min(self.tile, H), min(self.tile, W)
        n = len(tile_starts(H, th, 16)) * len(tile_starts(W, tw, 16))
        return -(-n // 32)


def png(x, info):
    """A tensor [3, H, W] -> PNG bytes in the input's mode (PNG's nearest: CMYK becomes RGB, as data.py says)."""
    from .data import FALLBACK

    mode = info.get("mode", "RGB")
    buf = io.BytesIO()
    to_pil(x, info, FALLBACK["PNG"].get(mode, mode)).save(buf, format="PNG")
    return buf.getvalue()


def handler(restorer):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt, *args):  # quiet: one line per restoration is printed instead
            pass

        def send(self, status, body, kind="application/json"):
            if isinstance(body, (dict, list)):
                body = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            path = urlparse(self.path).path
            parts = path.strip("/").split("/")
            if path in ("/", "/index.html"):
                return self.send(HTTPStatus.OK, PAGE.read_bytes(), "text/html; charset=utf-8")
            if path == "/api/info":
                return self.send(HTTPStatus.OK, restorer.info())
            job = restorer.jobs.get(parts[-1]) if len(parts) == 3 and parts[0] == "api" else None
            if job is None:
                return self.send(HTTPStatus.NOT_FOUND, {"message": f"no such page or job: {path}"})
            if parts[1] == "job":
                return self.send(HTTPStatus.OK, {k: job[k] for k in ("state", "progress", "message", "note", "size")})
            if parts[1] in ("input", "result") and job[parts[1]] is not None:
                return self.send(HTTPStatus.OK, job[parts[1]], "image/png")
            return self.send(HTTPStatus.NOT_FOUND, {"message": "not there (yet)"})

        def do_POST(self):
            url = urlparse(self.path)
            if url.path != "/api/restore":
                return self.send(HTTPStatus.NOT_FOUND, {"message": f"no such endpoint: {url.path}"})
            length = int(self.headers.get("Content-Length") or 0)
            if length > restorer.max_bytes:  # refuse before reading it all
                self.close_connection = True
                return self.send(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {
                    "message": f"the file is {length / 1e6:.1f} MB, more than this page takes "
                               f"({restorer.max_bytes / 1e6:.0f} MB; start it with a larger --max-bytes)"})
            data = self.rfile.read(length)
            q = {k: v[-1] for k, v in parse_qs(url.query).items()}
            try:
                degradations = [d for d in q.get("degradations", "").split(",") if d]
                t0 = q.get("t0", "auto")
                t0 = t0 if t0 == "auto" else float(t0)
                steps = int(q.get("steps", "20"))
            except ValueError:
                return self.send(HTTPStatus.BAD_REQUEST, {"message": "t0 is a number or auto, steps a whole number"})
            try:
                job = restorer.submit(data, degradations, t0, steps)
            except UserError as e:
                return self.send(HTTPStatus.BAD_REQUEST, {"message": str(e)})
            print(f"restoring {len(data)} bytes with {'+'.join(degradations)}, T0 {t0}, {steps} steps (job {job})",
                  flush=True)
            return self.send(HTTPStatus.OK, {"job": job})

    return Handler


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=Help)
    p.add_argument("--model", default="tiny", help="backbone: tiny (shipped), flux-dev, flux-schnell, "
                   "wan2.1-t2v-1.3b, wan2.1-t2v-14b, or a backbone folder (as in sample.py)")
    p.add_argument("--prompt", action="append", default=[], help="another prompt file to offer (repeatable)")
    p.add_argument("--port", type=int, default=7860, help="port on 127.0.0.1 (0: any free one)")
    p.add_argument("--max-size", type=int, default=1024, help="refuse images whose longer side is larger")
    p.add_argument("--max-bytes", type=int, default=20_000_000, help="refuse uploads larger than this")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="weights' dtype (default: bf16 on CUDA, fp32 on CPU)")
    args = p.parse_args(argv)
    if not 0 <= args.port < 65536:
        raise UserError(f"--port {args.port}: give 0 (any free port) to 65535")
    if args.max_size < 1 or args.max_bytes < 1:
        raise UserError("--max-size and --max-bytes must be at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")]
    restorer = Restorer(args.model, args.device, dtype, args.prompt, args.max_size, args.max_bytes)
    try:
        server = ThreadingHTTPServer(("127.0.0.1", args.port), handler(restorer))
    except OSError as e:
        raise UserError(f"cannot serve on 127.0.0.1:{args.port} ({e.strerror}): pass another --port") from None
    print(f"restoration page for {restorer.backbone.name} ({', '.join(restorer.files)}): "
          f"http://127.0.0.1:{server.server_address[1]}/  (Ctrl-C stops it)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    run(main)
