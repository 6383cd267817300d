/*
 * pushservice.js - dependency-free browser client for pushservice.
 *
 *   const ps = new PushService(url?, options?);   // url: ws(s)://<location.host>/
 *   ps.on("message", (content, msg) => ...);
 *   ps.on("gap", (info) => reloadStateFromYourBackend());
 *   await ps.subscribe("news");
 *   await ps.publish({hello: 1}, {channel: "news"});
 *
 * Plain ES2017, no modules: load it with <script src="/pushservice.js"> and
 * use the global `PushService`. It reconnects with exponential backoff and
 * jitter and, on reconnect, resumes from the last offset it saw (`since=`),
 * so the server replays whatever was missed while it was away; where it
 * cannot, the client says so with a "gap" event.
 *
 * Where the WebSocket cannot connect (twice in a row, never opened: a proxy
 * that drops upgrades, say), it falls back to Server-Sent Events
 * (GET /events with the browser's EventSource), and tries the WebSocket
 * again whenever the stream fails. On a stream it receives the same messages
 * and events and resumes the same way (the browser's own reconnect sends
 * Last-Event-ID); subscribe()/unsubscribe() reopen the stream with the new
 * channels (resuming, so nothing is missed), publish() rejects with
 * "unavailable" (publish from your backend: POST /publish), and a token goes
 * in the stream's URL (token=...): an EventSource cannot send headers.
 *
 * Options:
 *   channels   names subscribed from the first connect ([])
 *   token      a JWT string, or a function returning one (or a Promise of
 *              one), called before every connect so an app can refresh an
 *              expiring token; null for none. It is sent in the first frame
 *              ({"type":"auth"}; the URL only says auth=1), never in a URL:
 *              proxies and servers log URLs.
 *   minDelay, maxDelay   reconnect backoff bounds, ms (250, 10000)
 *   fallback   use Server-Sent Events when the WebSocket cannot connect (true)
 *   sseUrl     the event stream's URL (default: url's host, http(s), /events)
 *
 * Methods:
 *   subscribe(channel, {since, presence}?)  Promise of the "subscribed"
 *                       reply; since defaults to lastOffset (null: no
 *                       replay); presence: true asks for that channel's
 *                       "join"/"leave" events too (kept across reconnects)
 *   unsubscribe(channel)          Promise of the "unsubscribed" reply
 *   presence(channel)   Promise of {users, user_count, anonymous, truncated?}:
 *                       who is subscribed to channel now, on every node
 *   publish(content, {channel}?)  Promise of the ack (rejects at once when not open)
 *   setToken(token)     a new token (same forms as the option), used from the
 *                       next connect; restarts a client stopped by a refusal
 *   close()             stops for good
 *   on(event, fn) / off(event, fn?)
 * Properties: state, lastOffset (the resume point), channels (a Set), url,
 * transport ("websocket" | "sse": the current or last connection's).
 * Requests made while not open wait for the next open; close() rejects them.
 *
 * Events:
 *   message (content, msg)  msg is the frame {content, channel (null: a
 *                           broadcast or your user's), offset}; duplicates
 *                           (a replay overlapping live traffic) are dropped
 *   state (state)           "connecting" | "open" | "closed"
 *   open ()                 authenticated and joined: requests go out now.
 *                           On a reconnect, "resumed" (and "gap") come first,
 *                           then "open", then the replayed messages.
 *   close (CloseEvent)      the socket closed; it reconnects unless stopped
 *   error (err)             an Error with err.code: a server error code
 *                           ("forbidden", "rate_limited", ...; err.frame), or
 *                           "auth_required" (close 4001) / "token_expired"
 *                           (close 4003; err.closeCode), "token_refused" (the
 *                           token function gave the refused token again),
 *                           "token_unavailable" (it threw or rejected),
 *                           "network", "bad_frame". A refused token (auth
 *                           error, 4001, 4003) stops reconnecting, and the
 *                           error has err.fatal = true, unless `token` is a
 *                           function (it is asked again); setToken() restarts.
 *   resumed (frame)         {since, recovered}: the answer to a reconnect's since
 *   gap (info)              you may have missed messages: reload your state.
 *                           info = {reason, channel?, frame}; reason is
 *                           "resume" (resumed, recovered false), "subscribe"
 *                           (subscribed, recovered false; info.channel), or the
 *                           server's gap frame's: "trimmed" | "reset". One event
 *                           per such frame.
 *   subscribed (frame) / unsubscribed (frame)   replies to (un)subscribe
 *   join (ev) / leave (ev)  ev = {channel, user}: a user's first connection
 *                           to a channel subscribed with presence: true came,
 *                           or its last one went (on any node). Events missed
 *                           while disconnected are not replayed: on the
 *                           "subscribed" event of such a channel after a
 *                           reconnect, ask presence(channel) again.
 *
 * Every frame is sent with "id" as its first member: the server echoes the
 * id even on errors for frames it does not parse (too_large, rate_limited).
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

  // ws://host/path -> http://host/events (wss -> https)
  function streamUrl(url) {
    const m = /^ws(s?):\/\/([^/?#]+)/.exec(url);
    return m ? "http" + m[1] + "://" + m[2] + "/events" : "/events";
  }

  function healthUrl(eventsUrl) {
    const m = /^(.*)\/events(\?.*)?$/.exec(eventsUrl);
    if (m) return m[1] + "/healthz";
    try { return new URL("/healthz", eventsUrl).href; } catch (e) { return "/healthz"; }
  }

  // Whether the server answers HTTP at all (any status; an opaque cross-origin answer counts).
  function reachable(url) {
    if (typeof root.fetch !== "function") return Promise.resolve(true);
    return root.fetch(url, { mode: "no-cors", cache: "no-store" }).then(() => true, () => false);
  }

  function makeError(code, message, extra) {
    return Object.assign(new Error(message || code), { code: code }, extra);
  }

  // Close codes that refuse the token (or its absence): README "Wire protocol".
  const AUTH_CLOSES = { 4001: "auth_required", 4003: "token_expired" };

  class PushService {
    constructor(url, options) {
      if (url && typeof url === "object") { options = url; url = null; }
      const opts = Object.assign({ channels: [], token: null, minDelay: 250, maxDelay: 10000, fallback: true }, options);
      this.url = url || defaultUrl();
      this.options = opts;
      this.channels = new Set(opts.channels || []);  // the wanted subscriptions
      this.lastOffset = null;    // highest offset seen: the resume point
      this.state = "closed";
      // What the server accepted: the connect query carries these; the rest is asked for by frame.
      this._confirmed = new Set(this.channels);
      this._presence = new Set();  // channels subscribed with presence events: by frame on every connect
      this._streamOffsets = {};  // channel ("" = broadcast) -> last offset seen
      this._handlers = {};
      this._pending = new Map(); // request id -> {resolve, reject, kind, channel}
      this._waitOpen = [];       // requests made while not open: settled on the next open
      this._nextId = 1;
      this._attempt = 0;
      this._timer = null;
      this._conn = null;         // the current attempt: {ws, token, channels, since, ready, refusal}
      this._closed = false;      // close() was called
      this._stopped = false;     // a refused token stopped reconnecting (setToken restarts)
      this._refused = undefined; // the token value last refused (null: "no token")
      this._wsFailures = 0;      // WebSocket attempts in a row that never opened while HTTP answered
      this.transport = null;
      if (root.addEventListener) {
        // Back online: skip whatever backoff is left.
        root.addEventListener("online", () => { if (this._timer) this._connect(); });
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

    subscribe(channel, options) {
      this.channels.add(channel);
      const since = options && "since" in options ? options.since : undefined;
      const presence = !!(options && options.presence);
      if (presence) this._presence.add(channel); else this._presence.delete(channel);
      return this._request({ kind: "subscribe", channel: channel, since: since, presence: presence });
    }

    presence(channel) {
      if (this._isOpen() && this._conn.es) return Promise.reject(makeError("unavailable", "an event stream cannot ask for presence"));
      return this._request({ kind: "presence", channel: channel });
    }

    unsubscribe(channel) {
      this.channels.delete(channel);
      this._presence.delete(channel);
      this._confirmed.delete(channel);
      delete this._streamOffsets[channel];
      return this._request({ kind: "unsubscribe", channel: channel });
    }

    publish(content, options) {
      if (!this._isOpen()) return Promise.reject(makeError("unavailable", "not connected"));
      if (this._conn.es) return Promise.reject(makeError("unavailable", "an event stream cannot publish: use POST /publish"));
      const body = { type: "message", content: content };
      if (options && options.channel) body.channel = options.channel;
      return new Promise((resolve, reject) => {
        this._send(body, { resolve: resolve, reject: reject, kind: "publish" });
      });
    }

    setToken(token) {
      this.options.token = token;
      this._refused = undefined;
      if (this._stopped && !this._closed) {
        this._stopped = false;
        this._attempt = 0;
        this._connect();
      }
      return this;
    }

    close() {
      this._closed = true;
      clearTimeout(this._timer);
      this._timer = null;
      for (const w of this._waitOpen.splice(0)) w.reject(makeError("closed", "client closed"));
      const conn = this._conn;
      if (conn && conn.ws) {
        conn.ws.close(1000);  // onclose finishes the job
      } else if (conn && conn.es) {
        conn.es.close();      // fires nothing: finish here
        this._onClose(conn, { code: 1000, reason: "client closed", wasClean: true });
      } else {
        this._conn = null;    // a token being fetched is dropped when it comes
        this._setState("closed");
      }
    }

    // -- internals ---------------------------------------------------------

    _isOpen() {
      const c = this._conn;
      return !!c && c.ready && (c.es ? c.es.readyState === 1 : !!c.ws && c.ws.readyState === 1);
    }

    _emit(event, ...args) {
      for (const h of (this._handlers[event] || []).slice()) {
        // A throwing handler must not break the client's own bookkeeping.
        try { h.apply(this, args); } catch (e) { console.error(e); }
      }
    }

    _setState(state) {
      if (state !== this.state) { this.state = state; this._emit("state", state); }
    }

    _request(w) {
      return new Promise((resolve, reject) => {
        w.resolve = resolve;
        w.reject = reject;
        if (this._isOpen() && this._conn.es) { this._waitOpen.push(w); this._restream(); }
        else if (this._isOpen()) this._sendChannelRequest(w);
        else if (this._closed) reject(makeError("closed", "client closed"));
        else this._waitOpen.push(w);
      });
    }

    _sendChannelRequest(w) {
      const body = { type: w.kind, channel: w.channel };
      if (w.kind === "subscribe") {
        // The server replays that channel's messages after this offset, so
        // nothing published since our resume point is missed.
        const since = w.since === undefined ? this.lastOffset : w.since;
        if (since != null) body.since = String(since);
        if (w.presence) body.presence = true;
      }
      this._send(body, w);
    }

    _send(body, pending) {
      const id = this._nextId++;
      // "id" first: the server echoes it even for a frame it does not parse.
      const frame = Object.assign({ id: id }, body);
      this._pending.set(id, pending);
      this._conn.ws.send(JSON.stringify(frame));
    }

    _token() {
      return new Promise((resolve) => {
        const t = this.options.token;
        resolve(typeof t === "function" ? t() : t);
      }).then((t) => (t == null || t === "" ? null : String(t)));
    }

    _connect() {
      clearTimeout(this._timer);
      this._timer = null;
      if (this._closed || this._stopped || this._conn) return;
      const conn = { ws: null, es: null, token: null, channels: null, since: false, ready: false, refusal: null, openedAt: 0 };
      // the fallback once the WebSocket failed twice, but not twice in a row: the WebSocket is tried again
      const stream = this.options.fallback && typeof root.EventSource === "function" &&
        this._wsFailures >= 2 && this.transport !== "sse";
      this._conn = conn;
      this._setState("connecting");
      this._token().then((token) => {
        if (this._conn !== conn) return;  // closed meanwhile
        if (token === this._refused) {
          this._conn = null;
          this._stop(makeError("token_refused", "the server refused this token: call setToken() with a new one"));
          return;
        }
        conn.token = token;
        if (stream) this._openStream(conn); else this._open(conn);
      }, (e) => {
        if (this._conn !== conn) return;
        this._conn = null;
        this._setState("closed");
        this._emit("error", makeError("token_unavailable", "the token function failed: " + ((e && e.message) || e), { cause: e }));
        this._scheduleReconnect();
      });
    }

    _open(conn) {
      // Only channels the server accepted go in the query (a refused one there would refuse
      // the whole connect); a comma cannot be in a query channel: the server splits on it.
      // (channels with presence events are subscribed by frame, which can ask for them)
      const channels = [...this._confirmed].filter(
        (c) => this.channels.has(c) && !this._presence.has(c) && c.indexOf(",") < 0);
      const q = [];
      if (channels.length) q.push("channels=" + channels.map(encodeURIComponent).join(","));
      if (this.lastOffset != null) q.push("since=" + encodeURIComponent(this.lastOffset));
      if (conn.token != null) q.push("auth=1");  // the token comes in the first frame, never in the URL
      conn.channels = new Set(channels);
      conn.since = this.lastOffset != null;
      const url = q.length ? this.url + (this.url.indexOf("?") < 0 ? "?" : "&") + q.join("&") : this.url;
      let ws;
      try {
        ws = new WebSocket(url);
      } catch (e) {
        this._conn = null;
        this._setState("closed");
        this._emit("error", makeError("network", "cannot open a WebSocket: " + e.message, { cause: e }));
        this._scheduleReconnect();
        return;
      }
      conn.ws = ws;
      this.transport = "websocket";
      ws.onopen = () => {
        if (this._conn !== conn) return;
        conn.openedAt = Date.now();
        this._wsFailures = 0;
        if (conn.token == null) { this._authenticated(conn); return; }
        this._send({ type: "auth", token: conn.token }, {
          kind: "auth",
          resolve: () => this._authenticated(conn),
          reject: (err) => { conn.refusal = err; ws.close(1000, "auth refused"); },
        });
      };
      ws.onmessage = (ev) => { if (this._conn === conn) this._onFrame(conn, ev.data); };
      ws.onerror = (ev) => {
        if (this._conn === conn) this._emit("error", makeError("network", "WebSocket error", { event: ev }));
      };
      ws.onclose = (ev) => this._onClose(conn, ev);
    }

    _openStream(conn) {
      const channels = [...this.channels].filter((c) => c.indexOf(",") < 0);
      const q = [];
      if (channels.length) q.push("channels=" + channels.map(encodeURIComponent).join(","));
      if (this.lastOffset != null) q.push("since=" + encodeURIComponent(this.lastOffset));
      if (conn.token != null) q.push("token=" + encodeURIComponent(conn.token));  // no headers on an EventSource
      conn.channels = new Set(channels);
      conn.since = this.lastOffset != null;
      const base = this.options.sseUrl || streamUrl(this.url);
      const es = new EventSource(q.length ? base + (base.indexOf("?") < 0 ? "?" : "&") + q.join("&") : base);
      conn.es = es;
      this.transport = "sse";
      const frame = (ev) => { if (this._conn === conn) this._onFrame(conn, ev.data); };
      es.onmessage = frame;
      for (const name of ["resumed", "gap", "joined"]) es.addEventListener(name, frame);
      es.addEventListener("close", (ev) => {
        // the server ends the stream: shutdown (the browser reconnects by itself) or a refused token
        let info = {};
        try { info = JSON.parse(ev.data); } catch (e) { /* keep the defaults */ }
        if (this._conn === conn && AUTH_CLOSES[info.code]) {
          es.close();
          this._onClose(conn, { code: info.code, reason: info.reason || "", wasClean: true });
        }
      });
      es.onopen = () => {
        if (this._conn !== conn) return;
        conn.openedAt = conn.openedAt || Date.now();
        this._authenticated(conn);
      };
      es.onerror = () => {
        if (this._conn !== conn) return;
        if (es.readyState === 2) {  // refused (an HTTP error) or unreachable: our backoff, the WebSocket first
          this._onClose(conn, { code: 1006, reason: "event stream failed", wasClean: false });
        } else {  // reconnecting by itself, with Last-Event-ID
          conn.ready = false;
          conn.since = true;
          this._setState("connecting");
        }
      };
    }

    _restream() {
      // new channels: a new stream from the resume point, so nothing between the two is missed
      const old = this._conn;
      old.es.close();
      const conn = { ws: null, es: null, token: old.token, channels: null, since: false, ready: false, refusal: null, openedAt: 0 };
      this._conn = conn;
      this._setState("connecting");
      this._openStream(conn);
    }

    _authenticated(conn) {
      // With a since, the server answers it ("resumed") before anything replayed: open then.
      if (!conn.since) this._ready(conn);
    }

    _ready(conn) {
      if (conn.ready) return;
      conn.ready = true;
      this._setState("open");
      const later = [];
      const waiting = this._waitOpen.splice(0);
      if (!conn.es) {
        // presence events are asked for again on every WebSocket (an event stream carries none)
        const asked = new Set(waiting.filter((w) => w.kind === "subscribe").map((w) => w.channel));
        for (const channel of this._presence) {
          if (asked.has(channel) || !this._confirmed.has(channel)) continue;
          this._request({ kind: "subscribe", channel: channel, presence: true })
            .catch((err) => this._emit("error", err));
        }
      }
      for (const w of waiting) {
        if (w.kind === "presence") {
          if (conn.es) w.reject(makeError("unavailable", "an event stream cannot ask for presence"));
          else this._sendChannelRequest(w);
        } else if (w.kind === "unsubscribe" ? !(conn.es && conn.channels.has(w.channel)) : conn.channels.has(w.channel)) {
          w.resolve({ type: w.kind + "d", channel: w.channel });  // the connect query did it
        } else if (w.kind !== "unsubscribe" && !this.channels.has(w.channel)) {
          w.reject(makeError("cancelled", "unsubscribed before the server was asked"));
        } else if (conn.es && w.channel.indexOf(",") >= 0) {
          w.reject(makeError("bad_request", "an event stream cannot carry a channel with a comma"));
        } else if (conn.es) {
          later.push(w);  // a stream asks nothing: it is reopened with the channels wanted now
        } else {
          this._sendChannelRequest(w);
        }
      }
      this._emit("open");
      if (later.length && this._conn === conn) { this._waitOpen.push(...later); this._restream(); }
    }

    _onClose(conn, ev) {
      if (this._conn !== conn) return;
      this._conn = null;
      if (conn.ws && !conn.openedAt) {
        // A failed WebSocket counts towards the fallback only while the server answers plain HTTP:
        // one that was down (a restart) says nothing against WebSockets, and pages should not stay on streams.
        reachable(healthUrl(this.options.sseUrl || streamUrl(this.url))).then((up) => {
          if (up) this._wsFailures++; else this._wsFailures = 0;
        });
      }
      // Only a connection that lived a while resets the backoff: a server
      // that accepts and then drops us at once must not be hammered.
      if (conn.openedAt && Date.now() - conn.openedAt > 5000) this._attempt = 0;
      for (const [, p] of this._pending) {
        if (p.kind === "auth") continue;
        if (p.kind === "publish") p.reject(makeError("unavailable", "connection closed before ack"));
        else if (this._closed) p.reject(makeError("closed", "client closed"));
        else this._waitOpen.push(p);
      }
      this._pending.clear();
      let refusal = conn.refusal;
      if (!refusal && AUTH_CLOSES[ev.code]) {
        refusal = makeError(AUTH_CLOSES[ev.code], ev.reason || AUTH_CLOSES[ev.code], { closeCode: ev.code });
      }
      this._setState("closed");
      this._emit("close", ev);
      if (this._closed) return;
      if (refusal) {
        this._refused = conn.token;
        // A fixed token would be refused again; a token function is asked for a new one.
        if (typeof this.options.token !== "function") { this._stop(refusal); return; }
        this._emit("error", refusal);
      }
      this._scheduleReconnect();
    }

    _stop(err) {
      this._stopped = true;
      this._setState("closed");
      err.fatal = true;
      this._emit("error", err);
    }

    _scheduleReconnect() {
      const o = this.options, base = Math.min(o.maxDelay, o.minDelay * Math.pow(2, this._attempt++));
      // "Equal jitter": half fixed, half random, so a crowd of browsers
      // dropped by one restart does not come back in lockstep.
      const delay = base / 2 + Math.random() * base / 2;
      this._timer = setTimeout(() => this._connect(), delay);
    }

    _onFrame(conn, data) {
      let msg;
      try {
        msg = JSON.parse(data);
      } catch (e) {
        this._emit("error", makeError("bad_frame", "the server sent a frame that is not JSON", { cause: e }));
        return;
      }
      if (!msg || typeof msg !== "object") return;
      if (msg.type === "message") return this._onMessage(conn, msg);
      if (msg.type === "resumed") {
        this._emit("resumed", msg);
        if (msg.recovered === false) this._gap("resume", msg);
        this._ready(conn);
        return;
      }
      if (msg.type === "gap") return this._gap(msg.reason || "unknown", msg);
      if (msg.type === "join" || msg.type === "leave") {
        this._emit(msg.type, { channel: msg.channel, user: msg.user });
        return;
      }
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
        const err = makeError(msg.code || "error", msg.message, { frame: msg });
        if (p && p.kind === "subscribe") {
          this.channels.delete(p.channel); this._confirmed.delete(p.channel); this._presence.delete(p.channel);
        }
        if (p) p.reject(err); else this._emit("error", err);
        return;
      }
      if (msg.type === "subscribed" && p && this.channels.has(p.channel)) this._confirmed.add(p.channel);
      if (p) p.resolve(msg);
      // ack, subscribed, unsubscribed; unknown types are ignored (forward compatible)
      if (msg.type === "subscribed" || msg.type === "unsubscribed") this._emit(msg.type, msg);
      if (msg.type === "subscribed" && msg.recovered === false) this._gap("subscribe", msg, msg.channel);
    }

    _gap(reason, frame, channel) {
      const info = { reason: reason, frame: frame };
      if (channel !== undefined) info.channel = channel;
      this._emit("gap", info);
    }

    _onMessage(conn, msg) {
      this._ready(conn);  // a server that sent no "resumed" has joined all the same
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
