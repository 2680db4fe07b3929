"""Property tests of the signatures against the ``standardwebhooks`` reference library.

For arbitrary bodies (any bytes our JSON can be: UTF-8 text), message ids, timestamps and rotations
of one to four secrets, every signature we send verifies with the reference ``Webhook.verify`` under
each secret of the rotation, and with no other secret.
"""

from __future__ import annotations

import base64
import datetime as dt
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from cdr_webhook.signing import build_headers, sign

SECRETS = st.binary(min_size=24, max_size=64).map(lambda key: "whsec_" + base64.b64encode(key).decode())
BODIES = st.text(st.characters(exclude_categories=("Cs",)), max_size=2000).map(str.encode)
# Ids as receivers see them: printable ASCII, no space or comma (header syntax); ours are msg_<hex>.
IDS = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters=","), min_size=1, max_size=64
)
TIMESTAMPS = st.integers(min_value=0, max_value=2**33)  # 1970 to the year 2242


@settings(max_examples=150)
@given(
    body=BODIES, msg_id=IDS, rotation=st.lists(SECRETS, min_size=1, max_size=4, unique=True), other=SECRETS
)
def test_every_signature_verifies_with_the_reference_library_under_each_secret_of_a_rotation(
    body, msg_id, rotation, other
):
    now = int(time.time())  # the reference refuses a timestamp more than 5 minutes away
    headers = build_headers(msg_id=msg_id, timestamp=now, body=body, api_key=None, signing_secrets=rotation)
    assert len(headers["webhook-signature"].split(" ")) == len(rotation)
    for secret in rotation:
        assert Webhook(secret).verify(body, headers, json_parse=False) is None
    if other not in rotation:
        with pytest.raises(WebhookVerificationError, match="No matching signature"):
            Webhook(other).verify(body, headers, json_parse=False)


@settings(max_examples=150)
@given(body=BODIES, msg_id=IDS, secret=SECRETS, timestamp=TIMESTAMPS)
def test_signatures_at_any_timestamp_equal_the_reference_librarys(body, msg_id, secret, timestamp):
    # verify() checks the clock; sign() is the same computation without it, for any timestamp.
    when = dt.datetime.fromtimestamp(timestamp, dt.UTC)
    assert sign(secret, msg_id, timestamp, body) == Webhook(secret).sign(msg_id, when, body.decode())


@settings(max_examples=100)
@given(body=BODIES, msg_id=IDS, secret=SECRETS)
def test_a_changed_body_id_or_timestamp_does_not_verify(body, msg_id, secret):
    now = int(time.time())
    headers = build_headers(msg_id=msg_id, timestamp=now, body=body, api_key=None, signing_secrets=[secret])
    webhook = Webhook(secret)
    for changed_body, changed in (
        (body + b" ", headers),
        (body, headers | {"webhook-id": msg_id + "x"}),
        (body, headers | {"webhook-timestamp": str(now + 1)}),
    ):
        with pytest.raises(WebhookVerificationError):
            webhook.verify(changed_body, changed, json_parse=False)
