// The web client for cloud users: everything goes through the JSON API under /v1.
//
//   login form --POST /v1/login--> token (sessionStorage, this tab only)
//   renewal:       POST /v1/token before the token expires (at the latest 5 minutes before,
//                  by this browser's own clock); refused -> the login form, saying why
//   conversations: GET /v1/conversations (again every 20 s and after every change)
//   open one:      GET .../messages?after=cursor (the newest 100), then post with POST
//                  .../messages; "Load older messages": GET .../messages?before=oldest
//   live updates:  GET /v1/notifications?timeout=25 (long poll) -> sync the conversations it
//                  names from their cursors -> POST /v1/notifications/{id}/ack
//   presence:      PUT /v1/presence every 30 s (ttl 90 s); members' via GET /v1/presence
//
// Every API error is shown (the banner, or the form that caused it); a 401 ends the session.
"use strict";

const LONGPOLL_S = 25;
const PRESENCE_EVERY_MS = 30000;
const PRESENCE_TTL_S = 90;
const CONVERSATIONS_EVERY_MS = 20000;
const MEMBERS_PRESENCE_EVERY_MS = 15000;
const HISTORY_SHOWN = 100;
const PAGE = 200;
const OLDER_PAGE = 100;
const RENEW_BEFORE_MS = 5 * 60 * 1000;  // renew this long before expiry (or at half-life)
const RENEW_RETRY_MS = 15000;
const STATUS_RANK = {online: 0, busy: 1, away: 2, offline: 3};

const $ = (id) => document.getElementById(id);

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

const state = {
  session: null,            // {token, account_id, handle, expires_at, lifetime_ms}
  generation: 0,            // bumped at every login and logout: old loops stop
  conversations: new Map(), // id -> {info, messages: [], after, loaded, seen}
  listed: false,            // the first list of this session is in (its history is read)
  openId: null,
  presence: {},             // account id -> effective status
  timers: [],
  renewal: null,            // the timer of the next token renewal
};

// ---------------------------------------------------------------- the API

