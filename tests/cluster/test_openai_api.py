"""`chimera serve` through the real `openai` client: plain and streamed completions, stop
strings, max_tokens, errors, the concurrency cap, a client that gives up, other sites."""

import http.client
import json
import time

import openai
import pytest

from chimera import chat
from chimera.inference import load_pretrained
from chimera.tokenizer import train_char
from cluster.serve import ChatService, Limits, make_server
from cluster.serve.service import StopStrings

TEXT = "Hello there! Who is the story about? Lily and Tom went to the park. abcxyz"
HELLO = [{"role": "user", "content": "Hello there!"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, make_model_dir):
    return make_model_dir(tmp_path_factory.mktemp("model"), train_char([TEXT]), 160)


@pytest.fixture
def served(model_dir):
    """(client, service, server) for a server with room for two generations at once."""
    model, tokenizer = load_pretrained(model_dir)
    service = ChatService(model, tokenizer, model_dir.name,
                          Limits(max_new_tokens=64, max_concurrent=2))
    with make_server(service, "127.0.0.1", 0) as httpd:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{httpd.server_address[1]}/v1",
                               api_key="none", max_retries=0)
        yield client, service, httpd
        client.close()


def _fake_reply(monkeypatch, service, text, delay=0.0, produced=None):
    """The model's reply becomes ``text`` repeated (one token a character), up to its budget,
    ``delay`` seconds a token; ``produced`` gets a 1 for each token made."""
    ids = [service.tokenizer.convert_tokens_to_ids(c) for c in text]

    def stream(model, prompt, sampling):
        for i in range(sampling.max_new_tokens):
            if produced is not None:
                produced.append(1)
            time.sleep(delay)
            yield ids[i % len(ids)]

    monkeypatch.setattr(chat, "stream", stream)


def test_plain_and_streamed_completions_agree(served):
    client, service, _ = served
    name = service.name
    plain = client.chat.completions.create(model=name, messages=HELLO, max_tokens=20, seed=7,
                                           temperature=1.0)
    assert plain.object == "chat.completion" and plain.model == name
    assert plain.id.startswith("chatcmpl-")
    (choice,) = plain.choices
    assert choice.index == 0 and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    usage = plain.usage
    assert usage.prompt_tokens > 0 and 0 <= usage.completion_tokens <= 20
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    chunks = list(client.chat.completions.create(
        model=name, messages=HELLO, max_tokens=20, seed=7, temperature=1.0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert chunks[-1].choices == [] and chunks[-1].usage == usage  # the usage comes last
    assert chunks[-2].choices[0].finish_reason == choice.finish_reason
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content


def test_stop_ends_the_text_before_the_stop_string(served, monkeypatch):
    client, service, _ = served
    _fake_reply(monkeypatch, service, "abcxyz")
    ask = dict(model=service.name, messages=HELLO, max_tokens=30)
    answer = client.chat.completions.create(**ask, stop="cxy").choices[0]
    assert answer.message.content == "ab" and answer.finish_reason == "stop"  # spans 3 tokens
    chunks = list(client.chat.completions.create(**ask, stop=["zz", "yzab"], stream=True))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert "".join(pieces) == "abcx" and chunks[-1].choices[0].finish_reason == "stop"
    # A stop string's start that the reply does not go on to complete is shown after all.
    answer = client.chat.completions.create(**ask, stop="abd").choices[0]
    assert answer.message.content == ("abcxyz" * 5) and answer.finish_reason == "length"


def test_stop_strings_hold_back_only_what_could_start_one():
    cut = StopStrings(["END", "xy"])
    assert cut.feed("hello E") == ("hello ", False)  # "E" could begin "END"
    assert cut.feed("N") == ("", False)
    assert cut.feed("Dless") == ("", True)
    cut = StopStrings(["END"])
    assert cut.feed("aE") == ("a", False) and cut.feed("Ebb") == ("EEbb", False)
    assert StopStrings([]).feed("END") == ("END", False)
    assert StopStrings(["b", "abc"]).feed("xxabc") == ("xx", True)  # the one starting first


def test_max_tokens_is_the_reply_length(served, monkeypatch):
    client, service, _ = served
    _fake_reply(monkeypatch, service, "l")
    answer = client.chat.completions.create(model=service.name, messages=HELLO, max_tokens=9)
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage.completion_tokens == 9 and answer.choices[0].message.content == "l" * 9
    answer = client.chat.completions.create(model=service.name, messages=HELLO,
                                            max_completion_tokens=3)
    assert answer.usage.completion_tokens == 3


def test_a_bad_request_is_a_400_naming_the_field(served):
    client, service, _ = served
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=service.name, messages=HELLO, temperature=5)
    assert bad.value.param == "temperature" and "temperature" in bad.value.message
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=service.name, messages=HELLO, n=2)
    assert bad.value.param == "n" and bad.value.code == "unsupported_parameter"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=service.name, messages=HELLO, extra_body={"k": 1})
    assert bad.value.param == "k" and bad.value.code == "unknown_parameter"
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert missing.value.code == "model_not_found" and service.name in missing.value.message
    assert service.pieces_generated == 0


