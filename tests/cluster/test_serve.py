"""`chimera serve`'s API over raw HTTP: the page, streaming, history trimming, limits, escaping,
concurrency and clients that leave mid-stream. (With the `openai` client: test_openai_api.py.)"""

import http.client
import json
import socket
import threading
import time

import pytest

from chimera import chat
from chimera.chat import reply
from chimera.generation import SamplingConfig
from chimera.inference import load_pretrained
from chimera.tokenizer import train_char
from cluster.serve import ChatService, Limits, make_server

TEXT = "Hello there! Who is the story about? Lily and Tom went to the park. <>&\"'/"
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, make_model_dir):
    return make_model_dir(tmp_path_factory.mktemp("model"), train_char([TEXT]), 160)


@pytest.fixture
def server(model_dir):
    model, tokenizer = load_pretrained(model_dir)
    service = ChatService(model, tokenizer, "test-model",
                          Limits(max_message_chars=200, max_messages=12, max_new_tokens=64,
                                 max_body_bytes=20_000, max_concurrent=4))
    with make_server(service, "127.0.0.1", 0) as httpd:
        yield httpd, service


def _post(httpd, body, raw=None):
    conn = http.client.HTTPConnection(*httpd.server_address[:2], timeout=60)
    data = raw if raw is not None else json.dumps(body).encode()
    conn.request("POST", CHAT, data, {"Content-Type": "application/json"})
    response = conn.getresponse()
    payload = response.read().decode()
    conn.close()
    return response, payload


def _events(payload):
    """The stream's chunks; it must end with [DONE]."""
    data = [chunk[len("data: "):] for chunk in payload.split("\n\n") if chunk]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def _streamed_text(chunks):
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])


def _ask(text, **extra):
    return {"messages": [{"role": "user", "content": text}], "temperature": 1.0, "seed": 7,
            "max_tokens": 20, **extra}


def test_page_and_info(server):
    httpd, _ = server
    conn = http.client.HTTPConnection(*httpd.server_address[:2], timeout=30)
    conn.request("GET", "/")
    page = conn.getresponse()
    html = page.read().decode()
    assert page.status == 200 and "Wyrd" in html and '<script src="/app.js">' in html
    assert "script-src 'self'" in page.getheader("Content-Security-Policy")
    conn.request("GET", "/app.js")
    script = conn.getresponse().read().decode()
    assert "innerHTML" not in script and "textContent" in script  # text is never parsed
    assert CHAT in script  # the page talks to the OpenAI API like any other client
    conn.request("GET", "/api/info")
    info = json.loads(conn.getresponse().read())
    assert info["model"] == "test-model" and info["context"] == 160
    assert info["limits"]["max_message_chars"] == 200
    conn.request("GET", "/v1/models")
    models = json.loads(conn.getresponse().read())
    assert [m["id"] for m in models["data"]] == ["test-model"]
    conn.close()
    assert httpd.server_address[0] == "127.0.0.1"


def test_streaming_matches_the_whole_reply(server, model_dir):
    httpd, _ = server
    response, payload = _post(httpd, _ask("Hello there!", stream=True))
    assert response.status == 200
    assert response.getheader("Content-Type").startswith("text/event-stream")
    chunks = _events(payload)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    final = chunks[-1]["choices"][0]
    assert final["delta"] == {} and final["finish_reason"] in ("stop", "length")
    assert chunks[-1]["trimmed"] == 0
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    streamed = _streamed_text(chunks)
    response, payload = _post(httpd, _ask("Hello there!"))
    whole = json.loads(payload)
    assert response.status == 200 and whole["object"] == "chat.completion"
    assert whole["choices"][0]["message"] == {"role": "assistant", "content": streamed}
    assert whole["choices"][0]["finish_reason"] == final["finish_reason"]
    model, tokenizer = load_pretrained(model_dir)
    direct = reply(model, tokenizer, _ask("Hello there!")["messages"],
                   SamplingConfig(max_new_tokens=20, temperature=1.0, top_p=0.95, seed=7))
    assert direct == streamed


def test_history_is_trimmed_to_the_context(server):
    httpd, _ = server
    messages = []
    for i in range(5):
        messages += [{"role": "user", "content": f"Who is the story about? {i} " * 2},
                     {"role": "assistant", "content": "Lily and Tom went to the park."}]
    messages.append({"role": "user", "content": "Hello there!"})
    response, payload = _post(httpd, {"messages": messages, "max_tokens": 40, "stream": True})
    assert response.status == 200
    trimmed = _events(payload)[-1]["trimmed"]
    assert trimmed >= 2 and trimmed % 2 == 0


