// The netboot dashboard: draws what /api/v1/dashboard/events pushes, acts through the REST API.
// Plain JavaScript, no build step. Data reaches the page through textContent only.
"use strict";

const csrf = document.querySelector('meta[name="csrf-token"]').content;
const csrfHeader = document.querySelector('meta[name="csrf-header"]').content;
let clockSkew = 0;      // server time minus this browser's time, in seconds

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function size(bytes) {
  if (bytes === null || bytes === undefined) return "?";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = bytes, unit = 0;
  while (value >= 1024 && unit < units.length - 1) { value /= 1024; unit += 1; }
  return `${value >= 10 || unit === 0 ? value.toFixed(0) : value.toFixed(1)} ${units[unit]}`;
}

function ago(stamp) {
  if (!stamp) return "never";
  const seconds = Math.max(0, Date.now() / 1000 + clockSkew - stamp);
  if (seconds < 90) return `${seconds.toFixed(0)} s ago`;
  if (seconds < 5400) return `${(seconds / 60).toFixed(0)} min ago`;
  if (seconds < 129600) return `${(seconds / 3600).toFixed(0)} h ago`;
  return `${(seconds / 86400).toFixed(0)} d ago`;
}

function notice(text, kind = "info") {
  const box = document.getElementById("notice");
  box.textContent = text;
  box.className = kind;
}

function replaceRows(table, rows) {
  const body = document.querySelector(`#${table} tbody`);
  body.replaceChildren(...rows);
}

// The picture as the feed last said it: per list, its items by name (the feed's KEYS).
const KEYS = { nodes: "mac", dom0s: "mac", instances: "name", volumes: "name" };
const picture = { roles: [], time: 0 };
for (const part of Object.keys(KEYS)) picture[part] = new Map();

function takeSnapshot(snapshot) {
  for (const [part, key] of Object.entries(KEYS)) {
    picture[part] = new Map(snapshot[part].map((item) => [item[key], item]));
  }
  picture.roles = snapshot.roles;
  picture.time = snapshot.time;
}

function takePatch(patch) {
  for (const part of Object.keys(KEYS)) {
    const change = patch[part];
    if (!change) continue;
    for (const name of change.drop) picture[part].delete(name);
    for (const item of change.set) picture[part].set(item[KEYS[part]], item);
  }
  if (patch.roles) picture.roles = patch.roles;
  picture.time = patch.time;
}

function sorted(part) {
  return [...picture[part].entries()].sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0))
    .map((entry) => entry[1]);
}

// Draw ``items`` into ``container`` in order, one element each (``key`` names it): an element
// whose item is the very object it was drawn from is kept as it is, so a change of a few
// nodes costs a few rows, not the whole table.
function reconcile(container, items, key, build) {
  const old = new Map();
  for (const child of container.children) old.set(child.dataset.key, child);
  let index = 0;
  for (const item of items) {
    const name = key(item);
    let element = old.get(name);
    if (!element || element.item !== item) {
      element = build(item);
      element.dataset.key = name;
      element.item = item;
    }
    const at = container.children[index];
    if (at !== element) container.insertBefore(element, at || null);
    index += 1;
  }
  while (container.children.length > index) container.lastElementChild.remove();
}

function refreshAges() {
  for (const row of document.querySelectorAll("#nodes tbody tr")) {
    if (!row.item) continue;
    row.querySelector(".heartbeat").textContent = ago(row.item.last_heartbeat);
    row.querySelector(".seen").textContent = ago(row.item.last_seen);
  }
}

// --- confirmation and the API -------------------------------------------------------------

function confirmAction(text) {
  const dialog = document.getElementById("confirm");
  document.getElementById("confirm-text").textContent = text;
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
    dialog.returnValue = "";
    dialog.showModal();
  });
}

async function api(method, path, body) {
  const headers = { [csrfHeader]: csrf, Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method, headers, credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const hint = data.hint ? ` (${data.hint})` : "";
    throw new Error(`${data.message || response.statusText}${hint}`);
  }
  return data;
}

async function act(question, method, path, body, done) {
  if (!(await confirmAction(question))) { notice("cancelled"); return; }
  try {
    await api(method, path, body);
    notice(done, "ok");
  } catch (error) {
    notice(error.message, "error");
  }
}

