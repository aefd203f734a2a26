"""The HTTP layer under the OpenAI SDK: the deadline transport (a whole-attempt ``TIMEOUT``),
proxies from the environment, and credentials scrubbed from error replies and logged requests.
"""

from __future__ import annotations

from ._scrub import redact, redact_body
from ._transport import http_client, scrub_credentials

__all__ = ["http_client", "scrub_credentials", "redact", "redact_body"]