async function api(method, path, body) {
  const headers = {Accept: "application/json"};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (state.session) headers.Authorization = "Bearer " + state.session.token;
  let response;
  try {
    response = await fetch(path, {
      method, headers, cache: "no-store",
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (e) {
    throw new ApiError(0, "unreachable", "The server cannot be reached. Check your connection.");
  }
  let data = null;
  try {
    data = await response.json();
  } catch (e) {
    data = null;
  }
  if (!response.ok) {
    const err = data && data.error ? data.error : {};
    throw new ApiError(response.status, err.code || "http_" + response.status,
                       err.message || "The server answered " + response.status + ".");
  }
  return data;
}

function describe(err) {
  if (err instanceof ApiError) {
    return err.status ? err.message + " (" + err.code + ", " + err.status + ")" : err.message;
  }
  return "Something went wrong: " + (err && err.message ? err.message : String(err));
}

// Errors of background work: a 401 ends the session, others go to the banner.
function failed(err) {
  if (err instanceof ApiError && err.status === 401 && state.session) {
    endSession("Your session has ended (" + err.message + "). Please log in again.");
    return;
  }
  showError(describe(err));
}

function showError(text) {
  $("error-text").textContent = text;
  $("error").hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error-text").textContent = "";
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function randomId() {
  const bytes = new Uint8Array(16);
  crypto.getRandomValues(bytes);  // works on plain http too (randomUUID needs https)
  return "web-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

// ---------------------------------------------------------------- session

function saveSession(session) {
  state.session = session;
  if (session) sessionStorage.setItem("chat-session", JSON.stringify(session));
  else sessionStorage.removeItem("chat-session");
}

function loadSession() {
  try {
    const s = JSON.parse(sessionStorage.getItem("chat-session") || "null");
    if (s && s.token && s.expires_at > Date.now()) return s;
  } catch (e) { /* a damaged entry is no session */ }
  return null;
}

// A session from a login's or a renewal's answer. Its expiry is kept in this browser's
// clock (now + expires_in_ms), which need not agree with the server's.
function sessionFrom(r, handle) {
  return {token: r.token, account_id: r.account_id, handle,
          expires_at: Date.now() + r.expires_in_ms, lifetime_ms: r.expires_in_ms};
}

// ---------------------------------------------------------------- token renewal

function renewAt(session) {
  return session.expires_at - Math.min(RENEW_BEFORE_MS, session.lifetime_ms / 2);
}

function scheduleRenewal(delayMs) {
  clearTimeout(state.renewal);
  const gen = state.generation;
  state.renewal = setTimeout(() => { if (gen === state.generation) renewToken(gen); },
                             Math.max(0, delayMs));
}

// A fresh token before this one expires. Refused (401, 403): the session ends, saying why.
// The server out of reach: retried while the token lasts, with a note in the banner.
async function renewToken(gen) {
  const session = state.session;
  if (!session || gen !== state.generation) return;
  try {
    const r = await api("POST", "/v1/token");
    if (gen !== state.generation) return;
    saveSession(sessionFrom(r, session.handle));
    if ($("connection").dataset.cause === "renewal") $("connection").hidden = true;
    scheduleRenewal(renewAt(state.session) - Date.now());
  } catch (err) {
    if (gen !== state.generation) return;
    if (err instanceof ApiError && (err.status === 401 || err.status === 403)) {
      endSession("Your session could not be renewed (" + err.message + "). " +
                 "Please log in again.");
      return;
    }
    const left = session.expires_at - Date.now();
    if (left <= 0) {
      endSession("Your session expired while the server was out of reach. " +
                 "Please log in again.");
      return;
    }
    const wait = Math.min(RENEW_RETRY_MS, left / 2);
    $("connection").textContent = "Could not renew your session (" + describe(err) +
      "); retrying in " + Math.max(1, Math.round(wait / 1000)) + " s.";
    $("connection").dataset.cause = "renewal";
    $("connection").hidden = false;
    scheduleRenewal(wait);
  }
}

// A tab in the background may run its timers late: renew on return if it is due.
function onVisible() {
  if (document.visibilityState !== "visible" || !state.session) return;
  if (Date.now() >= state.session.expires_at) {
    endSession("Your session expired while this page was in the background. " +
               "Please log in again.");
  } else if (Date.now() >= renewAt(state.session)) {
    renewToken(state.generation);
  }
}

function showLogin(message) {
  $("app-view").hidden = true;
  $("me").hidden = true;
  $("login-view").hidden = false;
  $("login-error").textContent = message || "";
  $("login-password").value = "";
  $("login-handle").focus();
}

async function onLogin(event) {
  event.preventDefault();
  const handle = $("login-handle").value.trim();
  const password = $("login-password").value;
  if (!handle || !password) {
    $("login-error").textContent = "Enter your handle and your password.";
    return;
  }
  $("login-submit").disabled = true;
  $("login-error").textContent = "";
  try {
    const r = await api("POST", "/v1/login", {handle, password});
    startSession(sessionFrom(r, handle));
  } catch (err) {
    $("login-error").textContent = describe(err);
  } finally {
    $("login-submit").disabled = false;
  }
}

function startSession(session) {
  saveSession(session);
  state.generation += 1;
  state.conversations = new Map();
  state.listed = false;
  state.openId = null;
  state.presence = {};
  clearError();
  $("login-view").hidden = true;
  $("app-view").hidden = false;
  $("me").hidden = false;
  $("me-handle").textContent = session.handle;
  document.title = "Chat: " + session.handle;
  renderConversation();
  const gen = state.generation;
  refreshConversations().then(() => { if (gen === state.generation) focusFirstConversation(); })
    .catch(failed);
  pollNotifications(gen);
  setPresence($("my-status").value).catch(failed);
  every(PRESENCE_EVERY_MS, () => setPresence($("my-status").value));
  every(CONVERSATIONS_EVERY_MS, refreshConversations);
  every(MEMBERS_PRESENCE_EVERY_MS, refreshPresence);
  scheduleRenewal(renewAt(session) - Date.now());
}

function every(ms, fn) {
  const gen = state.generation;
  state.timers.push(setInterval(() => {
    if (gen === state.generation && state.session) fn().catch(failed);
  }, ms));
}

function stopTimers() {
  state.timers.forEach(clearInterval);
  state.timers = [];
}

function endSession(message) {
  state.generation += 1;
  stopTimers();
  clearTimeout(state.renewal);
  $("connection").hidden = true;
  saveSession(null);
  state.conversations = new Map();
  state.openId = null;
  $("conversation-list").replaceChildren();
  $("messages").replaceChildren();
  document.title = "Chat";
  showLogin(message);
}

async function onLogout() {
  try {
    await api("PUT", "/v1/presence", {status: "offline", ttl_s: PRESENCE_TTL_S});
  } catch (e) { /* logging out works even when the server does not answer */ }
  endSession("You are logged out.");
}

// ---------------------------------------------------------------- conversations

function conversationName(info) {
  if (info.title) return info.title;
  const others = info.members.filter((a) => a !== state.session.account_id).map(handleOf(info));
  return others.length ? others.join(", ") : "Only you";
}

function handleOf(info) {
  return (accountId) => (info.handles && info.handles[accountId]) || accountId.slice(0, 8);
}

async function refreshConversations() {
  const gen = state.generation;
  const r = await api("GET", "/v1/conversations");
  if (gen !== state.generation) return;
  const seen = new Set();
  for (const info of r.conversations) {
    seen.add(info.conversation_id);
    const known = state.conversations.get(info.conversation_id);
    if (known) {
      info.last_seq = Math.max(info.last_seq, known.info.last_seq);
      known.info = info;
    } else {
      // unread: what came after the user last looked; at login that is not known, so the
      // conversations listed then start read, and one that appears later starts unread
      const seen = state.listed ? 0 : info.last_seq;
      state.conversations.set(info.conversation_id,
                              {info, messages: [], after: 0, loaded: false, seen});
    }
  }
  for (const id of Array.from(state.conversations.keys())) {
    if (!seen.has(id)) state.conversations.delete(id);  // removed from it
  }
  if (state.openId && !state.conversations.has(state.openId)) {
    state.openId = null;
    showError("You are no longer a member of that conversation.");
    renderConversation();
  }
  state.listed = true;
  renderConversationList();
  if (state.openId) renderMembers();
}

function unread(c) {
  return Math.max(0, c.info.last_seq - c.seen);
}

function renderConversationList() {
  const list = $("conversation-list");
  const items = [];
  for (const [id, c] of state.conversations) {
    const li = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.conversationId = id;
    const name = document.createElement("span");
    name.textContent = conversationName(c.info);
    button.append(name);
    if (unread(c) > 0 && id !== state.openId) {
      const badge = document.createElement("span");
      badge.className = "unread";
      badge.textContent = String(unread(c));
      badge.setAttribute("aria-label", unread(c) + " unread");
      button.append(badge);
    }
    if (id === state.openId) button.setAttribute("aria-current", "true");
    button.addEventListener("click", () => openConversation(id));
    li.append(button);
    items.push(li);
  }
  list.replaceChildren(...items);
  $("no-conversations").hidden = items.length > 0;
}

function focusFirstConversation() {
  const first = $("conversation-list").querySelector("button");
  if (first) first.focus();
  else $("new-conversation").open = true;
}

async function openConversation(id) {
  const c = state.conversations.get(id);
  if (!c) return;
  state.openId = id;
  c.seen = c.info.last_seq;
  clearError();
  renderConversationList();
  renderConversation();
  $("conversation-title").focus();
  try {
    await syncConversation(id);
    await refreshPresence();
  } catch (err) {
    failed(err);
  }
}

// Fetch what is new in a conversation from its cursor; the first time, the last
// HISTORY_SHOWN messages only.
async function syncConversation(id) {
  const gen = state.generation;
  const c = state.conversations.get(id);
  if (!c) return;
  if (!c.loaded) {
    c.after = Math.max(0, c.info.last_seq - HISTORY_SHOWN);
    c.loaded = true;
    c.oldest = c.after + 1;  // the seq of the oldest message shown (seqs start at 1)
    c.truncated = c.after > 0;
    if (id === state.openId) $("earlier").hidden = !c.truncated;
  }
  for (;;) {
    const r = await api("GET", "/v1/conversations/" + id + "/messages?after=" + c.after +
                               "&limit=" + PAGE);
    if (gen !== state.generation) return;
    const fresh = r.messages.filter((m) => m.seq > c.after);
    if (fresh.length) {
      c.messages.push(...fresh);
      c.after = fresh[fresh.length - 1].seq;
      c.info.last_seq = Math.max(c.info.last_seq, c.after);
      if (id === state.openId) {
        c.seen = c.after;
        appendMessages(fresh);
      }
    }
    if (r.messages.length < PAGE) return;
  }
}

function renderConversation() {
  const c = state.openId ? state.conversations.get(state.openId) : null;
  $("conversation-view").hidden = !c;
  $("members-panel").hidden = !c;
  $("conversation-title").textContent = c ? conversationName(c.info) : "Pick a conversation";
  $("messages").replaceChildren();
  if (!c) return;
  $("earlier").hidden = !c.truncated;
  $("older-error").textContent = "";
  $("composer-error").textContent = "";
  $("member-error").textContent = "";
  appendMessages(c.messages);
  renderMembers();
}

function appendMessages(messages) {
  const list = $("messages");
  const nearBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 80;
  for (const m of messages) {
    if (list.querySelector('[data-seq="' + m.seq + '"]')) continue;
    list.append(messageItem(m));
  }
  if (nearBottom || messages.length) list.scrollTop = list.scrollHeight;
}

// Older messages go above those shown, and the view stays on what the user was reading.
function prependMessages(messages) {
  const list = $("messages");
  const fromBottom = list.scrollHeight - list.scrollTop;
  const items = messages.filter((m) => !list.querySelector('[data-seq="' + m.seq + '"]'))
    .map(messageItem);
  list.prepend(...items);
  list.scrollTop = list.scrollHeight - fromBottom;
}

// The previous page of the open conversation's history, before the oldest message shown.
async function loadOlder() {
  const id = state.openId;
  const c = id ? state.conversations.get(id) : null;
  if (!c || !c.truncated) return;
  const gen = state.generation;
  const button = $("load-older");
  button.disabled = true;
  $("older-error").textContent = "";
  try {
    const r = await api("GET", "/v1/conversations/" + id + "/messages?before=" + c.oldest +
                               "&limit=" + OLDER_PAGE);
    if (gen !== state.generation) return;
    const older = r.messages.filter((m) => m.seq < c.oldest);
    if (older.length) {
      c.messages.unshift(...older);
      c.oldest = older[0].seq;
    }
    c.truncated = r.messages.length === OLDER_PAGE && c.oldest > 1;
    if (id === state.openId) {
      prependMessages(older);
      $("earlier").hidden = !c.truncated;
      if (!c.truncated) $("messages").focus();
    }
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) failed(err);
    else $("older-error").textContent = describe(err);
  } finally {
    button.disabled = false;
  }
}

function messageItem(m) {
  const li = document.createElement("li");
  li.className = "message" + (m.sender === state.session.account_id ? " mine" : "");
  li.dataset.seq = String(m.seq);
  li.dataset.messageId = m.message_id;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = m.sender_handle;
  const when = document.createElement("time");
  const date = new Date(m.sent_ms);
  when.dateTime = date.toISOString();
  when.textContent = date.toLocaleTimeString([], {hour: "2-digit", minute: "2-digit"});
  li.append(who, when);
  if (m.origin && m.origin !== "cloud") {
    const via = document.createElement("span");
    via.className = "via";
    via.textContent = "via " + m.origin;
    li.append(via);
  }
  const body = document.createElement("p");
  body.className = "body";
  body.textContent = m.body;
  li.append(body);
  return li;
}

async function onSend(event) {
  event.preventDefault();
  const id = state.openId;
  const box = $("composer-body");
  const body = box.value;
  if (!id || !body.trim()) {
    $("composer-error").textContent = "Type a message first.";
    return;
  }
  $("composer-error").textContent = "";
  box.value = "";
  try {
    await api("POST", "/v1/conversations/" + id + "/messages",
              {client_message_id: randomId(), body});
    // synced from the cursor, not appended: a message posted by someone else just before
    // this one must not be skipped
    await syncConversation(id);
  } catch (err) {
    if (!box.value) box.value = body;  // not lost: the user can send it again
    if (err instanceof ApiError && err.status === 401) failed(err);
    else $("composer-error").textContent = describe(err);
  }
}

function onComposerKey(event) {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
}

async function onNewConversation(event) {
  event.preventDefault();
  const members = $("new-members").value.split(",").map((h) => h.trim()).filter((h) => h);
  const title = $("new-title").value.trim();
  if (!members.length) {
    $("new-conversation-error").textContent = "Name at least one member by handle.";
    return;
  }
  $("new-conversation-error").textContent = "";
  try {
    const r = await api("POST", "/v1/conversations", {members, title});
    $("new-members").value = "";
    $("new-title").value = "";
    $("new-conversation").open = false;
    await refreshConversations();
    await openConversation(r.conversation_id);
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) failed(err);
    else $("new-conversation-error").textContent = describe(err);
  }
}

// ---------------------------------------------------------------- members and presence

function renderMembers() {
  const c = state.openId ? state.conversations.get(state.openId) : null;
  if (!c) return;
  const name = handleOf(c.info);
  const items = c.info.members.map((accountId) => {
    const li = document.createElement("li");
    li.dataset.accountId = accountId;
    const who = document.createElement("span");
    who.className = "presence";
    const status = state.presence[accountId] || "offline";
    who.dataset.status = status;
    const handle = document.createElement("span");
    handle.className = "handle";
    handle.textContent = name(accountId) + (accountId === state.session.account_id ? " (you)" : "");
    const word = document.createElement("span");
    word.className = "status";
    word.textContent = status;
    who.append(handle, word);
    li.append(who);
    const memberHandle = c.info.handles && c.info.handles[accountId];
    if (memberHandle && accountId !== state.session.account_id) {
      const remove = document.createElement("button");
      remove.type = "button";
      remove.className = "quiet";
      remove.textContent = "Remove";
      remove.setAttribute("aria-label", "Remove " + memberHandle + " from this conversation");
      remove.addEventListener("click", () => removeMember(state.openId, memberHandle));
      li.append(remove);
    }
    return li;
  });
  $("member-list").replaceChildren(...items);
}

async function removeMember(id, handle) {
  $("member-error").textContent = "";
  try {
    await api("DELETE", "/v1/conversations/" + id + "/members/" + encodeURIComponent(handle));
    await refreshConversations();
    $("add-member-handle").focus();
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) failed(err);
    else $("member-error").textContent = describe(err);
  }
}

async function onAddMember(event) {
  event.preventDefault();
  const id = state.openId;
  const handle = $("add-member-handle").value.trim();
  if (!id || !handle) {
    $("member-error").textContent = "Type the handle of the member to add.";
    return;
  }
  $("member-error").textContent = "";
  try {
    const r = await api("POST", "/v1/conversations/" + id + "/members", {handle});
    $("add-member-handle").value = "";
    if (!r.added) $("member-error").textContent = handle + " is a member already.";
    await refreshConversations();
    await refreshPresence();
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) failed(err);
    else $("member-error").textContent = describe(err);
  }
}

function setPresence(status) {
  return api("PUT", "/v1/presence", {status, ttl_s: PRESENCE_TTL_S});
}

// A member's status over every source that has not expired: the most available one.
function effectiveStatus(entries) {
  let best = "offline";
  for (const p of entries || []) {
    if ((STATUS_RANK[p.status] ?? 3) < STATUS_RANK[best]) best = p.status;
  }
  return best;
}

async function refreshPresence() {
  const gen = state.generation;
  const c = state.openId ? state.conversations.get(state.openId) : null;
  if (!c || !c.info.members.length) return;
  const ids = c.info.members.slice(0, 100);
  const r = await api("GET", "/v1/presence?accounts=" + ids.join(","));
  if (gen !== state.generation) return;
  for (const id of ids) state.presence[id] = effectiveStatus(r.presence[id]);
  renderMembers();
}

// ---------------------------------------------------------------- live updates

async function pollNotifications(gen) {
  let failures = 0;
  const acked = new Set();
  while (gen === state.generation) {
    let notes;
    try {
      notes = (await api("GET", "/v1/notifications?timeout=" + LONGPOLL_S)).notifications;
      if (failures) $("connection").hidden = true;
      failures = 0;
    } catch (err) {
      if (gen !== state.generation) return;
      if (err instanceof ApiError && err.status === 401) { failed(err); return; }
      failures += 1;
      const wait = Math.min(30000, 1000 * 2 ** Math.min(failures, 5));
      $("connection").textContent = "Live updates paused (" + describe(err) +
        "); retrying in " + Math.round(wait / 1000) + " s.";
      $("connection").dataset.cause = "poll";
      $("connection").hidden = false;
      await sleep(wait);
      continue;
    }
    if (gen !== state.generation) return;
    // the same notifications once more (their ack did not take): do not spin on them
    if (notes.length && notes.every((n) => acked.has(n.notification_id))) await sleep(2000);
    try {
      await handleNotifications(notes, acked);
    } catch (err) {
      if (gen !== state.generation) return;
      failed(err);
      await sleep(2000);
    }
  }
}

// Sync what the notifications name, then acknowledge them: by then the messages are here.
async function handleNotifications(notes, acked) {
  if (!notes.length) return;
  const byConversation = new Map();
  for (const n of notes) {
    const had = byConversation.get(n.conversation_id);
    if (!had || n.seq > had.seq) byConversation.set(n.conversation_id, n);
  }
  if (Array.from(byConversation.keys()).some((id) => !state.conversations.has(id))) {
    await refreshConversations();  // added to a conversation: it is new to this page
  }
  for (const [id, n] of byConversation) {
    const c = state.conversations.get(id);
    if (!c) continue;
    if (id === state.openId) await syncConversation(id);
    else c.info.last_seq = Math.max(c.info.last_seq, n.seq);
  }
  renderConversationList();
  await Promise.all(notes.map((n) => api("POST", "/v1/notifications/" + n.notification_id +
                                                 "/ack").catch((err) => {
    if (!(err instanceof ApiError) || err.status !== 404) throw err;
  })));
  notes.forEach((n) => acked.add(n.notification_id));
}

// ---------------------------------------------------------------- start

function start() {
  $("login-form").addEventListener("submit", onLogin);
  $("logout").addEventListener("click", onLogout);
  $("composer").addEventListener("submit", onSend);
  $("composer-body").addEventListener("keydown", onComposerKey);
  $("new-conversation-form").addEventListener("submit", onNewConversation);
  $("add-member-form").addEventListener("submit", onAddMember);
  $("error-dismiss").addEventListener("click", clearError);
  $("load-older").addEventListener("click", loadOlder);
  document.addEventListener("visibilitychange", onVisible);
  $("my-status").addEventListener("change", (e) => setPresence(e.target.value).catch(failed));
  window.addEventListener("unhandledrejection", (e) => failed(e.reason));
  window.addEventListener("error", (e) => showError("Something went wrong: " + e.message));
  const session = loadSession();
  if (session) startSession(session);
  else showLogin("");
  document.body.dataset.ready = "true";
}

document.addEventListener("DOMContentLoaded", start);