@pytest.mark.parametrize("body, status, message, param", [
    ({"messages": [{"role": "user", "content": "x" * 201}]}, 413, "at most 200", "messages"),
    ({"messages": [{"role": "user", "content": "hi"}] * 13}, 413, "at most 12", "messages"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "must be the user's",
     "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "role must be one of",
     "messages"),
    ({"messages": []}, 400, "at least one message", "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 65}, 400, "max_tokens",
     "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 9}, 400, "temperature",
     "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, "top_p", "top_p"),
])
def test_limits_and_bad_requests(server, body, status, message, param):
    httpd, _ = server
    response, payload = _post(httpd, body)
    assert response.status == status
    error = json.loads(payload)["error"]
    assert message in error["message"] and error["param"] == param
    assert error["type"] == "invalid_request_error"


def test_bad_json_huge_body_and_unknown_paths(server):
    httpd, _ = server
    response, payload = _post(httpd, None, raw=b"{not json")
    assert response.status == 400 and "not valid JSON" in json.loads(payload)["error"]["message"]
    response, payload = _post(httpd, None, raw=b" " * 30_000)
    assert response.status == 413
    conn = http.client.HTTPConnection(*httpd.server_address[:2], timeout=30)
    conn.request("GET", "/etc/passwd")
    assert conn.getresponse().status == 404
    conn.close()


def test_markup_in_messages_is_data_not_html(server):
    httpd, _ = server
    attack = '<img src=x onerror="alert(1)"><script>alert(2)</script>'
    response, payload = _post(httpd, _ask(attack))
    assert response.status == 200
    assert response.getheader("Content-Type") == "application/json"
    assert response.getheader("X-Content-Type-Options") == "nosniff"
    assert isinstance(json.loads(payload)["choices"][0]["message"]["content"], str)


def test_two_concurrent_conversations_stay_separate(server, model_dir):
    httpd, _ = server
    conversations = {
        "a": [{"role": "user", "content": "Hello there!"}],
        "b": [{"role": "user", "content": "Who is the story about?"},
              {"role": "assistant", "content": "Lily."},
              {"role": "user", "content": "And Tom?"}],
    }
    results, barrier = {}, threading.Barrier(2)

    def talk(name):
        barrier.wait()
        _, payload = _post(httpd, {"messages": conversations[name], "stream": True,
                                   "seed": 3, "max_tokens": 30})
        results[name] = _streamed_text(_events(payload))

    threads = [threading.Thread(target=talk, args=(name,)) for name in conversations]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    model, tokenizer = load_pretrained(model_dir)
    sampling = SamplingConfig(max_new_tokens=30, temperature=0.8, top_p=0.95, seed=3)
    for name, messages in conversations.items():
        assert results[name] == reply(model, tokenizer, messages, sampling), name


def test_a_client_that_leaves_stops_its_generation(server, monkeypatch):
    httpd, service = server
    produced = []

    letter = service.tokenizer.convert_tokens_to_ids("l")

    def endless(model, prompt, sampling):
        while True:  # a reply that would never end by itself
            produced.append(1)
            time.sleep(0.01)
            yield letter

    monkeypatch.setattr(chat, "stream", endless)
    sock = socket.create_connection(httpd.server_address[:2], timeout=30)
    body = json.dumps(_ask("Hello there!", stream=True)).encode()
    host = "127.0.0.1:%d" % httpd.server_address[1]
    sock.sendall(f"POST {CHAT} HTTP/1.1\r\nHost: {host}\r\n".encode() +
                 b"Content-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    received = b""
    while b'"content":"l"' not in received.replace(b" ", b""):  # a piece has been streamed
        chunk = sock.recv(4096)
        assert chunk, "the server closed the stream before any piece"
        received += chunk
    assert service.active == 1
    sock.close()
    deadline = time.monotonic() + 10
    while service.active and time.monotonic() < deadline:
        time.sleep(0.05)
    assert service.active == 0  # the generation ended with the connection
    stopped_at = len(produced)
    time.sleep(0.3)
    assert len(produced) == stopped_at


def test_busy_server_answers_503(server):
    httpd, service = server
    for _ in range(4):
        service.slots.acquire()
    try:
        response, payload = _post(httpd, _ask("Hello there!", stream=True))
        assert response.status == 503
        error = json.loads(payload)["error"]
        assert "busy" in error["message"] and error["type"] == "server_error"
    finally:
        for _ in range(4):
            service.slots.release()
    assert _post(httpd, _ask("Hello there!"))[0].status == 200  # served again
