// Cube dashboard: builds each page from /dashboard/api/... with DOM calls.
// Everything shown is set as text (textContent, attribute values), never parsed as HTML:
// sandbox metadata, template names and log lines are other people's input.
"use strict";

const CSRF = document.querySelector('meta[name="csrf-token"]')?.content || "";
const BODY = document.body;
const CONTENT = document.getElementById("content");
const POLL_MS = 2000;
const LIST_POLL_MS = 5000; // the list asks every running guest's agent for its CPU and memory

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (name === "on") {
      for (const [event, handler] of Object.entries(value)) node.addEventListener(event, handler);
    } else if (value !== null && value !== undefined && value !== false) {
      node.setAttribute(name, String(value));
    }
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function showError(message) {
  const box = document.getElementById("error");
  box.textContent = message;
  box.hidden = !message;
}

async function api(path, options) {
  const init = { credentials: "same-origin", headers: {}, ...(options || {}) };
  if (init.method && init.method !== "GET") {
    init.headers["X-CSRF-Token"] = CSRF;
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(init.json || {});
  }
  const response = await fetch("/dashboard/api/" + path, init);
  if (response.status === 401) {
    window.location.assign("/dashboard/login");
    throw new Error("signed out");
  }
  const text = await response.text();
  const data = text ? JSON.parse(text) : null;
  if (!response.ok) throw new Error((data && data.message) || response.statusText);
  return data;
}

async function act(path, json, question) {
  if (question && !window.confirm(question)) return false;
  try {
    await api(path, { method: "POST", json });
    showError("");
    return true;
  } catch (error) {
    showError(String(error.message || error));
    return false;
  }
}

function poll(render, everyMs = POLL_MS) {
  let stopped = false;
  async function tick() {
    if (stopped) return;
    try {
      const again = await render();
      showError("");
      if (again === false) return;
    } catch (error) {
      showError(String(error.message || error));
    }
    setTimeout(tick, everyMs);
  }
  tick();
  return () => { stopped = true; };
}

function table(headers, rows, id) {
  return el("table", { id },
    el("thead", {}, el("tr", {}, headers.map((h) => el("th", {}, h)))),
    el("tbody", {}, rows));
}

function replace(node, id) {
  const old = document.getElementById(id);
  if (old) old.replaceWith(node); else CONTENT.append(node);
}

function mib(bytes) { return (bytes / 1048576).toFixed(0) + " MiB"; }
function metadataText(metadata) {
  return Object.entries(metadata || {}).map(([k, v]) => k + "=" + v).join(", ");
}

// Overview.

function chart(points, id) {
  const NS = "http://www.w3.org/2000/svg";
  const width = 600, height = 160, pad = 30;
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("id", id || "latency-chart");
  svg.setAttribute("class", "latency-chart");
  svg.setAttribute("role", "img");
  const max = Math.max(1, ...points.map((p) => p.p95Ms));
  const first = points.length ? points[0].at : 0, last = points.length ? points[points.length - 1].at : 1;
  const x = (at) => pad + ((at - first) / Math.max(60, last - first)) * (width - 2 * pad);
  const y = (ms) => height - pad - (ms / max) * (height - 2 * pad);
  for (const [key, cls] of [["p50Ms", "p50"], ["p95Ms", "p95"]]) {
    const line = document.createElementNS(NS, "polyline");
    line.setAttribute("class", cls);
    line.setAttribute("points", points.map((p) => `${x(p.at).toFixed(1)},${y(p[key]).toFixed(1)}`).join(" "));
    svg.append(line);
    for (const p of points) {
      const dot = document.createElementNS(NS, "circle");
      dot.setAttribute("class", cls);
      dot.setAttribute("cx", x(p.at).toFixed(1));
      dot.setAttribute("cy", y(p[key]).toFixed(1));
      dot.setAttribute("r", "3");
      svg.append(dot);
    }
  }
  const label = document.createElementNS(NS, "text");
  label.setAttribute("x", "4");
  label.setAttribute("y", "14");
  label.textContent = `max ${max.toFixed(0)} ms`;
  svg.append(label);
  return svg;
}

