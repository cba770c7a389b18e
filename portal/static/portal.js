// hostiso portal: Tooling Allowlist settings and endpoint isolation, talking to the REST APIs.
// Security notes: the bearer token lives in sessionStorage only; its claims are decoded here
// only to choose what to show (the APIs enforce every rule). API data is rendered with
// textContent, never as HTML.
"use strict";

(() => {
  const TOKEN_KEY = "hostiso.token";
  const ACCOUNT_KEY = "hostiso.account";
  const POLL_MS = 2000;

  const state = {
    config: { isolation_url: "", settings_url: "" },
    token: null,
    claims: null,
    account: null,
    allowlist: null,
    etag: null,
    endpoints: [],
    view: "allowlist",
    pollTimer: null,
    busy: false,
  };

  const $ = (id) => document.getElementById(id);

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs)) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  // ---- token ------------------------------------------------------------------------

  class TokenFormatError extends Error {}

  function decodeClaims(token) {
    const parts = token.split(".");
    if (parts.length !== 3) throw new TokenFormatError("This is not a JWT: it must have three dot-separated parts.");
    let payload;
    try {
      const b64 = parts[1].replace(/-/g, "+").replace(/_/g, "/");
      const padded = b64 + "=".repeat((4 - (b64.length % 4)) % 4);
      const bytes = Uint8Array.from(atob(padded), (c) => c.charCodeAt(0));
      payload = JSON.parse(new TextDecoder().decode(bytes));
    } catch {
      throw new TokenFormatError("The token's payload is not readable base64url JSON.");
    }
    if (!["partner", "soc", "service"].includes(payload.role)) {
      throw new TokenFormatError("The token's role claim must be partner, soc or service.");
    }
    if (payload.role === "partner" && !payload.account_id) {
      throw new TokenFormatError("A partner token needs the account_id claim.");
    }
    if (typeof payload.exp === "number" && payload.exp * 1000 < Date.now()) {
      throw new TokenFormatError("This token has expired; paste a fresh one.");
    }
    return payload;
  }

  const isSoc = () => state.claims && (state.claims.role === "soc" || state.claims.role === "service");

  function setToken(token) {
    state.token = token;
    state.claims = decodeClaims(token);
    sessionStorage.setItem(TOKEN_KEY, token);
    if (state.claims.role === "partner") {
      state.account = state.claims.account_id;
    } else {
      state.account = sessionStorage.getItem(ACCOUNT_KEY) || null;
    }
  }

  function clearToken(message) {
    sessionStorage.removeItem(TOKEN_KEY);
    state.token = null;
    state.claims = null;
    $("token-input").value = "";
    setFieldError("token-input", "token-error", message || "");
    render();
  }

  // ---- API --------------------------------------------------------------------------

  class ApiUnreachable extends Error {}

  async function api(service, method, path, { body, ifMatch } = {}) {
    const base = service === "isolation" ? state.config.isolation_url : state.config.settings_url;
    const headers = { Accept: "application/json", Authorization: `Bearer ${state.token}` };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    if (ifMatch) headers["If-Match"] = ifMatch;
    let response;
    try {
      response = await fetch(base + path, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        cache: "no-store",
      });
    } catch (err) {
      throw new ApiUnreachable(`The ${service} API at ${base || window.location.origin} is unreachable (${err.message}).`);
    }
    let data = null;
    const text = await response.text();
    if (text) {
      try { data = JSON.parse(text); } catch { data = { detail: text.slice(0, 500) }; }
    }
    if (response.status === 401) {
      clearToken(`The API refused the token: ${detailText(data) || "unauthorised"}`);
    }
    if (response.status >= 500) {
      showBanner(`The ${service} API failed (${response.status}): ${detailText(data) || response.statusText}`);
    }
    return { ok: response.ok, status: response.status, data, etag: response.headers.get("ETag") };
  }

  // Every service answers RFC 9457 problem details {title, detail, errors: [{field, rule, message}]}
  // (field a dotted path such as "body.address"). Older bodies are still read for a release:
  // {"detail": "text"} or {"detail": [{"loc": [..., "field"], "msg": "..."}]}.
  function problemItems(data) {
    if (!data) return [];
    if (Array.isArray(data.errors) && data.errors.length) {
      return data.errors.map((e) => ({
        field: String((e && e.field) || "").split(".").pop(),
        message: (e && (e.message || e.rule)) || JSON.stringify(e),
      }));
    }
    return [];
  }

  function detailText(data) {
    if (!data) return "";
    const detail = data.detail;
    if (typeof detail === "string") return detail;
    if (Array.isArray(detail)) return detail.map((d) => (d && d.msg) || JSON.stringify(d)).join("; ");
    if (detail && typeof detail === "object") return detail.msg || detail.message || JSON.stringify(detail);
    const items = problemItems(data);
    if (items.length) return items.map((i) => i.message).join("; ");
    return data.title || "";
  }

  function fieldErrors(data, fields) {
    const out = { general: [] };
    const problems = problemItems(data);
    if (problems.length) {
      for (const item of problems) {
        if (fields.includes(item.field)) (out[item.field] = out[item.field] || []).push(item.message);
        else out.general.push(item.message);
      }
      return out;
    }
    const detail = data && data.detail;
    const items = Array.isArray(detail) ? detail : [detail];
    for (const item of items) {
      if (!item) continue;
      if (typeof item === "object" && Array.isArray(item.loc)) {
        const field = [...item.loc].reverse().find((part) => fields.includes(part));
        const msg = item.msg || JSON.stringify(item);
        if (field) (out[field] = out[field] || []).push(msg);
        else out.general.push(msg);
        continue;
      }
      const msg = typeof item === "string" ? item : item.msg || JSON.stringify(item);
      // A plain-text detail still names its field (the API's rule): put it next to that field.
      const named = fields.find((f) => new RegExp(`\\b${f}\\b`, "i").test(msg));
      const rmm = /hostname|cloud rmm|ipv4|ipv6|cidr|loopback|multicast|broadcast/i.test(msg);
      const field = named || (rmm && fields.includes("address") ? "address" : null);
      if (field) (out[field] = out[field] || []).push(msg);
      else out.general.push(msg);
    }
    return out;
  }

  function setFieldError(inputId, errorId, message) {
    const input = inputId ? $(inputId) : null;
    $(errorId).textContent = message || "";
    if (input) {
      if (message) input.setAttribute("aria-invalid", "true");
      else input.removeAttribute("aria-invalid");
    }
  }

  function showBanner(message, kind = "error") {
    const banner = $("banner");
    banner.textContent = message;
    banner.className = kind === "ok" ? "banner banner-ok" : "banner";
    banner.hidden = !message;
  }

  function announce(message) {
    $("live").textContent = message;
  }

  function fmtTime(iso) {
    if (!iso) return "—";
    const d = new Date(iso);
    if (Number.isNaN(d.getTime())) return String(iso);
    return d.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
  }

  async function guarded(fn) {
    try {
      await fn();
    } catch (err) {
      if (err instanceof ApiUnreachable) showBanner(err.message);
      else {
        showBanner(`Unexpected error: ${err.message}`);
        console.error(err);
      }
    }
  }

  // ---- Tooling Allowlist view -------------------------------------------------------

  const allowlistPath = () => `/v1/accounts/${encodeURIComponent(state.account)}/tooling-allowlist`;

  async function loadAllowlist() {
    const res = await api("settings", "GET", allowlistPath());
    if (!res.ok) {
      if (res.status !== 401) showBanner(`Could not load the allowlist (${res.status}): ${detailText(res.data)}`);
      state.allowlist = null;
      renderAllowlist();
      return;
    }
    state.allowlist = res.data;
    state.etag = res.etag || (res.data && res.data.version !== undefined ? String(res.data.version) : null);
    renderAllowlist();
  }

  function renderAllowlist() {
    const al = state.allowlist;
    const sw = $("tooling-switch");
    const enabled = Boolean(al && al.enabled);
    sw.setAttribute("aria-checked", String(enabled));
    sw.disabled = !al || state.busy;
    $("switch-state").textContent = enabled ? "On" : "Off";
    $("entry-add").disabled = !al || state.busy;

    const body = $("entries-body");
    body.replaceChildren();
    const entries = (al && al.entries) || [];
    for (const entry of entries) body.append(entryRow(entry));
    $("entries-empty").hidden = entries.length > 0 || !al;
    $("entries-table").hidden = entries.length === 0;
    $("allowlist-meta").textContent = al
      ? `Account ${al.account_id} · settings version ${al.version} · ${entries.length} ${entries.length === 1 ? "entry" : "entries"}` +
        (al.updated_at ? ` · updated ${fmtTime(al.updated_at)}` : "")
      : "";
  }

  // Allowlist v2: protocol, ports and expiry of an entry, after its address (nothing for v1).
  function entryReach(entry) {
    const parts = [];
    if (entry.protocol && entry.protocol !== "any") {
      const ports = (entry.ports || []).join(", ");
      parts.push(`${entry.protocol.toUpperCase()} ${ports ? `port ${ports}` : "every port"}`);
    }
    if (entry.expires_at) parts.push(`until ${fmtTime(entry.expires_at)}`);
    return parts.length ? [el("span", { class: "entry-reach muted", text: ` · ${parts.join(" · ")}` })] : [];
  }

  // The optional v2 fields of the add form; left out of the body when empty, so {name, address}
  // stays what it always was. Ports that are not numbers go as typed: the API names the rule.
  function entryOptions() {
    const out = {};
    const protocol = $("entry-protocol").value;
    if (protocol && protocol !== "any") out.protocol = protocol;
    const ports = $("entry-ports").value.split(/[\s,]+/).filter(Boolean);
    if (ports.length) out.ports = ports.map((p) => (/^\d+$/.test(p) ? Number(p) : p));
    const expires = $("entry-expires").value;
    if (expires) {
      const when = new Date(expires);
      out.expires_at = Number.isNaN(when.getTime()) ? expires : when.toISOString();
    }
    return out;
  }

  function entryRow(entry) {
    const renameBtn = el("button", { type: "button", class: "btn btn-sm", "aria-label": `Rename ${entry.name}`, text: "Rename" });
    const removeBtn = el("button", { type: "button", class: "btn btn-sm btn-link-danger", "aria-label": `Remove ${entry.name}`, text: "Remove" });
    const row = el(
      "tr",
      { "data-entry-id": entry.id },
      el("td", { class: "entry-name", text: entry.name }),
      el("td", { class: "mono entry-address" }, entry.address, ...entryReach(entry)),
      el("td", { text: entry.created_by || "—" }),
      el("td", { text: fmtTime(entry.created_at) }),
      el("td", { class: "actions" }, renameBtn, removeBtn),
    );
    renameBtn.addEventListener("click", () => startRename(row, entry));
    removeBtn.addEventListener("click", () => guarded(() => removeEntry(entry)));
    row.querySelector(".actions").append(compromisedButton(entry));
    return row;
  }

  function startRename(row, entry) {
    const inputId = `rename-${entry.id}`;
    const errorId = `rename-error-${entry.id}`;
    const input = el("input", { type: "text", id: inputId, value: entry.name, maxlength: 200, "aria-describedby": errorId });
    const save = el("button", { type: "submit", class: "btn btn-sm btn-primary", text: "Save" });
    const cancel = el("button", { type: "button", class: "btn btn-sm", text: "Cancel", onclick: () => renderAllowlist() });
    const form = el(
      "form",
      { class: "row-edit", novalidate: true },
      el("label", { for: inputId, class: "visually-hidden", text: `New name for ${entry.address}` }),
      input,
      el("p", { id: errorId, class: "field-error", "aria-live": "polite" }),
    );
    const nameCell = row.querySelector(".entry-name");
    nameCell.replaceChildren(form);
    row.querySelector(".actions").replaceChildren(save, cancel);
    const submit = (ev) => {
      ev.preventDefault();
      guarded(() => renameEntry(entry, input.value, inputId, errorId));
    };
    form.addEventListener("submit", submit);
    save.addEventListener("click", submit);
    input.focus();
    input.select();
  }

  async function renameEntry(entry, name, inputId, errorId) {
    const res = await api("settings", "PATCH", `${allowlistPath()}/entries/${encodeURIComponent(entry.id)}`, {
      body: { name },
      ifMatch: state.etag,
    });
    if (res.ok) {
      announce(`Renamed to ${name}`);
      await loadAllowlist();
      return;
    }
    if (await handleStale(res)) return;
    const errs = fieldErrors(res.data, ["name"]);
    setFieldError(inputId, errorId, [...(errs.name || []), ...errs.general].join(" ") || `Rename refused (${res.status}).`);
  }

  async function removeEntry(entry) {
    const answer = await confirmDialog({
      title: `Remove ${entry.name}?`,
      body: `${entry.address} will not be reachable from endpoints isolated from now on. Endpoints already isolated keep their frozen allowlist.`,
      ok: "Remove entry",
      danger: true,
    });
    if (!answer) return;
    const res = await api("settings", "DELETE", `${allowlistPath()}/entries/${encodeURIComponent(entry.id)}`, { ifMatch: state.etag });
    if (res.ok) {
      announce(`Removed ${entry.name}`);
      await loadAllowlist();
      return;
    }
    if (await handleStale(res)) return;
    showBanner(`Could not remove ${entry.name} (${res.status}): ${detailText(res.data)}`);
  }

  async function toggleSwitch() {
    if (!state.allowlist || state.busy) return;
    const wanted = !state.allowlist.enabled;
    setFieldError(null, "switch-error", "");
    state.busy = true;
    renderAllowlist();
    try {
      const res = await api("settings", "PATCH", allowlistPath(), { body: { enabled: wanted }, ifMatch: state.etag });
      if (res.ok) {
        announce(`Tooling Connections ${wanted ? "on" : "off"}`);
      } else if (!(await handleStale(res))) {
        setFieldError(null, "switch-error", detailText(res.data) || `Refused (${res.status}).`);
      }
    } finally {
      state.busy = false;
      await loadAllowlist();
    }
  }

  async function addEntry(ev) {
    ev.preventDefault();
    const name = $("entry-name").value;
    const address = $("entry-address").value;
    setFieldError("entry-name", "entry-name-error", "");
    setFieldError("entry-address", "entry-address-error", "");
    for (const f of ["protocol", "ports", "expires"]) setFieldError(`entry-${f}`, `entry-${f}-error`, "");
    $("add-form-error").textContent = "";
    const options = entryOptions();
    // One write at a time: the next one must carry the version this one produces.
    setAddFormBusy(true);
    let res;
    try {
      res = await api("settings", "POST", `${allowlistPath()}/entries`, { body: { name, address, ...options }, ifMatch: state.etag });
      if (res.ok) {
        $("entry-name").value = "";
        $("entry-address").value = "";
        $("entry-ports").value = "";
        $("entry-expires").value = "";
        $("entry-protocol").value = "any";
        announce(`Added ${name} (${address})`);
        await loadAllowlist();
      }
    } finally {
      setAddFormBusy(false);
    }
    if (res.ok) {
      $("entry-name").focus();
      return;
    }
    if (await handleStale(res)) return;
    if (res.status >= 500) {
      // 503 may mean "saved, not yet published": show what the store holds now.
      await loadAllowlist();
      return;
    }
    const errs = fieldErrors(res.data, ["name", "address", "protocol", "ports", "expires_at"]);
    if (errs.name) setFieldError("entry-name", "entry-name-error", errs.name.join(" "));
    if (errs.address) setFieldError("entry-address", "entry-address-error", errs.address.join(" "));
    if (errs.protocol) setFieldError("entry-protocol", "entry-protocol-error", errs.protocol.join(" "));
    if (errs.ports) setFieldError("entry-ports", "entry-ports-error", errs.ports.join(" "));
    if (errs.expires_at) setFieldError("entry-expires", "entry-expires-error", errs.expires_at.join(" "));
    const named = errs.name || errs.address || errs.protocol || errs.ports || errs.expires_at;
    if (errs.general.length || !named) {
      $("add-form-error").textContent = errs.general.join(" ") || `Refused (${res.status}).`;
    }
    const first = errs.address
      ? "entry-address"
      : errs.name
        ? "entry-name"
        : errs.protocol
          ? "entry-protocol"
          : errs.ports
            ? "entry-ports"
            : errs.expires_at
              ? "entry-expires"
              : null;
    if (first) $(first).focus();
  }

  function setAddFormBusy(busy) {
    for (const id of ["entry-name", "entry-address", "entry-protocol", "entry-ports", "entry-expires", "entry-add"]) {
      $(id).disabled = busy || !state.allowlist;
    }
    $("add-form").setAttribute("aria-busy", String(busy));
  }

  // 412: someone else changed the allowlist since we read it; reload and let the user retry.
  async function handleStale(res) {
    if (res.status !== 412) return false;
    await loadAllowlist();
    showBanner(
      `The allowlist was changed elsewhere; the page now shows version ${state.allowlist ? state.allowlist.version : "?"}. Check it and try again.`,
    );
    return true;
  }

  // ---- Endpoints view: the account's inventory --------------------------------------

  const PAGE_SIZE = 25;
  const SEARCH_DELAY_MS = 300;
  // Where the list stands: the filters, the cursor of this page and those of the pages before.
  const inventory = { q: "", state: "", cursor: null, previous: [], next: null, searchTimer: null, timelineFor: null };

  function inventoryPath() {
    const params = new URLSearchParams({ limit: String(PAGE_SIZE) });
    if (inventory.q) params.set("q", inventory.q);
    if (inventory.state) params.set("state", inventory.state);
    if (inventory.cursor) params.set("cursor", inventory.cursor);
    return `/v1/accounts/${encodeURIComponent(state.account)}/endpoints?${params}`;
  }

  async function loadEndpoints() {
    const res = await api("isolation", "GET", inventoryPath());
    if (!res.ok) {
      if (res.status !== 401) showBanner(`Could not load the endpoints (${res.status}): ${detailText(res.data)}`);
      return;
    }
    const items = (res.data && Array.isArray(res.data.items)) ? res.data.items : [];
    inventory.next = (res.data && res.data.next_cursor) || null;
    // The frozen allowlist is in each isolated endpoint's own state: fetched for those rows only.
    const rows = await Promise.all(items.map(withPolicy));
    state.endpoints = rows;
    renderEndpoints();
    await annotateFreshness(rows);
    if (inventory.timelineFor) await loadTimeline(inventory.timelineFor);
  }

  async function withPolicy(item) {
    if (item.state === "not_isolated" && !item.mode) return item;
    const one = await api("isolation", "GET", `/v1/endpoints/${encodeURIComponent(item.endpoint_id)}/isolation`);
    return one.ok && one.data ? { ...one.data, ...item, policy: one.data.policy, desired_sequence: one.data.desired_sequence, detail: one.data.detail } : item;
  }

  // "4 min ago" for recent times (the full time is the cell's title), a date beyond a week.
  function fmtAgo(iso) {
    const then = new Date(iso).getTime();
    if (Number.isNaN(then)) return String(iso);
    const s = Math.max(0, Math.round((Date.now() - then) / 1000));
    if (s < 60) return "just now";
    if (s < 3600) return `${Math.round(s / 60)} min ago`;
    if (s < 86400) return `${Math.round(s / 3600)} h ago`;
    if (s < 7 * 86400) return `${Math.round(s / 86400)} d ago`;
    return new Date(iso).toLocaleDateString(undefined, { dateStyle: "medium" });
  }

  function resetPages() {
    inventory.cursor = null;
    inventory.previous = [];
  }

  function onSearchInput() {
    clearTimeout(inventory.searchTimer);
    inventory.searchTimer = setTimeout(() => {
      const q = $("endpoint-search").value.trim();
      if (q === inventory.q) return;
      inventory.q = q;
      resetPages();
      guarded(loadEndpoints);
    }, SEARCH_DELAY_MS);
  }

  function onStateFilter() {
    inventory.state = $("endpoint-state").value;
    resetPages();
    guarded(loadEndpoints);
  }

  function nextPage() {
    if (!inventory.next) return;
    inventory.previous.push(inventory.cursor);
    inventory.cursor = inventory.next;
    guarded(loadEndpoints);
  }

  function previousPage() {
    if (!inventory.previous.length) return;
    inventory.cursor = inventory.previous.pop();
    guarded(loadEndpoints);
  }

  const PENDING = new Set(["isolation_pending", "release_pending"]);
  const STATE_LABEL = {
    not_isolated: "Not isolated",
    isolation_pending: "Isolation pending",
    isolated: "Isolated",
    release_pending: "Release pending",
    failed: "Failed",
  };

  // Mirrors the API's rules (DESIGN §6.4) only to hide buttons; the API decides.
  function actionsFor(row) {
    const soc = isSoc();
    const mode = row.mode || (row.policy && row.policy.mode) || null;
    const isolatedLike = ["isolated", "isolation_pending", "failed"].includes(row.state) && mode && mode !== "none";
    if (row.state === "release_pending") return [];
    if (!isolatedLike) return ["isolate", "strict"];
    if (mode === "strict") return soc ? ["release"] : [];
    return ["strict", "release"];
  }

  const ACTION = {
    isolate: { label: "Isolate", cls: "btn btn-sm btn-primary" },
    strict: { label: "Isolate strict", cls: "btn btn-sm btn-danger" },
    release: { label: "Release", cls: "btn btn-sm" },
  };

  // Allowlist usage (DESIGN §4): "used N times, last at T" per entry of an isolated endpoint's
  // policy in force, from what its agent counted; nothing when the agent reported nothing.
  function usageNote(row, peer) {
    if (row.state !== "isolated" || !Array.isArray(row.allowlist_usage)) return null;
    const key = (u) => `${u.address}|${u.protocol || "any"}|${(u.ports || []).slice().sort((a, b) => a - b).join(",")}`;
    const used = row.allowlist_usage.find((u) => key(u) === key(peer));
    if (!used) return null;
    const text = used.packets
      ? `used ${used.packets} times` + (used.last_seen ? `, last at ${fmtTime(used.last_seen)}` : "")
      : "not used";
    return el("span", { class: "muted usage", text: ` · ${text}`, title: `${used.packets} packets, ${used.bytes} bytes through the allowlist` });
  }

  function endpointRow(row) {
    const policy = row.policy || null;
    const mode = row.mode || (policy && policy.mode) || null;
    const peers = (policy && policy.allowed_outbound) || [];
    const inForce = policy && policy.mode && policy.mode !== "none";
    let allowCell;
    if (!inForce) allowCell = el("span", { class: "none", text: "—" });
    else if (peers.length === 0) allowCell = el("span", { class: "none", text: "None (platform only)" });
    else allowCell = el("ul", { class: "peers" }, ...peers.map((p) => el("li", {}, `${p.name} `, el("span", { class: "addr mono", text: p.address }), usageNote(row, p))));
    const seq = row.desired_sequence
      ? `#${row.desired_sequence}` + (row.applied_sequence === row.desired_sequence ? " applied" : row.applied_sequence ? ` (applied #${row.applied_sequence})` : "")
      : "—";
    const stateBadge = el("span", { class: `badge badge-${row.state}`, text: STATE_LABEL[row.state] || row.state });
    const stateCell = el("td", { class: "ep-state" }, stateBadge);
    if (row.state === "failed" && row.detail) stateCell.append(el("div", { class: "muted", text: row.detail }));
    const buttons = actionsFor(row).map((action) =>
      el("button", {
        type: "button",
        class: ACTION[action].cls,
        "data-action": action,
        "aria-label": `${ACTION[action].label} ${row.endpoint_id}`,
        text: ACTION[action].label,
        onclick: () => guarded(() => endpointAction(row, action)),
      }),
    );
    buttons.push(timelineButton(row));
    return el(
      "tr",
      { "data-endpoint-id": row.endpoint_id },
      el(
        "td",
        { class: "ep-host" },
        el("span", { class: "ep-hostname", text: row.hostname || "—" }),
        el("span", { class: "ep-sub" }, el("span", { class: "ep-platform", text: row.platform || "—" }), " · ", el("span", { class: "ep-id mono", text: row.endpoint_id })),
      ),
      stateCell,
      el("td", { class: "ep-mode" }, mode && mode !== "none" ? el("span", { class: `badge badge-${mode}`, text: mode }) : el("span", { class: "none", text: "—" })),
      el("td", { class: "ep-allowlist" }, allowCell),
      el("td", { class: "ep-settings-version", text: inForce ? String(policy.settings_version) : "—" }),
      el("td", { class: "ep-sequence mono", text: seq, title: row.updated_at ? `updated ${fmtTime(row.updated_at)}` : null }),
      el("td", { class: "ep-last-seen", text: row.last_seen ? fmtAgo(row.last_seen) : "Never", title: row.last_seen ? fmtTime(row.last_seen) : null }),
      el("td", { class: "actions" }, ...buttons),
    );
  }

  function renderEndpoints() {
    const body = $("endpoints-body");
    body.replaceChildren(...state.endpoints.map(endpointRow));
    $("endpoints-empty").hidden = state.endpoints.length > 0;
    $("endpoints-table").hidden = state.endpoints.length === 0;
    $("endpoints-prev").disabled = inventory.previous.length === 0;
    $("endpoints-next").disabled = !inventory.next;
    const pageNo = inventory.previous.length + 1;
    $("endpoints-page").textContent = pageNo > 1 || inventory.next ? `Page ${pageNo}` : "";
    const pending = state.endpoints.filter((r) => PENDING.has(r.state)).length;
    const filtered = inventory.q || inventory.state;
    $("endpoints-meta").textContent =
      `Account ${state.account} · ${state.endpoints.length} endpoint${state.endpoints.length === 1 ? "" : "s"}` +
      (filtered ? " matching" : "") +
      (inventory.next || inventory.previous.length ? " on this page" : "") +
      (pending ? ` · ${pending} waiting for the agent to apply` : "") +
      ` · refreshed ${new Date().toLocaleTimeString()}`;
  }

  async function endpointAction(row, action) {
    const id = row.endpoint_id;
    const name = row.hostname ? `${row.hostname} (${id})` : id;
    const text = {
      isolate: [`Isolate ${name}?`, "The endpoint will reach only the platform and the Tooling Allowlist as it is now (frozen). Inbound connections are blocked."],
      strict: [`Strictly isolate ${name}?`, "The endpoint will reach only the platform: the Tooling Allowlist is ignored. Only the SOC can release a strict isolation."],
      release: [`Release ${name}?`, "The endpoint's network access is restored."],
    }[action];
    const answer = await confirmDialog({ title: text[0], body: text[1], ok: ACTION[action].label, danger: action !== "release", reason: true });
    if (!answer) return;
    const path = `/v1/endpoints/${encodeURIComponent(id)}/isolation`;
    const res =
      action === "release"
        ? await api("isolation", "DELETE", `${path}?${new URLSearchParams({ reason: answer.reason })}`)
        : await api("isolation", "POST", path, { body: { mode: action === "strict" ? "strict" : "standard", reason: answer.reason } });
    if (res.ok) {
      showBanner(`${ACTION[action].label}: request accepted for ${name}${res.data && res.data.request_id ? ` (request ${res.data.request_id})` : ""}.`, "ok");
    } else if (res.status !== 401) {
      showBanner(`${ACTION[action].label} ${name} refused (${res.status}): ${detailText(res.data)}`);
    }
    await loadEndpoints();
  }

  // ---- per-endpoint timeline --------------------------------------------------------

  const OUTCOME_LABEL = { pending: "Pending", applied: "Applied", failed: "Failed" };

  function timelineButton(row) {
    return el("button", {
      type: "button",
      class: "btn btn-sm btn-ghost",
      "data-action": "timeline",
      "aria-label": `Timeline ${row.endpoint_id}`,
      "aria-controls": "timeline-panel",
      text: "Timeline",
      onclick: () => guarded(() => openTimeline(row)),
    });
  }

  async function openTimeline(row) {
    inventory.timelineFor = row;
    $("timeline-title").textContent = `Timeline of ${row.hostname || row.endpoint_id}`;
    $("timeline-panel").hidden = false;
    await loadTimeline(row);
    $("timeline-panel").scrollIntoView({ block: "nearest" });
  }

  function closeTimeline() {
    inventory.timelineFor = null;
    $("timeline-panel").hidden = true;
  }

  async function loadTimeline(row) {
    const res = await api("isolation", "GET", `/v1/endpoints/${encodeURIComponent(row.endpoint_id)}/isolation/timeline`);
    if (inventory.timelineFor !== row) return;
    if (!res.ok) {
      if (res.status !== 401) showBanner(`Could not load the timeline of ${row.endpoint_id} (${res.status}): ${detailText(res.data)}`);
      return;
    }
    const items = (res.data && Array.isArray(res.data.items)) ? res.data.items : [];
    $("timeline-body").replaceChildren(...items.map(timelineRow));
    $("timeline-empty").hidden = items.length > 0;
    $("timeline-table").hidden = items.length === 0;
  }

  function timelineRow(item) {
    const mode = item.mode === "none" ? "release" : item.mode;
    const status = el("td", { class: "tl-status" }, el("span", { class: `badge badge-tl-${item.status}`, text: OUTCOME_LABEL[item.status] || item.status }));
    if (item.reported_at) status.append(el("span", { class: "muted", text: fmtTime(item.reported_at) }));
    if (item.detail) status.append(el("span", { class: "muted tl-detail", text: item.detail }));
    return el(
      "tr",
      { "data-sequence": item.sequence },
      el("td", { class: "mono", text: `#${item.sequence}` }),
      el("td", { text: fmtTime(item.issued_at) }),
      el("td", { class: "tl-by", text: item.issued_by || "—" }),
      el("td", { class: "tl-mode" }, el("span", { class: `badge badge-${item.mode === "none" ? "release" : item.mode}`, text: mode })),
      el("td", { class: "tl-settings-version", text: item.mode === "standard" ? String(item.settings_version) : "—" }),
      el("td", { class: "tl-reason", text: item.reason || "—" }),
      status,
    );
  }

  async function rmmCompromised() {
    const answer = await confirmDialog({
      title: "RMM compromised?",
      body: `Every isolated or pending endpoint of account ${state.account} will be strictly isolated (platform traffic only), overriding the Tooling Allowlist. Only the SOC can release a strict isolation.`,
      ok: "Strictly isolate all",
      danger: true,
      reason: true,
      check: true,
    });
    if (!answer) return;
    const res = await api("isolation", "POST", `/v1/accounts/${encodeURIComponent(state.account)}/strict-isolation`, {
      body: { reason: answer.reason, disable_allowlist: answer.checked },
    });
    if (res.ok) {
      const n = res.data && typeof res.data.endpoints === "number" ? res.data.endpoints : "the";
      showBanner(`Strict isolation requested for ${n} endpoint${n === 1 ? "" : "s"}${answer.checked ? "; Tooling Connections switched off" : ""}.`, "ok");
    } else if (res.status !== 401) {
      showBanner(`RMM compromised response refused (${res.status}): ${detailText(res.data)}`);
    }
    await loadEndpoints();
  }

  // ---- revoke a compromised entry ---------------------------------------------------

  const REVOKE_POLL_MS = 1000;
  const REVOKE_WATCH_MS = 120000;

  function compromisedButton(entry) {
    return el("button", {
      type: "button",
      class: "btn btn-sm btn-danger",
      "data-action": "compromised",
      "aria-label": `${entry.name} is compromised: revoke it everywhere`,
      text: "Compromised",
      onclick: () => guarded(() => revokeEntry(entry)),
    });
  }

  async function revokeEntry(entry) {
    const answer = await confirmDialog({
      title: `${entry.name} is compromised?`,
      body: `${entry.address} is removed from the allowlist and cut at once, on the priority lanes, from every isolated endpoint of account ${state.account} that allows it (unlike Remove, which leaves isolated endpoints alone). Strict isolations stay strict. Say why: the reason is audited.`,
      ok: "Revoke everywhere",
      danger: true,
      reason: true,
    });
    if (!answer) return;
    if (!answer.reason) {
      showBanner("A reason is required to revoke a compromised entry.");
      return;
    }
    const res = await api("settings", "POST", `${allowlistPath()}/entries/${encodeURIComponent(entry.id)}/revoke`, {
      body: { reason: answer.reason },
    });
    if (!res.ok) {
      if (res.status !== 401) showBanner(`Could not revoke ${entry.name} (${res.status}): ${detailText(res.data)}`);
      return;
    }
    announce(`Revoked ${entry.name}`);
    await loadAllowlist();
    await watchRevocation(res.data, entry);
  }

  function revokeProgressText(entry, view) {
    if (!view || typeof view.endpoints !== "number") {
      return `${entry.name} revoked; the isolation service could not say yet how many endpoints it tightens.`;
    }
    const n = view.endpoints;
    const failed = view.failed ? ` · ${view.failed} failed` : "";
    return `${entry.name} revoked: ${view.tightened} of ${n} endpoint${n === 1 ? "" : "s"} tightened · ${view.applied} of ${n} applied${failed}`;
  }

  // Polls the isolation service's count of the revocation until every affected agent applied.
  async function watchRevocation(accepted, entry) {
    const node = $("revoke-progress");
    const show = (text, kind) => {
      node.textContent = text;
      node.dataset.kind = kind;
      node.hidden = false;
    };
    const initial = typeof accepted.endpoints === "number" ? { endpoints: accepted.endpoints, tightened: 0, applied: 0, failed: 0 } : null;
    show(revokeProgressText(entry, initial), "pending");
    const query = new URLSearchParams({ address: entry.address, protocol: entry.protocol || "any" });
    for (const port of entry.ports || []) query.append("ports", String(port));
    const path = `/v1/accounts/${encodeURIComponent(state.account)}/revocations/${encodeURIComponent(accepted.revocation_id)}?${query}`;
    const deadline = Date.now() + REVOKE_WATCH_MS;
    while (Date.now() < deadline) {
      const res = await api("isolation", "GET", path);
      if (res.ok && res.data) {
        const v = res.data;
        const settled = v.tightened === v.endpoints && v.applied + v.failed === v.endpoints;
        show(revokeProgressText(entry, v), settled ? (v.failed ? "error" : "ok") : "pending");
        if (settled) return;
      } else if (res.status === 401 || res.status === 403) {
        return;
      }
      await new Promise((resolve) => setTimeout(resolve, REVOKE_POLL_MS));
    }
  }

  // ---- frozen vs current allowlist, and refresh -------------------------------------

  function standardIsolation(row) {
    const mode = row.mode || (row.policy && row.policy.mode) || null;
    return mode === "standard" && ["isolated", "isolation_pending", "failed"].includes(row.state);
  }

  // "frozen at settings vN; current is vM: +a / −r" with a Refresh action, from the dry run.
  async function annotateFreshness(rows) {
    for (const row of rows.filter(standardIsolation)) {
      const res = await api("isolation", "GET", `/v1/endpoints/${encodeURIComponent(row.endpoint_id)}/isolation/preview`);
      if (!res.ok || !res.data) continue;
      const tr = document.querySelector(`tr[data-endpoint-id="${CSS.escape(row.endpoint_id)}"]`);
      if (!tr) continue;
      // With the row's actions: the Refresh button belongs there, and the columns keep their values.
      const cell = tr.querySelector(".actions") || tr.lastElementChild;
      cell.querySelectorAll(".freshness").forEach((n) => n.remove());
      cell.prepend(freshnessNote(row, res.data));
    }
  }

  function freshnessNote(row, preview) {
    const frozen = row.policy ? row.policy.settings_version : "?";
    const current = preview.current_settings_version ?? 0;
    const added = (preview.diff && preview.diff.added) || [];
    const removed = (preview.diff && preview.diff.removed) || [];
    const stale = added.length > 0 || removed.length > 0;
    const text = `frozen at settings v${frozen}; current is v${current}` + (stale ? `: +${added.length} / −${removed.length}` : " (up to date)");
    const note = el("div", { class: "freshness muted", "data-stale": String(stale) }, text);
    if (stale) {
      const detail = [...added.map((p) => `+ ${p.name} ${p.address}`), ...removed.map((p) => `− ${p.name} ${p.address}`)].join("\n");
      note.title = detail;
      note.append(
        " ",
        el("button", {
          type: "button",
          class: "btn btn-sm",
          "data-action": "refresh",
          "aria-label": `Refresh the allowlist of ${row.endpoint_id}`,
          text: "Refresh",
          onclick: () => guarded(() => refreshIsolation(row, added, removed)),
        }),
      );
    }
    return note;
  }

  async function refreshIsolation(row, added, removed) {
    const id = row.endpoint_id;
    const answer = await confirmDialog({
      title: `Refresh the allowlist of ${id}?`,
      body: `The endpoint stays isolated and takes the account's current Tooling Allowlist (+${added.length} / −${removed.length}) without a release. Audited.`,
      ok: "Refresh",
      reason: true,
    });
    if (!answer) return;
    const res = await api("isolation", "POST", `/v1/endpoints/${encodeURIComponent(id)}/isolation/refresh`, { body: { reason: answer.reason } });
    if (res.ok) showBanner(`Refresh accepted for ${id}${res.data && res.data.request_id ? ` (request ${res.data.request_id})` : ""}.`, "ok");
    else if (res.status !== 401) showBanner(`Refresh of ${id} refused (${res.status}): ${detailText(res.data)}`);
    await loadEndpoints();
  }

  // ---- dialog -----------------------------------------------------------------------

  function confirmDialog({ title, body, ok, danger = false, reason = false, check = false }) {
    const dialog = $("confirm-dialog");
    $("confirm-title").textContent = title;
    $("confirm-body").textContent = body;
    $("confirm-ok").textContent = ok;
    $("confirm-ok").className = danger ? "btn btn-danger" : "btn btn-primary";
    $("confirm-reason-field").hidden = !reason;
    $("confirm-reason").value = "";
    $("confirm-check-field").hidden = !check;
    $("confirm-check").checked = true;
    $("confirm-error").textContent = "";
    return new Promise((resolve) => {
      const finish = (value) => {
        $("confirm-form").removeEventListener("submit", onSubmit);
        $("confirm-cancel").removeEventListener("click", onCancel);
        dialog.removeEventListener("cancel", onCancel);
        if (dialog.open) dialog.close();
        resolve(value);
      };
      const onSubmit = (ev) => {
        ev.preventDefault();
        finish({ reason: $("confirm-reason").value.trim(), checked: $("confirm-check").checked });
      };
      const onCancel = (ev) => {
        if (ev) ev.preventDefault();
        finish(null);
      };
      $("confirm-form").addEventListener("submit", onSubmit);
      $("confirm-cancel").addEventListener("click", onCancel);
      dialog.addEventListener("cancel", onCancel);
      dialog.showModal();
      (reason ? $("confirm-reason") : $("confirm-ok")).focus();
    });
  }

  // ---- routing and rendering --------------------------------------------------------

  function currentView() {
    return window.location.hash === "#/endpoints" ? "endpoints" : "allowlist";
  }

  function stopPolling() {
    if (state.pollTimer) clearInterval(state.pollTimer);
    state.pollTimer = null;
  }

  function render() {
    const signedIn = Boolean(state.token);
    $("token-view").hidden = signedIn;
    $("session").hidden = !signedIn;
    state.view = currentView();
    for (const link of document.querySelectorAll(".sidenav a")) {
      if (link.dataset.view === state.view) link.setAttribute("aria-current", "page");
      else link.removeAttribute("aria-current");
    }
    const ready = signedIn && Boolean(state.account);
    $("allowlist-view").hidden = !(ready && state.view === "allowlist");
    $("endpoints-view").hidden = !(ready && state.view === "endpoints");
    stopPolling();
    if (!signedIn) {
      $("token-input").focus();
      return;
    }
    $("session-sub").textContent = state.claims.sub || "";
    $("session-role").textContent = state.claims.role;
    const partner = state.claims.role === "partner";
    $("account-input").hidden = partner;
    $("account-picker-label").hidden = partner;
    $("account-fixed").hidden = !partner;
    $("account-fixed").textContent = partner ? state.claims.account_id : "";
    if (!partner) $("account-input").value = state.account || "";
    if (!state.account) {
      showBanner("Enter the account ID to manage (top right), then press Enter.");
      $("account-input").focus();
      return;
    }
    document.title = `${state.view === "endpoints" ? "Endpoints & Isolation" : "Tooling Allowlist"} · Account Settings · hostiso`;
    if (state.view === "allowlist") guarded(loadAllowlist);
    else {
      guarded(loadEndpoints);
      state.pollTimer = setInterval(() => {
        if (!document.hidden && !$("confirm-dialog").open) guarded(loadEndpoints);
      }, POLL_MS);
    }
  }

  async function init() {
    try {
      const res = await fetch("config.json", { cache: "no-store" });
      state.config = await res.json();
    } catch (err) {
      showBanner(`Could not load the portal configuration: ${err.message}`);
      return;
    }
    state.config.settings_url = state.config.settings_url || "";
    state.config.isolation_url = state.config.isolation_url || "";

    $("token-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const token = $("token-input").value.trim();
      try {
        setToken(token);
        setFieldError("token-input", "token-error", "");
        showBanner("");
        render();
      } catch (err) {
        setFieldError("token-input", "token-error", err instanceof TokenFormatError ? err.message : String(err));
        $("token-input").focus();
      }
    });
    $("change-token").addEventListener("click", () => clearToken(""));
    const pickAccount = () => {
      const value = $("account-input").value.trim();
      if (!value || value === state.account) return;
      state.account = value;
      sessionStorage.setItem(ACCOUNT_KEY, value);
      resetPages();
      closeTimeline();
      showBanner("");
      render();
    };
    $("account-input").addEventListener("change", pickAccount);
    $("account-input").addEventListener("keydown", (ev) => { if (ev.key === "Enter") pickAccount(); });
    $("tooling-switch").addEventListener("click", () => guarded(toggleSwitch));
    $("add-form").addEventListener("submit", (ev) => guarded(() => addEntry(ev)));
    $("endpoint-filters").addEventListener("submit", (ev) => ev.preventDefault());
    $("endpoint-search").addEventListener("input", onSearchInput);
    $("endpoint-state").addEventListener("change", onStateFilter);
    $("endpoints-prev").addEventListener("click", previousPage);
    $("endpoints-next").addEventListener("click", nextPage);
    $("timeline-close").addEventListener("click", closeTimeline);
    $("endpoints-refresh").addEventListener("click", () => guarded(loadEndpoints));
    $("rmm-compromised").addEventListener("click", () => guarded(rmmCompromised));
    window.addEventListener("hashchange", () => { showBanner(""); render(); });

    const saved = sessionStorage.getItem(TOKEN_KEY);
    if (saved) {
      try { setToken(saved); } catch (err) { clearToken(err.message); return; }
    }
    render();
  }

  document.addEventListener("DOMContentLoaded", () => { init(); });
})();
