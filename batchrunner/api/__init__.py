"""The only code that speaks HTTP to the API.

``client`` (the Client: one method per call), ``answers`` (answers read into records), ``transport`` (aiohttp and
HTTP failures mapped to the error tree, bounded reads), ``paths`` (the create path's two forms), ``redact`` (the key's
check and its mask). The names callers need are exported here.
"""

from __future__ import annotations

from batchrunner.api.answers import Execution, ExecutionsPage, Phase, Prediction, Presigned
from batchrunner.api.client import DEFAULT_API_URL, Client
from batchrunner.api.paths import CREATE_PATHS
from batchrunner.api.redact import Redactor, check_api_key

__all__ = [
    "CREATE_PATHS",
    "DEFAULT_API_URL",
    "Client",
    "Execution",
    "ExecutionsPage",
    "Phase",
    "Prediction",
    "Presigned",
    "Redactor",
    "check_api_key",
]
