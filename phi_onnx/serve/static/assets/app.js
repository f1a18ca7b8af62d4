// The chat page: the same OpenAI API any client uses (POST v1/chat/completions, stream=true).
// Model output is untrusted: it is rendered by marked, then sanitised by DOMPurify before it reaches the
// DOM, and the page's Content-Security-Policy runs no inline script even if something slipped through.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const log = $("log");
  const input = $("input");
  const key = $("key");
  const sendButton = $("send");
  const stopButton = $("stop");
  const dialog = $("settings");
  const list = $("conversations");

  const KEYS = {key: "phi-onnx-key", settings: "phi-onnx-settings", conversations: "phi-onnx-conversations",
                current: "phi-onnx-current"};
  const SETTINGS = ["system", "temperature", "top_p", "max_tokens"];
  const DEFAULT_MAX_TOKENS = 512;
  const UNREACHABLE = "The server is not reachable. Is phi-onnx serve still running?";

  // -- storage: a full or disabled localStorage must not break the page (this visit still works) ----------
  function read(name, fallback) {
    try {
      const value = JSON.parse(localStorage.getItem(name));
      return value === null || value === undefined ? fallback : value;
    } catch (error) {
      return fallback;
    }
  }
  function write(name, value, raw = false) {
    try {
      localStorage.setItem(name, raw ? value : JSON.stringify(value));
    } catch (error) {
      console.warn("phi-onnx: could not save to localStorage:", error);
    }
  }

  // -- settings ---------------------------------------------------------------------------------------------
  try { key.value = localStorage.getItem(KEYS.key) || ""; } catch (error) { /* storage disabled */ }
  key.addEventListener("input", () => write(KEYS.key, key.value, true));  // raw, as earlier versions kept it
  const saved = read(KEYS.settings, {});
  for (const name of SETTINGS) {
    const field = $(name);
    field.value = typeof saved[name] === "string" ? saved[name] : "";
    field.addEventListener("input", saveSettings);
  }
  function saveSettings() {
    const values = {};
    for (const name of SETTINGS) values[name] = $(name).value;
    write(KEYS.settings, values);
  }
  $("settings-button").addEventListener("click", () => dialog.showModal());
  $("settings-close").addEventListener("click", () => dialog.close());
  $("settings-defaults").addEventListener("click", () => {
    for (const name of SETTINGS) $(name).value = "";
    saveSettings();
  });

  /** The request body: the conversation, the system prompt and the sampling settings. */
  function requestBody(messages) {
    const body = {messages: messages.map((m) => ({role: m.role, content: m.content})), stream: true,
                  stream_options: {include_usage: true}};
    const system = $("system").value;
    if (system.trim()) body.messages.unshift({role: "system", content: system});
    const temperature = parseFloat($("temperature").value);
    if (Number.isFinite(temperature)) body.temperature = temperature;
    const topP = parseFloat($("top_p").value);
    if (Number.isFinite(topP)) body.top_p = topP;
    const maxTokens = parseInt($("max_tokens").value, 10);
    body.max_tokens = maxTokens > 0 ? maxTokens : DEFAULT_MAX_TOKENS;
    return body;
  }

  // -- conversations, kept in this browser ------------------------------------------------------------------
  let conversations = read(KEYS.conversations, []);
  if (!Array.isArray(conversations)) conversations = [];
  let current = conversations.find((c) => c.id === read(KEYS.current, null)) || newConversation();

  function newConversation() {
    return {id: Date.now().toString(36) + Math.random().toString(36).slice(2, 8), title: "", messages: [],
            updated: Date.now()};
  }
  function persist(conversation) {
    if (conversation.deleted) return;  // a reply that ended after its conversation was deleted
    conversation.updated = Date.now();
    if (!conversation.title) {
      const first = conversation.messages.find((m) => m.role === "user");
      conversation.title = first ? first.content.trim().split("\n")[0].slice(0, 60) : "";
    }
    if (!conversation.messages.length) {  // a first question that got no answer: nothing to keep
      conversation.title = "";
      conversations = conversations.filter((c) => c !== conversation);
    } else if (!conversations.includes(conversation)) {
      conversations.unshift(conversation);
    }
    conversations.sort((a, b) => b.updated - a.updated);
    write(KEYS.conversations, conversations);
    write(KEYS.current, current.id);
    renderList();
  }
  function renderList() {
    list.textContent = "";
    for (const conversation of conversations) {
      const item = document.createElement("li");
      if (conversation === current) item.className = "current";
      const open = document.createElement("button");
      open.type = "button";
      open.className = "open";
      open.textContent = conversation.title || "(untitled)";
      open.title = conversation.title;
      open.addEventListener("click", () => switchTo(conversation));
      const remove = document.createElement("button");
      remove.type = "button";
      remove.className = "delete";
      remove.textContent = "\u00d7";
      remove.setAttribute("aria-label", "Delete conversation");
      remove.title = "Delete";
      remove.addEventListener("click", () => deleteConversation(conversation));
      item.append(open, remove);
      list.appendChild(item);
    }
    $("no-conversations").hidden = conversations.length > 0;
  }
  function switchTo(conversation) {
    if (running) running.abort();
    current = conversation;
    write(KEYS.current, current.id);
    document.body.classList.remove("sidebar-open");
    renderList();
    renderConversation();
  }
  function deleteConversation(conversation) {
    conversation.deleted = true;
    conversations = conversations.filter((c) => c !== conversation);
    write(KEYS.conversations, conversations);
    if (conversation === current) switchTo(newConversation());
    else renderList();
  }
  $("reset").addEventListener("click", () => switchTo(newConversation()));
  $("menu").addEventListener("click", () => {
    const open = document.body.classList.toggle("sidebar-open");
    $("menu").setAttribute("aria-expanded", String(open));
  });

  // -- rendering --------------------------------------------------------------------------------------------
  if (window.hljs) hljs.configure({ignoreUnescapedHTML: true});
  if (window.DOMPurify) {
    DOMPurify.addHook("afterSanitizeAttributes", (node) => {
      if (node.tagName === "A" && node.hasAttribute("href")) {
        node.setAttribute("target", "_blank");
        node.setAttribute("rel", "noopener noreferrer");
      }
    });
  }

  /** Model text as sanitised HTML elements in `target` (no library: plain text, never HTML). */
  function renderMarkdown(target, text) {
    if (!window.marked || !window.DOMPurify) {
      target.textContent = text;
      target.style.whiteSpace = "pre-wrap";
      return;
    }
    target.innerHTML = DOMPurify.sanitize(marked.parse(text, {gfm: true}), {USE_PROFILES: {html: true}});
    for (const table of target.querySelectorAll("table")) {
      const wrap = document.createElement("div");
      wrap.className = "table-wrap";
      table.replaceWith(wrap);
      wrap.appendChild(table);
    }
    for (const code of target.querySelectorAll("pre > code")) {
      if (window.hljs) {
        const language = [...code.classList].find((c) => c.startsWith("language-"));
        if (!language || hljs.getLanguage(language.slice(9))) hljs.highlightElement(code);
        else code.classList.add("hljs");
      }
      addCopyButton(code);
    }
  }

  function addCopyButton(code) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "copy";
    button.textContent = "Copy";
    button.addEventListener("click", async () => {
      const text = code.textContent;
      let copied = false;
      try {
        if (navigator.clipboard && window.isSecureContext) {
          await navigator.clipboard.writeText(text);
          copied = true;
        }
      } catch (error) { /* fall back below */ }
      if (!copied) copied = copyBySelection(text);
      button.textContent = copied ? "Copied" : "Copy failed";
      setTimeout(() => { button.textContent = "Copy"; }, 1500);
    });
    // The button sits outside the <pre> so it stays put while a long line scrolls sideways.
    const pre = code.parentElement;
    const block = document.createElement("div");
    block.className = "code-block";
    pre.replaceWith(block);
    block.append(pre, button);
  }
  function copyBySelection(text) {
    // Plain http on a LAN address is not a secure context, so navigator.clipboard is missing there.
    const area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.style.position = "fixed";
    area.style.opacity = "0";
    document.body.appendChild(area);
    area.select();
    let ok = false;
    try { ok = document.execCommand("copy"); } catch (error) { ok = false; }
    area.remove();
    return ok;
  }

  function bubble(role, text) {
    const div = document.createElement("div");
    div.className = "msg " + role;
    if (role === "assistant") {
      const body = document.createElement("div");
      body.className = "body";
      const meta = document.createElement("div");
      meta.className = "meta";
      div.append(body, meta);
      renderMarkdown(body, text);
    } else {
      div.textContent = text;
    }
    log.appendChild(div);
    return div;
  }

  function describe(stats) {
    if (!stats) return "";
    const parts = [`${stats.tokens} token${stats.tokens === 1 ? "" : "s"}`];
    if (stats.tokensPerSecond) parts.push(`${stats.tokensPerSecond.toFixed(1)} tokens/s`);
    if (stats.firstTokenMs !== undefined) parts.push(`first token ${Math.round(stats.firstTokenMs)} ms`);
    if (stats.finish === "length") parts.push("stopped at max tokens");
    else if (stats.finish === "stopped") parts.push("stopped");
    return parts.join(" \u00b7 ");
  }

  function setMeta(div, message, last) {
    const meta = div.querySelector(".meta");
    meta.textContent = "";
    const stats = document.createElement("span");
    stats.className = "stats";
    stats.textContent = describe(message.stats);
    meta.appendChild(stats);
    if (last) {
      const again = document.createElement("button");
      again.type = "button";
      again.className = "regenerate";
      again.textContent = "Regenerate";
      again.addEventListener("click", regenerate);
      meta.appendChild(again);
    }
  }

  function renderConversation() {
    log.textContent = "";
    const messages = current.messages;
    messages.forEach((message, index) => {
      const div = bubble(message.role, message.content);
      if (message.role === "assistant") {
        div.dataset.done = "true";
        setMeta(div, message, index === messages.length - 1);
      }
    });
    follow = true;
    scrollDown();
  }

  // -- auto-scroll: follow the reply unless the reader scrolled up ------------------------------------------
  let follow = true;
  let lastTop = 0;
  log.addEventListener("scroll", () => {
    if (log.scrollHeight - log.scrollTop - log.clientHeight < 40) follow = true;
    else if (log.scrollTop < lastTop - 1) follow = false;  // content growing never moves scrollTop up
    lastTop = log.scrollTop;
  });
  function scrollDown() {
    if (!follow) return;
    log.scrollTop = log.scrollHeight;
    lastTop = log.scrollTop;
  }

  // -- sending ----------------------------------------------------------------------------------------------
  let running = null;  // the AbortController of the reply being streamed

  function busy(on) {
    sendButton.disabled = on;
    stopButton.disabled = !on;
    for (const button of log.querySelectorAll(".regenerate")) button.disabled = on;
  }

  async function errorMessage(response) {
    const text = await response.text().catch(() => "");
    try {
      const body = JSON.parse(text);
      if (body && body.error && body.error.message) return body.error.message;
    } catch (error) { /* not JSON: fall through */ }
    return `The server answered ${response.status} ${response.statusText}`.trim() +
      (text && text.length < 300 ? `: ${text}` : ".");
  }

  /** Stream the assistant's answer to the conversation so far (which ends with the user's message). */
  async function reply(conversation) {
    const div = bubble("assistant", "");
    const body = div.querySelector(".body");
    div.dataset.done = "false";
    follow = true;
    scrollDown();
    const controller = new AbortController();
    running = controller;
    busy(true);
    const headers = {"Content-Type": "application/json"};
    if (key.value) headers.Authorization = "Bearer " + key.value;
    const started = performance.now();
    let text = "";
    let chunks = 0;
    let first = null;
    let usage = null;
    let finish = null;
    let failure = null;
    let timer = null;
    const render = () => {
      timer = null;
      renderMarkdown(body, text);
      scrollDown();
    };
    try {
      let response;
      try {
        response = await fetch("v1/chat/completions", {
          method: "POST", headers, signal: controller.signal,
          body: JSON.stringify(requestBody(conversation.messages)),
        });
      } catch (error) {
        if (error.name === "AbortError") throw error;
        throw new Error(UNREACHABLE);
      }
      if (!response.ok) throw new Error(await errorMessage(response));
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let pending = "";
      for (;;) {
        let part;
        try {
          part = await reader.read();
        } catch (error) {
          if (error.name === "AbortError") throw error;
          throw new Error("The connection to the server broke off mid-reply.");
        }
        if (part.done) break;
        pending += decoder.decode(part.value, {stream: true});
        const lines = pending.split("\n");
        pending = lines.pop();
        for (const line of lines) {
          if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
          const chunk = JSON.parse(line.slice(6));
          if (chunk.error) throw new Error(chunk.error.message || "The server reported an error.");
          if (chunk.usage) usage = chunk.usage;
          for (const choice of chunk.choices || []) {
            if (choice.delta && choice.delta.content) {
              if (first === null) first = performance.now();
              text += choice.delta.content;
              chunks += 1;
            }
            if (choice.finish_reason) finish = choice.finish_reason;
          }
        }
        if (timer === null) timer = setTimeout(render, 50);  // at most ~20 renders a second
      }
    } catch (error) {
      if (error.name === "AbortError") finish = "stopped";
      else failure = error.message || String(error);
    } finally {
      if (timer !== null) clearTimeout(timer);
      const ended = performance.now();
      if (running === controller) running = null;
      div.dataset.done = "true";
      if (text) {
        render();
        const tokens = usage ? usage.completion_tokens : chunks;
        const stats = {tokens, finish};
        if (first !== null) {
          stats.firstTokenMs = first - started;
          // Under 20 ms (a reply that arrived in one piece) a rate means nothing.
          if (tokens > 1 && ended - first >= 20) stats.tokensPerSecond = (tokens - 1) / ((ended - first) / 1000);
        }
        const message = {role: "assistant", content: text, stats};
        conversation.messages.push(message);
        if (conversation === current) setMeta(div, message, !failure);
        persist(conversation);
      } else {
        // Nothing came back: no empty bubble, and the question goes back into the box to send again.
        div.remove();
        const asked = conversation.messages.pop();
        const question = [...log.querySelectorAll(".msg.user")].pop();
        if (question && conversation === current) question.classList.add("failed");
        if (asked && asked.role === "user" && !input.value) input.value = asked.content;
        persist(conversation);
      }
      if (failure && conversation === current) bubble("error", failure);
      busy(running !== null);
      scrollDown();
    }
  }

  function send(text) {
    log.querySelectorAll(".regenerate").forEach((button) => button.remove());
    log.querySelectorAll(".msg.error, .msg.failed").forEach((div) => div.remove());
    current.messages.push({role: "user", content: text});
    persist(current);
    bubble("user", text);
    follow = true;
    return reply(current);
  }

  function regenerate() {
    if (running) return;
    const messages = current.messages;
    if (!messages.length || messages[messages.length - 1].role !== "assistant") return;
    messages.pop();
    renderConversation();
    return reply(current);
  }

  $("form").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = input.value.trim();
    if (!text || running) return;
    input.value = "";
    send(text);
  });
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("form").requestSubmit();
    }
  });
  stopButton.addEventListener("click", () => { if (running) running.abort(); });

  renderList();
  renderConversation();
})();
