"""QR codes: whatever the webhook accepts renders as SVG and PNG (a longer QR is refused with
400 at the webhook, never a 500 at ``GET /qr``), and rendering never blocks the event loop."""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from typing import Any

import pytest

from services.gateway import qr
from tests.stack import Stack, wait_for
from zapbus.dialects.reports import MAX_QR_CHARS, Delivery, PayloadError, QrReport
from zapbus.dialects.seed import SeedDialect
from zapbus.tokens import webhook_token


def parse(body: bytes) -> Delivery:
    return SeedDialect.parse_webhook(body, {}, "")


LONGEST = ("2@" + "A1b/+," * MAX_QR_CHARS)[:MAX_QR_CHARS]  # byte mode, like Baileys' QRs


def _hook(qr_text: str) -> bytes:
    return json.dumps({"event": "qr.update", "data": {"qr": qr_text}}).encode()


def test_the_limit_is_what_the_largest_qr_code_holds() -> None:
    assert len(LONGEST) == MAX_QR_CHARS
    assert parse(_hook(LONGEST)).reports == [QrReport(qr=LONGEST)]
    for media in (qr.SVG, qr.PNG):
        assert qr.render(LONGEST, media)
    with pytest.raises(PayloadError, match=r"data\.qr"):
        parse(_hook(LONGEST + "x"))
    # Characters beyond ASCII take more room: the limit is on the UTF-8 length.
    wide = "€" * (MAX_QR_CHARS // 3 + 1)  # fewer characters than the limit, more bytes
    assert len(wide) < MAX_QR_CHARS
    with pytest.raises(PayloadError, match=r"data\.qr"):
        parse(_hook(wide))
    fits = "€" * (MAX_QR_CHARS // 3)
    parse(_hook(fits))
    qr.render(fits, qr.PNG)


async def test_the_longest_qr_renders_and_a_longer_one_is_refused_at_the_webhook(
    stack: Stack,
) -> None:
    created = await stack.create("long-qr")
    cid = created["id"]
    await stack.wait_status(cid, "qr_ready")
    token = webhook_token(stack.settings.webhook_secret, uuid.UUID(cid), 1)
    hook_url = f"{stack.webhook_url}/webhooks/baileys/{cid}/1/{token}"

    async with stack.http.post(hook_url, data=_hook(LONGEST + "y")) as r:
        assert r.status == 400, await r.text()
        assert r.content_type == "application/problem+json"

    async with stack.http.post(hook_url, data=_hook(LONGEST)) as r:
        assert r.status == 202, await r.text()

    async def shown() -> Any:
        status, body = await stack.get(cid)
        return body if status == 200 and body["qr"] == LONGEST else None

    await wait_for("the longest QR on the row", shown)
    url = f"{stack.gateway_url}/v1/connections/{cid}/qr"
    for media, magic in ((qr.SVG, b"<svg"), (qr.PNG, b"\x89PNG")):
        async with stack.http.get(url, headers={**stack.auth(), "Accept": media}) as r:
            assert r.status == 200, await r.text()
            assert r.content_type == media
            assert (await r.read()).startswith(magic)


async def test_rendering_runs_off_the_event_loop() -> None:
    """Every render runs on the renderer's own threads, never on the event loop's."""
    threads: list[str] = []

    def draw(text: str, media: str) -> bytes:
        threads.append(threading.current_thread().name)
        return qr.render(text, media)

    renderer = qr.QrRenderer(threads=2, max_in_flight=2, draw=draw)
    try:
        images = await asyncio.gather(*(renderer.render(LONGEST, qr.PNG) for _ in range(4)))
    finally:
        renderer.close()
    assert all(image.startswith(b"\x89PNG") for image in images)
    assert len(threads) == 4
    assert threading.current_thread().name not in threads
    assert all(name.startswith("zapbus-qr") for name in threads)
