"""``kdkit lm serve``'s HTTP side: FastAPI routes, request batching, and the socket it listens on.

Routes (every one behind the shared token when there is one):

================================  ==========================================================
``GET /kdkit/v1/info``            the teacher's identity: fingerprint, weights, engine,
                                  tokenizer, transform, vocabulary, limits (JSON)
``POST /kdkit/v1/topk``           rows in, the cache's top k out (safetensors, :mod:`.wire`)
``POST /v1/completions``          vLLM's protocol: token-id prompts, ``prompt_logprobs``
``GET /v1/models``, ``POST /tokenize``  as vLLM answers them (:mod:`.vllm`)
``GET /health``                   200 when up
================================  ==========================================================

**Batching.** Requests are queued; one loop takes the oldest and every queued request that asks
for the same ``k`` and temperature (up to ``max_batch_tokens``), scores them as one batch in a
worker thread (so the server keeps accepting while the teacher runs) and cuts the answer back
per request. Requests that arrive during a forward ride the next one: several trainers or DDP
ranks share the teacher's batches without a fixed wait.

**Exposure.** The server binds ``127.0.0.1`` unless told otherwise; on any other address it
refuses to start without a shared token (``Authorization: Bearer``, compared in constant time).
Bodies are bounded (``max_body_bytes``) before they are read, and every value in them is
checked (:func:`~kdkit.lm.serve.wire.decode_rows`) before the teacher sees it.
"""

# no `from __future__ import annotations`: FastAPI reads the handlers' annotations
# (fastapi.Request, imported lazily inside build_app) as objects
import asyncio
import contextlib
import functools
import hmac
import importlib
import ipaddress
import json
import logging
import socket
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from kdkit.errors import KDError
from kdkit.lm.data import TokenRow
from kdkit.lm.serve.scorer import TeacherScorer, split_topk
from kdkit.lm.serve.vllm import (
    OpenAIError,
    completion_body,
    models_body,
    parse_completion,
)
from kdkit.lm.serve.wire import (
    FINGERPRINT_HEADER,
    INFO_PATH,
    MEDIA_TYPE,
    TOPK_PATH,
    decode_rows,
    encode_topk,
)
from kdkit.lm.topk import TopK

__all__ = ["Batcher", "build_app", "check_exposure", "is_loopback", "listen", "serve"]

log = logging.getLogger(__name__)
_HINT = "pip install 'kdkit[serve]'"


def _require(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise KDError(f"kdkit lm serve needs the {name!r} package ({e}); {_HINT}") from None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, token: str | None, token_env: str) -> None:
    """Beyond loopback, a server without a shared token would score for anyone who can reach it."""
    if not is_loopback(host) and not token:
        raise KDError(
            f"--host {host} listens beyond this machine: set a shared token in ${token_env} "
            "(clients send it; any long random string), or keep the default --host 127.0.0.1"
        )


@dataclass
class _Job:
    rows: list[TokenRow]
    topk: int
    temperature: float
    mass: bool
    labels: bool
    future: asyncio.Future
    tokens: int = field(init=False)

    def __post_init__(self) -> None:
        self.tokens = sum(len(r) for r in self.rows)

    def key(self) -> tuple:
        return (self.topk, self.temperature, self.labels)


class Batcher:
    """Merges queued requests into teacher batches (see the module docstring)."""

    def __init__(self, scorer: TeacherScorer, max_batch_tokens: int) -> None:
        self.scorer, self.max_batch_tokens = scorer, max_batch_tokens
        self.jobs: deque[_Job] = deque()
        self.wake = asyncio.Event()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="kdkit-serve")
        #: teacher forwards run and requests answered (``/kdkit/v1/info`` reports them)
        self.forwards = self.requests = 0

    async def score(self, rows: list[TokenRow], topk: int, temperature: float, *,
                    mass: bool = False, labels: bool = False) -> TopK:  # fmt: skip
        future = asyncio.get_running_loop().create_future()
        self.jobs.append(_Job(rows, topk, temperature, mass, labels, future))
        self.wake.set()
        return await future

    def _take(self) -> list[_Job]:
        first = self.jobs.popleft()
        group, tokens, rest = [first], first.tokens, deque()
        while self.jobs and not first.mass:  # a request for the mass is scored alone
            job = self.jobs.popleft()
            fits = tokens + job.tokens <= self.max_batch_tokens
            if job.key() == first.key() and not job.mass and fits:
                group.append(job)
                tokens += job.tokens
            else:
                rest.append(job)
        self.jobs.extendleft(reversed(rest))
        return group

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.wake.wait()
            self.wake.clear()
            while self.jobs:
                group = [j for j in self._take() if not j.future.done()]  # dropped clients
                if not group:
                    continue
                first = group[0]
                work = functools.partial(
                    self.scorer.score, [r for j in group for r in j.rows], topk=first.topk,
                    temperature=first.temperature, mass=first.mass, labels=first.labels,
                )  # fmt: skip
                try:
                    top, counts = await loop.run_in_executor(self.executor, work)
                except Exception as err:  # noqa: BLE001 - every waiting request gets it
                    for job in group:
                        if not job.future.done():
                            job.future.set_exception(err)
                    continue
                self.forwards += 1
                sizes, start = [], 0
                for job in group:
                    sizes.append(sum(counts[start : start + len(job.rows)]))
                    start += len(job.rows)
                for job, part in zip(group, split_topk(top, sizes), strict=True):
                    if not job.future.done():
                        job.future.set_result(part)
                        self.requests += 1


def _error(status: int, message: str, kind: str = "BadRequestError") -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse(OpenAIError(status, message, kind).body, status_code=status)


