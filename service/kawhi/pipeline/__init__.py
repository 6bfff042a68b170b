"""The one request pipeline every front end calls (parse -> admit -> prepare -> run -> assemble).

See :mod:`kawhi.pipeline.core` for the steps and :mod:`kawhi.errors` for the closed
error catalogue they raise.
"""

from kawhi.errors import CATALOGUE, ErrorKind, KawhiError, grpc_code, http_status
from kawhi.pipeline.admit import Admitted, Limits
from kawhi.pipeline.core import Admission, Pipeline, limits_of, outcome
from kawhi.pipeline.parse import MAX_DEPTH, ParsedRequest, parse_json, parse_request

__all__ = [
    "CATALOGUE", "MAX_DEPTH", "Admission", "Admitted", "ErrorKind", "KawhiError", "Limits", "ParsedRequest",
    "Pipeline", "grpc_code", "http_status", "limits_of", "outcome", "parse_json", "parse_request",
]
