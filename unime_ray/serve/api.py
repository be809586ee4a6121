"""The HTTP API: request/response models (the OpenAPI schema), input validation, and the FastAPI app.

The app is built per ingress replica by :func:`create_api` around a *backend* (the ingress deployment),
which provides ``embed_items``, ``search``, ``info`` and ``health`` coroutines. Everything a client can
send wrong is answered with a 4xx and a message in ``detail`` (and in ``error.message``, where OpenAI's clients
look):

* 400 - the body is not JSON; 401 - missing or wrong API key;
* 413 - body larger than ``limits.max_body_bytes``, an image over ``max_image_bytes`` or ``max_image_pixels``;
* 422 - schema errors, bad base64, undecodable images, empty queries, ``top_k`` out of range, texts too long,
  reranking asked of a server without a reranker.

Unexpected failures are logged and answered with 500; they never take a replica down. A request needing a
deployment that has no running replica gets 503 at once (``GET /readyz`` lists the deployments' state), and
one that a deployment does not answer within ``limits.request_timeout_s`` gets 504 naming it. Bodies of the
POST endpoints are parsed as JSON whatever their ``Content-Type`` (``curl -d`` sends a form type).
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
from typing import Any, Awaitable, Callable, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from ..data.schema import Item
from .config import LimitsConfig, check_api_key
from .page import mount_search_page

logger = logging.getLogger(__name__)

API_VERSION = "1"
OPEN_PATHS = ("/healthz", "/readyz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")
JSON_PATHS = ("/v1/search", "/v1/embed", "/v1/embeddings", "/v1/rerank")   # POST bodies: JSON, whatever the type


class RequestError(Exception):
    """A client error: HTTP ``status`` with a human-readable message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


# ------------------------------------------------------------------------------------------ models
class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class QueryIn(_In):
    """One item: text and/or an image (base64), with an optional instruction."""

    text: str | None = Field(default=None, description="query text (may contain the image marker <image>)")
    instruction: str | None = Field(default=None, description="task instruction, e.g. 'Find an image caption "
                                    "describing the given image.'")
    image: str | None = Field(default=None, description="base64-encoded image bytes (PNG, JPEG, ...), or a "
                              "data: URL")


class SearchRequest(_In):
    query: QueryIn
    top_k: int = Field(default=10, ge=1, description="how many candidates to return (at most limits.max_top_k)")
    rerank: bool = Field(default=False, description="rerank the top candidates with the pairwise reranker")
    rerank_top_k: int | None = Field(default=None, ge=1, description="how many of the embedder's top "
                                     "candidates to rerank (default: top_k); the rest keep embedder order")
    include_image: bool = Field(default=False, description="return candidate images (base64) in the results")


class Hit(BaseModel):
    rank: int = Field(description="1-based position in the returned list")
    id: str
    score: float = Field(description="embedder cosine similarity")
    rerank_score: float | None = Field(default=None, description="reranker P(Yes), when reranked")
    embed_rank: int = Field(description="1-based position by embedder score alone")
    task: str | None = None
    instruction: str | None = None
    text: str | None = None
    image_path: str | None = None
    has_image: bool = False
    image: str | None = Field(default=None, description="base64 image bytes, only with include_image")


class SearchResponse(BaseModel):
    results: list[Hit]
    reranked: bool
    timings_ms: dict[str, float]
    rerank_note: str | None = None     # why a requested reranking did not happen (the reranker is withheld)


class EmbedRequest(_In):
    items: list[QueryIn] = Field(min_length=1, description="items to embed (at most limits.max_embed_items)")


class EmbedResponse(BaseModel):
    model: str
    dim: int
    embeddings: list[list[float]] = Field(description="unit-norm float32 vectors, one per item, in order")


class ContentPart(_In):
    """A part of a chat message's content, as OpenAI and vLLM write it."""

    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: dict[str, str] | None = Field(default=None, description="{'url': 'data:image/png;base64,...'}")


class ChatMessage(_In):
    role: Literal["system", "user"] = Field(description="system: the instruction; user: the item")
    content: str | list[ContentPart]


