"""A small Python client of the serving API (``requests`` only).

    from unime_ray.serve.client import UniMEClient

    client = UniMEClient("http://127.0.0.1:8000", api_key=os.environ.get("UNIME_API_KEY"))
    hits = client.search(text="a red car", top_k=5, rerank=True)["results"]
    vectors = client.embed(["a red car", {"image": "photo.png"}])      # [2, dim] float32
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import requests


class UniMEError(RuntimeError):
    """A non-2xx answer; ``status`` and the server's ``detail`` message."""

    def __init__(self, status: int, detail: str):
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail


ImageLike = bytes | str | os.PathLike | None


def encode_image(image: ImageLike) -> str | None:
    """bytes, or a path to an image file -> base64 (None stays None)."""
    if image is None:
        return None
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
    else:
        data = Path(image).read_bytes()
    return base64.b64encode(data).decode("ascii")


def _item(item: Any) -> dict[str, Any]:
    if isinstance(item, str):
        return {"text": item}
    if isinstance(item, dict):
        out = {k: v for k, v in item.items() if v is not None and k != "image"}
        if item.get("image") is not None:
            out["image"] = encode_image(item["image"])
        return out
    # an Item-like object (unime_ray.data.schema.Item)
    out = {"text": getattr(item, "text", "") or None, "instruction": getattr(item, "instruction", "") or None}
    image = getattr(item, "image", None) or getattr(item, "image_path", None)
    if image is not None:
        out["image"] = encode_image(image)
    return {k: v for k, v in out.items() if v is not None}


class UniMEClient:
    """``UniMEClient(url, api_key=None).search(...)``, ``.embed(...)``, ``.info()``, ``.health()``,
    ``.readiness()``. A 503 (a deployment not running) or 504 (past the server's deadline) raises
    :class:`UniMEError` with the server's message naming the deployment."""

    def __init__(self, url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 120.0,
                 session: requests.Session | None = None):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.session = session or requests.Session()
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"

    def _call(self, method: str, path: str, payload: dict | None = None) -> Any:
        resp = self.session.request(method, self.url + path, json=payload, timeout=self.timeout)
        if resp.status_code >= 400:
            try:
                detail = resp.json().get("detail", resp.text)
            except ValueError:
                detail = resp.text
            raise UniMEError(resp.status_code, str(detail))
        return resp.json()

    def health(self) -> dict[str, Any]:
        return self._call("GET", "/healthz")

    def readiness(self) -> dict[str, Any]:
        """``/readyz``: {"ready": bool, "not_ready": [deployments], "deployments": {...}} (200 or 503 alike)."""
        resp = self.session.get(self.url + "/readyz", timeout=self.timeout)
        if resp.status_code not in (200, 503) or not resp.headers.get("content-type", "").startswith(
                "application/json"):
            raise UniMEError(resp.status_code, resp.text[:500])
        return resp.json()

    def info(self) -> dict[str, Any]:
        return self._call("GET", "/v1/info")

    def search(self, text: str | None = None, image: ImageLike = None, instruction: str | None = None,
               top_k: int = 10, rerank: bool = False, rerank_top_k: int | None = None,
               include_image: bool = False) -> dict[str, Any]:
        """``{"results": [{rank, id, score, rerank_score, text, ...}], "reranked": bool, "timings_ms": {...}}``."""
        query = {k: v for k, v in {"text": text, "instruction": instruction, "image": encode_image(image)}.items()
                 if v is not None}
        payload: dict[str, Any] = {"query": query, "top_k": top_k, "rerank": rerank, "include_image": include_image}
        if rerank_top_k is not None:
            payload["rerank_top_k"] = rerank_top_k
        return self._call("POST", "/v1/search", payload)

    def embed(self, items: Iterable[Any]) -> np.ndarray:
        """[N, dim] float32 unit vectors; an item is a text, a dict (text/instruction/image) or an Item."""
        out = self._call("POST", "/v1/embed", {"items": [_item(it) for it in items]})
        return np.asarray(out["embeddings"], dtype=np.float32)
