"""The web chat page in a real browser: headless Chromium (Debian's ``chromium``) driven by
Selenium through Debian's ``chromium-driver`` (the driver built with the browser, so their
versions always match; no browser download), against a real ``tsmsg serve --dev --ws``.

Two users chat in a channel and a DM: each sees the other's messages, typing indicator and
read receipt; an edit and a delete show on both pages; the server is restarted (a send
made meanwhile waits in the outbox) and both pages reconnect and show every message once,
in order; a message that looks like HTML is shown as text. A screenshot of each step goes
to the test's tmp directory (``screens/``). Every wait is bounded; loopback only."""

from __future__ import annotations

import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from server_proc import ServerProcess

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium "
    "chromium-driver; .ci/run installs them)",
)

WAIT_S = 15.0  # any one thing a page must show (a reconnect after a restart included)
XSS = "<img src=x onerror=alert(1)>"

if CHROMIUM is not None:  # selenium is a dev dependency; import only where it can run
    from selenium import webdriver
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.remote.webdriver import WebDriver
    from selenium.webdriver.support.ui import WebDriverWait


# Run in the page: a client whose token provider mints 3-second tokens; after 7 s it
# sends. The server closes a connection whose token expired without a refresh.
REFRESHING_CLIENT = """
const done = arguments[arguments.length - 1];
(async () => {
  const { TsmsgClient } = await import("/tsmsg.js");
  let asked = 0;
  const client = new TsmsgClient({ tokenProvider: async () => {
    asked += 1;
    const r = await fetch("/dev/token?user=carol&ttl_s=3");
    return (await r.json()).token;
  } });
  let drops = 0;
  client.on("connection", (c) => { if (!c.connected) drops += 1; });
  const seen = [];
  client.onChannel("general", (e) => { if (e.type) seen.push(e.type); });  // entries
  await client.connect();
  await client.join("general");
  await new Promise((r) => setTimeout(r, 7000));
  const ack = await client.send("general", "carol outlived her tokens");
  await new Promise((r) => setTimeout(r, 200));  // its own event
  const out = { asked, seq: ack.seq, connected: client.connected, drops, seen, error: null };
  client.close();
  return out;
})().then(done, (e) => done({ error: String(e) }));
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Page:
    """One user's browser on the chat page."""

    def __init__(self, driver: WebDriver, user: str, screens: Path) -> None:
        self.driver, self.user, self.screens = driver, user, screens

    def wait(self, what: str, test: Callable[[], Any]) -> Any:
        def check(_: object) -> Any:
            try:
                return test()
            except Exception:  # the element is being re-rendered: look again
                return False

        return WebDriverWait(self.driver, WAIT_S, poll_frequency=0.05).until(
            check, f"{self.user}: {what}"
        )

    def find(self, css: str) -> Any:
        return self.driver.find_element(By.CSS_SELECTOR, css)

    def find_all(self, css: str) -> list[Any]:
        return list(self.driver.find_elements(By.CSS_SELECTOR, css))

    def shot(self, step: str) -> None:
        self.driver.save_screenshot(str(self.screens / f"{step}-{self.user}.png"))

    def login(self, url: str) -> None:
        self.driver.get(url)
        self.find("#login-user").send_keys(self.user)
        self.find("#login-go").click()
        self.wait("connected", lambda: self.find("#status").text == "connected")
        self.wait("in #general", lambda: self.find("#channel-title").text == "# general")

    def texts(self) -> list[str]:
        """The messages shown, acknowledged ones (not those still "sending…")."""
        return [e.text for e in self.find_all("#message-list .msg:not(.pending) .text")]

    def type(self, text: str) -> None:
        self.find("#composer").send_keys(text)

    def send(self, text: str) -> None:
        box = self.find("#composer")
        box.send_keys(text)
        self.find("#send").click()

    def open(self, channel: str) -> None:
        self.find(f'#sidebar li[data-channel="{channel}"]').click()

    def message(self, text: str) -> Any:
        for row in self.find_all("#message-list .msg"):
            if row.find_element(By.CSS_SELECTOR, ".text").text == text:
                return row
        raise LookupError(text)


@pytest.fixture
def browsers(tmp_path: Path) -> Iterator[Callable[[str], Page]]:
    screens = tmp_path / "screens"
    screens.mkdir()
    drivers: list[WebDriver] = []

    def open_page(user: str) -> Page:
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM or ""
        for arg in (
            "--headless=new",
            "--no-sandbox",
            "--disable-dev-shm-usage",
            "--window-size=1100,760",
            "--disable-gpu",
            "--no-first-run",
        ):
            options.add_argument(arg)
        driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER or ""))
        driver.set_page_load_timeout(WAIT_S)
        driver.set_script_timeout(WAIT_S)
        drivers.append(driver)
        return Page(driver, user, screens)

    try:
        yield open_page
    finally:
        for driver in drivers:
            driver.quit()


