"""The secrets sweep (tests/support/secrets_sweep.py) finds each form of a secret and says where, unshown."""

from __future__ import annotations

import base64
import json

import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.support.pki import issue, pem
from tests.support.secrets_sweep import Sweep, forms_of

API_KEY = "swp-unit-key-5f0c2b9e41d7"
KEY_BYTES = b"sweep-unit-signing-key-of-32-by!"
SIGNING_SECRET = "whsec_" + base64.b64encode(KEY_BYTES).decode()
CA = issue("sweep test CA")
CLIENT_KEY = pem(*issue("sweep-client", issuer=CA, usage=ExtendedKeyUsageOID.CLIENT_AUTH))[1]
SECRETS = {"API_KEY": API_KEY, "SIGNING_SECRET": SIGNING_SECRET, "CLIENT_KEY": CLIENT_KEY}


def pem_lines() -> list[str]:
    return [line for line in CLIENT_KEY.splitlines() if "-----" not in line]


def der() -> bytes:
    return base64.b64decode("".join(pem_lines()))


FOUND = {
    "as written": ("API_KEY", f"x-api-key: {API_KEY}".encode()),
    "base64": ("API_KEY", base64.b64encode(API_KEY.encode())),
    "in basic auth's base64url": (
        "API_KEY",
        base64.urlsafe_b64encode(f"cdr:{API_KEY}".encode()).rstrip(b"="),
    ),
    "URL-encoded": ("SIGNING_SECRET", SIGNING_SECRET.replace("+", "%2B").replace("/", "%2F").encode()),
    "in hex": ("API_KEY", b"\\x" + API_KEY.encode().hex().encode()),
    "the key without whsec_": ("SIGNING_SECRET", b"key=" + SIGNING_SECRET[6:].encode()),
    "the key's raw bytes": ("SIGNING_SECRET", b"\x00\x01" + KEY_BYTES + b"\xff"),
    "a PEM JSON-escaped": ("CLIENT_KEY", json.dumps({"client_key": CLIENT_KEY}).encode()),
    "one line of a PEM": ("CLIENT_KEY", f"line {pem_lines()[1]} ".encode()),
    "a PEM as DER": ("CLIENT_KEY", der()),
}


@pytest.mark.parametrize("form", FOUND)
def test_each_form_is_found_in_a_file_and_named_without_showing_it(form, tmp_path):
    name, content = FOUND[form]
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "attempt=1.log").write_bytes(b"before " + content + b" after")
    (tmp_path / "clean.txt").write_text("nothing secret here " * 50)
    sweep = Sweep(SECRETS)

    sweep.files(tmp_path, "home")

    assert [(f.secret, f.where.split(" (")[0]) for f in sweep.findings] == [(name, "home/logs/attempt=1.log")]
    assert sweep.searched["files"] == 2
    report = sweep.report()
    assert f"<{name}>" in report
    for secret in SECRETS.values():
        assert not any(form.decode("latin-1") in report for form in forms_of(secret))


def test_an_excerpt_is_widened_over_a_secret_its_edge_would_cut():
    # A second key sits where the excerpt's context ends: it is masked whole, not shown in part.
    text = f"{API_KEY}{'.' * 55}{API_KEY}"
    sweep = Sweep({"API_KEY": API_KEY})

    sweep.text("page", text)

    [finding] = sweep.findings
    assert finding.excerpt == f"<API_KEY>{'.' * 55}<API_KEY>"


def test_clean_text_and_masked_secrets_are_no_finding():
    sweep = Sweep(SECRETS)
    sweep.text("log", "x-api-key: *** signature v1,*** " + API_KEY[:6])
    assert sweep.findings == []
    assert sweep.searched["bytes"] > 0


def test_no_form_is_short_enough_to_match_by_chance():
    assert all(len(form) >= 8 for secret in SECRETS.values() for form in forms_of(secret))
