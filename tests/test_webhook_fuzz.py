"""Fuzzing the real webhook service with thousands of odd bodies, headers and URLs.

The target is a real connection that reached ``logged_out`` through the simulator (create, QR,
the phone logs out). A logged-out generation is terminal: no webhook may change its row. That
lets the fuzzer send *everything*, valid-looking QR and status webhooks included, so the bodies
the parser accepts travel the whole way (JetStream, the projector, Postgres history) instead of
being filtered out beforehand by an oracle that would have to re-implement the parser.

Checks: no answer is a 5xx; every 4xx is ``application/problem+json``; every 2xx is JSON; once
the projector has written one history entry per newly accepted webhook (it caught up, and no
accepted event poisoned it), the connection row is exactly what it was before.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from yarl import URL

from tests.stack import Stack, wait_for
from zapbus.dialects.reports import MAX_QR_CHARS
from zapbus.dialects.seed import QR_EVENTS, STATUS_EVENTS
from zapbus.tokens import webhook_token

EXAMPLES = 5000
URL_COUNT = 16  # see urls()
FIELDS = ["qr", "qrCode", "code", "status", "connection", "state", "statusCode", "statusReason"]
FIELDS += ["reason", "message", "error", "lastDisconnect", "output", "data"]
WORDS = ["connected", "open", "close", "connecting", "logout", "conflict", "2@x,y,z", "515", "401"]
CONTENT_TYPES = [
    "application/json",
    "application/json; charset=latin-1",
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=zz",
    "application/octet-stream",
    "",
]


def bodies(session: str) -> st.SearchStrategy[bytes]:
    """JSON webhooks (plausible ones for ``session``, odd envelopes, any JSON) and non-JSON."""
    scalar = (
        st.none()
        | st.booleans()
        | st.integers()
        | st.integers(min_value=-(10**40), max_value=10**40)
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=40)
        | st.sampled_from([*WORDS, 408, 440, 515, 401, 9999, 10000, -1, "QR refs attempts ended"])
    )
    value = st.recursive(
        scalar,
        lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
        max_leaves=10,
    )
    data = st.dictionaries(st.sampled_from(FIELDS), value, max_size=5) | value
    last = st.builds(
        lambda code, msg: {
            "lastDisconnect": {"error": {"output": {"statusCode": code}, "message": msg}}
        },
        value,
        value,
    )
    event = st.sampled_from(sorted(QR_EVENTS | STATUS_EVENTS)) | st.text(max_size=20) | value
    envelope = st.fixed_dictionaries(
        {"event": event},
        optional={
            "session": st.sampled_from([session, session.upper(), ""]) | value,
            "data": data | last,
            "type": event,
            "sessionId": value,
            "extra": value,
        },
    )
    plausible = st.builds(  # a known event for this session, fields of any type
        lambda name, data, named: (
            {"event": name, "data": data} | ({"session": session} if named else {})
        ),
        st.sampled_from(sorted(QR_EVENTS | STATUS_EVENTS)),
        st.dictionaries(st.sampled_from(FIELDS), scalar | value, min_size=1, max_size=4) | last,
        st.booleans(),
    )
    qr_hook = st.builds(  # well-formed but for odd texts: the parser accepts many of these
        lambda name, key, qr: {"event": name, "session": session, "data": {key: qr}},
        st.sampled_from(sorted(QR_EVENTS)),
        st.sampled_from(["qr", "qrCode", "code"]),
        st.text(min_size=1, max_size=100),
    )
    status_hook = st.builds(
        lambda name, word, code, reason: {
            "event": name,
            "data": {"status": word, "statusReason": code, "reason": reason},
        },
        st.sampled_from(sorted(STATUS_EVENTS)),
        st.sampled_from(WORDS) | st.text(max_size=70),
        st.none() | st.integers(-5, 10_050) | st.sampled_from(["401", "x", 4.5, True]),
        st.none() | st.text(max_size=400),
    )
    as_json = st.builds(
        lambda doc, ascii_only: json.dumps(doc, ensure_ascii=ascii_only).encode(),
        plausible | qr_hook | status_hook | envelope | value,
        st.booleans(),
    )
    odd = st.one_of(
        st.binary(max_size=300),
        st.just(b""),
        st.builds(lambda b, i: b[:i] + b"\xff\xfe" + b[i:], as_json, st.integers(0, 200)),
        st.builds(lambda b, i: b[:i], as_json, st.integers(0, 200)),  # truncated JSON
        st.builds(lambda n: b"[" * n + b"]" * n, st.sampled_from([64, 1000, 20_000])),
        st.builds(  # huge strings: at and past MAX_QR_CHARS, and past the body limit
            lambda n, key: json.dumps(
                {"event": "qr.update", "data": {key: "2@" + "A" * n}}
            ).encode(),
            st.sampled_from([MAX_QR_CHARS - 2, MAX_QR_CHARS - 1, 70_000, 300_000]),
            st.sampled_from(["qr", "qrCode", "code"]),
        ),
        st.sampled_from(
            [
                b'{"event":"qr","data":{"qr":NaN}}',
                b'{"event":"session.status","data":{"code":1e400}}',
                b'{"event":"qr.update","data":{"qr":"\\ud800"}}',
                b'{"event":"session.status","data":{"status":"close","code":"0x191"}}',
                b"null",
            ]
        ),
    )
    return as_json | as_json | odd


class Body(bytes):
    """A request body whose repr stays short in a failure report, however long the body."""

    def __repr__(self) -> str:
        return f"Body({bytes(self[:300])!r}{'...' if len(self) > 300 else ''}, {len(self)} bytes)"


@st.composite
def deliveries(
    draw: st.DrawFn, body: st.SearchStrategy[bytes]
) -> tuple[int, Body, str, str | None]:
    """(URL index, body, content type, webhook-id header); URL 0, the valid one, most often."""
    return (
        draw(st.sampled_from([0] * 24 + list(range(1, URL_COUNT)))),
        Body(draw(body)),
        draw(st.sampled_from(CONTENT_TYPES)),
        draw(st.none() | st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=300)),
    )


def urls(stack: Stack, cid: uuid.UUID) -> list[tuple[URL, str]]:
    """(URL, kind): the valid one first, then URLs to refuse, or to accept for another reason."""
    secret, base = stack.settings.webhook_secret, f"{stack.webhook_url}/webhooks/baileys"
    token = webhook_token(secret, cid, 1)
    stranger = uuid.uuid4()
    paths = [
        (f"{cid}/1/{token}", "valid"),
        (f"{cid}/1/{token[:-1]}{'B' if token[-1] != 'B' else 'C'}", "refused"),
        (f"{cid}/2/{token}", "refused"),
        (f"{cid}/0/{webhook_token(secret, cid, 0)}", "refused"),
        (f"{cid}/abc/{token}", "refused"),
        (f"{cid}/99999999999999999999999/{token}", "refused"),
        (f"not-a-uuid/1/{token}", "refused"),
        (f"{cid}/1/%FF%FE%00", "refused"),
        (f"{cid}/1/%ED%A0%80", "refused"),
        (f"{cid}/1/{token}/extra", "refused"),
        # Python's int() reads the Arabic-Indic digit one as 1, so this is the valid URL again.
        (f"{cid}/%D9%A1/{token}", "same connection"),
        (f"{stranger}/1/{webhook_token(secret, stranger, 1)}", "no such connection"),
        # in a pool the URL names its server, under the HMAC: it cannot be changed or dropped
        (f"{cid}/1/{webhook_token(secret, cid, 1, 'a')}?server=a", "same connection"),
        (f"{cid}/1/{webhook_token(secret, cid, 1, 'a')}?server=b", "refused"),
        (f"{cid}/1/{webhook_token(secret, cid, 1, 'a')}", "refused"),
        (f"{cid}/1/{token}?server=a", "refused"),
    ]
    return [(URL(f"{base}/{p}", encoded=True), kind) for p, kind in paths]


async def _logged_out_connection(stack: Stack) -> dict[str, Any]:
    created = await stack.create("fuzzed")
    await stack.wait_status(created["id"], "qr_ready")
    await stack.sim("POST", f"/_sim/sessions/{created['session_name']}/logout")
    row = dict(await stack.wait_status(created["id"], "logged_out"))
    await stack.wait_released(created["id"])  # the row is compared before and after
    return row


async def test_odd_webhooks_never_5xx_and_never_change_a_terminal_row(stack: Stack) -> None:
    created = await _logged_out_connection(stack)
    cid = uuid.UUID(created["id"])
    targets = urls(stack, cid)
    assert len(targets) == URL_COUNT
    row_sql = "SELECT * FROM connections WHERE id = $1"
    count_sql = "SELECT count(*) FROM connection_events WHERE connection_id = $1"
    before = dict(await stack.pool.fetchrow(row_sql, cid))
    history_before = await stack.pool.fetchval(count_sql, cid)
    loop = asyncio.get_running_loop()
    statuses: Counter[int] = Counter()
    newly_stored = 0

    async def deliver(target: int, body: bytes, ctype: str, hook_id: str | None) -> None:
        nonlocal newly_stored
        headers = {"Content-Type": ctype} if ctype else {}
        if hook_id is not None:
            headers["webhook-id"] = hook_id
        skip = () if ctype else ("Content-Type",)
        url, kind = targets[target]
        async with stack.http.post(url, data=body, headers=headers, skip_auto_headers=skip) as r:
            answer, ctype_back = await r.read(), r.content_type
        statuses[r.status] += 1
        assert r.status < 500, (r.status, answer, body[:300])
        if r.status >= 400:
            assert ctype_back == "application/problem+json", (r.status, ctype_back, answer)
            assert json.loads(answer)["status"] == r.status
        else:
            assert r.status == 202 and ctype_back == "application/json", (r.status, answer)
            reply = json.loads(answer)
            if kind != "no such connection":
                newly_stored += reply["stored"]  # each new event lands in history
        if kind == "refused":
            assert r.status in (401, 404), (url, r.status, answer)

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        phases=[Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
    )
    @given(deliveries(bodies(created["session_name"])))
    def fuzz(case: tuple[int, Body, str, str | None]) -> None:
        asyncio.run_coroutine_threadsafe(deliver(*case), loop).result(timeout=30)

    await asyncio.to_thread(fuzz)
    sent = sum(statuses.values())
    print(f"\n{sent} webhooks sent, by status: {dict(sorted(statuses.items()))}")
    print(f"{newly_stored} accepted and stored for the logged-out connection")
    assert sent >= EXAMPLES
    assert statuses[400] and statuses[401] and statuses[202] and statuses[413]

    async def caught_up() -> bool:
        return bool(await stack.pool.fetchval(count_sql, cid) == history_before + newly_stored)

    await wait_for("the projector to record every accepted webhook", caught_up, timeout=30)
    assert dict(await stack.pool.fetchrow(row_sql, cid)) == before


async def test_an_unknown_event_named_with_a_nul_is_kept_in_history(stack: Stack) -> None:
    """Found by the fuzzer: the name of an unknown event reaches history, and Postgres text
    refuses NUL; it must be stored cleaned, not refused (which lost it)."""
    created = await stack.create("nul")
    await stack.wait_status(created["id"], "qr_ready")
    cid = uuid.UUID(created["id"])
    url = f"{stack.webhook_url}/webhooks/baileys/{cid}/1/"
    url += webhook_token(stack.settings.webhook_secret, cid, 1)
    async with stack.http.post(url, json={"event": "odd\u0000event", "data": {}}) as r:
        assert r.status == 202, await r.text()

    async def kept() -> bool:
        reasons = await stack.pool.fetch(
            "SELECT reason FROM connection_events WHERE connection_id = $1"
            " AND event_type = 'webhook.ignored'",
            cid,
        )
        return any(r["reason"] == "not used: oddevent" for r in reasons)

    await wait_for("the ignored event in history", kept)


async def test_the_server_a_pool_url_names_is_signed_with_it(stack: Stack) -> None:
    """Each variant of a pool's webhook URL once, with a body of the dialect: only the URL as
    minted (its ?server= under the HMAC) is taken."""
    created = await _logged_out_connection(stack)
    cid = uuid.UUID(created["id"])
    body = {
        "event": "connection.update",
        "session": created["session_name"],
        "data": {"status": "open"},
    }
    answers = {}
    for url, kind in urls(stack, cid)[-4:]:
        async with stack.http.post(url, json=body) as r:
            answers[str(url).rsplit("/", 1)[1][-12:]] = (kind, r.status)
    assert [status for kind, status in answers.values()] == [202, 401, 401, 401], answers
