"""The error tree of batchrunner.

Every error a user can cause or meet ends the run with one line (``str(exc)``) and the exit code the class carries.
Errors of the underlying libraries (aiohttp, OSError, yaml) are translated into this tree in exactly one place per
concern: HTTP in ``client.py``, YAML in ``manifest.py``, disk in ``output.py``.

    BatchrunnerError                 exit 1   base: something went wrong
    ├── UsageError                   exit 2   bad arguments or configuration, nothing submitted
    │   ├── ManifestError            exit 2   the manifest (file, job, field, line)
    │   ├── InputImageError          exit 2   a local input image is missing, unreadable or not an image
    │   └── Problems                 exit 2   several of these at once (``validate``), one line each
    ├── LockHeld                     exit 75  another live run holds the output folder
    ├── OutputError                  exit 74  the output folder cannot be written (disk full, permissions)
    └── ApiError                     exit 1   the API or the network answered badly
        ├── TransientError                    worth another try with backoff
        │   ├── RateLimited                   429 (``retry_after`` when the server said)
        │   ├── ServerError                   5xx, an HTML or empty or malformed body
    │   ├── CreatePathRefused             404/405 (or a redirect to the other form) to one form of the create path:
    │   │                                 nothing was created; the client now uses the other form, send again
        │   ├── NetworkError                  connection failed; ``sent`` tells whether the request may have arrived
        │   │   └── ApiTimeout                no answer within the client timeout (``sent`` is True)
        │   └── DownloadIncomplete            the output file was cut short or is not there yet
        ├── AuthError                exit 2   401: the key is wrong; the run ends
        ├── PaymentRequired                   402: out of credit; stop submitting
        ├── NotFound                          404: unknown prediction
        ├── RequestRejected                   any other 4xx: the job fails for good with the API's message
        │   ├── Forbidden                     403: "operation not allowed" (a locked resource): not a bad key
        │   └── CreatePathUnusable            both forms of the create path refused or redirected: nothing created
        └── DownloadRejected                  the output URL or bytes are unacceptable (scheme, size, not an image)
"""

from __future__ import annotations

from pathlib import Path


class BatchrunnerError(Exception):
    """Base of every error batchrunner raises on purpose."""

    exit_code = 1


class UsageError(BatchrunnerError):
    """Bad command-line arguments or configuration; nothing was submitted."""

    exit_code = 2


class ManifestError(UsageError):
    """A problem in the manifest, located as precisely as the YAML allows."""

    def __init__(
        self,
        message: str,
        *,
        file: Path | str,
        job: str | None = None,
        field: str | None = None,
        line: int | None = None,
    ) -> None:
        self.message = message
        self.file = str(file)
        self.job = job
        self.field = field
        self.line = line
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        parts = [where]
        if self.job is not None:
            parts.append(f"job {self.job!r}")
        if self.field is not None:
            parts.append(f"field {self.field!r}")
        return f"{': '.join(parts)}: {self.message}"


class InputImageError(UsageError):
    """A local input image is missing, unreadable, too large or not a supported image."""

    def __init__(self, message: str, *, file: Path | str, jobs: tuple[str, ...] = ()) -> None:
        self.file = str(file)
        self.jobs = jobs
        shown = ", ".join(jobs[:3]) + (f" and {len(jobs) - 3} more" if len(jobs) > 3 else "")
        used_by = f" (used by {shown})" if jobs else ""
        super().__init__(f"{self.file}: {message}{used_by}")


class Problems(UsageError):
    """Several usage problems found in one pass (``validate``): ``str()`` is one line per problem."""

    def __init__(self, problems: list[UsageError], *, more: bool = False) -> None:
        self.problems = problems
        self.more = more
        lines = [str(p) for p in problems]
        if more:
            lines.append(f"(stopped after {len(problems)} problems; there are more)")
        super().__init__("\n".join(lines))


class LockHeld(BatchrunnerError):
    """Another live run holds the output folder."""

    exit_code = 75


class OutputError(BatchrunnerError):
    """The output folder or ledger cannot be written."""

    exit_code = 74


class ApiError(BatchrunnerError):
    """The API or the network answered badly. ``retryable`` tells the scheduler whether to try again."""

    retryable = False

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.message = message
        self.status = status
        self.request_id = request_id
        self.retry_after = retry_after
        super().__init__(str(self))

    def __str__(self) -> str:
        status = f"HTTP {self.status}: " if self.status is not None else ""
        rid = f" (request id {self.request_id})" if self.request_id else ""
        return f"{status}{self.message}{rid}"


class TransientError(ApiError):
    """Worth another try after a backoff."""

    retryable = True


class RateLimited(TransientError):
    """429 Too Many Requests."""


class ServerError(TransientError):
    """5xx, or a body that is not the JSON the API speaks."""


class CreatePathRefused(TransientError):
    """One form of the create path (``/v1/prediction`` or ``/v1/prediction/``) answered 404 or 405, or redirected to
    the other form: the server acted on nothing, and the client sends the next create on the other form."""


class NetworkError(TransientError):
    """The connection failed. ``sent`` is True when the request may have reached the server."""

    def __init__(self, message: str, *, sent: bool, request_id: str | None = None) -> None:
        self.sent = sent
        super().__init__(message, request_id=request_id)


class ApiTimeout(NetworkError):
    """No answer within the client timeout; the request was sent and may have been acted on."""

    def __init__(self, message: str, *, request_id: str | None = None) -> None:
        super().__init__(message, sent=True, request_id=request_id)


class DownloadIncomplete(TransientError):
    """The output file was cut short, or is not available yet."""


class AuthError(ApiError):
    """401: the API key is missing or wrong."""

    exit_code = 2


class PaymentRequired(ApiError):
    """402: the account is out of credit; stop submitting."""


class NotFound(ApiError):
    """404: the API does not know this prediction."""


class RequestRejected(ApiError):
    """Any other 4xx: the request itself is wrong and will not succeed when repeated."""


class DownloadRejected(ApiError):
    """The output URL or its bytes are unacceptable: scheme, size, or not an image."""


class Forbidden(RequestRejected):
    """403: the key was accepted but this operation is not allowed (the docs: e.g. a locked resource)."""


class CreatePathUnusable(RequestRejected):
    """Both forms of the create path were refused (404/405) or redirected: nothing was created, the job fails."""
