// zapbus web page: plain JavaScript, no build step. The API key stays in this browser only.
// Texts come from i18n.js (English, Brazilian Portuguese).
"use strict";

const $ = (sel) => document.querySelector(sel);
const state = { key: localStorage.getItem("zapbus.apiKey") || "", open: null };

const t = I18N.t;
const label = (status) => I18N.state(status);

async function api(method, path, body) {
  const headers = { Authorization: `Bearer ${state.key}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const res = await fetch(path, { method, headers, body: body && JSON.stringify(body) });
  if (!res.ok) {
    const problem = await res.json().catch(() => ({ title: res.statusText }));
    throw Object.assign(new Error(problem.detail || problem.title), { status: res.status });
  }
  return res.json();
}

function notice(text, kind) {
  const el = $("#notice");
  el.textContent = text || "";
  el.dataset.kind = kind || "";
}

function badge(status) {
  const span = document.createElement("span");
  span.className = "badge";
  span.dataset.status = status;
  span.textContent = label(status);
  return span;
}

function signedOut(text) {
  $("#connections tbody").replaceChildren();
  $("#empty").hidden = true;
  $("#new-connection").disabled = true;
  notice(text, text ? "error" : "");
}

async function refresh() {
  if (!state.key) {
    signedOut("");
    notice(t("pasteKey"));
    return;
  }
  try {
    const page = await api("GET", "/v1/connections?limit=100");
    $("#connections tbody").replaceChildren(...page.items.map(row));
    $("#empty").hidden = page.items.length > 0;
    $("#new-connection").disabled = false;
    notice("");
  } catch (err) {
    if (err.status === 401) signedOut(t("keyRefused"));
    else notice(t("couldNotLoad", { msg: err.message }), "error");
  }
}

// A row action: report a failure on the page instead of an unhandled rejection.
const guarded = (what, fn) => async () => {
  try {
    await fn();
  } catch (err) {
    notice(t(what, { msg: err.message }), "error");
  }
};

function row(c) {
  const tr = document.createElement("tr");
  tr.dataset.id = c.id;
  const updated = new Date(c.updated_at);
  const cells = [c.name, badge(c.status), String(c.generation), updated.toLocaleTimeString()];
  for (const v of cells) {
    const td = document.createElement("td");
    td.append(v);
    tr.append(td);
  }
  tr.cells[0].className = "name";
  tr.cells[3].title = updated.toLocaleString();
  const actions = document.createElement("td");
  actions.className = "actions";
  const button = (text, fn, cls) => {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = text;
    if (cls) b.className = cls;
    b.addEventListener("click", fn);
    actions.append(b);
  };
  if (c.status !== "deleted") {
    button(t("btnQr"), () => openQr(c.id));
    button(t("btnRecreate"), guarded("couldNotRecreate", async () => {
      await api("POST", `/v1/connections/${c.id}/recreate`);
      openQr(c.id);
      await refresh();
    }));
    button(t("btnDelete"), guarded("couldNotDelete", async () => {
      if (confirm(t("confirmDelete", { name: c.name }))) {
        await api("DELETE", `/v1/connections/${c.id}`);
        await refresh();
      }
    }), "danger");
  }
  tr.append(actions);
  return tr;
}

// Server-Sent Events over fetch (EventSource cannot send the Authorization header).
async function follow(id, onEvent, signal) {
  let lastId = null;
  while (!signal.aborted) {
    try {
      const headers = { Authorization: `Bearer ${state.key}` };
      if (lastId !== null) headers["Last-Event-ID"] = lastId;
      const res = await fetch(`/v1/connections/${id}/events`, { headers, signal });
      if (res.status === 401 || res.status === 404) return; // retrying cannot help
      if (!res.ok) throw new Error(`events: ${res.status}`);
      const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value.replaceAll("\r\n", "\n");
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const frame = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          const ev = { event: "message", data: [] };
          for (const line of frame.split("\n")) {
            if (line.startsWith(":")) continue; // a keep-alive comment
            const at = line.indexOf(":");
            const field = at < 0 ? line : line.slice(0, at);
            const val = at < 0 ? "" : line.slice(at + 1).replace(/^ /, "");
            if (field === "id") lastId = val;
            else if (field === "event") ev.event = val;
            else if (field === "data") ev.data.push(val);
          }
          if (ev.data.length && !signal.aborted) onEvent(ev.event, JSON.parse(ev.data.join("\n")));
        }
      }
    } catch (err) {
      if (signal.aborted) return;
    }
    await new Promise((r) => setTimeout(r, 1000)); // reconnect, resuming from lastId
  }
}

// The QR image of code `seq`, unless the modal moved on (closed, another code, connected).
async function showQrImage(id, seq, signal) {
  let blob;
  try {
    const res = await fetch(`/v1/connections/${id}/qr`, {
      headers: { Authorization: `Bearer ${state.key}`, Accept: "image/svg+xml" },
      signal,
    });
    if (!res.ok) return;
    blob = await res.blob();
  } catch (err) {
    return;
  }
  if (signal.aborted || state.shownSeq !== seq) return;
  const img = $("#qr-image");
  const old = img.src;
  img.src = URL.createObjectURL(blob);
  if (old.startsWith("blob:")) URL.revokeObjectURL(old);
  img.dataset.seq = seq;
  img.hidden = false;
  $("#qr-wait").hidden = true;
}

function waiting(text) {
  $("#qr-image").hidden = true;
  $("#qr-done").hidden = true;
  $("#qr-wait").hidden = false;
  $("#qr-wait-text").textContent = text;
}

function openQr(id) {
  closeQr();
  const controller = new AbortController();
  state.open = controller;
  state.shownSeq = null;
  const status = $("#qr-status");
  status.textContent = "…";
  status.dataset.status = "";
  $("#qr-title").textContent = t("scanTitle");
  $("#qr-help").hidden = false;
  $("#qr-seq").textContent = "";
  $("#qr-reason").textContent = "";
  waiting(t("waitingQr"));
  $("#qr-dialog").showModal();
  follow(id, (event, c) => showState(id, c, controller), controller.signal);
}

// The modal for the connection's latest state (again when the language changes).
function showState(id, c, controller) {
  state.last = { id, c, controller };
  const status = $("#qr-status");
  status.textContent = label(c.status);
  status.dataset.status = c.status;
  $("#qr-reason").textContent = I18N.reason(c);
  if (c.status === "code_ready" && c.pairing_code) {
    const code = c.pairing_code;
    const grouped = code.length === 8 ? `${code.slice(0, 4)}-${code.slice(4)}` : code;
    $("#qr-title").textContent = t("linkWithCode");
    $("#qr-help").hidden = true;
    $("#qr-image").hidden = true;
    $("#qr-wait").hidden = true;
    $("#code-box").hidden = false;
    $("#pairing-code").textContent = grouped;
    return refresh();
  }
  $("#code-box").hidden = true;
  if (c.status === "qr_ready" && c.qr) {
    $("#qr-title").textContent = t("scanTitle");
    $("#qr-seq").textContent = t("qrSeq", { seq: c.qr_seq });
    if (state.shownSeq !== c.qr_seq) {
      state.shownSeq = c.qr_seq;
      showQrImage(id, c.qr_seq, controller.signal);
    }
  } else if (c.status !== "qr_ready") {
    state.shownSeq = null;
    $("#qr-seq").textContent = "";
    if (c.status === "connected") {
      $("#qr-title").textContent = t("linked");
      $("#qr-help").hidden = true;
      $("#qr-image").hidden = true;
      $("#qr-wait").hidden = true;
      $("#qr-done").hidden = false;
    } else {
      waiting(`${label(c.status)}…`);
    }
  }
  refresh();
}

function closeQr() {
  if (state.open) state.open.abort();
  state.open = null;
  state.last = null;
  state.shownSeq = null;
  if ($("#qr-dialog").open) $("#qr-dialog").close();
}

$("#key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  state.key = $("#api-key").value.trim();
  localStorage.setItem("zapbus.apiKey", state.key);
  refresh();
});
$("#new-connection").addEventListener("click", () => {
  $("#new-name").value = "";
  $("#new-phone").value = "";
  $("#new-dialog").showModal();
});
$("#new-cancel").addEventListener("click", () => $("#new-dialog").close());
$("#new-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const name = $("#new-name").value.trim();
  const phone = $("#new-phone").value.trim();
  if (!name) return;
  $("#new-dialog").close();
  const body = phone ? { name, login: "code", phone_number: phone } : { name };
  try {
    const c = await api("POST", "/v1/connections", body);
    await refresh();
    openQr(c.id);
  } catch (err) {
    notice(t("couldNotCreate", { msg: err.message }), "error");
  }
});
$("#qr-close").addEventListener("click", closeQr);
$("#qr-dialog").addEventListener("close", closeQr);

I18N.onChange(() => {
  refresh();
  if (state.last && $("#qr-dialog").open) {
    const { id, c, controller } = state.last;
    showState(id, c, controller);
  }
});

$("#api-key").value = state.key;
refresh();
setInterval(refresh, 5000);
