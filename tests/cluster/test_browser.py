"""Wyrd in headless Chromium: load the page, send a message, watch the reply stream in (from
/v1/chat/completions), start a new chat; markup typed by the user stays text. A screenshot is
saved as a test artifact (``$ARTIFACTS_DIR`` or ``test-artifacts/``)."""

import os
from pathlib import Path

import pytest
import torch
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from chimera.chat import stop_token_ids
from chimera.checkpoint import save_model
from chimera.config import ChimeraConfig
from chimera.inference import TOKENIZER_DIR, load_pretrained
from chimera.model import Chimera
from chimera.tokenizer import train_char
from cluster.serve import ChatService, make_server

ARTIFACTS = Path(os.environ.get("ARTIFACTS_DIR", "test-artifacts"))


class NeverStops(torch.nn.Module):
    """The model with its stop tokens masked out, so every reply streams for all of max_tokens
    (an untrained model could otherwise end a reply after one token)."""

    def __init__(self, model, stops):
        super().__init__()
        self.inner, self.stops, self.config = model, list(stops), model.config
        self.embed = model.embed

    def init_cache(self, *args, **kwargs):
        return self.inner.init_cache(*args, **kwargs)

    def forward(self, tokens, cache=None):
        logits, cache = self.inner(tokens, cache)
        logits[..., self.stops] = float("-inf")
        return logits, cache


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    directory = tmp_path_factory.mktemp("model")
    tokenizer = train_char(["Hello there, friend! Once upon a time <img> & a story."])
    torch.manual_seed(1)
    config = ChimeraConfig(vocab_size=len(tokenizer), d_model=32, n_layers=2, n_heads=2,
                           n_kv_heads=1, window_size=32, max_seq_len=256)
    save_model(Chimera(config), directory)
    tokenizer.save_pretrained(str(directory / TOKENIZER_DIR))
    model, tokenizer = load_pretrained(directory)
    service = ChatService(NeverStops(model, stop_token_ids(tokenizer)), tokenizer,
                          "browser-test")
    with make_server(service, "127.0.0.1", 0) as httpd:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/"


def test_send_a_message_and_see_the_reply_stream(browser, url):  # (browser: skips first)
    browser.get(url)
    wait = WebDriverWait(browser, 60, poll_frequency=0.02)
    wait.until(lambda d: "parameters" in d.find_element(By.ID, "model").text)
    browser.find_element(By.ID, "max_tokens").clear()
    browser.find_element(By.ID, "max_tokens").send_keys("120")
    attack = '<img src=x onerror="document.title=\'pwned\'">Hello!'
    browser.find_element(By.ID, "input").send_keys(attack)
    browser.find_element(By.ID, "send").click()
    # The reply grows while it streams: seen partly written, then finished.
    lengths = []
    streaming = (By.CSS_SELECTOR, ".assistant.streaming")
    wait.until(lambda d: d.find_elements(*streaming))
    while browser.find_elements(*streaming):
        lengths.append(len(browser.find_element(By.CSS_SELECTOR, ".assistant").text))
    final = browser.find_element(By.CSS_SELECTOR, ".assistant").text
    assert len(final) > 0
    assert any(0 < n < len(final) for n in lengths), "the reply appeared all at once"
    user = browser.find_element(By.CSS_SELECTOR, ".user")
    assert user.text == attack  # shown as typed: text, not markup
    assert not browser.find_elements(By.CSS_SELECTOR, "#log img")
    assert browser.title != "pwned"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "wyrd-chat.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 1000
    browser.find_element(By.ID, "new-chat").click()
    assert not browser.find_elements(By.CSS_SELECTOR, ".msg")
    assert "new conversation" in browser.find_element(By.ID, "log").text
