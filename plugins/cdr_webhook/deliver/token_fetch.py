"""An OAuth2 access token from the client-credentials grant (RFC 6749 4.4), by authlib, through our guard.

:func:`bearer_tokens` gives a hook its endpoint's :class:`~cdr_webhook.deliver.auth.BearerTokens`, which
fetch with :func:`fetch_token` (the hook imports this module for an OAuth2 endpoint only: authlib).

authlib's ``OAuth2Session`` makes the request (client authentication, the form, the reply's errors);
the session is ours: the hook's egress guard with the endpoint's TLS files, no proxy from the
environment, no redirect, one deadline (``request_timeout_seconds``), a reply read up to
:data:`MAX_REPLY_BYTES`. Every failure is a :class:`~cdr_webhook.deliver.auth.TokenUnavailable` whose
reason names the token endpoint's origin and the problem, never a secret.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

import requests
from authlib.integrations.base_client import OAuthError
from authlib.integrations.requests_client import OAuth2Session

from cdr_webhook.db import connect
from cdr_webhook.deliver.auth import AccessToken, BearerTokens, SharedTokens, TokenUnavailable
from cdr_webhook.deliver.deadline import Deadline
from cdr_webhook.deliver.egress import EndpointRefused, pem_files
from cdr_webhook.deliver.hook import network_reason
from cdr_webhook.signing import BASE_HEADERS

if TYPE_CHECKING:
    from collections.abc import Mapping

    from cdr_webhook.deliver.hook import CdrWebhookHook
    from cdr_webhook.endpoint_config import EndpointConfig

log = logging.getLogger(__name__)

#: The lifetime of a token whose reply has no ``expires_in`` (a 401 replaces it sooner).
DEFAULT_LIFETIME = 300.0
#: The longest a token is kept, whatever its ``expires_in`` says: a day (a fetch a day costs nothing).
MAX_LIFETIME = 86400.0
#: The most of a token endpoint's reply that is read.
MAX_REPLY_BYTES = 64 * 1024


def bearer_tokens(hook: CdrWebhookHook) -> BearerTokens:
    """The tokens of the hook's endpoint (which has OAuth2), shared through its CDR database."""
    endpoint = hook.endpoint
    oauth2 = endpoint.auth.oauth2
    assert oauth2 is not None
    store = None
    if hook.db_conn_id:
        db_conn_id = hook.db_conn_id
        store = SharedTokens(
            endpoint.conn_id, oauth2, lambda: connect(db_conn_id), wait_seconds=hook.timeout + 5
        )
    return BearerTokens(endpoint.conn_id, lambda: fetch_token(hook, endpoint), store)


def fetch_token(hook: CdrWebhookHook, endpoint: EndpointConfig) -> AccessToken:
    """
    Ask the endpoint's token endpoint for an access token (client credentials), through the hook's
    egress guard and the endpoint's TLS files, within one deadline. Raises :class:`TokenUnavailable`.
    """
    oauth2 = endpoint.auth.oauth2
    assert oauth2 is not None
    where = f"OAuth2 token endpoint {oauth2.token_origin}"
    fetched_at = time.time()
    try:
        with contextlib.ExitStack() as stack:
            tls = stack.enter_context(pem_files(endpoint.conn_id, endpoint.tls_extra()))
            deadline = stack.enter_context(Deadline(hook.timeout))
            session = stack.enter_context(
                OAuth2Session(
                    client_id=oauth2.client_id,
                    client_secret=oauth2.client_secret,
                    token_endpoint_auth_method=oauth2.client_auth,
                    scope=oauth2.scope,
                    trust_env=False,  # no proxy from the environment, as for the POSTs
                )
            )
            session.headers.clear()
            session.headers.update(BASE_HEADERS)
            guard = hook.guard(tls)
            session.mount("http://", guard)
            session.mount("https://", guard)
            session.register_compliance_hook("access_token_response", _bounded_reply)
            audience = {"audience": oauth2.audience} if oauth2.audience else {}
            try:
                reply = session.fetch_token(
                    oauth2.token_url,
                    grant_type="client_credentials",
                    timeout=(hook.timeout, hook.timeout),
                    allow_redirects=False,
                    stream=True,
                    **audience,
                )
            except requests.RequestException:
                if deadline.passed:
                    raise TokenUnavailable(
                        f"{where}: no reply within the {hook.timeout:g} s deadline"
                    ) from None
                raise
    except TokenUnavailable:
        raise
    except EndpointRefused as err:
        raise TokenUnavailable(f"{where} refused by the egress guard: {err}", refused=True) from None
    except OAuthError as err:
        described = f" ({err.description})" if err.description else ""
        raise TokenUnavailable(f"{where} refused the request: {err.error}{described}") from None
    except requests.HTTPError as err:
        status = err.response.status_code if err.response is not None else "?"
        raise TokenUnavailable(f"{where} answered HTTP {status}") from None
    except requests.Timeout as err:
        raise TokenUnavailable(
            f"{where} timed out after {hook.timeout:g} s ({network_reason(err)})"
        ) from None
    except requests.exceptions.SSLError as err:
        raise TokenUnavailable(f"{where}: TLS failed: {network_reason(err)}") from None
    except requests.RequestException as err:
        raise TokenUnavailable(f"{where}: connection failed: {network_reason(err)}") from None
    except ValueError as err:  # authlib: a reply that is no JSON object (a 3xx, a gateway's page)
        raise TokenUnavailable(f"{where}: {err}") from None
    token = _access_token(where, reply, fetched_at)
    log.info(
        "Endpoint %s: fetched an OAuth2 access token from %s, valid for %g s",
        endpoint.conn_id,
        oauth2.token_origin,
        token.expires_at - token.fetched_at,
    )
    return token


def _access_token(where: str, reply: Mapping[str, Any], fetched_at: float) -> AccessToken:
    """The token of a successful reply (RFC 6749 5.1), checked: a bearer token a header can carry."""
    value = reply.get("access_token")
    if not isinstance(value, str) or not value or any(ord(ch) < 33 or ord(ch) > 126 for ch in value):
        raise TokenUnavailable(f"{where}: the reply has no usable access_token")
    token_type = reply.get("token_type")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        raise TokenUnavailable(f"{where}: the token_type is {str(token_type)[:40]!r}, not Bearer")
    lifetime = reply.get("expires_in")
    try:
        seconds = float(lifetime) if lifetime is not None else DEFAULT_LIFETIME
    except (TypeError, ValueError):
        raise TokenUnavailable(f"{where}: expires_in is not a number") from None
    if not seconds > 0:
        raise TokenUnavailable(f"{where}: expires_in is {seconds:g}, not a lifetime")
    # Counted from before the request: the server's clock started no earlier.
    return AccessToken(value, fetched_at, fetched_at + min(seconds, MAX_LIFETIME))


def _bounded_reply(response: requests.Response) -> requests.Response:
    """Read at most :data:`MAX_REPLY_BYTES` of the token endpoint's reply (streamed), or refuse it."""
    body = response.raw.read(MAX_REPLY_BYTES + 1, decode_content=True)
    if len(body) > MAX_REPLY_BYTES:
        raise TokenUnavailable(f"the OAuth2 token endpoint's reply is over {MAX_REPLY_BYTES} bytes")
    response._content = body  # what response.json() reads
    response._content_consumed = True
    return response
