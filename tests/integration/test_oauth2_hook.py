"""The token request goes where the POSTs go: through the egress guard, with the endpoint's TLS settings.

The hook alone (no CDR database: ``db_conn_id=None``), against a real token endpoint over HTTPS with
the test PKI, and a token URL the egress guard refuses; then a task's token rules on their own.
"""

from __future__ import annotations

import concurrent.futures
import time

import pytest

from cdr_webhook.deliver.auth import FAILURE_PAUSE, AccessToken, BearerTokens, TokenUnavailable
from cdr_webhook.deliver.hook import CdrWebhookHook
from cdr_webhook.deliver.token_fetch import _access_token
from cdr_webhook.signing import signed_headers
from tests.support.oauth2_server import BearerReceiver, TokenServer
from tests.support.pki import issue, pem, tls_context
from tests.support.task_instances import API_KEY, ENDPOINT, SECRET, connect_endpoint

CLIENT_SECRET = "cl13nt-s3cr3t-hook-5e6f7a"


@pytest.fixture
def pki(tmp_path):
    """A CA and a server certificate for 127.0.0.1 (its PEM and a server context), and another CA."""
    from cryptography.x509.oid import ExtendedKeyUsageOID

    ca = issue("test CA")
    server = issue("127.0.0.1", issuer=ca, usage=ExtendedKeyUsageOID.SERVER_AUTH)
    cert_path, key_path = tmp_path / "server.pem", tmp_path / "server.key"
    cert_path.write_text(pem(*server)[0])
    key_path.write_text(pem(*server)[1])
    return {
        "ca": pem(ca[0])[0],
        "other_ca": pem(issue("another CA")[0])[0],
        "context": lambda: tls_context((cert_path, key_path)),
    }


def post(hook: CdrWebhookHook):
    body = b'{"cdr_id": "1"}'
    return hook.post(body, signed_headers(hook.endpoint, body, "msg_1"))


def hook() -> CdrWebhookHook:
    return CdrWebhookHook(ENDPOINT, timeout=5, allowed_networks=["127.0.0.0/8"], db_conn_id=None)


def test_the_token_endpoint_is_verified_with_the_endpoints_ca_bundle_like_the_receiver(pki, monkeypatch):
    with (
        TokenServer(client_id="c", client_secret=CLIENT_SECRET, tls=pki["context"]()) as tokens,
        BearerReceiver(tokens, secret=SECRET, api_key=API_KEY, tls=pki["context"]()) as receiver,
    ):
        oauth2 = {
            "oauth2_token_url": tokens.url,
            "oauth2_client_id": "c",
            "oauth2_client_secret": CLIENT_SECRET,
        }
        connect_endpoint(monkeypatch, receiver.url, signing_secret=SECRET, ca_bundle=pki["ca"], **oauth2)
        result = post(hook())
        assert (result.http_status, result.error) == (200, None)
        assert tokens.url.startswith("https://")
        [issued] = tokens.issued
        assert receiver.received()[0].headers["authorization"] == f"Bearer {issued.token}"

        # Another CA: the token endpoint's certificate is not trusted, and nothing reaches the receiver.
        connect_endpoint(
            monkeypatch, receiver.url, signing_secret=SECRET, ca_bundle=pki["other_ca"], **oauth2
        )
        result = post(hook())
        origin = tokens.url.rsplit("/", 3)[0]
        assert result.http_status is None
        assert result.error.startswith(f"OAuth2 token endpoint {origin}: TLS failed: ")
        assert not result.refused  # retryable, as a POST's TLS failure
        assert len(receiver.received()) == 1
        assert len(tokens.issued) == 1


def test_a_token_url_the_egress_guard_refuses_is_never_asked_and_fails_the_post_at_once(monkeypatch):
    connect_endpoint(
        monkeypatch, "http://127.0.0.1:9/cdr", oauth2_token_url="http://169.254.169.254/latest/token",
        oauth2_client_id="c", oauth2_client_secret=CLIENT_SECRET,
    )  # fmt: skip

    result = post(hook())

    assert result.refused
    assert result.error.startswith(
        "OAuth2 token endpoint http://169.254.169.254 refused by the egress guard: 169.254.169.254 is a "
        "link-local address (cloud metadata lives at 169.254.169.254): refused"
    )
    assert CLIENT_SECRET not in result.error


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def counting_fetch(clock: Clock, lifetime: float = 3600, *, pause: float = 0.0):
    fetched: list[str] = []

    def fetch() -> AccessToken:
        time.sleep(pause)
        fetched.append(f"tok-{len(fetched) + 1}")
        return AccessToken(fetched[-1], clock.now, clock.now + lifetime)

    return fetch, fetched


def test_a_token_is_used_until_shortly_before_it_expires():
    assert AccessToken("t", 0, 3600).usable(3539)
    assert not AccessToken("t", 0, 3600).usable(3540)
    assert AccessToken("t", 0, 10).usable(8.9)
    assert not AccessToken("t", 0, 10).usable(9)


def test_threads_of_a_task_share_one_fetch_and_one_refresh_after_a_401():
    clock = Clock()
    fetch, fetched = counting_fetch(clock, pause=0.2)
    bearer = BearerTokens("ep", fetch, None, clock=clock)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = set(pool.map(lambda _: bearer.current(), range(8)))
        assert got == {"tok-1"}
        assert set(pool.map(lambda _: bearer.refresh("tok-1"), range(8))) == {"tok-2"}
    assert fetched == ["tok-1", "tok-2"]
    assert bearer.refresh("tok-2") is None  # refused right after a 401 too: the 401 stands
    clock.now += 3600 - 59  # within 60 s of its expiry
    assert bearer.current() == "tok-3"


def test_a_failed_fetch_is_not_asked_again_for_a_few_seconds():
    clock = Clock()
    calls = []

    def failing() -> AccessToken:
        calls.append(1)
        raise TokenUnavailable("OAuth2 token endpoint https://idp.example answered HTTP 503")

    bearer = BearerTokens("ep", failing, None, clock=clock)
    for _ in range(3):
        with pytest.raises(TokenUnavailable, match="answered HTTP 503"):
            bearer.current()
    assert len(calls) == 1
    clock.now += FAILURE_PAUSE
    with pytest.raises(TokenUnavailable):
        bearer.current()
    assert len(calls) == 2


@pytest.mark.parametrize(
    ("reply", "problem"),
    [
        ({"token_type": "Bearer"}, "the reply has no usable access_token"),
        ({"access_token": "a b", "token_type": "Bearer"}, "the reply has no usable access_token"),
        ({"access_token": "t0k", "token_type": "mac"}, "the token_type is 'mac', not Bearer"),
        ({"access_token": "t0k", "token_type": "Bearer", "expires_in": "soon"}, "expires_in is not a number"),
        (
            {"access_token": "t0k", "token_type": "Bearer", "expires_in": -5},
            "expires_in is -5, not a lifetime",
        ),
    ],
)
def test_a_reply_without_a_usable_bearer_token_is_refused_naming_the_problem(reply, problem):
    with pytest.raises(TokenUnavailable) as raised:
        _access_token("OAuth2 token endpoint https://idp.example", reply, 100.0)
    assert str(raised.value) == f"OAuth2 token endpoint https://idp.example: {problem}"


def test_a_token_lives_as_long_as_expires_in_says_else_five_minutes_and_at_most_a_day():
    def expires(**reply):
        return _access_token("x", {"access_token": "t0k", "token_type": "bearer", **reply}, 100.0).expires_at

    assert (expires(expires_in=3600), expires(), expires(expires_in=10**12)) == (3700.0, 400.0, 86500.0)
