// LoRA Fleet console: plain JavaScript, no dependencies. Every page reads the /v1 API with the API key kept in
// this tab's sessionStorage. Text from the API is only ever inserted with textContent (never as HTML).
"use strict";

(() => {
  const KEY = "lorafleet.apiKey";
  const FINAL = new Set(["succeeded", "failed", "cancelled"]);
  const SVG_NS = "http://www.w3.org/2000/svg";

  // ---- small helpers --------------------------------------------------------------------------------------

  const $ = (selector, root = document) => root.querySelector(selector);

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs)) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "class") node.className = value;
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function svg(tag, attrs = {}, text) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  const fmtTime = (s) => (s ? new Date(s * 1000).toLocaleString() : "—");
  const fmtLoss = (x) => (x === null || x === undefined || Number.isNaN(x) ? "—" : Number(x).toFixed(4));
  const fmtInt = (n) => Number(n || 0).toLocaleString();

  function badge(status) {
    return el("span", { class: `badge ${status}` }, (status || "unknown").replace("_", " "));
  }

  function say(node, text) {
    if (node) node.textContent = text;
  }

  function showError(node, text) {
    if (!node) return;
    node.textContent = text;
    node.hidden = !text;
  }

  // ---- API ------------------------------------------------------------------------------------------------

  const apiKey = () => sessionStorage.getItem(KEY);

  function toLogin() {
    const next = location.pathname + location.search;
    location.assign(`/console/login?next=${encodeURIComponent(next)}`);
  }

  class ApiError extends Error {
    constructor(status, message, code) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  async function request(path, { method = "GET", body, signal, headers = {}, key = apiKey() } = {}) {
    const init = { method, signal, headers: { Authorization: `Bearer ${key}`, ...headers } };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const response = await fetch(path, init);
    if (!response.ok) {
      let message = `${response.status} ${response.statusText}`;
      let code;
      try {
        const error = (await response.json()).error || {};
        message = error.message || message;
        code = error.code;
      } catch (_) {
        /* not JSON */
      }
      if (response.status === 401 && key === apiKey()) {
        sessionStorage.removeItem(KEY);
        toLogin();
      }
      throw new ApiError(response.status, message, code);
    }
    return response;
  }

  const api = async (path, options) => (await request(path, options)).json();

  // Server-sent events from a fetch() response (EventSource cannot send an Authorization header).
  async function* readSSE(response) {
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    let data = [];
    let id = null;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let newline;
      while ((newline = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, newline).replace(/\r$/, "");
        buffer = buffer.slice(newline + 1);
        if (line === "") {
          if (data.length) yield { id, data: data.join("\n") };
          data = [];
          continue;
        }
        if (line.startsWith(":")) continue; // keepalive comment
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "data") data.push(text);
        else if (field === "id") id = text;
      }
    }
  }

  // ---- pages ------------------------------------------------------------------------------------------------

  function loginPage() {
    const form = $("#login-form");
    const input = $("#api-key");
    const error = $("#login-error");
    input.focus();
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const key = input.value.trim();
      if (!key) {
        showError(error, "Enter an API key.");
        input.focus();
        return;
      }
      showError(error, "");
      form.querySelector("button").disabled = true;
      try {
        await request("/v1/models", { key });
        sessionStorage.setItem(KEY, key);
        const next = new URLSearchParams(location.search).get("next") || "";
        location.assign(next.startsWith("/console/") && !next.startsWith("//") ? next : "/console/jobs");
      } catch (err) {
        const text = err.status === 401 ? "That API key was not accepted." : `Could not sign in: ${err.message}`;
        showError(error, text);
        input.focus();
      } finally {
        form.querySelector("button").disabled = false;
      }
    });
  }

  function progressCell(job) {
    const lf = job.lorafleet || {};
    if (!lf.total_steps) return el("td", {}, job.status === "succeeded" ? "done" : "—");
    const bar = el("span", { class: "progress", "aria-hidden": "true" }, el("span"));
    bar.firstChild.style.width = `${Math.min(100, (100 * lf.step) / lf.total_steps)}%`;
    return el("td", {}, bar, `${lf.step}/${lf.total_steps}`);
  }

  function jobsPage() {
    const body = $("#jobs-table tbody");
    const status = $("#jobs-status");
    let timer = null;
    async function load() {
      clearTimeout(timer);
      try {
        const jobs = (await api("/v1/fine_tuning/jobs?limit=100")).data;
        body.replaceChildren(
          ...jobs.map((job) =>
            el(
              "tr",
              {},
              el("td", {}, el("a", { href: `/console/jobs/${encodeURIComponent(job.id)}`, class: "mono" }, job.id)),
              el("td", {}, badge(job.status)),
              progressCell(job),
              el("td", { class: "num" }, fmtLoss(job.lorafleet && job.lorafleet.loss)),
              el("td", { class: "wrap" }, job.fine_tuned_model || el("span", { class: "muted" }, job.model)),
              el("td", {}, fmtTime(job.created_at)),
            ),
          ),
        );
        $("#jobs-empty").hidden = jobs.length > 0;
        const active = jobs.filter((job) => !FINAL.has(job.status)).length;
        say(status, `${jobs.length} job(s)${active ? `, ${active} in progress (refreshing)` : ""}.`);
        if (active) timer = setTimeout(load, 3000);
      } catch (err) {
        say(status, `Could not load jobs: ${err.message}`);
      }
    }
    $("#refresh").addEventListener("click", load);
    load();
  }

  // The loss curve: inline SVG, redrawn from all points (cheap at the hundreds of steps a LoRA run has).
  function drawLossChart(chart, points, totalSteps) {
    const W = 720, H = 280, L = 64, R = 20, T = 16, B = 44;
    for (const node of [...chart.children]) if (!["title", "desc"].includes(node.tagName)) node.remove();
    if (!points.length) return;
    const losses = points.map((p) => p.loss);
    let lo = Math.min(...losses), hi = Math.max(...losses);
    const pad = (hi - lo) * 0.1 || Math.abs(hi) * 0.1 || 0.1;
    lo = Math.max(0, lo - pad);
    hi += pad;
    const first = points[0].step;
    const last = Math.max(totalSteps || 0, points[points.length - 1].step, first + 1);
    const x = (step) => L + ((step - first) / (last - first || 1)) * (W - L - R);
    const y = (loss) => T + (1 - (loss - lo) / (hi - lo)) * (H - T - B);
    for (let i = 0; i <= 4; i++) {
      const value = lo + ((hi - lo) * i) / 4;
      chart.append(svg("line", { class: "grid", x1: L, x2: W - R, y1: y(value), y2: y(value) }));
      chart.append(svg("text", { class: "tick", x: L - 8, y: y(value) + 4, "text-anchor": "end" }, value.toFixed(3)));
    }
    const ticks = Math.min(5, last - first);
    for (let i = 0; i <= ticks; i++) {
      const step = Math.round(first + ((last - first) * i) / (ticks || 1));
      chart.append(svg("text", { class: "tick", x: x(step), y: H - B + 18, "text-anchor": "middle" }, String(step)));
    }
    chart.append(svg("line", { class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B }));
    chart.append(svg("line", { class: "axis", x1: L, x2: L, y1: T, y2: H - B }));
    chart.append(svg("text", { class: "tick", x: (L + W - R) / 2, y: H - 6, "text-anchor": "middle" }, "step"));
    const middle = (T + H - B) / 2;
    chart.append(svg("text", { class: "tick", x: 14, y: middle, "text-anchor": "middle", transform: `rotate(-90 14 ${middle})` }, "loss"));
    const coords = points.map((p) => `${x(p.step).toFixed(1)},${y(p.loss).toFixed(1)}`).join(" ");
    chart.append(svg("polyline", { class: "loss-line", points: coords }));
    if (points.length <= 80) {
      for (const p of points) chart.append(svg("circle", { class: "loss-point", cx: x(p.step), cy: y(p.loss), r: 2.5 }));
    }
    const end = points[points.length - 1];
    chart.append(svg("circle", { class: "loss-last", cx: x(end.step), cy: y(end.loss), r: 5 }));
  }

  function jobPage() {
    const jobId = document.body.dataset.jobId;
    const path = `/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}`;
    const chart = $("#loss-chart");
    const caption = $("#loss-caption");
    const table = $("#loss-table tbody");
    const events = $("#events");
    const streamStatus = $("#stream-status");
    const cancel = $("#cancel-job");
    const points = [];
    let totalSteps = 0;
    let drawPending = false;
    let lastEventId = null;
    let done = false;
    const aborter = new AbortController();
    window.addEventListener("pagehide", () => aborter.abort());

    function fact(label, value) {
      return [el("dt", {}, label), el("dd", {}, value === null || value === undefined || value === "" ? "—" : value)];
    }

    async function loadJob() {
      try {
        const job = await api(path);
        $("#job-status").replaceWith(Object.assign(badge(job.status), { id: "job-status" }));
        const hp = job.hyperparameters || {};
        const lf = job.lorafleet || {};
        $("#job-facts").replaceChildren(
          ...fact("Status", job.status.replace("_", " ")),
          ...fact("Base model", job.model),
          ...fact("Fine-tuned model", job.fine_tuned_model),
          ...fact("Training file", job.training_file),
          ...fact("Created", fmtTime(job.created_at)),
          ...fact("Finished", fmtTime(job.finished_at)),
          ...fact("Steps", lf.total_steps ? `${lf.step} of ${lf.total_steps}` : null),
          ...fact("Trained tokens", job.trained_tokens === null ? null : fmtInt(job.trained_tokens)),
          ...fact("Epochs", hp.n_epochs),
          ...fact("Learning rate multiplier", hp.learning_rate_multiplier),
          ...fact("Batch size", hp.batch_size),
          ...fact("Suffix", job.user_provided_suffix),
        );
        if (job.error) showError($("#job-error"), `Failed: ${job.error.message}`);
        cancel.hidden = FINAL.has(job.status);
        if (job.fine_tuned_model) {
          const link = el("a", { href: `/console/playground?model=${encodeURIComponent(job.fine_tuned_model)}` }, "Chat with it");
          $("#job-facts").append(el("dt", {}, "Try it"), el("dd", {}, link));
        }
        return job;
      } catch (err) {
        showError($("#job-error"), err.status === 404 ? "No such job (or it belongs to another tenant)." : err.message);
        return null;
      }
    }

    function redraw() {
      drawPending = false;
      drawLossChart(chart, points, totalSteps);
      const end = points[points.length - 1];
      const best = points.reduce((a, b) => (b.loss < a.loss ? b : a));
      const text =
        `${points.length} step(s) recorded${totalSteps ? ` of ${totalSteps}` : ""}: loss ${fmtLoss(points[0].loss)} at ` +
        `step ${points[0].step}, ${fmtLoss(end.loss)} at step ${end.step}; lowest ${fmtLoss(best.loss)} at step ${best.step}.`;
      say($("#loss-desc"), text);
      say(caption, text);
    }

    function onEvent(event) {
      if (event.type === "metrics" && event.data) {
        const d = event.data;
        if (points.length && d.step <= points[points.length - 1].step) return; // replayed after a reconnect
        points.push({ step: d.step, loss: d.train_loss });
        totalSteps = d.total_steps || totalSteps;
        table.append(
          el(
            "tr",
            {},
            el("td", { class: "num" }, d.step),
            el("td", { class: "num" }, fmtLoss(d.train_loss)),
            el("td", { class: "num" }, Number(d.learning_rate).toExponential(2)),
            el("td", { class: "num" }, Number(d.epoch).toFixed(2)),
          ),
        );
        if (!drawPending) {
          drawPending = true;
          requestAnimationFrame(redraw);
        }
        return;
      }
      const item = el(
        "li",
        { class: `level-${event.level}` },
        el("time", { datetime: new Date(event.created_at * 1000).toISOString() }, fmtTime(event.created_at)),
        event.message,
      );
      events.prepend(item);
      if (event.data && event.data.status) {
        $("#job-status").replaceWith(Object.assign(badge(event.data.status), { id: "job-status" }));
        cancel.hidden = FINAL.has(event.data.status);
      }
    }

    async function follow() {
      let failures = 0;
      while (!done && failures < 6) {
        try {
          const headers = { Accept: "text/event-stream" };
          if (lastEventId) headers["Last-Event-ID"] = lastEventId;
          say(streamStatus, "Following live events…");
          const response = await request(`${path}/events/stream`, { headers, signal: aborter.signal });
          for await (const message of readSSE(response)) {
            failures = 0;
            if (message.data === "[DONE]") {
              done = true;
              break;
            }
            const event = JSON.parse(message.data);
            if (event.error) throw new ApiError(0, event.error.message);
            lastEventId = message.id || lastEventId;
            onEvent(event);
          }
        } catch (err) {
          if (aborter.signal.aborted || err.status === 404 || err.status === 401) return;
          failures += 1;
          say(streamStatus, `Event stream interrupted (${err.message}); reconnecting…`);
        }
        if (!done) await new Promise((resolve) => setTimeout(resolve, Math.min(8000, 500 * 2 ** failures)));
      }
      say(streamStatus, done ? "The job is finished: all events shown." : "Stopped following events; reload to retry.");
      if (done) loadJob();
    }

    cancel.addEventListener("click", async () => {
      if (!window.confirm(`Cancel job ${jobId}?`)) return;
      try {
        await api(`${path}/cancel`, { method: "POST" });
        loadJob();
      } catch (err) {
        showError($("#job-error"), `Could not cancel: ${err.message}`);
      }
    });

    loadJob().then((job) => {
      if (job) follow();
    });
  }

  function placementCell(adapter) {
    if (!adapter.loaded_on.length) return el("td", { class: "muted" }, "not loaded");
    return el(
      "td",
      {},
      el("ul", { class: "placements" }, ...adapter.loaded_on.map((p) => el("li", {}, `${p.replica} (${p.versions.join(", ")}${p.merged_version ? `; merged ${p.merged_version}` : ""})`))),
    );
  }

  function adaptersPage() {
    const body = $("#adapters-table tbody");
    const status = $("#adapters-status");
    async function load() {
      try {
        const adapters = (await api("/v1/lorafleet/adapters")).data;
        body.replaceChildren(
          ...adapters.map((a) => {
            const details = el(
              "details",
              {},
              el("summary", {}, "details"),
              el("p", {}, `Base model: ${a.base_model}`),
              el("p", {}, `System prompt: ${a.system_prompt || "(none)"}`),
              el("p", {}, `Target modules: ${a.target_modules.join(", ")}`),
              a.job_id ? el("p", {}, "Trained by job ", el("a", { href: `/console/jobs/${encodeURIComponent(a.job_id)}` }, a.job_id)) : null,
              el("p", { class: "mono" }, `sha256 ${a.sha256.slice(0, 16)}…`),
            );
            const versions = el(
              "ul",
              { class: "placements" },
              ...a.versions.map((v) => el("li", {}, `${v.version}${v.latest ? " (latest)" : ""}`, el("span", { class: "muted" }, ` ${fmtTime(v.created_at)}`))),
            );
            const t = a.traffic;
            return el(
              "tr",
              {},
              el("td", { class: "model" }, el("strong", {}, a.id), details),
              el("td", {}, versions),
              el("td", {}, `r=${a.rank}, α=${a.alpha}`),
              el("td", { class: "num" }, fmtLoss(a.final_loss)),
              placementCell(a),
              el("td", { class: "num" }, fmtInt(t.requests), t.errors ? el("span", { class: "muted" }, ` (${fmtInt(t.errors)} failed)`) : null),
              el("td", { class: "num" }, `${fmtInt(t.prompt_tokens)} / ${fmtInt(t.completion_tokens)}`),
              el("td", {}, fmtTime(a.created_at)),
              el("td", {}, el("a", { class: "action", href: `/console/playground?model=${encodeURIComponent(a.id)}` }, "Chat", el("span", { class: "visually-hidden" }, ` with ${a.id}`))),
            );
          }),
        );
        $("#adapters-empty").hidden = adapters.length > 0;
        say(status, `${adapters.length} adapter(s), updated ${new Date().toLocaleTimeString()}.`);
      } catch (err) {
        say(status, `Could not load adapters: ${err.message}`);
      }
    }
    $("#refresh").addEventListener("click", load);
    load();
    setInterval(load, 15000);
  }

  function playgroundPage() {
    const form = $("#chat-form");
    const pickA = $("#model-a");
    const pickB = $("#model-b");
    const compare = $("#compare");
    const message = $("#message");
    const send = $("#send");
    const stop = $("#stop");
    const status = $("#chat-status");
    const panes = {
      a: { pick: pickA, transcript: $("#transcript-a"), title: $("#pane-a-title"), meta: $("#meta-a"), history: [] },
      b: { pick: pickB, transcript: $("#transcript-b"), title: $("#pane-b-title"), meta: $("#meta-b"), history: [] },
    };
    let aborter = null;

    function setCompare(on) {
      compare.checked = on;
      $("#model-b-field").hidden = !on;
      $("#pane-b").hidden = !on;
      $("#panes").classList.toggle("two", on);
    }

    function reset(pane) {
      pane.history = [];
      pane.transcript.replaceChildren();
      say(pane.meta, "");
      say(pane.title, pane.pick.value || pane.title.textContent);
    }

    function bubble(pane, role, text) {
      const node = el("div", { class: `msg ${role}` }, el("span", { class: "who" }, role === "user" ? "You" : pane.pick.value), text);
      pane.transcript.append(node);
      pane.transcript.scrollTop = pane.transcript.scrollHeight;
      return node;
    }

    async function ask(pane, text, signal) {
      pane.history.push({ role: "user", content: text });
      bubble(pane, "user", text);
      const answer = bubble(pane, "assistant", "");
      const output = document.createTextNode("");
      answer.append(output);
      const system = $("#system-prompt").value.trim();
      const body = {
        model: pane.pick.value,
        messages: system ? [{ role: "system", content: system }, ...pane.history] : pane.history,
        stream: true,
        stream_options: { include_usage: true },
        temperature: Number($("#temperature").value || 0),
        max_tokens: Number($("#max-tokens").value || 256),
      };
      const started = performance.now();
      let firstToken = null;
      let usage = null;
      try {
        const response = await request("/v1/chat/completions", { method: "POST", body, signal, headers: { Accept: "text/event-stream" } });
        for await (const event of readSSE(response)) {
          if (event.data === "[DONE]") break;
          const chunk = JSON.parse(event.data);
          if (chunk.error) throw new ApiError(0, chunk.error.message);
          if (chunk.usage) usage = chunk.usage;
          const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta && chunk.choices[0].delta.content;
          if (delta) {
            if (firstToken === null) firstToken = performance.now() - started;
            output.data += delta;
            pane.transcript.scrollTop = pane.transcript.scrollHeight;
          }
        }
        pane.history.push({ role: "assistant", content: output.data });
        const total = (performance.now() - started) / 1000;
        say(
          pane.meta,
          `first token ${Math.round(firstToken ?? 0)} ms · ${total.toFixed(2)} s total` +
            (usage ? ` · ${usage.completion_tokens} tokens` : ""),
        );
        return true;
      } catch (err) {
        pane.history.pop();
        answer.classList.add("failed");
        output.data += signal.aborted ? " [stopped]" : ` [error: ${err.message}]`;
        say(pane.meta, signal.aborted ? "stopped" : `error: ${err.message}`);
        return false;
      }
    }

    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const text = message.value.trim();
      if (!text || aborter) return;
      const active = compare.checked ? [panes.a, panes.b] : [panes.a];
      message.value = "";
      aborter = new AbortController();
      send.disabled = true;
      stop.disabled = false;
      say(status, `Asking ${active.map((p) => p.pick.value).join(" and ")}…`);
      const results = await Promise.all(active.map((pane) => ask(pane, text, aborter.signal)));
      say(status, results.every(Boolean) ? "Answered." : "Some answers did not complete.");
      aborter = null;
      send.disabled = false;
      stop.disabled = true;
      message.focus();
    });
    message.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        form.requestSubmit();
      }
    });
    stop.addEventListener("click", () => aborter && aborter.abort());
    $("#clear").addEventListener("click", () => {
      reset(panes.a);
      reset(panes.b);
      message.focus();
    });
    compare.addEventListener("change", () => setCompare(compare.checked));
    pickA.addEventListener("change", () => reset(panes.a));
    pickB.addEventListener("change", () => reset(panes.b));

    (async () => {
      try {
        const models = (await api("/v1/models")).data;
        for (const pick of [pickA, pickB]) {
          pick.replaceChildren(...models.map((m) => el("option", { value: m.id }, m.parent ? m.id : `${m.id} (base model)`)));
        }
        const params = new URLSearchParams(location.search);
        const ids = models.map((m) => m.id);
        const wanted = params.get("model");
        if (wanted && ids.includes(wanted)) pickA.value = wanted;
        const other = params.get("compare");
        pickB.value = other && ids.includes(other) ? other : models[0].id;
        setCompare(Boolean(other));
        reset(panes.a);
        reset(panes.b);
        say(status, `${models.length} model(s) available.`);
      } catch (err) {
        say(status, `Could not load models: ${err.message}`);
      }
    })();
  }

  // ---- start ------------------------------------------------------------------------------------------------

  const pages = { login: loginPage, jobs: jobsPage, job: jobPage, adapters: adaptersPage, playground: playgroundPage };

  document.addEventListener("DOMContentLoaded", () => {
    const page = document.body.dataset.page;
    if (page !== "login" && !apiKey()) {
      toLogin();
      return;
    }
    const logout = $("#logout");
    if (logout) {
      logout.addEventListener("click", () => {
        sessionStorage.removeItem(KEY);
        location.assign("/console/login");
      });
    }
    (pages[page] || (() => {}))();
  });
})();
