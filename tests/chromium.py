"""A Selenium-driven headless Chromium (Debian's chromium + chromium-driver) with its console and
network logs, for the map's browser test, its benchmark and its screenshot script."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run")
TIMEOUT_S = 60.0


def available() -> bool:
    return CHROMIUM.is_file() and CHROMEDRIVER.is_file()


class Browser:
    """One headless Chromium; ``requests`` and ``console`` fill from its logs on :meth:`collect`."""

    def __init__(self, profile: Path, *, size: tuple[int, int] = (1300, 950), downloads: Path | None = None):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        os.environ.setdefault("SE_AVOID_STATS", "true")  # Selenium Manager is never run: both paths are given
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for flag in (*FLAGS, f"--window-size={size[0]},{size[1]}", f"--user-data-dir={profile}"):
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
        if downloads:
            options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                                      "download.prompt_for_download": False})
        self.driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
        self.driver.set_page_load_timeout(TIMEOUT_S)
        self.driver.set_script_timeout(TIMEOUT_S)
        if downloads:
            self.driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
        self.console: list[dict] = []
        self.requests: list[str] = []

    def js(self, script: str, *args):
        return self.driver.execute_script(script, *args)

    def wait(self, script: str, message: str, timeout: float = TIMEOUT_S, *args):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(script, *args)
            if value:
                return value
            time.sleep(0.05)
        self.collect()
        raise AssertionError(f"{message}; console: {self.console[-5:]}")

    def collect(self) -> None:
        self.console += self.driver.get_log("browser")
        for entry in self.driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message.get("method") == "Network.requestWillBeSent":
                self.requests.append(message["params"]["request"]["url"])

    def errors(self) -> list[dict]:
        self.collect()
        return [e for e in self.console if e["level"] == "SEVERE"]

    def outside_requests(self) -> list[str]:
        """Requests that left the machine: anything but file:, data:, blob:, chrome: or 127.0.0.1."""
        self.collect()
        local = ("file:", "data:", "blob:", "chrome:", "about:", "http://127.0.0.1", "ws://127.0.0.1")
        return [r for r in self.requests if not r.startswith(local)]

    def quit(self) -> None:
        self.driver.quit()
