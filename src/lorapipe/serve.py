"""`lorapipe serve`: the model `lorapipe generate` would load, behind an OpenAI-compatible API.

mlx-lm's server does the serving (`mlx_lm.server`: its request handler for /v1/models,
/v1/chat/completions and /v1/completions, streaming and not, and its response generator, which
batches concurrent requests). lorapipe configures it:
- One model, the one `generate.pick` chooses. mlx-lm loads whatever model path, Hub id or adapter
  folder a request names; here a request may only name the served model (or none), so nobody
  who can reach the port can make the server read other files or download models.
- Chat requests are shaped the way training shaped its rows, as `lorapipe generate` and
  `lorapipe chat` shape them: `data.system_prompt` as the system turn unless the request brings
  one, `data.prompt_template` around each user turn, the model's chat template around all. A
  greedy answer then equals `lorapipe generate`'s, and eval's for a test prompt. /v1/completions
  sends its prompt to the model as it is (no template): it is for clients that shape prompts
  themselves.
- The `generate` section's sampling (temperature, top_p, max_tokens) is the default of every
  request; a request's own values win.
- /v1/models lists the served model without scanning the Hugging Face cache: mlx-lm's scan
  fails on a machine that has no cache folder, after the response has begun.
- It binds to loopback unless told otherwise, and sends no CORS headers (mlx-lm allows every
  origin), so a web page open in the user's browser cannot read its answers.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import http.server
import ipaddress
import json
import signal
import socket
import sys
import threading
from functools import partial
from typing import Any

from mlx_lm.generate import DEFAULT_QUANTIZED_KV_START
from mlx_lm.models.cache import LRUPromptCache, make_prompt_cache
from mlx_lm.server import (
    APIHandler,
    CompletionRequest,
    ModelProvider,
    ResponseGenerator,
    get_system_fingerprint,
)

from lorapipe.artifacts import load_model
from lorapipe.errors import LorapipeError
from lorapipe.generate import choose, first_messages, user_turn
from lorapipe.params import Params


class ServeError(LorapipeError):
    """The server cannot start: the address is unusable or the model does not load."""


def shape(messages: list[dict[str, Any]], params: Params) -> list[dict[str, Any]]:
    """A chat request's messages as training shaped its rows: `data.prompt_template` around each
    user turn, and `data.system_prompt` first unless the request has a system turn of its own
    (preprocess adds it only to rows that have none)."""
    shaped = []
    for message in messages:
        text = _text(message.get("content"))
        if message.get("role") == "user" and text is not None:
            message = {**message, **user_turn(params, text)}
        shaped.append(message)
    if not shaped or shaped[0].get("role") != "system":
        shaped = [*first_messages(params), *shaped]
    return shaped


def _text(content: Any) -> str | None:
    """A message's text: the string, or the text parts of a list joined (as mlx-lm joins them);
    None for content with other parts, which mlx-lm then refuses."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" for p in content
    ):
        return "".join(str(p.get("text", "")) for p in content)
    return None


def settings(params: Params, name: str) -> argparse.Namespace:
    """What mlx-lm's server reads from its command line, for the model `name`."""
    g = params.generate
    return argparse.Namespace(
        model=name,
        adapter_path=None,
        draft_model=None,
        num_draft_tokens=3,
        pipeline=False,
        trust_remote_code=False,
        chat_template="",  # the model's own
        use_default_chat_template=False,
        chat_template_args={},
        temp=g.temperature,
        top_p=g.top_p,
        top_k=0,
        min_p=0.0,
        max_tokens=g.max_tokens,
        allowed_origins=[],
        # mlx-lm's own defaults: up to 32 requests decode together, 8 prompts prefill together.
        decode_concurrency=32,
        prompt_concurrency=8,
        prefill_step_size=2048,
        prompt_cache_size=10,
        prompt_cache_bytes=None,
        kv_bits=None,
        kv_group_size=64,
        quantized_kv_start=DEFAULT_QUANTIZED_KV_START,
    )


