"""The search page: a static, dependency-free HTML/JS/CSS front end served by the ingress at ``/``.

The page holds no data and needs no key to load; its script calls ``/v1/info`` and ``/v1/search`` with the
API key the user enters (kept in ``sessionStorage``), so the API stays behind the key. The files are served
by a small ASGI middleware placed *outside* the API-key guard, and only for ``GET``/``HEAD`` of the fixed
paths below; every other request goes on to the API unchanged.
"""

from __future__ import annotations

from importlib import resources

STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8"}
# Strict: the page loads only its own script, style and data: thumbnails, and talks only to this origin.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def _load() -> dict[str, tuple[bytes, str]]:
    """{relative path: (bytes, content type)} of the page's files."""
    folder = resources.files(__package__) / "static"
    files = {}
    for name in ("index.html", "search.js", "search.css"):
        ext = name[name.rfind("."):]
        files["/" if name == "index.html" else f"/static/{name}"] = (folder.joinpath(name).read_bytes(),
                                                                    STATIC_TYPES[ext])
    return files


class SearchPageMiddleware:
    """Serves the page's files; passes everything else to ``app``."""

    def __init__(self, app):
        self.app = app
        self.files = _load()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") not in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        root = scope.get("root_path", "") or ""
        rel = path[len(root):] if root and path.startswith(root) else path
        if rel == "" and root:   # /prefix -> /prefix/, so that the page's relative URLs resolve under it
            return await self._send(send, scope, 307, b"", "text/plain", [(b"location", (root + "/").encode())])
        found = self.files.get(rel)
        if found is None:
            return await self.app(scope, receive, send)
        body, ctype = found
        return await self._send(send, scope, 200, body, ctype)

    @staticmethod
    async def _send(send, scope, status: int, body: bytes, ctype: str, extra: list | None = None) -> None:
        headers = [(b"content-type", ctype.encode()), (b"content-length", str(len(body)).encode()),
                   (b"cache-control", b"no-cache"), (b"x-content-type-options", b"nosniff"),
                   (b"referrer-policy", b"no-referrer"), (b"content-security-policy", CSP.encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers + (extra or [])})
        await send({"type": "http.response.body", "body": b"" if scope.get("method") == "HEAD" else body})


def mount_search_page(api) -> None:
    """Serve the page from ``api`` (a FastAPI app). Call it after the guard middleware is added, so that the
    page is outside it (Starlette runs the last-added middleware first)."""
    api.add_middleware(SearchPageMiddleware)
