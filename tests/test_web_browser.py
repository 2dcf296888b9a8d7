"""The web chat page in a real browser: headless Chromium (Debian's ``chromium``) driven by
Selenium through Debian's ``chromium-driver`` (the driver built with the browser, so their
versions always match; no browser download), against a real ``tsmsg serve --dev --ws``.

Two users chat in a channel and a DM: each sees the other's messages, typing indicator and
read receipt; an edit and a delete show on both pages; the server is restarted (a send
made meanwhile waits in the outbox) and both pages reconnect and show every message once,
in order; a message that looks like HTML is shown as text. A DM from someone the page has
never seen shows up in its sidebar (the server's `membership` push), and after a reload
the sidebar is the server's `channels` list with its unread counts. A screenshot of each step goes
to the test's tmp directory (``screens/``). Every wait is bounded; loopback only."""

from __future__ import annotations

import shutil
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from server_proc import ServerProcess, server_process

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

# Run in the page: tsmsg.js against a fake socket that lists 250 channels in pages of 100
# (a real server needs 101 memberships for a second page) and pushes one membership.
PAGED_CLIENT = """
const done = arguments[arguments.length - 1];
(async () => {
  const { TsmsgClient } = await import("/tsmsg.js");
  const asked = [];
  class FakeSocket {
    constructor() { this.readyState = 1; setTimeout(() => this.onopen(), 0); }
    close() {}
    push(frame) { setTimeout(() => this.onmessage({ data: JSON.stringify(frame) }), 0); }
    send(text) {
      const f = JSON.parse(text);
      if (f.t === "hello") {
        this.push({ t: "welcome", user: "carol", session: "s", heartbeat_ms: 30000, limits: {} });
        this.push({ t: "membership", channel: "dm:bob:carol", by: "bob" });
      } else if (f.t === "channels") {
        asked.push(f.after ?? null);
        const from = f.after ? Number(f.after.slice(3)) + 1 : 0;
        const n = Math.min(100, 250 - from);
        const channels = [...Array(n).keys()].map((i) => ({
          channel: `ch-${String(from + i).padStart(3, "0")}`,
          head: 2, read: 1, unread: 1, capped: false,
        }));
        this.push({ t: "ok", rid: f.rid, channels, more: from + n < 250 });
      }
    }
  }
  const client = new TsmsgClient({ url: "ws://fake/connect", token: "t", WebSocket: FakeSocket });
  const memberships = [];
  client.on("membership", (m) => memberships.push(m));
  await client.connect();
  const list = await client.listChannels();
  client.close();
  return { asked, count: list.length, first: list[0], last: list[249].channel, memberships };
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

    def dm(self, user: str) -> None:
        """Open (or start) the DM with ``user``, as a person types the name."""
        self.find("#dm-user").send_keys(f"{user}\n")
        self.wait("in the DM", lambda: self.find("#channel-title").text == f"@ {user}")

    def open(self, channel: str) -> None:
        self.find(f'#sidebar li[data-channel="{channel}"]').click()

    def sidebar(self, channel: str, css: str = "") -> str:
        """The text of a sidebar entry (or of an element in it)."""
        return str(self.find(f'#sidebar li[data-channel="{channel}"] {css}'.strip()).text)

    def message(self, text: str) -> Any:
        for row in self.find_all("#message-list .msg"):
            if row.find_element(By.CSS_SELECTOR, ".text").text == text:
                return row
        raise LookupError(text)

    def click_in(self, text: str, css: str) -> None:
        """Click ``css`` in the message ``text``: again if the list was re-rendered under
        the click (a receipt arriving meanwhile makes the rows found stale)."""

        def click() -> bool:
            self.message(text).find_element(By.CSS_SELECTOR, css).click()
            return True

        self.wait(f"{css} of {text!r} clicked", click)


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


@pytest.fixture
async def page_server(tmp_path: Path) -> AsyncIterator[tuple[ServerProcess, str]]:
    """A ``tsmsg serve --dev`` with its web page on a free port, and the page's URL."""
    ws_port = free_port()
    args = ("--dev", "--ws", f"127.0.0.1:{ws_port}")
    async with server_process(tmp_path / "data", tmp_path / "server.log", *args) as server:
        yield server, f"http://127.0.0.1:{ws_port}/"