async def _body(request: Any, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise OpenAIError(413, f"the body is larger than this server's {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise OpenAIError(413, f"the body is larger than this server's {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def build_app(
    scorer: TeacherScorer,
    *,
    token: str | None = None,
    name: str = "teacher",
    max_logprobs: int = 20,
    max_batch_tokens: int = 1 << 16,
    max_body_bytes: int = 64 << 20,
) -> Any:
    """The FastAPI application serving ``scorer`` (see the module docstring)."""
    fastapi = _require("fastapi")
    from fastapi.responses import JSONResponse, Response

    batcher = Batcher(scorer, max_batch_tokens)
    fingerprint = scorer.fingerprint

    @contextlib.asynccontextmanager
    async def lifespan(app: Any):
        task = asyncio.create_task(batcher.run())
        yield
        task.cancel()
        batcher.executor.shutdown(wait=False, cancel_futures=True)

    async def authorize(request: fastapi.Request) -> None:
        if token is None:
            return
        got = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(got, f"Bearer {token}".encode()):
            raise fastapi.HTTPException(401, "a missing or wrong token (Authorization: Bearer)")

    app = fastapi.FastAPI(
        title="kdkit lm serve", lifespan=lifespan, docs_url=None, redoc_url=None,
        openapi_url=None, dependencies=[fastapi.Depends(authorize)],
    )  # fmt: skip
    app.state.batcher = batcher

    async def guarded(call: Callable[[], Any]) -> Any:
        try:
            return await call()
        except OpenAIError as err:
            return JSONResponse(err.body, status_code=err.status)
        except KDError as err:  # the rows are fine but the teacher cannot score them
            return _error(422, str(err).splitlines()[0], "UnprocessableEntityError")
        except Exception as err:  # noqa: BLE001 - one line to the client, the trace here
            log.exception("kdkit lm serve: a request failed")
            return _error(500, f"{type(err).__name__}: {err}".splitlines()[0], "InternalError")

    @app.get("/health")
    async def health():
        return Response(status_code=200)

    @app.get(INFO_PATH)
    async def info():
        stats = {"forwards": batcher.forwards, "requests": batcher.requests}
        return JSONResponse({**scorer.info, "stats": stats})

    @app.post(TOPK_PATH)
    async def topk(request: fastapi.Request):
        async def answer() -> Any:
            try:
                req = decode_rows(await _body(request, max_body_bytes), scorer.limits)
            except KDError as err:
                raise OpenAIError(400, str(err)) from None
            scorer.check_rows(req.rows)
            top = await batcher.score(req.rows, req.topk, req.temperature, mass=req.mass)
            data = encode_topk(top, fingerprint=fingerprint, topk=req.topk,
                               temperature=req.temperature)  # fmt: skip
            return Response(data, media_type=MEDIA_TYPE, headers={FINGERPRINT_HEADER: fingerprint})

        return await guarded(answer)

    @app.get("/v1/models")
    async def models():
        return JSONResponse(models_body(name, scorer.info))

    @app.post("/tokenize")
    async def tokenize(request: fastapi.Request):
        async def answer() -> Any:
            data = _json(await _body(request, max_body_bytes))
            text = data.get("prompt") if isinstance(data, dict) else None
            if not isinstance(text, str):
                raise OpenAIError(400, "kdkit lm serve tokenizes a text prompt", param="prompt")
            special = bool(data.get("add_special_tokens", True))
            ids = scorer.tokenizer(text, add_special_tokens=special)["input_ids"]
            return JSONResponse({"count": len(ids), "max_model_len": scorer.positions,
                                 "tokens": ids, "token_strs": None})  # fmt: skip

        return await guarded(answer)

    @app.post("/v1/completions")
    async def completions(request: fastapi.Request):
        async def answer() -> Any:
            data = _json(await _body(request, max_body_bytes))
            prompts, k = parse_completion(
                data, name=name, max_logprobs=max_logprobs,
                vocab_rows=scorer.limits.vocab_rows, vocab=scorer.vocab,
            )  # fmt: skip
            if sum(len(p) for p in prompts) > scorer.limits.max_tokens:
                raise OpenAIError(400, f"more than {scorer.limits.max_tokens} prompt tokens")
            if scorer.positions is not None and max(len(p) for p in prompts) > scorer.positions:
                raise OpenAIError(400, f"a prompt is longer than {scorer.positions} tokens")
            parts = None
            if k is not None:
                rows = [TokenRow.of(p) for p in prompts]
                top = await batcher.score(rows, max(k, 1), 1.0, labels=True)
                parts = split_topk(top, [len(p) - 1 for p in prompts])
            return JSONResponse(completion_body(name, prompts, parts, k, fingerprint))

        return await guarded(answer)

    return app


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        raise OpenAIError(400, "the body is not JSON") from None


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (``port`` 0: a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # answers go out as two writes (headers, body): without TCP_NODELAY (inherited by the
    # accepted sockets) the body waits for the client's delayed ACK, ~40 ms a request
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise KDError(f"cannot listen on {host}:{port} ({err.strerror or err})") from None
    sock.listen(128)
    return sock


def serve(app: Any, sock: socket.socket, *, ready: Callable[[str], None] | None = None) -> None:
    """Run ``app`` on ``sock`` until SIGINT / SIGTERM (uvicorn, one process)."""
    uvicorn = _require("uvicorn")
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                            timeout_keep_alive=60)  # fmt: skip
    server = uvicorn.Server(config)
    if ready is not None:
        host, port = sock.getsockname()[:2]
        ready(f"http://{host if ':' not in host else f'[{host}]'}:{port}")
    server.run(sockets=[sock])
