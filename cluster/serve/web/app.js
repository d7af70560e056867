// Wyrd: the chat page of `chimera serve`, a client of its OpenAI-compatible API. The
// conversation lives here, in the page; every request sends the whole history and the server
// trims it to the model's context. All text goes into the page with textContent, never as
// HTML.
"use strict";

const log = document.getElementById("log");
const input = document.getElementById("input");
const send = document.getElementById("send");
const controls = ["temperature", "top_p", "max_tokens"].map((id) => document.getElementById(id));
let history = [];
let limits = { max_message_chars: 4000 };
let modelId = null; // the served model's id, as /v1/models lists it
let current = null; // the AbortController of the reply being streamed

function bubble(kind, text) {
  const div = document.createElement("div");
  div.className = "msg " + kind;
  div.textContent = text;
  log.appendChild(div);
  log.scrollTop = log.scrollHeight;
  return div;
}

function note(kind, text) {
  const div = document.createElement("div");
  div.className = kind;
  div.textContent = text;
  log.appendChild(div);
  log.scrollTop = log.scrollHeight;
}

async function loadInfo() {
  const info = await (await fetch("/api/info")).json();
  document.getElementById("model").textContent =
    `${info.model} · ${(info.params / 1e6).toFixed(2)}M parameters · context ${info.context}`;
  limits = info.limits;
  modelId = info.model;
  controls[0].value = info.defaults.temperature;
  controls[1].value = info.defaults.top_p;
  controls[2].value = info.defaults.max_tokens;
  controls[2].max = info.limits.max_new_tokens;
}

function speak(text) {
  if (!document.getElementById("speak").checked || !("speechSynthesis" in window)) return;
  window.speechSynthesis.cancel();
  window.speechSynthesis.speak(new SpeechSynthesisUtterance(text));
}

// The reply's chunks, from the Server-Sent Events of /v1/chat/completions (OpenAI's stream).
async function* chunks(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      if (!event.startsWith("data: ")) continue;
      if (event === "data: [DONE]") return;
      const data = JSON.parse(event.slice(6));
      if (data.error) throw new Error(data.error.message);
      yield data;
    }
  }
}

async function ask(text) {
  history.push({ role: "user", content: text });
  bubble("user", text);
  const reply = bubble("assistant streaming", "");
  send.disabled = true;
  current = new AbortController();
  let answer = "";
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      signal: current.signal,
      body: JSON.stringify({
        model: modelId, messages: history, stream: true,
        temperature: Number(controls[0].value), top_p: Number(controls[1].value),
        max_tokens: Number(controls[2].value),
      }),
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new Error((body.error && body.error.message) || response.statusText);
    }
    let finished = false;
    for await (const chunk of chunks(response)) {
      const choice = chunk.choices[0];
      if (!choice) continue;
      if (choice.delta.content) {
        answer += choice.delta.content;
        reply.textContent = answer;
        log.scrollTop = log.scrollHeight;
      }
      if (choice.finish_reason) {
        finished = true;
        if (chunk.trimmed > 0) {
          note("note", `(the oldest ${chunk.trimmed} messages no longer fit the context)`);
        }
        if (choice.finish_reason === "length") {
          // max tokens, or the end of the model's context when that came first
          note("note", "(the reply was cut off at its length limit)");
        }
      }
    }
    if (!finished) throw new Error("the reply stopped before its end");
    history.push({ role: "assistant", content: answer });
    speak(answer);
  } catch (error) {
    history.pop(); // the question was not answered: do not keep it
    if (error.name !== "AbortError") note("error", "error: " + error.message);
    if (!answer) reply.remove();
  } finally {
    reply.classList.remove("streaming");
    send.disabled = false;
    current = null;
    input.focus();
  }
}

document.getElementById("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = input.value.trim();
  if (!text || current) return;
  if (text.length > limits.max_message_chars) {
    note("error", `message too long: at most ${limits.max_message_chars} characters`);
    return;
  }
  input.value = "";
  ask(text);
});

input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    document.getElementById("composer").requestSubmit();
  }
});

document.getElementById("new-chat").addEventListener("click", () => {
  if (current) current.abort(); // the server stops generating when the stream closes
  if ("speechSynthesis" in window) window.speechSynthesis.cancel();
  history = [];
  log.replaceChildren();
  note("note", "new conversation");
});

loadInfo().catch((error) => note("error", "cannot reach the server: " + error.message));