async def test_two_users_chat_in_the_browser(
    page_server: tuple[ServerProcess, str], browsers: Callable[[str], Page]
) -> None:
    server, url = page_server
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
    alice.dm("bob")
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
    alice.click_in("psst, bob", ".edit")
    composer = alice.find("#composer")
    composer.clear()
    composer.send_keys("psst, bob (fixed)\n")
    alice.click_in("typo", ".delete")
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


async def test_a_dm_from_a_stranger_and_the_sidebar_after_a_reload(
    page_server: tuple[ServerProcess, str], browsers: Callable[[str], Page]
) -> None:
    _, url = page_server
    bob, carol = browsers("bob"), browsers("carol")
    bob.login(url)
    carol.login(url)  # a fresh page: bob never wrote, typed or changed status since
    carol.find("#join-channel").send_keys("lounge\n")
    carol.wait("in #lounge", lambda: carol.find("#channel-title").text == "# lounge")

    # Bob writes to carol: her page learns of the DM from the membership push alone.
    dm = "dm:bob:carol"
    bob.dm("carol")
    bob.send("hi carol")
    carol.wait(
        "the new DM in the sidebar",
        lambda: (
            carol.sidebar(dm, ".new") == "new message from bob"
            and carol.sidebar(dm, ".unread") == "1"
        ),
    )
    assert carol.sidebar(dm, ".name") == "bob"
    carol.shot("10-dm-from-a-stranger")
    carol.open(dm)
    carol.wait("the DM", lambda: carol.texts() == ["hi carol"])
    assert carol.find_all(f'#sidebar li[data-channel="{dm}"] .new') == []
    carol.shot("11-dm-opened")

    # Carol's page goes away; meanwhile bob writes in the DM and in #lounge.
    carol.driver.get("about:blank")
    bob.send("are you there?")
    bob.send("hello?")
    bob.wait("the DM sent", lambda: bob.texts() == ["hi carol", "are you there?", "hello?"])
    bob.find("#join-channel").send_keys("lounge\n")
    bob.wait("in #lounge", lambda: bob.find("#channel-title").text == "# lounge")
    bob.send("anyone in the lounge?")
    bob.wait("the lounge sent", lambda: bob.texts() == ["anyone in the lounge?"])

    # Back: the sidebar is the server's list, with the unread counts.
    carol.login(url)
    carol.wait(
        "the listed channels and DM with their counts",
        lambda: carol.sidebar("lounge", ".unread") == "1" and carol.sidebar(dm, ".unread") == "2",
    )
    names = [li.get_attribute("data-channel") for li in carol.find_all("#sidebar li")]
    assert names == ["general", "lounge", dm], names
    assert carol.find_all('#sidebar li[data-channel="general"] .unread') == []
    carol.shot("12-after-reload")
    carol.open(dm)
    carol.wait(
        "the DM after the reload",
        lambda: carol.texts() == ["hi carol", "are you there?", "hello?"],
    )
    carol.wait("no badge", lambda: not carol.find_all(f'li[data-channel="{dm}"] .unread'))

    # listChannels follows `more`/`after` over every page; membership is an event.
    result = carol.driver.execute_async_script(PAGED_CLIENT)
    assert result.get("error") is None, result
    assert result["asked"] == [None, "ch-099", "ch-199"], result["asked"]
    assert result["count"] == 250 and result["last"] == "ch-249", result
    assert result["first"] == {
        "channel": "ch-000",
        "head": 2,
        "read": 1,
        "unread": 1,
        "capped": False,
        "peer": None,
    }
    assert result["memberships"] == [{"channel": "dm:bob:carol", "by": "bob"}]