// In a cluster (`perNode` names its nodes) the cards add up every node; each node's own figures
// follow in a table, its create latency and its warm pools under its name.
function overviewPage() {
  poll(async () => {
    const data = await api("overview");
    const host = data.host;
    const cluster = data.perNode.length > 1 || data.nodeID !== null;
    const here = cluster ? ` on ${data.nodeID}` : "";
    const cards = el("div", { class: "cards", id: "cards" },
      el("div", { class: "card" }, el("b", { id: "running-count" }, data.sandboxes.running), " running"),
      el("div", { class: "card" }, el("b", {}, data.sandboxes.paused), " paused"),
      el("div", { class: "card" }, el("b", { id: "creates-per-minute" }, data.createsLastMinute), " creates in the last minute"),
      el("div", { class: "card" }, el("b", {}, mib(host.memTotal - host.memAvailable)), " of ", mib(host.memTotal), " host memory used" + here),
      el("div", { class: "card" }, el("b", {}, host.load1.toFixed(2)), ` load (${host.cpuCount} CPUs)` + here),
      el("div", { class: "card" }, el("b", {}, host.memoryCommittedMB + " MiB"), ` of ${host.memoryBudgetMB} MiB sandbox budget` + here));
    replace(cards, "cards");
    replace(cluster ? el("section", { id: "per-node" }, el("h2", {}, "Per node"),
      table(["Node", "Running", "Paused", "Creates (last minute)", "Host memory used", "Load", "Sandbox budget"], data.perNode.map((n) =>
        el("tr", { "data-node": n.nodeID }, el("td", {}, n.nodeID), el("td", {}, n.sandboxes.running), el("td", {}, n.sandboxes.paused),
          el("td", {}, n.createsLastMinute), el("td", {}, mib(n.host.memTotal - n.host.memAvailable) + " of " + mib(n.host.memTotal)),
          el("td", {}, n.host.load1.toFixed(2)), el("td", {}, `${n.host.memoryCommittedMB} of ${n.host.memoryBudgetMB} MiB`))))) :
      el("div", { id: "per-node" }), "per-node");
    const charts = cluster
      ? data.perNode.filter((n) => n.creates.length).map((n) => el("div", { "data-node": n.nodeID }, el("h3", {}, n.nodeID), chart(n.creates, "latency-chart-" + n.nodeID)))
      : (data.creates.length ? [chart(data.creates)] : []);
    replace(el("section", { id: "latency" },
      el("h2", {}, "Create latency (p50 ", el("span", { class: "p50" }, "—"), ", p95 ", el("span", { class: "p95" }, "—"), ") per minute"),
      charts.length ? charts : el("p", {}, "No sandbox created in the last hour.")), "latency");
    const pools = data.perNode.flatMap((n) => Object.entries(n.pools).map(([id, p]) =>
      el("tr", { "data-node": n.nodeID || "" }, cluster ? el("td", {}, n.nodeID) : null, el("td", {}, id), el("td", {}, p.target), el("td", {}, p.ready), el("td", {}, p.booting))));
    replace(el("section", { id: "pools" }, el("h2", {}, "Warm pools"),
      table([...(cluster ? ["Node"] : []), "Template", "Target", "Ready", "Booting"], pools)), "pools");
    replace(data.nodes.length ? el("section", { id: "nodes" }, el("h2", {}, "Nodes"),
      table(["Node", "State", "API", "Runtime", "CPUs", "Free memory", "Warm guests", "Sandboxes"], data.nodes.map((n) =>
        el("tr", { "data-node": n.node_id }, el("td", {}, n.node_id), el("td", {}, n.state), el("td", {}, n.api_url),
          el("td", {}, n.runtime), el("td", {}, n.cpus), el("td", {}, n.memory_free_mb + " MiB"),
          el("td", {}, n.free_pool_slots), el("td", {}, n.sandboxes))))) : el("div", { id: "nodes" }), "nodes");
  });
}

// Sandboxes.

function sandboxFilters(onChange) {
  const form = el("form", { id: "filters", class: "filters", on: { submit: (e) => { e.preventDefault(); onChange(); } } },
    el("input", { id: "search", type: "search", placeholder: "search id, template, metadata" }),
    el("input", { id: "filter-template", placeholder: "template" }),
    el("input", { id: "filter-metadata", placeholder: "metadata key=value" }),
    el("select", { id: "filter-state" },
      el("option", { value: "running,paused" }, "running or paused"),
      el("option", { value: "running" }, "running"),
      el("option", { value: "paused" }, "paused")),
    el("button", { type: "submit" }, "Filter"));
  for (const input of form.querySelectorAll("input, select")) input.addEventListener("change", onChange);
  return form;
}