class EmbeddingsRequest(_In):
    """OpenAI's embeddings request (``input``: texts), or vLLM's multimodal form (``messages``: one item, its
    images as data: URLs; a system message is the item's instruction)."""

    model: str | None = Field(default=None, description="the served embedder's name or id (any value is accepted)")
    input: str | list[str] | None = Field(default=None, description="a text or a list of texts")
    messages: list[ChatMessage] | None = Field(default=None, description="one multimodal item as chat messages")
    encoding_format: Literal["float", "base64"] = Field(default="float", description="base64: little-endian "
                                                        "float32 bytes of each vector, base64-encoded")
    dimensions: int | None = Field(default=None, ge=1, description="must equal the model's dimension (the "
                                   "vectors are not trained to be truncated)")
    user: str | None = None


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: dict[str, int] = Field(description="prompt_tokens / total_tokens: not counted here (0)")


class RerankRequest(_In):
    """A Cohere/Jina-style rerank request; a query or document may be a text or an item (text and/or image)."""

    model: str | None = Field(default=None, description="the served reranker's name (any value is accepted)")
    query: str | QueryIn
    documents: list[str | QueryIn] = Field(min_length=1, description="at most limits.max_rerank_top_k")
    top_n: int | None = Field(default=None, ge=1, description="return the best n (default: all)")
    return_documents: bool = Field(default=False, description="echo each document's text in its result")


class RerankResult(BaseModel):
    index: int = Field(description="the document's position in the request")
    relevance_score: float | None = Field(description="the reranker's P(Yes) for (query, document); null: the "
                                          "document could not be scored (see error), ranked last")
    document: dict[str, Any] | None = None
    error: str | None = None


class RerankResponse(BaseModel):
    model: str
    results: list[RerankResult] = Field(description="by relevance_score, highest first")
    meta: dict[str, Any] = Field(default_factory=dict)


class Health(BaseModel):
    status: str


class DeploymentState(BaseModel):
    role: str = Field(description="embedder, index (partition i/n) or reranker")
    status: str = Field(description="Ray Serve's deployment status (HEALTHY, UPDATING, ...; MISSING)")
    replicas: dict[str, int] = Field(description="replica count by state (RUNNING, STARTING, ...)")
    ready: bool
    message: str = ""


class Readiness(BaseModel):
    status: str = Field(description="ready, not ready, or unknown")
    ready: bool
    not_ready: list[str] = Field(description="deployments without a running replica")
    deployments: dict[str, DeploymentState]
    message: str


class InfoResponse(BaseModel):
    api_version: str
    embedder: dict[str, Any]
    reranker: dict[str, Any] | None
    index: dict[str, Any]
    limits: dict[str, Any]
    auth: bool


# ------------------------------------------------------------------------------------------ validation
def decode_base64_image(data: str, limits: LimitsConfig) -> bytes:
    """Base64 (or a ``data:`` URL) -> bytes, with the encoded-size limit checked before decoding."""
    s = data.strip()
    if s.startswith("data:"):
        head, sep, s = s.partition(",")
        if not sep or ";base64" not in head:
            raise RequestError(422, "image data URL must be base64-encoded (data:<mime>;base64,<data>)")
    if len(s) * 3 // 4 > limits.max_image_bytes + 3:
        raise RequestError(413, f"image is larger than the limit of {limits.max_image_bytes} bytes")
    try:
        raw = base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(422, "image is not valid base64") from None
    if not raw:
        raise RequestError(422, "image is empty")
    if len(raw) > limits.max_image_bytes:
        raise RequestError(413, f"image is {len(raw)} bytes, more than the limit of {limits.max_image_bytes}")
    return raw


def check_image(raw: bytes, limits: LimitsConfig) -> tuple[int, int]:
    """Size checks from the header (before any pixel is decoded), then a full decode; returns (w, h)."""
    from PIL import Image, UnidentifiedImageError

    from ..data.images import ImageError, decode_image

    try:
        with Image.open(io.BytesIO(raw)) as im:
            width, height = im.size
    except Image.DecompressionBombError:
        raise RequestError(413, "image has too many pixels") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise RequestError(422, f"image cannot be decoded: {exc}") from None
    if width < 1 or height < 1:
        raise RequestError(422, "image has no pixels")
    if width * height > limits.max_image_pixels:
        raise RequestError(413, f"image is {width}x{height} = {width * height} pixels, more than the limit of "
                                f"{limits.max_image_pixels}")
    if max(width, height) / min(width, height) > limits.max_image_aspect_ratio:
        raise RequestError(422, f"image aspect ratio {width}x{height} exceeds {limits.max_image_aspect_ratio:g}")
    try:
        decode_image(raw)
    except ImageError as exc:
        raise RequestError(422, f"image cannot be decoded: {exc}") from None
    return width, height


