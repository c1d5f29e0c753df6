// The roundtrip web view: reads the JSON API under /api/ and listens to /api/events.
// Message data only ever reaches the DOM through textContent and attribute setters, never
// innerHTML; message HTML is shown only in the sandboxed iframe (docs/web.md, "Safety").
"use strict";

const TOKEN_HEADER = "X-Roundtrip-Token";
const PAGE = 50;
const state = { user: null, folder: null, uid: null, htmlUrl: null, offset: 0, query: "", tab: "html" };

function readToken() {
  const match = /(?:^#|&)token=([^&]+)/.exec(window.location.hash);
  if (match) {
    sessionStorage.setItem("roundtrip-token", decodeURIComponent(match[1]));
    history.replaceState(null, "", window.location.pathname + window.location.search);
  }
  return sessionStorage.getItem("roundtrip-token") || "";
}
let token = readToken();

const $ = (id) => document.getElementById(id);

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (key === "class") node.className = value;
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function query(params) {
  return new URLSearchParams(params).toString();
}

// A view beyond loopback needs the token for reads too: frames, downloads and the event
// stream cannot send a header, so every URL the page builds carries it as a parameter.
function withToken(params) {
  return token ? { ...params, token } : params;
}

function where(extra) {
  return query(withToken({ user: state.user, folder: state.folder, ...(extra || {}) }));
}

async function api(path, options) {
  const headers = { ...((options && options.headers) || {}) };
  if (token && !headers[TOKEN_HEADER]) headers[TOKEN_HEADER] = token;
  const response = await fetch(path, { ...(options || {}), headers });
  if (!response.ok) {
    let text = response.statusText;
    try { text = (await response.json()).error; } catch (e) { /* not JSON */ }
    throw new Error(`${response.status}: ${text}`);
  }
  return response;
}

async function change(path) {
  if (!token) {
    token = window.prompt("Token of this web view (web_token in the serve --json line):") || "";
    if (token) sessionStorage.setItem("roundtrip-token", token);
  }
  try {
    return await api(path, { method: "DELETE", headers: { [TOKEN_HEADER]: token } });
  } catch (err) {
    setError(err);
    throw err;
  }
}

function setStatus(text) { $("status").textContent = text; }
function setError(err) { $("error").textContent = String(err); }

function badge(box) {
  return el("span", { class: box.unread ? "badge" : "badge zero", title: `${box.total} messages` },
    `${box.unread}/${box.total}`);
}

function boxItem(box) {
  const item = el("li", {
    "data-user": box.user, "data-folder": box.folder,
    class: box.user === state.user && box.folder === state.folder ? "active box" : "box",
  }, el("span", {}, box.folder), badge(box));
  item.addEventListener("click", () => openMailbox(box.user, box.folder));
  return item;
}

async function loadMailboxes() {
  const doc = await (await api("/api/mailboxes")).json();
  const domains = $("domains");
  domains.replaceChildren();
  for (const domain of doc.domains) {
    domains.append(el("h2", {}, domain.name));
    const list = el("ul", { class: "boxes" });
    let user = null;
    for (const box of domain.mailboxes) {
      if (box.user !== user) {
        user = box.user;
        list.append(el("li", { class: "user" }, user));
      }
      list.append(boxItem(box));
    }
    domains.append(list);
  }
  // The capture only ever fills its INBOX; other folders show once something is in them.
  $("outbound").replaceChildren(
    ...doc.outbound.filter((box) => box.folder === "INBOX" || box.total).map(boxItem));
  renderQueue(doc.queue);
}

function renderQueue(entries) {
  const list = $("queue");
  if (!entries.length) {
    list.replaceChildren(el("li", { class: "empty" }, "empty"));
    return;
  }
  list.replaceChildren(...entries.map((q) => el("li", { "data-id": q.id },
    el("div", {}, `${q.id} ${q.mail_from || "<>"} → ${q.rcpt.join(", ")}`),
    el("div", {}, `attempts ${q.attempts}; next ` +
      (q.next_attempt_in === null ? "none" : `in ${Math.max(0, q.next_attempt_in).toFixed(1)} s`)),
    q.last_error ? el("div", { class: "error" }, `last reply: ${q.last_error}`) : null)));
}

async function loadQueue() {
  renderQueue((await (await api("/api/queue")).json()).queue);
}

function openMailbox(user, folder) {
  Object.assign(state, { user, folder, offset: 0, uid: null });
  $("mailbox-title").textContent = `${user} ${folder}`;
  $("search").disabled = false;
  $("empty").disabled = false;
  $("view-pane").hidden = true;
  for (const node of document.querySelectorAll(".box")) {
    node.classList.toggle("active", node.dataset.user === user && node.dataset.folder === folder);
  }
  loadMessages();
}

async function loadMessages(append) {
  if (!state.user) return;
  const limit = append ? PAGE : Math.max(PAGE, state.offset + PAGE);
  const offset = append ? state.offset : 0;
  const doc = await (await api(`/api/messages?${where({ offset, limit, q: state.query })}`)).json();
  const items = doc.messages.map((m) => {
    const item = el("li", {
      "data-uid": m.uid,
      class: (m.seen ? "msg" : "msg unread") + (m.uid === state.uid ? " active" : ""),
    },
      el("div", { class: "subject" }, m.subject || "(no subject)"),
      el("div", { class: "from" }, `${m.from || m.envelope_from || "?"} → ${(m.to.length ? m.to : m.envelope_to).join(", ")}`),
      el("div", { class: "when" }, new Date(m.internal_date * 1000).toLocaleString() +
        (m.attachments ? ` · ${m.attachments} attachment(s)` : "")),
      el("div", { class: "preview" }, m.preview));
    item.addEventListener("click", () => openMessage(m.uid));
    return item;
  });
  if (append) $("messages").append(...items);
  else $("messages").replaceChildren(...items);
  state.offset = offset + doc.messages.length;
  $("count").textContent = `${state.offset} of ${doc.total}`;
  $("more").hidden = state.offset >= doc.total;
}

function showTab(name) {
  state.tab = name;
  for (const button of document.querySelectorAll(".tabs button")) {
    button.classList.toggle("active", button.dataset.tab === name);
  }
  for (const tab of document.querySelectorAll(".tab")) tab.hidden = tab.id !== `tab-${name}`;
  if (name === "raw" && state.uid !== null) loadRaw();
}

function row(table, ...cells) {
  table.append(el("tr", {}, ...cells.map((c, i) => el(i ? "td" : "th", {}, c))));
}

function mimeNode(node) {
  const label = `${node.path} ${node.content_type}` +
    (node.filename ? ` "${node.filename}"` : "") +
    (node.disposition ? ` (${node.disposition})` : "") +
    (node.encoded_size !== null ? ` ${node.encoded_size} bytes encoded` : "") + (node.truncated ? " …" : "");
  const item = el("li", {}, label);
  if (node.children.length) item.append(el("ul", {}, ...node.children.map(mimeNode)));
  return item;
}

// The frame's URL comes from the server (html_url): on a view whose reads need the token it
// carries a capability for this message's HTML alone, never the token, since the message
// can see its own URL (docs/web.md, "Safety").
function htmlSource() {
  return `${state.htmlUrl}&${query({ remote: $("remote").checked ? 1 : 0 })}`;
}

async function openMessage(uid) {
  state.uid = uid;
  for (const node of document.querySelectorAll(".msg")) {
    node.classList.toggle("active", Number(node.dataset.uid) === uid);
  }
  const m = await (await api(`/api/message?${where({ uid })}`)).json();
  $("view-pane").hidden = false;
  $("msg-subject").textContent = m.subject || "(no subject)";
  const meta = $("msg-meta");
  meta.replaceChildren();
  for (const [name, value] of [["From", m.from], ["To", m.to.join(", ")], ["Cc", m.cc.join(", ")],
    ["Date", m.date], ["Envelope", `${m.envelope_from || "<>"} → ${m.envelope_to.join(", ")}`],
    ["Size", `${m.size} bytes`], ["Message-ID", m.message_id]]) {
    if (value) meta.append(el("dt", {}, name), el("dd", {}, value));
  }
  $("remote").checked = false;
  state.htmlUrl = m.html_url;
  $("no-html").hidden = m.has_html;
  $("html-frame").hidden = !m.has_html;
  if (m.has_html) $("html-frame").src = htmlSource();
  else $("html-frame").removeAttribute("src");
  $("text").textContent = m.text === null ? "(no text part)" : m.text;
  const headers = $("headers");
  headers.replaceChildren();
  for (const [name, value] of m.headers) row(headers, name, value);
  $("raw").textContent = "";
  const parts = $("parts");
  parts.replaceChildren(...m.parts.map((p) => el("li", {},
    el("a", {
      href: `/api/message/attachment?${where({ uid, index: p.index })}`,
      download: p.filename || `part-${p.index}`, "data-index": p.index,
    }, p.filename || `part ${p.index}`),
    ` ${p.content_type}, ${p.size} bytes${p.inline ? " (inline)" : ""}`)));
  if (!m.parts.length) parts.append(el("li", { class: "empty" }, "none"));
  $("mime").replaceChildren(m.mime ? mimeNode(m.mime) : el("li", { class: "empty" }, m.parse_error || "unparsable"));
  renderJourney(m.journey);
  showTab(state.tab === "html" && !m.has_html ? "text" : state.tab);
}

function renderJourney(j) {
  const steps = $("steps");
  steps.replaceChildren();
  row(steps, "at", "step", "host");
  for (const s of j.steps) row(steps, `${(s.at * 1000).toFixed(1)} ms`, s.step, s.host);
  if (!j.steps.length) row(steps, "", "no steps recorded for this Message-ID", "");
  const hops = $("hops");
  hops.replaceChildren();
  row(hops, "time", "from → by", "with", "TLS");
  for (const h of j.received) {
    const tls = h.tls ? `${h.tls_version || "yes"} ${h.cipher || ""}`.trim() : "none";
    hops.append(el("tr", { class: "hop" },
      el("th", {}, h.time || "?"), el("td", {}, `${h.from || "?"} → ${h.by || "?"}`),
      el("td", {}, `${h.with || ""} ${h.id ? "id " + h.id : ""}`),
      el("td", { class: h.tls ? "tls-yes" : "tls-no" }, tls)));
  }
  const verdict = $("verdict");
  verdict.replaceChildren();
  for (const [name, value] of Object.entries(j.spam)) row(verdict, name, value);
  for (const r of j.auth.results) row(verdict, r.method, r.result + (r.reason ? ` (${r.reason})` : ""));
  if (!verdict.children.length) row(verdict, "", "none recorded");
}

async function loadRaw() {
  const response = await api(`/api/message/raw?${where({ uid: state.uid })}`);
  $("raw").textContent = await response.text();
}

let refreshTimer = null;
function scheduleRefresh(event) {
  // Bursts of changes (a test delivering many messages) become one refresh.
  const mine = event && event.user === state.user && (event.folder === state.folder || !event.folder);
  if (refreshTimer) clearTimeout(refreshTimer);
  refreshTimer = setTimeout(() => {
    refreshTimer = null;
    loadMailboxes().catch((err) => setError(err));
    if (mine || (event && event.kind === "mailboxes")) loadMessages().catch((err) => setError(err));
  }, 20);
}

function listen() {
  const source = new EventSource(`/api/events?${query(withToken({}))}`);
  let opened = false;
  source.addEventListener("open", () => {
    setStatus("live");
    setError("");
    // Changes made while the stream was down were not announced: read everything again.
    if (opened) scheduleRefresh({ kind: "mailboxes", user: state.user, folder: state.folder });
    opened = true;
  });
  source.addEventListener("error", () => setStatus("reconnecting…"));
  source.addEventListener("store", (e) => {
    const event = JSON.parse(e.data);
    if (event.kind === "expunged" && event.user === state.user && event.folder === state.folder &&
        event.uids.includes(state.uid)) {
      state.uid = null;
      $("view-pane").hidden = true;
    }
    scheduleRefresh(event);
  });
}

document.addEventListener("DOMContentLoaded", () => {
  $("token-state").textContent = token ? "token set: delete enabled" : "read-only (no token)";
  for (const button of document.querySelectorAll(".tabs button")) {
    button.addEventListener("click", () => showTab(button.dataset.tab));
  }
  let searchTimer = null;
  $("search").addEventListener("input", () => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(() => { state.query = $("search").value; state.offset = 0; loadMessages(); }, 200);
  });
  $("more").addEventListener("click", () => loadMessages(true));
  $("remote").addEventListener("change", () => { $("html-frame").src = htmlSource(); });
  $("delete").addEventListener("click", async () => {
    if (state.uid === null) return;
    await change(`/api/message?${where({ uid: state.uid })}`);
    state.uid = null;
    $("view-pane").hidden = true;
    await loadMessages();
  });
  $("empty").addEventListener("click", async () => {
    if (!state.user || !window.confirm(`Empty ${state.user} ${state.folder}?`)) return;
    await change(`/api/messages?${where()}`);
    $("view-pane").hidden = true;
    await loadMessages();
  });
  showTab("html");
  loadMailboxes().catch((err) => setError(err));
  setInterval(() => loadQueue().catch(() => {}), 5000);
  listen();
});
