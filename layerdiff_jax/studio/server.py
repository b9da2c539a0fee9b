"""The studio's HTTP server: the page, and a JSON API over one loaded LayerDiff model.

    GET  /                                        the page (static/index.html, its script and style)
    GET  /api/info                                the model: layers, size, sampling defaults
    POST /api/split        {"prompt"}             a global prompt split into background and layer prompts
    POST /api/generate     {"prompt", "background_prompt", "layer_prompts", "seed", "steps", "guidance",
                            "candidates"}         -> a job whose result is one document per candidate
    GET  /api/jobs/<id>                           a job's state, queue position, result or one-line error
    GET  /api/documents/<id>                      a document's current version
    GET  /api/documents/<id>/v/<n>/<image>.png    composite.png, layer_NN.png (RGBA), mask_NN.png
    POST /api/documents/<id>/layers/<i>/regenerate {"prompt", "seed", ...}   layer inpainting -> a job
    POST /api/documents/<id>/layers/<i>/restyle    {"style", "strength", "seed", ...}   style transfer -> a job
    POST /api/documents/<id>/undo | /redo
    GET  /api/documents/<id>/export/<ora|psd|zip>
    POST /api/open?name=<file name>               the file's bytes as the body -> a document

Requests are checked when they arrive (prompts, layer counts, settings, prompt lengths), so a bad one is an
HTTP 400 with one line at once; model work runs in the job queue. The server writes only under its session
folder; uploads are read in memory with size limits (`sampling/layered_files.py`).
"""

from __future__ import annotations

import http.server
import json
import logging
import re
import threading
import urllib.parse
from pathlib import Path
from typing import Any

from layerdiff_jax.data.layers import DataError
from layerdiff_jax.diffusion.settings import BACKGROUND_PROMPT, DEFAULT_STRENGTH, RequestError, check_prompt, check_sampling_settings
from layerdiff_jax.sampling.editing import inpaint_layer, restyle_layer
from layerdiff_jax.sampling.layered_files import export_bytes, read_layered_bytes
from layerdiff_jax.data.prompt_split import PromptSplitError, split_prompt
from layerdiff_jax.sampling.sampler import LayerDiffPipeline, LayerRequest
from layerdiff_jax.studio.documents import DocumentError, DocumentStore, version_image
from layerdiff_jax.studio.jobs import JobQueue

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
MAX_CANDIDATES = 8  # one batch: candidates are sampled together
MAX_BODY = 64 * 2**20  # an upload or a JSON request
_STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}


class BadRequest(ValueError):
    """A request the studio cannot serve, in one line (HTTP 400)."""