// --- drawing ------------------------------------------------------------------------------

function actionButton(label, cls, handler) {
  const button = el("button", { type: "button", class: cls, textContent: label });
  button.addEventListener("click", handler);
  return button;
}

function nodeRow(node) {
  const name = node.hostname || node.mac;
  const path = `/api/v1/nodes/${encodeURIComponent(node.mac)}`;
  const actions = el("td", { class: "actions" });
  if (node.state !== "pending") {
    actions.append(node.drained
      ? actionButton("Undrain", "undrain", () => act(`Undrain ${name}?`, "POST",
          `${path}/undrain`, undefined, `${name}: undrain asked`))
      : actionButton("Drain", "drain", () => act(`Drain ${name}? Nothing new is placed there`
          + (node.role === "dom0" ? "; its instances migrate away live." : "."),
          "POST", `${path}/drain`, undefined, `${name}: drain asked`)));
  }
  actions.append(actionButton("Timeline", "timeline", () => showNode(node.mac)));
  const state = el("span", { class: `state ${node.state}` }, node.state);
  return el("tr", { "data-mac": node.mac },
    el("td", { class: "mac" }, node.mac),
    el("td", { class: "hostname" }, node.hostname || ""),
    el("td", { class: "role" }, node.role),
    el("td", { class: "state-cell" }, state,
       node.drained ? el("span", { class: "badge drained" }, "drained") : null),
    el("td", { class: "ip" }, node.ip || ""),
    el("td", { class: "heartbeat" }, ago(node.last_heartbeat)),
    el("td", { class: "seen" }, ago(node.last_seen)),
    actions);
}

function dom0Card(dom0) {
  const total = dom0.total_memory, free = dom0.free_memory;
  const used = total !== null && free !== null ? total - free : null;
  const bar = el("div", { class: "bar" });
  if (total) {
    bar.append(el("span", { class: "used", title: `used ${size(used)}` }));
    bar.firstChild.style.width = `${Math.min(100, (100 * used) / total).toFixed(1)}%`;
  }
  const guests = el("ul", { class: "guests" },
    ...dom0.instances.map((name) => el("li", { "data-instance": name }, name)));
  return el("div", { class: "dom0", "data-mac": dom0.mac },
    el("h3", {}, dom0.hostname || dom0.mac, " ",
       el("span", { class: `state ${dom0.state}` }, dom0.state),
       dom0.drained ? el("span", { class: "badge drained" }, "drained") : null),
    el("p", { class: "memory" },
       total === null ? "memory not reported yet"
         : `${size(used)} used, ${size(free)} free of ${size(total)}; guests ${size(dom0.guest_memory)}`),
    bar, guests);
}

function instanceRow(instance) {
  const path = `/api/v1/instances/${encodeURIComponent(instance.name)}`;
  const actions = el("td", { class: "actions" });
  if (instance.desired === "running") {
    actions.append(actionButton("Stop", "stop", () => act(`Stop ${instance.name}?`, "POST",
      `${path}/stop`, undefined, `${instance.name}: stop asked`)));
  } else {
    actions.append(actionButton("Start", "start", () => act(`Start ${instance.name}?`, "POST",
      `${path}/start`, {}, `${instance.name}: start asked`)));
  }
  const state = instance.desired === instance.actual ? instance.actual
    : `${instance.actual} → ${instance.desired}`;
  return el("tr", { "data-instance": instance.name },
    el("td", { class: "name" }, instance.name),
    el("td", {}, instance.tenant || ""),
    el("td", { class: "state-cell" }, el("span", { class: `state ${instance.actual}` }, state)),
    el("td", { class: "on-dom0" }, instance.hostname || instance.node || ""),
    el("td", {}, size(instance.memory)),
    el("td", {}, instance.vcpus),
    el("td", {}, instance.ip || ""),
    el("td", {}, instance.disk || ""),
    actions);
}