function sandboxesPage() {
  let refresh = () => {};
  CONTENT.append(sandboxFilters(() => refresh()));
  const render = async () => {
    const query = new URLSearchParams({ limit: "100", state: document.getElementById("filter-state").value });
    const template = document.getElementById("filter-template").value.trim();
    if (template) query.set("template", template);
    const metadata = document.getElementById("filter-metadata").value.trim();
    if (metadata) query.set("metadata", metadata);
    const [list, metrics] = await Promise.all([api("sandboxes?" + query), api("sandboxes/metrics")]);
    const search = document.getElementById("search").value.trim().toLowerCase();
    const shown = list.filter((s) => !search ||
      [s.sandboxID, s.templateID, s.alias || "", metadataText(s.metadata)].join(" ").toLowerCase().includes(search));
    const rows = shown.map((s) => {
      const m = metrics.sandboxes[s.sandboxID];
      return el("tr", { "data-sandbox": s.sandboxID },
        el("td", {}, el("a", { href: "/dashboard/sandboxes/" + encodeURIComponent(s.sandboxID) }, s.sandboxID)),
        el("td", {}, s.alias || s.templateID),
        el("td", { class: "state" }, s.state),
        el("td", { class: "metadata" }, metadataText(s.metadata)),
        el("td", {}, m ? m.cpuUsedPct.toFixed(1) + " %" : "—"),
        el("td", {}, m ? mib(m.memUsed) + " / " + mib(m.memTotal) : "—"),
        el("td", {}, s.startedAt),
        el("td", {}, s.endAt));
    });
    replace(table(["Sandbox", "Template", "State", "Metadata", "CPU", "Memory", "Started", "Ends"], rows, "sandboxes"), "sandboxes");
  };
  refresh = () => render().catch((e) => showError(String(e.message || e)));
  poll(render, LIST_POLL_MS);
}

function sandboxActions(id, state, reload) {
  const button = (label, action, json, question) => el("button", {
    id: "action-" + action, type: "button",
    on: { click: async () => { if (await act(`sandboxes/${encodeURIComponent(id)}/${action}`, json, question)) reload(); } },
  }, label);
  const minutes = el("input", { id: "timeout-minutes", type: "number", min: "1", value: "10" });
  return el("div", { class: "actions", id: "actions" },
    state === "running" ? button("Pause", "pause", {}, "Pause this sandbox?") : null,
    state === "paused" ? button("Resume", "resume", {}, null) : null,
    el("span", {}, "Time out in ", minutes, " min ",
      el("button", { id: "action-timeout", type: "button", on: { click: async () => {
        if (await act(`sandboxes/${encodeURIComponent(id)}/timeout`, { timeout: Number(minutes.value) * 60 }, null)) reload();
      } } }, "Set")),
    button("Kill", "kill", {}, `Kill sandbox ${id}? Its processes and files are gone for good.`));
}

function sandboxPage(id) {
  const render = async () => {
    const s = await api("sandboxes/" + encodeURIComponent(id));
    const live = s.state === "running" || s.state === "paused";
    const usage = s.state === "running"
      ? (await api("sandboxes/metrics?sandbox_ids=" + encodeURIComponent(id))).sandboxes[id] : null;
    const details = el("section", { id: "details" },
      el("dl", {},
        el("dt", {}, "State"), el("dd", { id: "state" }, s.state + (s.endReason ? ` (${s.endReason})` : "")),
        el("dt", {}, "Template"), el("dd", {}, s.alias || s.templateID),
        el("dt", {}, "Team"), el("dd", {}, s.teamID),
        s.nodeID ? el("dt", {}, "Node") : null, s.nodeID ? el("dd", { id: "node" }, s.nodeID) : null,
        el("dt", {}, "Metadata"), el("dd", { id: "metadata" }, metadataText(s.metadata)),
        el("dt", {}, "Started"), el("dd", {}, s.startedAt),
        el("dt", {}, live ? "Times out" : "Ended"), el("dd", {}, live ? s.endAt : s.endedAt),
        el("dt", {}, "CPU / memory"), el("dd", { id: "usage" }, `${s.cpuCount} vCPU, ${s.memoryMB} MiB` +
          (usage ? `; now ${usage.cpuUsedPct.toFixed(1)} % CPU, ${mib(usage.memUsed)} used` : "")),
        el("dt", {}, "Network"), el("dd", { id: "network" },
          (s.allowInternetAccess ? "internet allowed" : "no internet") +
          (s.network.allowOut ? "; allow " + s.network.allowOut.join(", ") : "") +
          (s.network.denyOut ? "; deny " + s.network.denyOut.join(", ") : "") +
          (s.network.allowPublicTraffic === false ? "; traffic needs its access token" : ""))),
      live ? sandboxActions(id, s.state, () => render()) : null);
    const events = el("section", { id: "events" }, el("h2", {}, "Events"),
      el("ol", { class: "timeline" }, s.events.map((e) => el("li", {}, el("time", {}, e.at), " ", el("b", {}, e.kind), " ", e.message))));
    replace(details, "details");
    replace(events, "events");
    let logs;
    try {
      logs = (await api(`sandboxes/${encodeURIComponent(id)}/logs?limit=200`)).logs;
    } catch (error) {
      logs = [];
    }
    replace(el("section", { id: "logs" }, el("h2", {}, "Console log"),
      el("pre", { class: "log" }, logs.map((l) => l.message).join("\n"))), "logs");
    return live;
  };
  poll(render);
}