def test_the_model_list(served):
    client, service, _ = served
    assert [m.id for m in client.models.list()] == [service.name]
    assert client.models.retrieve(service.name).owned_by == "chimera"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_beyond_max_concurrent_is_a_503_and_then_served_again(served, monkeypatch):
    client, service, _ = served
    _fake_reply(monkeypatch, service, "l", delay=0.05)
    ask = dict(model=service.name, messages=HELLO, max_tokens=60)
    streams = [client.chat.completions.create(**ask, stream=True) for _ in range(2)]
    assert service.active == 2  # both generating (their headers came back)
    with pytest.raises(openai.InternalServerError) as busy:
        client.chat.completions.create(**ask, stream=True)
    assert busy.value.status_code == 503 and "busy" in busy.value.message
    for stream in streams:
        stream.close()  # the clients leave: their generations stop
    deadline = time.monotonic() + 10
    while service.active and time.monotonic() < deadline:
        time.sleep(0.02)
    assert service.active == 0
    answer = client.chat.completions.create(**{**ask, "max_tokens": 3})
    assert answer.choices[0].message.content == "lll"


def test_a_plain_completion_whose_client_gives_up_stops(served, monkeypatch):
    client, service, _ = served
    produced = []
    _fake_reply(monkeypatch, service, "l", delay=0.1, produced=produced)  # 6 s for 60 tokens
    with pytest.raises(openai.APITimeoutError):
        client.with_options(timeout=0.5).chat.completions.create(
            model=service.name, messages=HELLO, max_tokens=60)
    deadline = time.monotonic() + 3
    while service.active and time.monotonic() < deadline:
        time.sleep(0.02)
    assert service.active == 0 and len(produced) < 20  # stopped well before its 60 tokens
    stopped_at = len(produced)
    time.sleep(0.3)
    assert len(produced) == stopped_at


@pytest.mark.parametrize("content_type, origin, status", [
    ("application/x-www-form-urlencoded", "http://evil.example", 403),
    ("application/x-www-form-urlencoded", None, 415),
    ("multipart/form-data; boundary=x", None, 415),
    ("text/plain", None, 415),
    ("application/json", "http://evil.example", 403),  # what a script elsewhere would send
])
def test_a_cross_origin_form_post_is_refused(served, content_type, origin, status):
    _, service, httpd = served
    conn = http.client.HTTPConnection(*httpd.server_address[:2], timeout=30)
    headers = {"Content-Type": content_type, **({"Origin": origin} if origin else {})}
    form = "messages=" + json.dumps(HELLO)
    conn.request("POST", "/v1/chat/completions", form.encode(), headers)
    response = conn.getresponse()
    error = json.loads(response.read())["error"]
    assert response.status == status and error["type"] == "invalid_request_error"
    assert response.getheader("Access-Control-Allow-Origin") is None
    conn.request("OPTIONS", "/v1/chat/completions", headers={"Origin": "http://evil.example",
                                                             "Access-Control-Request-Method":
                                                             "POST"})
    preflight = conn.getresponse()
    preflight.read()
    assert preflight.status in (403, 405)  # a preflight is never granted
    assert preflight.getheader("Access-Control-Allow-Origin") is None
    conn.close()
    assert service.pieces_generated == 0


def test_a_bug_is_a_500_and_one_line_in_the_log(served, monkeypatch, capsys):
    client, service, _ = served

    def broken(model, prompt, sampling):
        raise RuntimeError("boom")
        yield  # a generator, as the real one

    monkeypatch.setattr(chat, "stream", broken)
    with pytest.raises(openai.InternalServerError) as error:
        client.chat.completions.create(model=service.name, messages=HELLO)
    assert error.value.status_code == 500 and "RuntimeError" in error.value.message
    with pytest.raises(openai.APIError) as error:  # the stream began: an error event ends it
        list(client.chat.completions.create(model=service.name, messages=HELLO, stream=True))
    assert "RuntimeError" in error.value.message
    log = capsys.readouterr().err
    assert "Traceback" not in log and log.count("internal error: RuntimeError: boom") == 2
    assert service.active == 0
