// The page for the person who scans: one connection's QR code or pairing code, live, until it
// is connected. It holds a client token (in its URL), which can only read this connection.
"use strict";

(() => {
  const $ = (sel) => document.querySelector(sel);
  const t = I18N.t;
  const id = document.body.dataset.connectionId;
  const link = document.body.dataset.link;
  const token = decodeURIComponent(location.pathname.split("/").pop() || "");
  const q = `token=${encodeURIComponent(token)}`;
  const TERMINAL = new Set(["qr_expired", "logged_out", "conflict", "failed", "deleted"]);
  let last = null; // the latest state seen, shown again when the language changes
  let shownSeq = null;
  let source = null;
  let ended = null; // "expired" | "invalid" once the link stops working

  function only(which) {
    for (const el of ["#qr", "#code-box", "#waiting", "#done", "#problem"]) $(el).hidden = el !== which;
    $("#qr-steps").hidden = which !== "#qr";
    $("#refresh-note").hidden = which !== "#qr";
  }

  function problem(text) {
    only("#problem");
    $("#problem").textContent = text;
  }

  function showLinkProblem() {
    $("#status-line").hidden = true;
    $("#reason").textContent = "";
    problem(t(ended === "expired" ? "connectExpired" : "connectInvalid"));
  }

  function render(c) {
    last = c;
    const status = $("#status");
    $("#status-line").hidden = false;
    status.textContent = I18N.state(c.status);
    status.dataset.status = c.status;
    $("#reason").textContent = c.status === "connected" ? "" : I18N.reason(c);
    if (c.status === "connected") {
      only("#done");
      $("#title").textContent = t("connectDoneTitle");
      stop();
      return;
    }
    $("#title").textContent = t(c.status === "code_ready" ? "linkWithCode" : "connectTitle");
    if (c.status === "code_ready" && c.pairing_code) {
      const code = c.pairing_code;
      $("#code").textContent = code.length === 8 ? `${code.slice(0, 4)}-${code.slice(4)}` : code;
      only("#code-box");
    } else if (c.status === "qr_ready" && c.qr) {
      if (shownSeq !== c.qr_seq) {
        shownSeq = c.qr_seq;
        const img = $("#qr");
        img.onload = () => {
          if (last && last.status === "qr_ready") only("#qr");
        };
        img.src = `/v1/connections/${id}/qr?${q}&seq=${c.qr_seq}`;
        img.dataset.seq = String(c.qr_seq);
      } else if ($("#qr").complete && $("#qr").naturalWidth > 0) {
        only("#qr");
      }
    } else if (TERMINAL.has(c.status)) {
      shownSeq = null;
      problem(t("connectEnded", { state: I18N.state(c.status) }));
    } else {
      shownSeq = null;
      only("#waiting");
      $("#waiting-text").textContent = `${I18N.state(c.status)}…`;
    }
  }

  function stop() {
    if (source) source.close();
    source = null;
  }

  // Why the stream closed: an expired or unknown link ends the page; anything else retries.
  async function check() {
    try {
      const res = await fetch(`/v1/connections/${id}`, {
        headers: { Authorization: `Bearer ${token}` },
        cache: "no-store",
      });
      if (res.status === 401 || res.status === 404) {
        ended = res.status === 401 ? "expired" : "invalid";
        showLinkProblem();
        return;
      }
      if (res.ok) render(await res.json());
    } catch (err) {
      // offline for now: try again below
    }
    setTimeout(listen, 3000);
  }

  function listen() {
    stop();
    // EventSource resumes by itself with Last-Event-ID while the server answers
    source = new EventSource(`/v1/connections/${id}/events?${q}`);
    for (const name of ["status", "qr", "pairing_code"]) {
      source.addEventListener(name, (e) => render(JSON.parse(e.data)));
    }
    source.onerror = () => {
      if (source && source.readyState === EventSource.CLOSED) {
        stop();
        check();
      }
    };
  }

  I18N.onChange(() => {
    if (ended) showLinkProblem();
    else if (last) render(last);
  });

  if (link !== "ok" || !id) {
    ended = link === "expired" ? "expired" : "invalid";
    showLinkProblem();
  } else {
    listen();
  }
})();