// Templates and builds.

function buildForm() {
  const image = el("input", { id: "build-image", placeholder: "image, e.g. docker.io/library/python:3.12-slim", required: true });
  const alias = el("input", { id: "build-alias", placeholder: "name (alias)" });
  return el("form", { id: "build-form", class: "filters", on: { submit: async (e) => {
    e.preventDefault();
    try {
      const job = await api("builds", { method: "POST", json: { image: image.value.trim(), alias: alias.value.trim() || undefined } });
      window.location.assign("/dashboard/builds/" + encodeURIComponent(job.job_id));
    } catch (error) {
      showError(String(error.message || error));
    }
  } } }, el("b", {}, "Build a template from an image:"), image, alias, el("button", { type: "submit" }, "Build"));
}

function buildsTable(jobs) {
  return table(["Build", "Template", "Phase", "Progress", "Created"], jobs.map((j) => el("tr", {},
    el("td", {}, el("a", { href: "/dashboard/builds/" + encodeURIComponent(j.job_id) }, j.job_id)),
    el("td", {}, (j.request && j.request.alias) || j.template_id),
    el("td", {}, j.phase), el("td", {}, j.progress.toFixed(0) + " %"), el("td", {}, j.created_at))), "builds");
}

function templatesPage() {
  CONTENT.append(buildForm());
  poll(async () => {
    const [templates, jobs] = await Promise.all([api("templates"), api("builds").catch(() => [])]);
    replace(table(["Template", "Names", "vCPU", "Memory", "Running", "Warm", "Created"], templates.map((t) => el("tr", {},
      el("td", {}, el("a", { href: "/dashboard/templates/" + encodeURIComponent(t.templateID) }, t.templateID)),
      el("td", {}, t.aliases.join(", ")), el("td", {}, t.cpuCount), el("td", {}, t.memoryMB + " MiB"),
      el("td", {}, t.runningSandboxes), el("td", {}, t.warmInstances), el("td", {}, t.createdAt))), "templates"), "templates");
    replace(el("section", { id: "build-history" }, el("h2", {}, "Builds"), buildsTable(jobs)), "build-history");
  });
}

function templatePage(id) {
  poll(async () => {
    const t = await api("templates/" + encodeURIComponent(id));
    const jobs = (await api("builds").catch(() => [])).filter((j) => j.template_id === t.templateID);
    replace(el("section", { id: "details" }, el("dl", {},
      el("dt", {}, "Names"), el("dd", {}, t.names.join(", ")),
      el("dt", {}, "Resources"), el("dd", {}, `${t.cpuCount} vCPU, ${t.memoryMB} MiB, ${t.diskSizeMB} MiB disk`),
      el("dt", {}, "Built in"), el("dd", {}, t.public ? "yes (read-only for teams)" : "no"),
      el("dt", {}, "Running sandboxes"), el("dd", {}, t.runningSandboxes),
      el("dt", {}, "Warm pool"), el("dd", {}, `${t.warmPool.ready} ready of ${t.warmPool.target}`)),
    el("button", { id: "delete-template", type: "button", on: { click: async () => {
      if (await act(`templates/${encodeURIComponent(id)}/delete`, {}, `Delete template ${id} and every version of it?`)) {
        window.location.assign("/dashboard/templates");
      }
    } } }, "Delete")), "details");
    replace(el("section", { id: "build-history" }, el("h2", {}, "Build history"), buildsTable(jobs)), "build-history");
  });
}

