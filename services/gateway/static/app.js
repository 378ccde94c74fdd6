// zapbus web page: plain JavaScript, no build step. The API key stays in this browser only.
"use strict";

const $ = (sel) => document.querySelector(sel);
const state = { key: localStorage.getItem("zapbus.apiKey") || "", open: null };

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

function notice(text) { $("#notice").textContent = text || ""; }

function badge(status) {
  const span = document.createElement("span");
  span.className = "badge";
  span.dataset.status = status;
  span.textContent = status.replace("_", " ");
  return span;
}

async function refresh() {
  if (!state.key) return;
  try {
    const page = await api("GET", "/v1/connections?limit=100");
    const body = $("#connections tbody");
    body.replaceChildren(...page.items.map(row));
    $("#empty").hidden = page.items.length > 0;
    $("#new-connection").disabled = false;
    notice("");
  } catch (err) {
    notice(err.status === 401 ? "That API key was not accepted." : `Could not load: ${err.message}`);
  }
}

function row(c) {
  const tr = document.createElement("tr");
  tr.dataset.id = c.id;
  const cells = [c.name, badge(c.status), String(c.generation), new Date(c.updated_at).toLocaleTimeString()];
  for (const v of cells) {
    const td = document.createElement("td");
    td.append(v);
    tr.append(td);
  }
  const actions = document.createElement("td");
  actions.className = "actions";
  const button = (label, fn) => {
    const b = document.createElement("button");
    b.textContent = label;
    b.addEventListener("click", fn);
    actions.append(b);
  };
  if (c.status !== "deleted") {
    button("QR / status", () => openQr(c.id));
    button("Recreate", async () => { await api("POST", `/v1/connections/${c.id}/recreate`); openQr(c.id); refresh(); });
    button("Delete", async () => {
      if (confirm(`Delete ${c.name}?`)) { await api("DELETE", `/v1/connections/${c.id}`); refresh(); }
    });
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
      if (!res.ok) throw new Error(`events: ${res.status}`);
      const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const frame = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          const ev = { event: "message", data: "" };
          for (const line of frame.split("\n")) {
            const [field, ...rest] = line.split(":");
            const val = rest.join(":").replace(/^ /, "");
            if (field === "id") lastId = val;
            else if (field === "event") ev.event = val;
            else if (field === "data") ev.data += val;
          }
          if (ev.data) onEvent(ev.event, JSON.parse(ev.data));
        }
      }
    } catch (err) {
      if (signal.aborted) return;
    }
    await new Promise((r) => setTimeout(r, 1000)); // reconnect, resuming from lastId
  }
}

async function showQrImage(id, seq) {
  const res = await fetch(`/v1/connections/${id}/qr`, {
    headers: { Authorization: `Bearer ${state.key}`, Accept: "image/svg+xml" },
  });
  if (!res.ok) return;
  const img = $("#qr-image");
  if (img.src) URL.revokeObjectURL(img.src);
  img.src = URL.createObjectURL(await res.blob());
  img.dataset.seq = seq;
  img.hidden = false;
  $("#qr-wait").hidden = true;
}

function openQr(id) {
  closeQr();
  const controller = new AbortController();
  state.open = controller;
  const status = $("#qr-status");
  $("#qr-image").hidden = true;
  $("#qr-wait").hidden = false;
  $("#qr-wait").textContent = "Waiting for the QR code…";
  $("#qr-seq").textContent = "";
  $("#qr-reason").textContent = "";
  $("#qr-dialog").showModal();
  follow(id, (event, c) => {
    status.textContent = c.status.replace("_", " ");
    status.dataset.status = c.status;
    $("#qr-reason").textContent = c.status_reason || "";
    if (c.status === "qr_ready" && c.qr) {
      $("#qr-seq").textContent = `(code ${c.qr_seq})`;
      showQrImage(id, c.qr_seq);
    } else if (c.status !== "qr_ready") {
      $("#qr-image").hidden = true;
      $("#qr-wait").hidden = false;
      $("#qr-wait").textContent = c.status === "connected" ? "✓ Connected" : `${c.status.replace("_", " ")}…`;
    }
    refresh();
  }, controller.signal);
}

function closeQr() {
  if (state.open) state.open.abort();
  state.open = null;
  if ($("#qr-dialog").open) $("#qr-dialog").close();
}

$("#key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  state.key = $("#api-key").value.trim();
  localStorage.setItem("zapbus.apiKey", state.key);
  refresh();
});
$("#new-connection").addEventListener("click", () => $("#new-dialog").showModal());
$("#new-form").addEventListener("submit", async (e) => {
  if (e.submitter && e.submitter.value !== "create") return;
  e.preventDefault();
  const name = $("#new-name").value.trim();
  if (!name) return;
  $("#new-dialog").close();
  try {
    const c = await api("POST", "/v1/connections", { name });
    $("#new-name").value = "";
    await refresh();
    openQr(c.id);
  } catch (err) {
    notice(`Could not create: ${err.message}`);
  }
});
$("#qr-close").addEventListener("click", closeQr);
$("#qr-dialog").addEventListener("close", closeQr);

$("#api-key").value = state.key;
refresh();
setInterval(refresh, 5000);
