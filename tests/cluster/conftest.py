"""Fixtures shared by the tests under tests/cluster: headless Chromium for the browser tests
(``test_browser.py``, ``test_dashboard_browser.py``)."""

import os
import shutil

import pytest

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser_window() -> tuple[int, int]:
    """The browser's window size (width, height); a test module overrides it with its own."""
    return 1000, 800


@pytest.fixture(scope="module")
def browser(browser_window):
    """Headless Chromium driven by Selenium, one per test module. Needs Debian's chromium and
    chromium-driver: skipped without them, a failure in CI (which installs them)."""
    if not (CHROMIUM and CHROMEDRIVER):
        if os.environ.get("CI"):
            pytest.fail("chromium and chromedriver are missing; run scripts/browser_deps.sh")
        pytest.skip("needs Debian's chromium and chromium-driver (scripts/browser_deps.sh)")
    from selenium import webdriver  # a test dependency, imported only where a browser runs

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    width, height = browser_window
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                 f"--window-size={width},{height}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER),
                              options=options)
    yield driver
    driver.quit()