function volumeRow(volume) {
  const legs = el("ul", { class: "legs" }, ...volume.legs.map((leg) =>
    el("li", {}, `${leg.hostname || leg.node}: ${leg.state}${leg.leaving ? " (leaving)" : ""}`)));
  const attached = el("ul", { class: "attached" }, ...volume.attached.map((a) => {
    const sync = a.sync && a.sync.percent !== null && a.sync.percent !== undefined
      ? el("progress", { max: 100, value: a.sync.percent, title: `${a.sync.action} ${a.sync.percent}%` })
      : null;
    return el("li", {}, `${a.hostname || a.node}: ${a.state}`,
      a.sync && a.sync.percent !== null && a.sync.percent !== undefined
        ? ` ${a.sync.action} ${a.sync.percent}% ` : "", sync);
  }));
  return el("tr", { "data-volume": volume.name },
    el("td", { class: "name" }, volume.name),
    el("td", {}, size(volume.size)),
    el("td", { class: "state-cell" }, el("span", { class: `state ${volume.state}` }, volume.state),
       volume.error ? el("span", { class: "error" }, ` ${volume.error}`) : null),
    el("td", {}, volume.redundancy),
    el("td", {}, legs),
    el("td", {}, attached));
}

function draw() {
  clockSkew = picture.time - Date.now() / 1000;
  const body = (table) => document.querySelector(`#${table} tbody`);
  const instances = sorted("instances");
  reconcile(body("nodes"), sorted("nodes"), (n) => n.mac, nodeRow);
  reconcile(body("instances"), instances, (i) => i.name, instanceRow);
  reconcile(body("volumes"), sorted("volumes"), (v) => v.name, volumeRow);
  reconcile(document.getElementById("guestmap"), sorted("dom0s"), (d) => d.mac, dom0Card);
  const roles = document.getElementById("register-role");
  const chosen = roles.value;
  const names = picture.roles.join("\n");
  if (roles.dataset.names !== names) {
    roles.replaceChildren(...picture.roles.map((r) => el("option", { value: r }, r)));
    roles.dataset.names = names;
    if (picture.roles.includes(chosen)) roles.value = chosen;
  }
  const running = instances.filter((i) => i.actual === "running").length;
  document.getElementById("summary").textContent =
    `${picture.nodes.size} nodes · ${picture.dom0s.size} dom0s · ` +
    `${running}/${instances.length} instances running · ${picture.volumes.size} volumes`;
}

async function showNode(mac) {
  try {
    const node = await api("GET", `/api/v1/nodes/${encodeURIComponent(mac)}`);
    document.getElementById("node-detail-title").textContent =
      `${node.hostname || node.mac}: latest boot`;
    replaceRows("timeline", node.timeline.map((step, index) => el("tr", {},
      el("td", {}, step.stage),
      el("td", {}, new Date(step.time * 1000).toLocaleTimeString()),
      el("td", {}, index === 0 ? "" : `+${(step.time - node.timeline[index - 1].time).toFixed(1)} s`))));
    document.getElementById("node-detail").hidden = false;
  } catch (error) {
    notice(error.message, "error");
  }
}

// --- wiring -------------------------------------------------------------------------------

function listen() {
  const live = document.getElementById("live");
  const source = new EventSource("/api/v1/dashboard/events");
  const count = () => {
    document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
  };
  source.addEventListener("snapshot", (event) => {
    live.textContent = "live";
    live.className = "live on";
    takeSnapshot(JSON.parse(event.data));
    draw();
    count();
  });
  source.addEventListener("patch", (event) => {
    takePatch(JSON.parse(event.data));
    draw();
    count();
  });
  source.addEventListener("error", () => {
    live.textContent = "reconnecting";
    live.className = "live off";
    if (source.readyState === EventSource.CLOSED) setTimeout(listen, 5000);
  });
}

document.getElementById("register").addEventListener("submit", (event) => {
  event.preventDefault();
  const form = new FormData(event.target);
  const body = { mac: form.get("mac").trim(), role: form.get("role") };
  for (const key of ["hostname", "ip"]) {
    const value = form.get(key).trim();
    if (value) body[key] = value;
  }
  act(`Register ${body.mac} as ${body.role}?`, "POST", "/api/v1/nodes", body,
      `${body.mac} registered as ${body.role}`).then(() => {
    if (document.getElementById("notice").className === "ok") event.target.reset();
  });
});

document.getElementById("logout").addEventListener("click", async () => {
  await fetch("/logout", { method: "POST", headers: { [csrfHeader]: csrf },
                           credentials: "same-origin" });
  window.location.replace("/");
});

setInterval(refreshAges, 10000);  // the ages move on
listen();