def to_item(q: QueryIn, limits: LimitsConfig, what: str = "query") -> Item:
    """A validated :class:`Item` from a request item (raises :class:`RequestError`)."""
    text = q.text or ""
    instruction = q.instruction or ""
    for name, value in (("text", text), ("instruction", instruction)):
        if len(value) > limits.max_text_chars:
            raise RequestError(413, f"{what} {name} is {len(value)} characters, more than the limit of "
                                    f"{limits.max_text_chars}")
    image = None
    if q.image is not None and q.image.strip():
        image = decode_base64_image(q.image, limits)
        check_image(image, limits)
    if not text.strip() and image is None:
        raise RequestError(422, f"{what} is empty: give a text and/or an image")
    return Item(text=text, instruction=instruction, image=image)


def check_search(req: SearchRequest, limits: LimitsConfig, can_rerank: bool, withheld: str | None = None) -> int:
    """Range checks of a search request; returns how many candidates to rerank (0: none). ``withheld``: why a
    configured reranker is not used (it did not beat the embedder alone): such a request gets the embedder's
    order and the reason, not an error."""
    if not 1 <= req.top_k <= limits.max_top_k:
        raise RequestError(422, f"top_k must be between 1 and {limits.max_top_k}, got {req.top_k}")
    if not req.rerank or (withheld and not can_rerank):
        return 0
    if not can_rerank:
        raise RequestError(422, "reranking is not available: this server was started without a reranker")
    n = req.rerank_top_k if req.rerank_top_k is not None else req.top_k
    if not 1 <= n <= limits.max_rerank_top_k:
        raise RequestError(422, f"rerank_top_k must be between 1 and {limits.max_rerank_top_k}, got {n}")
    return n


def rerank_order(mode: str, similarities: list[float], scores: list[float | None], choice: int | None = None,
                 weight: float | None = None) -> list[int]:
    """New order of the top hits (given best first, with their cosines): the eval's rule
    (:func:`~unime_ray.rerank.inference.reorder`) in ``mode``; ``scores``: P(Yes) per hit (None: not scored, kept
    after the scored ones in embedder order); ``choice``: the listwise answer's index. The hits after the head
    follow in embedder order."""
    from ..rerank.inference import reorder

    p_yes = [float("nan") if s is None else float(s) for s in scores]
    return reorder(mode, list(range(len(similarities))), choice=choice, p_yes=p_yes, similarities=similarities,
                   weight=0.5 if weight is None else weight)[0]


# ------------------------------------------------------------------------------------------ middleware
class GuardMiddleware:
    """Pure-ASGI guard in front of the app: API key (before the body is read) and body size limit."""

    def __init__(self, app, max_body_bytes: int, key_digest: str | None):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.key_digest = key_digest

    @staticmethod
    async def _reply(send, status: int, detail: str, extra_headers: list | None = None) -> None:
        import json

        body = json.dumps(error_body(status, detail)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers + (extra_headers or [])})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        path = scope.get("path", "")
        root = scope.get("root_path", "") or ""
        rel = path[len(root):] if root and path.startswith(root) else path
        if scope.get("method") == "POST" and rel in JSON_PATHS and not _is_json_type(headers.get(b"content-type")):
            # curl -d sends application/x-www-form-urlencoded, some clients nothing: the body is JSON anyway
            scope = dict(scope, headers=[(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-type"]
                         + [(b"content-type", b"application/json")])
        if self.key_digest and (rel or "/") not in OPEN_PATHS:
            auth = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not check_api_key(token.strip(), self.key_digest):
                return await self._reply(send, 401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                                         [(b"www-authenticate", b"Bearer")])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                return await self._reply(send, 400, "invalid Content-Length header")
            if n > self.max_body_bytes:
                return await self._reply(send, 413, f"request body is {n} bytes, more than the limit of "
                                                    f"{self.max_body_bytes}")
        seen = 0
        limit = self.max_body_bytes

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message.get("type") == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    from fastapi import HTTPException

                    raise HTTPException(413, f"request body is more than the limit of {limit} bytes")
            return message

        return await self.app(scope, limited_receive, send)


def _is_json_type(value: bytes | None) -> bool:
    media = (value or b"").split(b";")[0].strip().lower()
    return media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))


# ------------------------------------------------------------------------------------------ the app
def _loc(loc) -> str:
    return ".".join(str(p) for p in loc if p != "body") or "body"