def _field(body: dict, name: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    """`body[name]` (or `default`) checked to be of `kind`; JSON's true and false are not numbers here."""
    value = body.get(name, default)
    if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
        kinds = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise BadRequest(f"{name} must be a {kinds}, got {value!r}")
    return value


class Studio:
    """The model, the documents and the job queue behind the API."""

    def __init__(self, pipe: LayerDiffPipeline, session: Path):
        self.pipe = pipe
        self.documents = DocumentStore(session)
        self.jobs = JobQueue(expected=(RequestError, DataError, DocumentError, PromptSplitError, BadRequest))

    # ------------------------------------------------------------------ checks made when a request arrives

    def _settings(self, body: dict) -> tuple[int, float, int]:
        steps, guidance, _ = self.pipe.sampling.choose(_field(body, "steps", int), _field(body, "guidance", (int, float)))
        seed = _field(body, "seed", int, 0)
        check_sampling_settings(steps=steps, guidance=guidance, seed=seed, num_train_timesteps=self.pipe.scheduler.num_train_timesteps)
        return steps, float(guidance), seed

    def _check_length(self, *prompts: str) -> None:
        limit = self.pipe.tokenizer.max_length
        for prompt in prompts:
            n = self.pipe.tokenizer.count(prompt)
            if n > limit:
                raise BadRequest(f"the prompt {prompt[:40]!r}... is {n} tokens; the model reads at most {limit}")

    def info(self) -> dict:
        sampling = self.pipe.sampling
        return {
            "checkpoint": self.pipe.checkpoint,
            "max_layers": self.pipe.max_layers,
            "size": list(self.pipe.default_size),
            "steps": sampling.steps,
            "guidance": sampling.guidance,
            "settings_from": sampling.source,
            "max_candidates": MAX_CANDIDATES,
        }

    def split(self, body: dict) -> dict:
        prompt = _field(body, "prompt", str, "")
        check_prompt("prompt", prompt)
        split = split_prompt(prompt, max_layers=self.pipe.max_layers)
        return {"global_prompt": split.global_prompt, "background_prompt": split.background_prompt, "layer_prompts": list(split.layer_prompts)}

    # ------------------------------------------------------------------ requests that become jobs

    def generate(self, body: dict) -> dict:
        prompt = _field(body, "prompt", str, "")
        layer_prompts = _field(body, "layer_prompts", list, [])
        background = _field(body, "background_prompt", str)
        if not layer_prompts:  # a global prompt alone: its automatic split
            split = self.split({"prompt": prompt})
            layer_prompts, background = split["layer_prompts"], background or split["background_prompt"]
        candidates = _field(body, "candidates", int, 1)
        if not 1 <= candidates <= MAX_CANDIDATES:
            raise BadRequest(f"candidates must be in [1, {MAX_CANDIDATES}], got {candidates}")
        steps, guidance, seed = self._settings(body)
        request = LayerRequest(prompt, layer_prompts, background or BACKGROUND_PROMPT, num_samples=candidates, seed=seed)
        self.pipe.check_requests([request])
        self._check_length(request.prompt, *request.all_layer_prompts)

        def run() -> dict:
            samples = self.pipe.generate([request], steps=steps, guidance=guidance, batch_size=candidates, progress=False)
            return {"documents": [self.documents.create(s, "generated").describe() for s in samples]}

        return {"job": self.jobs.submit("generate", run).id}

    def edit(self, doc_id: str, layer: int, kind: str, body: dict) -> dict:
        document = self.documents.get(doc_id)
        if not 0 <= layer < document.sample.num_layers:
            raise BadRequest(f"{doc_id} has layers 0 (background) to {document.sample.num_layers - 1}, not {layer}")
        steps, guidance, seed = self._settings(body)
        settings = dict(steps=steps, guidance=guidance, seed=seed)
        if kind == "regenerate":
            prompt = _field(body, "prompt", str) or document.sample.layer_prompts[layer]
            check_prompt("prompt", prompt)
            self._check_length(prompt)
            edit = lambda sample: inpaint_layer(self.pipe, sample, layer, prompt, **settings)  # noqa: E731
        else:
            style = _field(body, "style", str, "")
            strength = _field(body, "strength", (int, float), DEFAULT_STRENGTH)
            check_prompt("style", style)
            check_sampling_settings(steps=steps, strength=strength)
            edit = lambda sample: restyle_layer(self.pipe, sample, layer, style, strength=strength, **settings)  # noqa: E731

        def run() -> dict:
            document.push(edit(document.sample))  # the version current when the job runs
            return {"documents": [document.describe()]}

        return {"job": self.jobs.submit(kind, run).id}

    # ------------------------------------------------------------------ documents

    def move(self, doc_id: str, step: int) -> dict:
        document = self.documents.get(doc_id)
        document.move(step)
        return document.describe()

    def open(self, data: bytes, name: str) -> dict:
        sample = read_layered_bytes(data, name, max_layers=self.pipe.max_layers)
        return self.documents.create(sample, name).describe()


# ---------------------------------------------------------------------------------------------- HTTP

_ROUTES: list[tuple[str, re.Pattern, str]] = [
    (method, re.compile(pattern + r"\Z"), handler)
    for method, pattern, handler in [
        ("GET", r"/", "page"),
        ("GET", r"/static/(?P<name>[\w.-]+)", "static"),
        ("GET", r"/api/info", "info"),
        ("POST", r"/api/split", "split"),
        ("POST", r"/api/generate", "generate"),
        ("GET", r"/api/jobs/(?P<job>\w+)", "job"),
        ("GET", r"/api/documents/(?P<doc>\w+)", "document"),
        ("GET", r"/api/documents/(?P<doc>\w+)/v/(?P<version>\d+)/(?P<image>[\w.]+\.png)", "image"),
        ("POST", r"/api/documents/(?P<doc>\w+)/layers/(?P<layer>\d+)/(?P<kind>regenerate|restyle)", "edit"),
        ("POST", r"/api/documents/(?P<doc>\w+)/(?P<direction>undo|redo)", "move"),
        ("GET", r"/api/documents/(?P<doc>\w+)/export/(?P<kind>ora|psd|zip)", "export"),
        ("POST", r"/api/open", "open"),
    ]
]


class Handler(http.server.BaseHTTPRequestHandler):
    """Routes a request to the studio; a bad request is HTTP 400 with {"error": one line}."""

    studio: Studio  # set on the class made by `make_server`
    server_version = "layerdiff-studio"

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def log_message(self, format: str, *args) -> None:  # noqa: A002 -- the base class's name
        log.debug("%s %s", self.address_string(), format % args)

    def _dispatch(self, method: str) -> None:
        url = urllib.parse.urlsplit(self.path)
        for route_method, pattern, name in _ROUTES:
            match = pattern.match(url.path)
            if match and route_method == method:
                try:
                    getattr(self, f"_{name}")(**match.groupdict(), query=urllib.parse.parse_qs(url.query))
                except DocumentError as e:
                    self._json({"error": str(e)}, 404)
                except (BadRequest, RequestError, DataError, PromptSplitError) as e:
                    self._json({"error": str(e)}, 400)
                except Exception as e:  # noqa: BLE001 -- one request's bug must not stop the server
                    log.exception("%s %s failed", method, url.path)
                    self._json({"error": f"{type(e).__name__}: {e}"}, 500)
                return
        self._json({"error": f"no such page: {method} {url.path}"}, 404)

    # ------------------------------------------------------------------ replies

    def _send(self, data: bytes, content_type: str, status: int = 200, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _json(self, payload: Any, status: int = 200) -> None:
        self._send(json.dumps(payload).encode(), "application/json", status)

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise BadRequest(f"the upload is {length / 2**20:.1f} MiB; the studio takes at most {MAX_BODY // 2**20} MiB")
        return self.rfile.read(length)

    def _json_body(self) -> dict:
        try:
            body = json.loads(self._body() or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRequest(f"the request is not JSON ({e})") from None
        if not isinstance(body, dict):
            raise BadRequest("the request must be a JSON object")
        return body

    # ------------------------------------------------------------------ routes

    def _page(self, query) -> None:
        self._static("index.html", query)

    def _static(self, name: str, query) -> None:
        path = STATIC / name
        if path.suffix not in _STATIC_TYPES or not path.is_file():
            raise DocumentError(f"no static file {name!r}")
        self._send(path.read_bytes(), _STATIC_TYPES[path.suffix])

    def _info(self, query) -> None:
        self._json(self.studio.info())

    def _split(self, query) -> None:
        self._json(self.studio.split(self._json_body()))

    def _generate(self, query) -> None:
        self._json(self.studio.generate(self._json_body()), 202)

    def _job(self, job: str, query) -> None:
        described = self.studio.jobs.describe(job)
        if described is None:
            raise DocumentError(f"no job {job!r}")
        self._json(described)

    def _document(self, doc: str, query) -> None:
        self._json(self.studio.documents.get(doc).describe())

    def _image(self, doc: str, version: str, image: str, query) -> None:
        self._send(version_image(self.studio.documents.version(doc, int(version)), image), "image/png")

    def _edit(self, doc: str, layer: str, kind: str, query) -> None:
        self._json(self.studio.edit(doc, int(layer), kind, self._json_body()), 202)

    def _move(self, doc: str, direction: str, query) -> None:
        self._json(self.studio.move(doc, -1 if direction == "undo" else 1))

    def _export(self, doc: str, kind: str, query) -> None:
        data, name, mime = export_bytes(self.studio.documents.get(doc).sample, kind)
        self._send(data, mime, headers={"Content-Disposition": f'attachment; filename="{doc}_{name}"'})

    def _open(self, query) -> None:
        name = (query.get("name") or ["upload"])[0]
        self._json(self.studio.open(self._body(), name))


def make_server(studio: Studio, host: str = "127.0.0.1", port: int = 0) -> http.server.ThreadingHTTPServer:
    """An HTTP server for `studio` (port 0: a free port; the bound one is `server.server_address[1]`)."""
    handler = type("StudioHandler", (Handler,), {"studio": studio})
    server = http.server.ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def serve_in_thread(server: http.server.ThreadingHTTPServer) -> threading.Thread:
    """Serves until `server.shutdown()` (tests, and callers with their own main loop)."""
    thread = threading.Thread(target=server.serve_forever, name="studio-http", daemon=True)
    thread.start()
    return thread
