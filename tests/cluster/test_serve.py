"""`chimera serve`'s API: streaming, history trimming, limits, escaping, concurrency and
clients that leave mid-stream."""

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


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, make_model_dir):
    return make_model_dir(tmp_path_factory.mktemp("model"), train_char([TEXT]), 160)


@pytest.fixture
def server(model_dir):
    model, tokenizer = load_pretrained(model_dir)
    service = ChatService(model, tokenizer, "test-model",
                          Limits(max_message_chars=200, max_messages=12, max_new_tokens=64,
                                 max_body_bytes=20_000, max_concurrent=4))
    httpd = make_server(service, "127.0.0.1", 0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd, service
    httpd.shutdown()
    httpd.server_close()


def _post(httpd, body, raw=None):
    conn = http.client.HTTPConnection(*httpd.server_address[:2], timeout=60)
    data = raw if raw is not None else json.dumps(body).encode()
    conn.request("POST", "/api/chat", data, {"Content-Type": "application/json"})
    response = conn.getresponse()
    payload = response.read().decode()
    conn.close()
    return response, payload


def _events(payload):
    return [json.loads(chunk[len("data: "):]) for chunk in payload.split("\n\n") if chunk]


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
    conn.request("GET", "/api/info")
    info = json.loads(conn.getresponse().read())
    assert info["model"] == "test-model" and info["context"] == 160
    assert info["limits"]["max_message_chars"] == 200
    conn.close()
    assert httpd.server_address[0] == "127.0.0.1"


def test_streaming_matches_the_whole_reply(server, model_dir):
    httpd, _ = server
    response, payload = _post(httpd, _ask("Hello there!", stream=True))
    assert response.status == 200
    assert response.getheader("Content-Type").startswith("text/event-stream")
    events = _events(payload)
    assert events[-1]["done"] is True and events[-1]["trimmed"] == 0
    streamed = "".join(e["delta"] for e in events[:-1])
    assert len(events) - 1 == events[-1]["pieces"]
    response, payload = _post(httpd, _ask("Hello there!"))
    whole = json.loads(payload)
    assert response.status == 200 and whole["reply"] == streamed
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
    done = _events(payload)[-1]
    assert done["done"] and done["trimmed"] >= 2 and done["trimmed"] % 2 == 0


@pytest.mark.parametrize("body, status, message", [
    ({"messages": [{"role": "user", "content": "x" * 201}]}, 413, "at most 200"),
    ({"messages": [{"role": "user", "content": "hi"}] * 13}, 413, "at most 12"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "must be the user's"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "role must be one of"),
    ({"messages": []}, 400, "at least one message"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 65}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 9}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, "top_p"),
])
def test_limits_and_bad_requests(server, body, status, message):
    httpd, _ = server
    response, payload = _post(httpd, body)
    assert response.status == status
    assert message in json.loads(payload)["error"]


def test_bad_json_huge_body_and_unknown_paths(server):
    httpd, _ = server
    response, payload = _post(httpd, None, raw=b"{not json")
    assert response.status == 400 and "not valid JSON" in json.loads(payload)["error"]
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
    assert isinstance(json.loads(payload)["reply"], str)


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
        results[name] = "".join(e.get("delta", "") for e in _events(payload))

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
    sock.sendall(b"POST /api/chat HTTP/1.1\r\nHost: " + host.encode() + b"\r\n"
                 b"Content-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    received = b""
    while b"data: " not in received:  # headers and events may come in separate reads
        chunk = sock.recv(4096)
        assert chunk, "the server closed the stream before any event"
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


def test_busy_server_answers_503(server, monkeypatch):
    httpd, service = server
    for _ in range(4):
        service.slots.acquire()
    try:
        response, payload = _post(httpd, _ask("Hello there!", stream=True))
        assert response.status == 503 and "busy" in json.loads(payload)["error"]
    finally:
        for _ in range(4):
            service.slots.release()