def items_of_embeddings_request(req: EmbeddingsRequest) -> list[QueryIn]:
    """The items an OpenAI/vLLM embeddings request asks for, as the native API's items."""
    if (req.input is None) == (req.messages is None):
        raise RequestError(422, "give either input (texts) or messages (one multimodal item)")
    if req.input is not None:
        texts = [req.input] if isinstance(req.input, str) else req.input
        if not texts:
            raise RequestError(422, "input is an empty list")
        return [QueryIn(text=t) for t in texts]
    texts, images, instruction = [], [], []
    for i, m in enumerate(req.messages):
        parts = [ContentPart(type="text", text=m.content)] if isinstance(m.content, str) else m.content
        for j, part in enumerate(parts):
            if part.type == "text":
                (instruction if m.role == "system" else texts).append(part.text or "")
                continue
            url = (part.image_url or {}).get("url", "")
            if m.role == "system" or not url.startswith("data:"):
                raise RequestError(422, f"messages[{i}].content[{j}]: images go in a user message as a data: URL "
                                        "(the server fetches no remote URL)")
            images.append(url)
    if len(images) > 1:
        raise RequestError(422, f"messages hold {len(images)} images; an item has at most one")
    text = " ".join(t for t in texts if t)
    if images and "<image>" not in text:   # the image goes first, as in the paper's query format
        text = ("<image> " + text).strip()
    return [QueryIn(text=text, instruction=" ".join(instruction) or None, image=images[0] if images else None)]


def embeddings_response(out: dict[str, Any], req: EmbeddingsRequest) -> dict[str, Any]:
    """OpenAI's response shape around the embedder's vectors."""
    import numpy as np

    if req.dimensions is not None and req.dimensions != out["dim"]:
        raise RequestError(422, f"dimensions {req.dimensions}: this model gives {out['dim']}-dimensional vectors "
                                "only")
    data = []
    for i, v in enumerate(out["embeddings"]):
        vec = base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode() if req.encoding_format == "base64" \
            else v
        data.append({"object": "embedding", "index": i, "embedding": vec})
    return {"object": "list", "data": data, "model": req.model or out["model"],
            "usage": {"prompt_tokens": 0, "total_tokens": 0}}


def error_body(status: int, message: str, **extra: Any) -> dict[str, Any]:
    """An error's body: the message in ``detail`` and, for OpenAI-style clients, in ``error.message``."""
    kind = "authentication_error" if status == 401 else "server_error" if status >= 500 else "invalid_request_error"
    return {"detail": message, "error": {"message": message, "type": kind, "code": status}, **extra}


