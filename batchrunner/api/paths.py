"""The create path's two forms, and how an answer says its form is refused.

Every official source writes ``/v1/prediction``; eachjs and one third-party client add a trailing slash, and a server
may take only one of the two. ``CreatePaths`` holds which form this server takes, as the client learns it.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable, Mapping

from batchrunner.api.redact import redact
from batchrunner.api.transport import api_message
from batchrunner.errors import ApiError, CreatePathRefused, CreatePathUnusable

__all__ = [
    "CREATE_PATH",
    "CREATE_PATHS",
    "REDIRECTS",
    "CreatePaths",
    "create_path_refused",
    "other_create_path",
    "route_exists",
]

# The documented form goes first.
CREATE_PATH = "/v1/prediction"
CREATE_PATHS = (CREATE_PATH, CREATE_PATH + "/")
REDIRECTS = frozenset({301, 302, 303, 307, 308})


def other_create_path(path: str) -> str:
    """The other form of the create path: with the trailing slash if ``path`` has none, and the reverse."""
    return CREATE_PATHS[1] if path == CREATE_PATHS[0] else CREATE_PATHS[0]


def _same_resource(a: str, b: str) -> bool:
    pa, pb = urllib.parse.urlsplit(a), urllib.parse.urlsplit(b)
    try:
        ports = (pa.port, pb.port)
    except ValueError:
        return False
    return (pa.scheme.lower(), (pa.hostname or "").lower(), ports[0], pa.path) == (
        pb.scheme.lower(),
        (pb.hostname or "").lower(),
        ports[1],
        pb.path,
    )


def create_path_refused(status: int, location: str | None, sent_url: str, other_url: str) -> bool:
    """Whether a create's answer refuses the form of the path it was sent to, so the other form is worth one try.

    A 404 or 405 creates nothing (a 4xx), and is what a server that knows only the other form answers. A redirect is
    never followed for a POST (a followed 301/302 turns into a GET, and the key would travel along): one whose
    ``Location`` is the other form on the same host says "use the other form", the server having acted on nothing.
    Any other redirect is left to the caller as an answer it cannot read (a create in doubt).
    """
    if status in (404, 405):
        return True
    if status in REDIRECTS and location:
        return _same_resource(urllib.parse.urljoin(sent_url, location.strip()), other_url)
    return False


def route_exists(status: int) -> bool:
    """An answer that shows the create path it was sent to is a route of the server (its form is the right one)."""
    return 200 <= status < 300 or (400 <= status < 500 and status not in (401, 403, 404, 405))


class CreatePaths:
    """Which form of the create path this server takes: the documented one until a 404/405 (or a redirect to the
    other form) says otherwise, or the form an earlier run learnt. ``on_confirmed`` hears of a form once the server
    has shown it is a route, so the caller may remember it for later runs."""

    def __init__(self, learnt: str | None, on_confirmed: Callable[[str], None] | None) -> None:
        self.current = learnt if learnt in CREATE_PATHS else CREATE_PATH
        self._confirmed = self.current if learnt in CREATE_PATHS else None
        self._refused: set[str] = set()
        self._on_confirmed = on_confirmed

    def refused(
        self, sent: str, status: int, reason: str | None, body: bytes, headers: Mapping[str, str], secret: str
    ) -> ApiError:
        """The error for a create whose path form was refused; switches to the other form while it is untried."""
        request_id = headers.get("X-Request-Id")
        other = other_create_path(sent)
        self._refused.add(sent)
        said = api_message(body) or redact(reason or "error", secret)
        if status in REDIRECTS:
            said = f"redirected to {other} (not followed)"
        if other in self._refused:
            return CreatePathUnusable(
                f"the API refuses both {CREATE_PATHS[0]} and {CREATE_PATHS[1]} for a create ({said})",
                status=status,
                request_id=request_id,
            )
        self.current = other
        return CreatePathRefused(
            f"create path {sent} refused ({said}): sending to {other} instead",
            status=status,
            request_id=request_id,
            retry_after=0.0,
        )

    def works(self, sent: str) -> None:
        """The server answered ``sent`` as a route of its own: keep it, and let the caller remember it."""
        self._refused.clear()
        self.current = sent
        if sent != self._confirmed:
            self._confirmed = sent
            if self._on_confirmed is not None:
                self._on_confirmed(sent)
