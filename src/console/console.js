// The console page's logic: drives the pubgate-client package (served beside it, the same file
// npm users import) and renders what happens. Everything is written with textContent: data from
// the channels is never parsed as HTML.

import { Pubgate } from "./pubgate-client.js";

const $ = (id) => document.getElementById(id);
const scheme = location.protocol === "https:" ? "wss:" : "ws:";
$("url").value = `${scheme}//${location.host}/ws`;

let client = null;
const subs = new Map();

function log(kind, text, extra = {}) {
  const li = document.createElement("li");
  li.className = kind;
  for (const [k, v] of Object.entries(extra)) li.dataset[k] = String(v);
  const time = document.createElement("span");
  time.className = "time";
  time.textContent = new Date().toISOString().slice(11, 23);
  li.append(time);
  if (extra.offset !== undefined) {
    const off = document.createElement("span");
    off.className = "offset";
    off.textContent = `#${extra.offset} `;
    li.append(off);
  }
  li.append(text);
  const ol = $("log");
  ol.append(li);
  while (ol.children.length > 2000) ol.firstElementChild.remove();
  ol.scrollTop = ol.scrollHeight;
}

function setStatus(state, text) {
  const el = $("status");
  el.className = `status ${state}`;
  el.textContent = text;
}

function connect() {
  client?.close();
  subs.clear();
  $("subs").replaceChildren();
  const token = $("token").value.trim();
  client = new Pubgate($("url").value.trim(), token ? { token } : {});
  client.on("connected", ({ connId, node }) => {
    setStatus("on", "connected");
    $("conn").textContent = `conn ${connId} on node ${node}`;
    log("connected", `connected: conn ${connId} on node ${node}`);
  });
  client.on("disconnected", ({ code, reason, willReconnect }) => {
    setStatus(willReconnect ? "wait" : "off", willReconnect ? "reconnecting" : "disconnected");
    log("disconnected", `disconnected: ${code} ${reason}${willReconnect ? " (reconnecting)" : ""}`);
  });
  client.on("error", (e) => log("error", `error ${e.code}: ${e.message}`));
  setStatus("wait", "connecting");
  client.connect();
}

function subscribe(channel, recover, presenceEvents) {
  if (!client) connect();
  if (subs.has(channel)) return;
  const sub = client.subscribe(channel, { recover, presenceEvents });
  subs.set(channel, sub);
  sub.on("subscribed", ({ recovered, epoch, offset }) => {
    const where = epoch === null ? "no history" : `epoch ${epoch}, offset ${offset}`;
    log("subscribed", `subscribed ${channel} (${where}, recovered: ${recovered})`, { channel });
  });
  sub.on("message", ({ data, offset }) =>
    log("message", `${channel}: ${JSON.stringify(data)}`, offset === undefined ? { channel } : { channel, offset }),
  );
  for (const kind of ["join", "leave"]) {
    sub.on(kind, (m) => {
      log(kind, `${kind} ${channel}: ${m.user ?? "anonymous"} (conn ${m.conn_id} on ${m.node})`, { channel });
      if ($("presence").dataset.channel === channel) showPresence(channel);
    });
  }
  sub.on("error", (e) => {
    log("error", `${channel}: ${e.code}: ${e.message}`, { channel });
    if (sub.state === "unsubscribed") removeSub(channel);
  });
  const li = document.createElement("li");
  li.dataset.channel = channel;
  const name = document.createElement("code");
  name.textContent = channel + (recover ? " [recover]" : "") + (presenceEvents ? " [events]" : "");
  const pres = button("presence", () => showPresence(channel));
  const hist = button("history", () => showHistory(channel));
  const unsub = button("unsubscribe", () => {
    sub.unsubscribe();
    removeSub(channel);
    log("subscribed", `unsubscribed ${channel}`);
  });
  li.append(name, pres, hist, unsub);
  $("subs").append(li);
}

function removeSub(channel) {
  subs.delete(channel);
  $("subs").querySelector(`li[data-channel="${CSS.escape(channel)}"]`)?.remove();
}

function button(text, onclick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = text;
  b.addEventListener("click", onclick);
  return b;
}

async function showPresence(channel) {
  const box = $("presence");
  box.dataset.channel = channel;
  try {
    const p = await client.presence(channel);
    const head = document.createElement("p");
    head.textContent = `${channel}: ${p.count} member(s)${p.truncated ? " (list truncated)" : ""}`;
    const ul = document.createElement("ul");
    for (const m of p.members ?? []) {
      const li = document.createElement("li");
      li.textContent = `${m.user ?? "anonymous"} - conn ${m.conn_id} on ${m.node}` +
        (m.info ? ` ${JSON.stringify(m.info)}` : "");
      ul.append(li);
    }
    box.replaceChildren(head, ul);
  } catch (e) {
    log("error", `presence ${channel}: ${e.code}: ${e.message}`);
  }
}

async function showHistory(channel) {
  try {
    const h = await client.history(channel, {});
    log("subscribed", `history ${channel}: epoch ${h.epoch}, offset ${h.offset}, ${h.messages.length} kept`);
    for (const m of h.messages) log("history", `${channel} (history): ${JSON.stringify(m.data)}`, { offset: m.offset });
  } catch (e) {
    log("error", `history ${channel}: ${e.code}: ${e.message}`);
  }
}

$("connect-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  connect();
});
$("disconnect").addEventListener("click", () => {
  client?.close();
  setStatus("off", "disconnected");
  log("disconnected", "closed by you");
});
$("subscribe-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  subscribe($("sub-channel").value.trim(), $("sub-recover").checked, $("sub-presence").checked);
});
$("publish-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  if (!client) connect();
  const channel = $("pub-channel").value.trim();
  const text = $("pub-data").value;
  let data;
  try {
    data = JSON.parse(text);
  } catch {
    data = text;
  }
  try {
    const { offset } = await client.publish(channel, data);
    log("published", `published to ${channel}${offset === undefined ? "" : ` at offset ${offset}`}`);
  } catch (e) {
    log("error", `publish ${channel}: ${e.code}: ${e.message}`);
  }
});
$("clear").addEventListener("click", () => $("log").replaceChildren());