def error_response(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse(error_body(status, message, **extra), status_code=status)


async def _guarded(fn: Callable[[], Awaitable[Any]]) -> Any:
    try:
        return await fn()
    except RequestError as exc:
        return error_response(exc.status, exc.message)
    except Exception as exc:  # never let a request take the replica down
        from ray.exceptions import RayActorError

        try:
            from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
            unavailable = (RayActorError, BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError)
        except ImportError:  # pragma: no cover
            unavailable = (RayActorError,)
        if isinstance(exc, unavailable):
            logger.warning("backend unavailable: %s", exc)
            return error_response(503, f"a backend deployment is unavailable: {type(exc).__name__}")
        logger.exception("internal error")   # details go to the replica log, not to the client
        return error_response(500, f"internal error ({type(exc).__name__}); see the server log")


async def _to_item(q: QueryIn, limits: LimitsConfig, what: str = "query") -> Item:
    """:func:`to_item`, decoding images off the event loop (a large image must not stall other requests)."""
    if q.image:
        import asyncio

        return await asyncio.to_thread(to_item, q, limits, what)
    return to_item(q, limits, what)


def create_api(backend, limits: LimitsConfig, key_digest: str | None) -> FastAPI:
    """The FastAPI app around ``backend`` (see the module docstring)."""
    api = FastAPI(
        title="UniME-V2 retrieval API",
        version=API_VERSION,
        description="Universal multimodal embeddings (UniME-V2): embed text/image items, search a candidate "
                    "index, and rerank the top candidates with a pairwise MLLM reranker. Send "
                    "`Authorization: Bearer <key>` when the server has an API key; `/healthz` is open.",
    )
    api.add_middleware(GuardMiddleware, max_body_bytes=limits.max_body_bytes, key_digest=key_digest)
    mount_search_page(api)   # the static search page at /, outside the key guard (it holds no data)
    bearer = HTTPBearer(auto_error=False, description="the server's API key, when one is configured")

    @api.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                  for e in exc.errors()]
        if any(e["type"] == "json_invalid" for e in errors):
            return error_response(400, "request body is not valid JSON", errors=errors)
        msg = "; ".join(f"{_loc(e['loc'])}: {e['msg']}" for e in errors) or "invalid request"
        return error_response(422, f"invalid request: {msg}", errors=errors)

    errors_doc = {401: {"description": "missing or invalid API key"},
                  413: {"description": "body or image over a limit"},
                  422: {"description": "invalid request (message in `detail`)"},
                  503: {"description": "a deployment the request needs is not running (see /readyz)"},
                  504: {"description": "a deployment did not answer within the request deadline"}}

    @api.get("/healthz", response_model=Health, summary="liveness (this process answers)")
    async def healthz():
        return await _guarded(backend.health)

    @api.get("/readyz", response_model=Readiness, summary="readiness: every deployment has a running replica",
             responses={503: {"model": Readiness, "description": "a deployment is not ready (listed in not_ready)"}})
    async def readyz():
        async def run():
            state = await backend.readiness()
            return JSONResponse(state, status_code=200 if state.get("ready") else 503)
        return await _guarded(run)

    @api.get("/v1/info", response_model=InfoResponse, summary="models, index size and limits",
             dependencies=[Depends(bearer)], responses={401: errors_doc[401]})
    async def info():
        return await _guarded(backend.info)

    @api.post("/v1/search", response_model=SearchResponse, summary="search the candidate index",
              dependencies=[Depends(bearer)], responses=errors_doc)
    async def search(req: SearchRequest):
        async def run():
            withheld = getattr(backend, "rerank_withheld", None)
            n_rerank = check_search(req, limits, backend.can_rerank, withheld)
            item = await _to_item(req.query, limits)
            out = await backend.search(item, req.top_k, n_rerank, req.include_image)
            if req.rerank and withheld:
                out["rerank_note"] = f"not reranked: {withheld}"
            return out
        return await _guarded(run)

    @api.post("/v1/embed", response_model=EmbedResponse, summary="embed items",
              dependencies=[Depends(bearer)], responses=errors_doc)
    async def embed(req: EmbedRequest):
        async def run():
            if len(req.items) > limits.max_embed_items:
                raise RequestError(413, f"{len(req.items)} items, more than the limit of {limits.max_embed_items}")
            items = [await _to_item(q, limits, what=f"items[{i}]") for i, q in enumerate(req.items)]
            return await backend.embed_items(items)
        return await _guarded(run)

    @api.post("/v1/embeddings", response_model=EmbeddingsResponse, dependencies=[Depends(bearer)],
              summary="embed items, OpenAI's request and response (texts), or vLLM's multimodal messages",
              responses=errors_doc)
    async def embeddings(req: EmbeddingsRequest):
        async def run():
            queries = items_of_embeddings_request(req)
            if len(queries) > limits.max_embed_items:
                raise RequestError(413, f"{len(queries)} inputs, more than the limit of {limits.max_embed_items}")
            items = [await _to_item(q, limits, what=f"input[{i}]") for i, q in enumerate(queries)]
            return embeddings_response(await backend.embed_items(items), req)
        return await _guarded(run)

    @api.post("/v1/rerank", response_model=RerankResponse, dependencies=[Depends(bearer)], responses=errors_doc,
              summary="score documents against a query with the pairwise reranker (Cohere/Jina shape)")
    async def rerank(req: RerankRequest):
        async def run():
            if not backend.can_rerank:
                withheld = getattr(backend, "rerank_withheld", None)
                raise RequestError(422, "reranking is not available: this server was started without a reranker"
                                   + (f" ({withheld})" if withheld else ""))
            if len(req.documents) > limits.max_rerank_top_k:
                raise RequestError(413, f"{len(req.documents)} documents, more than the limit of "
                                        f"{limits.max_rerank_top_k}")
            def as_in(x: str | QueryIn) -> QueryIn:
                return QueryIn(text=x) if isinstance(x, str) else x

            query = await _to_item(as_in(req.query), limits)
            docs = [await _to_item(as_in(d), limits, what=f"documents[{i}]") for i, d in enumerate(req.documents)]
            outcomes = await backend.rerank(query, docs)
            results = [{"index": i, "relevance_score": s, "error": err,
                        "document": {"text": docs[i].text} if req.return_documents else None}
                       for i, (s, err) in enumerate(outcomes)]
            results.sort(key=lambda r: (r["relevance_score"] is None, -(r["relevance_score"] or 0.0), r["index"]))
            return {"model": req.model or backend.reranker_model, "results": results[:req.top_n],
                    "meta": {"score": "P(Yes) of the pairwise prompt"}}
        return await _guarded(run)

    return api
