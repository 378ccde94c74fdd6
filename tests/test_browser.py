"""The web page at ``/`` driven in a real headless Chromium (Debian's, through Playwright).

Paste the API key, create a connection from the "New connection" modal, see the QR image the
moment it arrives, have the simulated phone scan it, and see the modal turn "connected".
Screenshots go to the test's ``tmp_path`` and are copied to ``test-output/browser/`` in the
repository (git-ignored) for a human to look at.
"""

from __future__ import annotations

import re
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, ViewportSize, async_playwright, expect

from tests.stack import Stack

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
]
OUTPUT = Path(__file__).resolve().parents[1] / "test-output" / "browser"
WAIT_MS = 15_000  # every wait below is bounded by this deadline


def _chromium() -> str:
    """Debian's Chromium, or a failure that says how to get it."""
    if not CHROMIUM.is_file():
        pytest.fail(
            f"{CHROMIUM} is missing: run `make deps-system` (Debian's chromium package; "
            "`make test` installs it). Do not run `playwright install`."
        )
    return str(CHROMIUM)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    executable = _chromium()
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            await b.close()


def _keep(shot: Path) -> None:
    """Copy a screenshot where a human can find it."""
    OUTPUT.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, OUTPUT / shot.name)


async def _session_name(stack: Stack, name: str) -> str:
    async with stack.http.get(f"{stack.gateway_url}/v1/connections", headers=stack.auth()) as r:
        assert r.status == 200, await r.text()
        items = [c for c in (await r.json())["items"] if c["name"] == name]
    assert len(items) == 1, f"expected one connection named {name!r}: {items}"
    session: str = items[0]["session_name"]
    return session


async def _sign_in(page: Page, stack: Stack) -> None:
    await page.goto(f"{stack.gateway_url}/")
    await page.get_by_label("API key").fill(stack.api_key)
    await page.get_by_role("button", name="Use key").click()
    await expect(page.get_by_role("button", name="New connection")).to_be_enabled()