async def test_two_users_chat_in_the_browser(
    tmp_path: Path, browsers: Callable[[str], Page]
) -> None:
    ws_port = free_port()
    server = ServerProcess(
        tmp_path / "data", tmp_path / "server.log", "--dev", "--ws", f"127.0.0.1:{ws_port}"
    )
    await server.start()
    try:
        url = f"http://127.0.0.1:{ws_port}/"
        alice, bob = browsers("alice"), browsers("bob")
        alice.login(url)
        bob.login(url)
        alice.shot("01-logged-in")
        bob.shot("01-logged-in")

        # A channel: typing, the message, the read receipt.
        alice.type("hello")
        bob.wait("alice typing", lambda: "alice is typing" in bob.find("#typing").text)
        bob.shot("02-typing")
        alice.find("#send").click()
        bob.wait("the message", lambda: bob.texts() == ["hello"])
        alice.wait("bob's receipt", lambda: "read by bob" in alice.message("hello").text)
        alice.shot("03-channel-read")
        bob.shot("03-channel-read")

        # A DM: bob sees it (unread badge, then the message); alice sees his receipt.
        dm = "dm:alice:bob"
        alice.find("#dm-user").send_keys("bob\n")
        alice.wait("in the DM", lambda: alice.find("#channel-title").text == "@ bob")
        alice.send("psst, bob")
        bob.wait(
            "the DM's unread badge",
            lambda: bob.find(f'li[data-channel="{dm}"] .unread').text == "1",
        )
        bob.shot("04-dm-unread")
        bob.open(dm)
        bob.wait("the DM", lambda: bob.texts() == ["psst, bob"])
        alice.wait("bob's DM receipt", lambda: "read by bob" in alice.message("psst, bob").text)
        bob.send("hi alice")
        alice.wait("bob's reply", lambda: alice.texts() == ["psst, bob", "hi alice"])
        alice.shot("05-dm")
        bob.shot("05-dm")

        # Edit and delete of her own messages show on both pages.
        alice.send("typo")
        bob.wait("typo", lambda: bob.texts()[-1] == "typo")
        alice.message("psst, bob").find_element(By.CSS_SELECTOR, ".edit").click()
        composer = alice.find("#composer")
        composer.clear()
        composer.send_keys("psst, bob (fixed)\n")
        alice.message("typo").find_element(By.CSS_SELECTOR, ".delete").click()
        expected = ["psst, bob (fixed)", "hi alice", "message deleted"]
        for page in (alice, bob):
            page.wait("the edit and the delete", lambda p=page: p.texts() == expected)
            page.shot("06-edit-delete")

        # HTML in a message is text.
        alice.send(XSS)
        bob.wait("the HTML as text", lambda: bob.texts()[-1] == XSS)
        assert bob.find_all("#message-list img") == []
        with pytest.raises(NoAlertPresentException):
            bob.driver.switch_to.alert.text  # noqa: B018 (the check is that there is none)
        bob.shot("07-xss-as-text")
        expected.append(XSS)

        # A restart: both pages show "reconnecting…", a send made meanwhile waits in the
        # outbox, and after the reconnect every message is shown once, in order.
        await server.terminate()
        for page in (alice, bob):
            page.wait("reconnecting", lambda p=page: p.find("#status").text == "reconnecting…")
        alice.send("sent while the server was down")
        alice.wait("the outbox", lambda: alice.find(".msg.pending .text").text.startswith("sent"))
        alice.shot("08-reconnecting")
        bob.shot("08-reconnecting")
        await server.restart()
        for page in (alice, bob):
            page.wait("reconnected", lambda p=page: p.find("#status").text == "connected")
        bob.send("after the restart")
        expected += ["sent while the server was down", "after the restart"]
        for page in (alice, bob):
            page.wait("every message once, in order", lambda p=page: p.texts() == expected)
            page.shot("09-after-restart")
        alice.open("general")
        alice.wait("the channel again", lambda: alice.texts() == ["hello"])

        # tsmsg.js on its own, with tokens that live 3 s: the provider is asked again
        # before each expires, and the connection outlives several of them.
        result = alice.driver.execute_async_script(REFRESHING_CLIENT)
        assert result["error"] is None, result
        assert result["asked"] >= 3 and result["drops"] == 0, result
        assert result["connected"] and result["seq"] >= 2, result
        assert result["seen"] == ["resynced", "message"], result["seen"]
    finally:
        server.kill()