class OneModel(ModelProvider):
    """mlx-lm's model provider, serving the pipeline's model `name` and nothing else."""

    model: Any  # None until loaded
    tokenizer: Any

    def __init__(self, params: Params, name: str) -> None:
        super().__init__(settings(params, name))
        self.params, self.name = params, name
        self.loaded = threading.Event()  # set once loading has succeeded or failed
        self.failure: BaseException | None = None

    def load(
        self, model_path: str, adapter_path: str | None = None, draft_model_path: str | None = None
    ) -> tuple[Any, Any]:
        # "default_model" is what mlx-lm asks for when a request names no model or draft model.
        if model_path not in ("default_model", self.name):
            raise ValueError(
                f"model {model_path!r}: this server serves {self.name!r} only (GET /v1/models)"
            )
        if adapter_path is not None or draft_model_path not in (None, "default_model"):
            raise ValueError(
                f"this server serves {self.name!r} only: it loads no adapters or draft models "
                "a request names"
            )
        if self.model is None:
            self.model, self.tokenizer = load_model(self.params.paths, self.name)
            self.model_key = (self.name,)
            # mlx-lm batches concurrent requests when every KV cache of the model can merge.
            self.is_batchable = all(hasattr(c, "merge") for c in make_prompt_cache(self.model))
        return self.model, self.tokenizer

    def load_default(self) -> None:
        """Runs first in mlx-lm's generation thread: load there (as mlx-lm does), and hand a
        failure to the main thread, which reports it, instead of a traceback from this one."""
        try:
            self.load("default_model")
        except Exception as exc:
            self.failure = exc
        finally:
            self.loaded.set()


class Generator(ResponseGenerator):
    """mlx-lm's response generator, whose thread destroys its MLX streams when it ends. MLX wants
    each thread that used it to do so (mlx.core.clear_streams); otherwise, as the process exits,
    the thread's streams are destroyed while Python shuts down, and it aborts ("terminate called
    without an active exception"): mlx-lm's own server does, on Ctrl-C."""

    def _run_generate(self) -> None:
        import mlx.core as mx

        try:
            super()._run_generate()
        finally:
            mx.clear_streams()


class Handler(APIHandler):
    """mlx-lm's request handler, with lorapipe's prompt shaping and model list."""

    def handle_chat_completions(self) -> CompletionRequest:
        request = super().handle_chat_completions()
        models: OneModel = self.response_generator.model_provider
        return dataclasses.replace(request, messages=shape(request.messages, models.params))

    def handle_models_request(self) -> None:
        name = self.response_generator.model_provider.name
        model = {"id": name, "object": "model", "created": self.created, "owned_by": "lorapipe"}
        wanted = self.path.split("?")[0].removeprefix("/v1/models").strip("/")
        if not wanted:
            status, body = 200, {"object": "list", "data": [model]}
        elif wanted == name:
            status, body = 200, model
        else:
            status, body = 404, {"error": f"model {wanted!r}: this server serves {name!r} only"}
        data = json.dumps(body).encode()
        self._set_completion_headers(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True  # a client still streaming does not hold up Ctrl-C


def listen(host: str, port: int) -> Server:
    """A server bound to host:port (port 0: a free one), or a ServeError that says why not."""
    try:
        family, _, _, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise ServeError(f"--host {host}: not an address of this machine ({exc.strerror})") from exc
    server_class = type("Server", (Server,), {"address_family": family})
    try:
        # The handler is set once the model is loading (serve), before any request is read.
        return server_class(address, http.server.BaseHTTPRequestHandler)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ServeError(
                f"{host}:{port} is already in use (another server, or a `lorapipe serve` still "
                f"running); choose another port with --port, e.g. --port {port + 1}"
            ) from exc
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def serve(params: Params, wanted: str | None, host: str, port: int) -> None:
    """Serve until Ctrl-C: the model first (a missing one is an error before anything listens),
    then the address (taken: an error before loading), then the loaded model."""
    name = choose(params, wanted)
    # Ctrl-C stops it even when started from a script's background job (`cmd &`), where the
    # shell hands it SIGINT ignored and Python then leaves it so.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    server = listen(host, port)
    models = OneModel(params, name)
    generator = Generator(models, LRUPromptCache(models.cli_args.prompt_cache_size))
    try:
        models.loaded.wait()
        if models.failure is not None:
            if isinstance(models.failure, LorapipeError):
                raise models.failure
            raise ServeError(f"{name}: the model did not load: {models.failure}")
        server.RequestHandlerClass = partial(
            Handler, generator, system_fingerprint=get_system_fingerprint()
        )
        bound_port = server.server_address[1]
        url_host = f"[{host}]" if ":" in host else host
        if not is_loopback(host):
            print(
                f"[lorapipe] serve: listening on {host}, not loopback: anyone who can reach "
                f"port {bound_port} of this machine can use the model (no authentication)",
                file=sys.stderr,
            )
        print(
            f"[lorapipe] serving {name} at http://{url_host}:{bound_port}/v1 (Ctrl-C stops)",
            file=sys.stderr,
            flush=True,
        )
        server.serve_forever()
    except KeyboardInterrupt:
        print("[lorapipe] serve: stopped", file=sys.stderr)
    finally:
        server.server_close()
        generator.stop_and_join()