async def test_page_creates_connection_shows_qr_then_connected(
    stack: Stack, browser: Browser, tmp_path: Path
) -> None:
    page = await browser.new_page(viewport={"width": 1100, "height": 760})
    page.set_default_timeout(WAIT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("response", lambda r: errors.append(f"{r.status} {r.url}") if r.status >= 400 else None)

    await _sign_in(page, stack)
    await expect(page.locator("#empty")).to_be_visible()

    await page.get_by_role("button", name="New connection").click()
    await page.get_by_label("Name").fill("Browser sales")
    await page.get_by_role("button", name="Create").click()

    dialog = page.locator("#qr-dialog")
    await expect(dialog).to_be_visible()
    image = page.locator("#qr-image")
    await expect(image).to_be_visible()
    await expect(image).to_have_attribute("src", re.compile(r"^blob:"))
    await page.wait_for_function(
        "() => { const i = document.querySelector('#qr-image');"
        " return i.complete && i.naturalWidth > 0; }"
    )
    status = page.locator("#qr-status")
    await expect(status).to_have_attribute("data-status", "qr_ready")
    await expect(page.locator("#connections tbody tr")).to_have_count(1)

    shot = tmp_path / "qr-modal.png"
    await dialog.screenshot(path=shot)
    _keep(shot)
    whole = tmp_path / "page-with-qr.png"
    await page.screenshot(path=whole)
    _keep(whole)

    session = await _session_name(stack, "Browser sales")
    await stack.sim("POST", f"/_sim/sessions/{session}/scan")

    await expect(status).to_have_attribute("data-status", "connected")
    await expect(status).to_have_text("connected")
    await expect(image).to_be_hidden()
    connected = tmp_path / "connected-modal.png"
    await dialog.screenshot(path=connected)
    _keep(connected)

    await page.get_by_role("button", name="Close").click()
    await expect(dialog).to_be_hidden()
    badge = page.locator("#connections tbody tr .badge")
    await expect(badge).to_have_text("connected")
    listing = tmp_path / "connections.png"
    await page.screenshot(path=listing)
    _keep(listing)
    assert errors == [], f"the page logged errors: {errors}"


async def test_page_refuses_a_wrong_key_and_creates_on_enter(
    stack: Stack, browser: Browser
) -> None:
    page = await browser.new_page()
    page.set_default_timeout(WAIT_MS)
    await page.goto(f"{stack.gateway_url}/")
    await expect(page.locator("#notice")).to_contain_text("Paste an API key")

    await page.get_by_label("API key").fill("zb_not-a-key")
    await page.get_by_role("button", name="Use key").click()
    await expect(page.locator("#notice")).to_have_text("That API key was not accepted.")
    await expect(page.get_by_role("button", name="New connection")).to_be_disabled()

    await _sign_in(page, stack)
    await page.get_by_role("button", name="New connection").click()
    await page.get_by_role("button", name="Cancel").click()
    await expect(page.locator("#new-dialog")).to_be_hidden()

    # Enter in the name field creates (the first button of the form is Cancel: it must not win)
    await page.get_by_role("button", name="New connection").click()
    await page.get_by_label("Name").fill("Support")
    await page.get_by_label("Name").press("Enter")
    await expect(page.locator("#qr-image")).to_be_visible()
    await page.keyboard.press("Escape")
    await expect(page.locator("#qr-dialog")).to_be_hidden()
    rows = page.locator("#connections tbody tr")
    await expect(rows).to_have_count(1)
    await expect(rows.locator("td.name")).to_have_text("Support")


async def test_page_links_by_code_shown_large_and_grouped(
    stack: Stack, browser: Browser, tmp_path: Path
) -> None:
    page = await browser.new_page(viewport={"width": 1100, "height": 760})
    page.set_default_timeout(WAIT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    await _sign_in(page, stack)
    await page.get_by_role("button", name="New connection").click()
    await page.get_by_label("Name").fill("By code")
    await page.get_by_label("Phone number (optional)").fill("+5511987654321")
    await page.get_by_role("button", name="Create").click()

    code = page.locator("#pairing-code")
    # the code comes after the create and a round trip to the server: allow the page's wait
    await expect(code).to_be_visible(timeout=WAIT_MS)
    await expect(code).to_have_text(re.compile(r"^[A-Z0-9]{4}-[A-Z0-9]{4}$"))
    await expect(page.locator("#qr-status")).to_have_attribute("data-status", "code_ready")
    await expect(page.locator("#qr-image")).to_be_hidden()
    await expect(page.get_by_text("Link with phone number instead")).to_be_visible()
    shot = tmp_path / "code-modal.png"
    await page.locator("#qr-dialog").screenshot(path=shot)
    _keep(shot)

    session = await _session_name(stack, "By code")
    await stack.sim("POST", f"/_sim/sessions/{session}/enter-code")
    await expect(page.locator("#qr-status")).to_have_attribute("data-status", "connected")
    await expect(code).to_be_hidden()
    assert not errors, errors


# --- languages, and the /connect/{token} page for the person who scans ---------------------

PHONE: ViewportSize = {"width": 390, "height": 844}


def _watch(page: Page) -> list[str]:
    """Errors the page reports: exceptions, console errors (CSP violations among them)."""
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    return errors


async def _client_link(stack: Stack, cid: str, ttl: int = 600) -> str:
    async with stack.http.post(
        f"{stack.gateway_url}/v1/connections/{cid}/client-token",
        json={"ttl_seconds": ttl},
        headers=stack.auth(),
    ) as r:
        assert r.status == 200, await r.text()
        token: str = (await r.json())["token"]
    return f"{stack.gateway_url}/connect/{token}"


async def _phone_page(browser: Browser, locale: str) -> Page:
    context = await browser.new_context(
        locale=locale, viewport=PHONE, device_scale_factor=2, is_mobile=True, has_touch=True
    )
    page = await context.new_page()
    page.set_default_timeout(WAIT_MS)
    return page


async def _fits_the_screen(page: Page) -> None:
    width = await page.evaluate("() => document.documentElement.scrollWidth")
    assert width <= PHONE["width"], f"the page scrolls sideways: {width}px"


async def test_page_in_portuguese_with_translated_states_and_a_switch_to_english(
    stack: Stack, browser: Browser, tmp_path: Path
) -> None:
    context = await browser.new_context(locale="pt-BR", viewport={"width": 1100, "height": 760})
    page = await context.new_page()
    page.set_default_timeout(WAIT_MS)
    errors = _watch(page)
    await page.goto(f"{stack.gateway_url}/")
    await expect(page.locator("html")).to_have_attribute("lang", "pt-BR")
    await expect(page.locator("#notice")).to_have_text(
        "Cole uma chave de API acima para ver suas conexões."
    )
    await page.get_by_label("Chave de API").fill(stack.api_key)
    await page.get_by_role("button", name="Usar chave").click()
    await expect(page.get_by_role("button", name="Nova conexão")).to_be_enabled()
    await expect(page.locator("#empty")).to_have_text(
        "Nenhuma conexão ainda. Crie uma para receber um QR code."
    )
    await page.get_by_role("button", name="Nova conexão").click()
    await page.get_by_label("Nome").fill("Vendas")
    await page.get_by_role("button", name="Criar", exact=True).click()

    status = page.locator("#qr-status")
    await expect(page.locator("#qr-image")).to_be_visible()
    await expect(status).to_have_text("QR code pronto")
    await expect(page.locator("#qr-title")).to_have_text("Leia com o WhatsApp")
    shot = tmp_path / "qr-modal-pt-BR.png"
    await page.locator("#qr-dialog").screenshot(path=shot)
    _keep(shot)

    session = await _session_name(stack, "Vendas")
    await stack.sim("POST", f"/_sim/sessions/{session}/scan")
    await expect(status).to_have_text("conectado")
    await expect(page.locator("#qr-title")).to_have_text("WhatsApp conectado")
    # a reason from the closed list, translated
    await stack.sim("POST", f"/_sim/sessions/{session}/logout")
    await expect(status).to_have_attribute("data-status", "logged_out")
    await expect(status).to_have_text("desconectado")
    await expect(page.locator("#qr-reason")).to_have_text("O celular desconectou este aparelho.")

    # the switch: English at once, the open modal included, and kept on reload
    await page.get_by_label("Idioma").select_option("en")
    await expect(page.locator("html")).to_have_attribute("lang", "en")
    await expect(status).to_have_text("logged out")
    await expect(page.locator("#qr-reason")).to_have_text("The phone logged this device out.")
    await page.get_by_role("button", name="Close").click()
    await expect(page.get_by_role("button", name="New connection")).to_be_visible()
    await expect(page.locator("#connections tbody tr .badge")).to_have_text("logged out")
    await page.reload()
    await expect(page.get_by_role("button", name="New connection")).to_be_enabled()
    await expect(page.locator("#connections th").first).to_have_text("Name")
    await page.get_by_label("Language").select_option("pt-BR")
    await expect(page.locator("#connections tbody tr .badge")).to_have_text("desconectado")
    assert not errors, errors


async def test_connect_page_in_english_on_a_phone_shows_the_qr_until_connected(
    stack: Stack, browser: Browser, tmp_path: Path
) -> None:
    created = await stack.create("Scan me")
    await stack.wait_status(created["id"], "qr_ready")
    link = await _client_link(stack, created["id"])
    page = await _phone_page(browser, "en-US")
    errors = _watch(page)
    await page.goto(link)
    await expect(page.locator("html")).to_have_attribute("lang", "en")
    await expect(page.get_by_role("heading", name="Link your WhatsApp")).to_be_visible()
    qr = page.locator("#qr")
    await expect(qr).to_be_visible()
    await page.wait_for_function(
        "() => { const i = document.querySelector('#qr');"
        " return i.complete && i.naturalWidth > 0; }"
    )
    await expect(
        page.get_by_text("Go to Settings → Linked devices → Link a device.")
    ).to_be_visible()
    await expect(page.locator("#status")).to_have_text("qr ready")
    box = await qr.bounding_box()
    assert box and box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"], box
    assert box["width"] >= 200, box  # large enough to scan from a screen
    await _fits_the_screen(page)
    shot = tmp_path / "connect-qr-en.png"
    await page.screenshot(path=shot, full_page=True)
    _keep(shot)

    await stack.sim("POST", f"/_sim/sessions/{created['session_name']}/scan")
    done = page.locator("#done")
    await expect(done).to_be_visible()
    await expect(done).to_contain_text("WhatsApp connected")
    await expect(done).to_contain_text("You can close this page.")
    await expect(qr).to_be_hidden()
    await _fits_the_screen(page)
    shot = tmp_path / "connect-done-en.png"
    await page.screenshot(path=shot, full_page=True)
    _keep(shot)
    # the page never saw the tenant's API key, and nothing asked the browser for one
    assert stack.api_key not in await page.content()
    assert not errors, errors


async def test_connect_page_in_portuguese_links_by_code(
    stack: Stack, browser: Browser, tmp_path: Path
) -> None:
    async with stack.http.post(
        f"{stack.gateway_url}/v1/connections",
        json={"name": "Por código", "login": "code", "phone_number": "+5511987654321"},
        headers=stack.auth(),
    ) as r:
        assert r.status == 202, await r.text()
        created = await r.json()
    await stack.wait_status(created["id"], "code_ready")
    link = await _client_link(stack, created["id"])
    page = await _phone_page(browser, "pt-BR")
    errors = _watch(page)
    await page.goto(link)
    await expect(page.locator("html")).to_have_attribute("lang", "pt-BR")
    code = page.locator("#code")
    await expect(code).to_be_visible()
    await expect(code).to_have_text(re.compile(r"^[A-Z0-9]{4}-[A-Z0-9]{4}$"))
    await expect(page.get_by_role("heading", name="Conectar com código")).to_be_visible()
    await expect(page.get_by_text("Toque em “Conectar com número de telefone”.")).to_be_visible()
    await expect(page.locator("#status")).to_have_text("código pronto")
    await expect(page.locator("#qr")).to_be_hidden()
    await _fits_the_screen(page)
    shot = tmp_path / "connect-code-pt-BR.png"
    await page.screenshot(path=shot, full_page=True)
    _keep(shot)

    await stack.sim("POST", f"/_sim/sessions/{created['session_name']}/enter-code")
    done = page.locator("#done")
    await expect(done).to_contain_text("WhatsApp conectado")
    await expect(done).to_contain_text("Você já pode fechar esta página.")
    shot = tmp_path / "connect-done-pt-BR.png"
    await page.screenshot(path=shot, full_page=True)
    _keep(shot)
    await page.get_by_label("Idioma").select_option("en")
    await expect(done).to_contain_text("WhatsApp connected")
    assert not errors, errors


async def test_connect_page_says_when_the_link_expired_in_both_languages(
    stack: Stack, browser: Browser
) -> None:
    from services.gateway import client_tokens

    created = await stack.create("Expiring")
    await stack.wait_status(created["id"], "qr_ready")
    key = client_tokens.signing_key(stack.settings)
    old, _ = client_tokens.mint(key, stack.tenant_id, uuid.UUID(created["id"]), 60, 1.0)
    for locale, text in (
        ("pt-BR", "Este link expirou. Peça um novo."),
        ("en-US", "This link has expired. Ask for a new one."),
    ):
        page = await _phone_page(browser, locale)
        response = await page.goto(f"{stack.gateway_url}/connect/{old}")
        assert response is not None and response.status == 410
        await expect(page.get_by_role("alert")).to_have_text(text)
    page = await _phone_page(browser, "pt-BR")
    await page.goto(f"{stack.gateway_url}/connect/zbc_nope.nope")
    await expect(page.get_by_role("alert")).to_contain_text("Este link não é válido.")

    # a link that expires while it is open: the stream ends, the page says so
    page = await _phone_page(browser, "en-US")
    await page.goto(await _client_link(stack, created["id"], ttl=3))
    await expect(page.locator("#qr")).to_be_visible()
    await expect(page.get_by_role("alert")).to_have_text(
        "This link has expired. Ask for a new one.", timeout=WAIT_MS
    )
    await expect(page.locator("#qr")).to_be_hidden()
