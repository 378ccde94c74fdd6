"""Standard Webhooks signatures: the unit rules and the webhook service with a secret set."""

from __future__ import annotations

import base64
import time
import uuid

import msgspec
import pytest

from tests.stack import FAST_SIM, start_stack
from zapbus import signing
from zapbus.config import Settings
from zapbus.tokens import webhook_token

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
BODY = b'{"event":"qr.update","data":{"qr":"2@x"}}'


def test_a_signed_delivery_verifies() -> None:
    now = int(time.time())
    headers = signing.signed_headers(SECRET, "msg_1", now, BODY)
    signing.verify(SECRET, headers, BODY, now, 300)


def test_known_vector_from_the_standard_webhooks_spec() -> None:
    # From the Standard Webhooks reference implementation's tests.
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"test": 2432232314}'
    signature = signing.sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body)
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"webhook-signature": "v1,AAAA"}, "no matching signature"),
        ({"webhook-id": "msg_2"}, "no matching signature"),
        ({"webhook-timestamp": "1"}, "outside the replay window"),
        ({"webhook-timestamp": "soon"}, "Unix seconds"),
        ({"webhook-signature": ""}, "missing"),
    ],
)
def test_tampered_or_stale_deliveries_are_refused(change: dict[str, str], why: str) -> None:
    now = int(time.time())
    headers = {**signing.signed_headers(SECRET, "msg_1", now, BODY), **change}
    with pytest.raises(signing.SignatureError, match=why):
        signing.verify(SECRET, headers, BODY, now, 300)


def test_any_of_several_signatures_may_match_for_key_rotation() -> None:
    now = int(time.time())
    good = signing.sign(SECRET, "msg_1", now, BODY)
    headers = {
        "webhook-id": "msg_1",
        "webhook-timestamp": str(now),
        "webhook-signature": f"v1,b2xkLWtleQ== {good}",
    }
    signing.verify(SECRET, headers, BODY, now, 300)


async def test_webhook_service_requires_signatures_when_configured(settings: Settings) -> None:
    sim = msgspec.structs.replace(FAST_SIM, signing_secret=SECRET)
    async with start_stack(settings, sim, webhook_signing_secret=SECRET) as stack:
        created = await stack.create("signed")
        await stack.wait_status(created["id"], "qr_ready")  # the simulator signs its webhooks
        cid = uuid.UUID(created["id"])
        token = webhook_token(stack.settings.webhook_secret, cid, 1)
        url = f"{stack.webhook_url}/webhooks/baileys/{cid}/1/{token}"
        body = b'{"event":"session.status","data":{"status":"connected"}}'
        stale = signing.signed_headers(SECRET, "msg_old", int(time.time()) - 3600, body)
        for headers in ({}, stale):
            async with stack.http.post(url, data=body, headers=headers) as r:
                assert r.status == 401
                problem = await r.json(content_type=None)
                assert problem["type"].endswith("/invalid-webhook-signature")
        assert (await stack.get(created["id"]))[1]["status"] == "qr_ready"