function buildPage(id) {
  const log = el("pre", { class: "log", id: "build-log" });
  const progress = el("progress", { id: "build-progress", max: "100", value: "0" });
  const phase = el("p", { id: "build-phase" });
  CONTENT.append(phase, progress, log);
  let since = 0;
  poll(async () => {
    const job = await api(`builds/${encodeURIComponent(id)}?log_since=${since}`);
    for (const line of job.log) log.append(document.createTextNode(line + "\n"));
    since = job.log_start + job.log.length;
    progress.value = job.progress;
    phase.textContent = `${job.phase} ${job.progress.toFixed(0)} % ${job.message || ""} ${job.reason || ""}`;
    return !["READY", "FAILED"].includes(String(job.phase).toUpperCase());
  });
}

// API keys and events.

function keysPage() {
  const name = el("input", { id: "key-name", placeholder: "name", required: true });
  const shown = el("p", { id: "new-key", class: "secret", hidden: true });
  let reload = () => {};
  const admin = BODY.dataset.admin === "yes"; // keys are the admin's to make and revoke
  if (admin) CONTENT.append(el("form", { id: "key-form", class: "filters", on: { submit: async (e) => {
    e.preventDefault();
    try {
      const made = await api("keys", { method: "POST", json: { name: name.value.trim() } });
      shown.textContent = "";
      shown.append("New key (shown once, copy it now): ", el("code", { id: "new-key-value" }, made.key));
      shown.hidden = false;
      reload();
    } catch (error) {
      showError(String(error.message || error));
    }
  } } }, name, el("button", { type: "submit" }, "Create key")), shown);
  const render = async () => {
    const keys = await api("keys");
    replace(table(["Name", "Id", "Team", "Prefix", "Created", "Last used", "Revoked", ""], keys.map((k) => el("tr", { "data-key": k.id },
      el("td", {}, k.name), el("td", {}, k.id), el("td", {}, k.team), el("td", {}, k.prefix + "…"),
      el("td", {}, k.createdAt), el("td", {}, k.lastUsedAt || "—"), el("td", { class: "revoked" }, k.revokedAt || "—"),
      el("td", {}, k.revokedAt || !admin ? null : el("button", { type: "button", class: "revoke", on: { click: async () => {
        if (await act(`keys/${encodeURIComponent(k.id)}/revoke`, {}, `Revoke key ${k.name}? Clients using it stop working.`)) reload();
      } } }, "Revoke")))), "keys"), "keys");
  };
  reload = () => render().catch((e) => showError(String(e.message || e)));
  reload();
}

function eventsPage() {
  const filter = el("input", { id: "event-filter", type: "search", placeholder: "filter: sandbox, kind, message" });
  CONTENT.append(el("form", { class: "filters", on: { submit: (e) => e.preventDefault() } }, filter));
  poll(async () => {
    const events = await api("events?limit=500");
    const text = filter.value.trim().toLowerCase();
    const shown = events.reverse().filter((e) => !text || [e.sandboxID, e.kind, e.message, e.nodeID || ""].join(" ").toLowerCase().includes(text));
    const cluster = events.some((e) => e.nodeID);
    replace(table(["At", ...(cluster ? ["Node"] : []), "Sandbox", "Kind", "Message"], shown.map((e) => el("tr", { "data-node": e.nodeID || "" },
      el("td", {}, e.at), cluster ? el("td", {}, e.nodeID) : null,
      el("td", {}, e.sandboxID ? el("a", { href: "/dashboard/sandboxes/" + encodeURIComponent(e.sandboxID) }, e.sandboxID) : "—"),
      el("td", {}, e.kind), el("td", {}, e.message))), "event-list"), "event-list");
  });
}

const PAGES = {
  overview: overviewPage,
  sandboxes: sandboxesPage,
  sandbox: sandboxPage,
  templates: templatesPage,
  template: templatePage,
  build: buildPage,
  keys: keysPage,
  events: eventsPage,
};

if (CONTENT && PAGES[BODY.dataset.page]) PAGES[BODY.dataset.page](BODY.dataset.id);
