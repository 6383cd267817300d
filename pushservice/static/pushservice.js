/*
 * pushservice.js - dependency-free browser client for pushservice.
 *
 *   const ps = new PushService();                 // ws(s)://<location.host>/
 *   ps.on("message", (content, msg) => ...);
 *   await ps.subscribe("news");
 *   await ps.publish({hello: 1}, {channel: "news"});
 *
 * Plain ES2017, no modules: load it with <script src="/pushservice.js"> and
 * use the global `PushService`. It reconnects with exponential backoff and
 * jitter and, on reconnect, resumes from the last offset it saw (`since=`),
 * so the server replays whatever was missed while it was away.
 */
(function (root) {
  "use strict";

  const cmp = (a, b) => (a < b ? -1 : a > b ? 1 : 0);
  // Digit strings compared numerically, free of Number's 2^53 limit.
  const cmpDigits = (a, b) => {
    a = a.replace(/^0+(?=\d)/, ""); b = b.replace(/^0+(?=\d)/, "");
    return a.length !== b.length ? cmp(a.length, b.length) : cmp(a, b);
  };

  // Offsets look like "1732700000000-5": compare as (ms, seq) integer pairs.
  // null (nothing seen yet) sorts before everything.
  function compareOffsets(a, b) {
    if (a == null || b == null) return a == null ? (b == null ? 0 : -1) : 1;
    const pa = String(a).split("-"), pb = String(b).split("-");
    const n = Math.max(pa.length, pb.length);
    for (let i = 0; i < n; i++) {
      const x = pa[i] || "0", y = pb[i] || "0";
      const c = /^\d+$/.test(x) && /^\d+$/.test(y) ? cmpDigits(x, y) : cmp(x, y);
      if (c) return c;
    }
    return 0;
  }

  function defaultUrl() {
    const loc = root.location || {};
    return (loc.protocol === "https:" ? "wss://" : "ws://") + (loc.host || "127.0.0.1:8000") + "/";
  }

  function makeError(code, message) {
    return Object.assign(new Error(message || code), { code: code });
  }

  class PushService {
    constructor(url, options) {
      if (url && typeof url === "object") { options = url; url = null; }
      const opts = Object.assign({ channels: [], token: null, minDelay: 250, maxDelay: 10000 }, options);
      this.url = url || defaultUrl();
      this.options = opts;
      this.channels = new Set(opts.channels || []);  // the wanted subscriptions
      this.lastOffset = null;    // highest offset seen: the resume point
      this.state = "closed";
      this._streamOffsets = {};  // channel ("" = broadcast) -> last offset seen
      this._handlers = {};
      this._pending = new Map(); // request id -> {resolve, reject, kind, channel}
      this._waitOpen = [];       // (un)subscribes settled by the next connect query
      this._nextId = 1;
      this._attempt = 0;
      this._timer = null;
      this._ws = null;
      this._closed = false;
      if (root.addEventListener) {
        // Back online: skip whatever backoff is left.
        root.addEventListener("online", () => {
          if (this._timer) { clearTimeout(this._timer); this._connect(); }
        });
      }
      this._connect();
    }

    on(event, handler) {
      (this._handlers[event] = this._handlers[event] || []).push(handler);
      return this;
    }

    off(event, handler) {
      const list = this._handlers[event] || [];
      this._handlers[event] = handler ? list.filter((h) => h !== handler) : [];
      return this;
    }

    subscribe(channel) {
      this.channels.add(channel);
      const frame = { type: "subscribe", channel: channel };
      // The server replays that channel's messages after this offset, so
      // nothing published since our resume point is missed.
      if (this.lastOffset != null) frame.since = this.lastOffset;
      return this._request(frame, "subscribe", channel);
    }

    unsubscribe(channel) {
      this.channels.delete(channel);
      delete this._streamOffsets[channel];
      return this._request({ type: "unsubscribe", channel: channel }, "unsubscribe", channel);
    }

    publish(content, options) {
      const frame = { type: "message", content: content };
      if (options && options.channel) frame.channel = options.channel;
      if (!this._isOpen()) return Promise.reject(makeError("unavailable", "not connected"));
      return this._request(frame, "publish");
    }

    close() {
      this._closed = true;
      clearTimeout(this._timer);
      this._timer = null;
      for (const w of this._waitOpen.splice(0)) w.reject(makeError("closed", "client closed"));
      if (this._ws) this._ws.close(1000);
      else this._setState("closed");
    }

    // -- internals ---------------------------------------------------------

    _isOpen() { return !!this._ws && this._ws.readyState === 1; }

    _emit(event, ...args) {
      for (const h of (this._handlers[event] || []).slice()) {
        // A throwing handler must not break the client's own bookkeeping.
        try { h.apply(this, args); } catch (e) { console.error(e); }
      }
    }

    _setState(state) {
      if (state !== this.state) { this.state = state; this._emit("state", state); }
    }

    _request(frame, kind, channel) {
      return new Promise((resolve, reject) => {
        if (!this._isOpen()) {
          // Not connected: the connect query will carry this.channels, which
          // already reflects the change, so it settles on the next open.
          if (this._closed) return reject(makeError("closed", "client closed"));
          this._waitOpen.push({ resolve: resolve, reject: reject, type: kind + "d", channel: channel });
          return;
        }
        frame.id = this._nextId++;
        this._pending.set(frame.id, { resolve: resolve, reject: reject, kind: kind, channel: channel });
        this._ws.send(JSON.stringify(frame));
      });
    }

    _buildUrl() {
      const q = [];
      if (this.channels.size) q.push("channels=" + [...this.channels].map(encodeURIComponent).join(","));
      if (this.lastOffset != null) q.push("since=" + encodeURIComponent(this.lastOffset));
      if (this.options.token) q.push("token=" + encodeURIComponent(this.options.token));
      if (!q.length) return this.url;
      return this.url + (this.url.indexOf("?") < 0 ? "?" : "&") + q.join("&");
    }

    _connect() {
      this._timer = null;
      if (this._closed) return;
      this._setState("connecting");
      let ws;
      try {
        ws = new WebSocket(this._buildUrl());
      } catch (e) {
        this._emit("error", e);
        this._scheduleReconnect();
        return;
      }
      this._ws = ws;
      let openedAt = 0;
      ws.onopen = (ev) => {
        openedAt = Date.now();
        this._setState("open");
        for (const w of this._waitOpen.splice(0)) w.resolve({ type: w.type, channel: w.channel });
        this._emit("open", ev);
      };
      ws.onmessage = (ev) => this._onFrame(ev.data);
      ws.onerror = (ev) => this._emit("error", ev);
      ws.onclose = (ev) => {
        if (this._ws !== ws) return;
        this._ws = null;
        // Only a connection that lived a while resets the backoff: a server
        // that accepts and then drops us at once must not be hammered.
        if (openedAt && Date.now() - openedAt > 5000) this._attempt = 0;
        for (const [, p] of this._pending) {
          if (p.kind === "publish") p.reject(makeError("unavailable", "connection closed before ack"));
          else if (this._closed) p.reject(makeError("closed", "client closed"));
          else this._waitOpen.push({ resolve: p.resolve, reject: p.reject, type: p.kind + "d", channel: p.channel });
        }
        this._pending.clear();
        this._setState("closed");
        this._emit("close", ev);
        if (!this._closed) this._scheduleReconnect();
      };
    }

    _scheduleReconnect() {
      const o = this.options, base = Math.min(o.maxDelay, o.minDelay * Math.pow(2, this._attempt++));
      // "Equal jitter": half fixed, half random, so a crowd of browsers
      // dropped by one restart does not come back in lockstep.
      const delay = base / 2 + Math.random() * base / 2;
      this._timer = setTimeout(() => this._connect(), delay);
    }

    _onFrame(data) {
      let msg;
      try { msg = JSON.parse(data); } catch (e) { this._emit("error", e); return; }
      if (!msg || typeof msg !== "object") return;
      if (msg.type === "message") return this._onMessage(msg);
      let id = msg.id;
      if ((msg.type === "subscribed" || msg.type === "unsubscribed") && !this._pending.has(id)) {
        // The contract does not promise an echoed id on these replies: match
        // the oldest pending request for the same channel instead.
        id = undefined;
        for (const [k, q] of this._pending) {
          if (q.kind + "d" === msg.type && q.channel === msg.channel) { id = k; break; }
        }
      }
      const p = id != null ? this._pending.get(id) : undefined;
      if (p) this._pending.delete(id);
      if (msg.type === "error") {
        const err = Object.assign(makeError(msg.code || "error", msg.message), { frame: msg });
        if (p && p.kind === "subscribe") this.channels.delete(p.channel);
        if (p) p.reject(err); else this._emit("error", err);
        return;
      }
      if (p) p.resolve(msg);
      // ack, subscribed, unsubscribed; unknown types are ignored (forward compatible)
      if (msg.type === "subscribed" || msg.type === "unsubscribed") this._emit(msg.type, msg);
    }

    _onMessage(msg) {
      const off = msg.offset;
      if (off != null) {
        // Belt and braces against duplicates from a replay overlapping live
        // traffic. Order is guaranteed per stream (broadcasts, each channel),
        // so the check is per stream: a channel replay that arrives after a
        // newer broadcast is not mistaken for a duplicate.
        const key = msg.channel == null ? "" : String(msg.channel);
        if (compareOffsets(off, this._streamOffsets[key]) <= 0) return;
        this._streamOffsets[key] = String(off);
        if (compareOffsets(off, this.lastOffset) > 0) this.lastOffset = String(off);
      }
      this._emit("message", msg.content, msg);
    }
  }

  PushService.compareOffsets = compareOffsets;
  root.PushService = PushService;
})(typeof window !== "undefined" ? window : globalThis);
