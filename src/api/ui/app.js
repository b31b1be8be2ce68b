// nasd operator console: one page, plain JavaScript, no build step, nothing from outside.
// Hash routes: #/overview, #/nas/ID, #/events?state=..., #/account[/USER_ID][?q=...], #/stack.
// Data comes from the JSON API with the session cookie; every POST carries X-Nasd-Csrf.
// Live figures arrive over server-sent events (/api/v1/live), closed while the tab is hidden.
'use strict';
(() => {
  const S = { me: null, ov: null, es: null, view: null, seq: 0, ovq: { q: '', state: '', sort: 'name', dir: 1 } };
  const STATES = ['queued', 'retrying', 'running', 'failed', 'done', 'superseded'];
  const FINAL = new Set(['done', 'failed']);
  const CMDS = ['user_add', 'user_del', 'user_accept', 'user_drop', 'user_redirect', 'user_redirect_cancel',
    'own_disabled', 'own_disabled_cancel', 'user_rate_set', 'user_rate_set_cancel', 'user_info'];
  const $ = (sel, root) => (root || document).querySelector(sel);

  // ---- DOM helpers (text always goes through textContent) ----
  function h(tag, attrs, ...kids) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v == null || v === false) continue;
      if (k === 'class') el.className = v;
      else if (k === 'test') el.dataset.test = v;
      else if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
      else if (k === 'value') el.value = v;
      else if (k === 'checked') el.checked = true;
      else el.setAttribute(k, v === true ? '' : v);
    }
    el.append(...kids.flat(9).filter(c => c != null && c !== false));
    return el;
  }
  // replaceChildren would write null as "null": drop it as h() does.
  const fill = (el, ...kids) => el.replaceChildren(...kids.flat(9).filter(c => c != null && c !== false));
  const NS = 'http://www.w3.org/2000/svg';
  function s(tag, attrs, text) {
    const el = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
    if (text != null) el.textContent = text;
    return el;
  }
  const isAdmin = () => S.me && S.me.role === 'admin';
  // An action button: disabled (and saying why) for a read-only token; the server refuses anyway.
  function act(label, attrs, onclick) {
    const b = h('button', Object.assign({ type: 'button', class: 'act', onclick }, attrs), label);
    if (!isAdmin()) { b.disabled = true; b.title = 'read-only token: needs an admin token'; }
    return b;
  }
  const mute = (...k) => h('span', { class: 'mute' }, ...k);
  const panel = (...k) => h('div', { class: 'panel' }, ...k);
  const h2 = (...k) => h('h2', null, ...k);
  const nasLink = id => h('a', { href: '#/nas/' + id }, nasName(id));
  const userLink = id => h('a', { href: '#/account/' + id }, String(id));
  const card = (label, value, test, bad) => h('div', { class: 'card' + (bad ? ' bad' : ''), test }, h('b', null, value), h('span', null, label));
  const badge = (state, text) => h('span', { class: 'badge b-' + state, 'data-state': state }, text || state);

  // ---- formatting ----
  const pad = n => String(n).padStart(2, '0');
  function fmtTime(iso) {
    if (!iso) return '–';
    const d = new Date(iso);
    if (isNaN(d)) return String(iso);
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  }
  function fmtAge(sec) {
    if (sec == null || isNaN(sec)) return '–';
    sec = Math.max(0, Math.round(sec));
    if (sec < 60) return sec + 's';
    if (sec < 3600) return `${Math.floor(sec / 60)}m ${sec % 60}s`;
    if (sec < 86400) return `${Math.floor(sec / 3600)}h ${Math.floor(sec % 3600 / 60)}m`;
    return `${Math.floor(sec / 86400)}d ${Math.floor(sec % 86400 / 3600)}h`;
  }
  const ageOf = iso => iso ? (serverNow() - new Date(iso)) / 1000 : null;
  const serverNow = () => (S.ov && S.ov.now && S.ovAt) ? new Date(S.ov.now).getTime() + (Date.now() - S.ovAt) : Date.now();
  function num(x, digits) {
    if (x == null || x === '') return '–';
    if (typeof x !== 'number') return String(x);
    const f = Math.pow(10, digits == null ? 1 : digits);
    return (Math.round(x * f) / f).toLocaleString('en-US');
  }
  const ms = x => x == null ? '–' : x >= 1000 ? num(x / 1000, 2) + ' s' : num(x, 0) + ' ms';
  const plural = (n, word) => `${n.toLocaleString('en-US')} ${word}${n === 1 ? '' : 's'}`;
  const nasName = id => {
    const n = S.ov && S.ov.nas && S.ov.nas.find(x => x.id === id);
    return n ? n.name : (id == null ? '–' : 'NAS ' + id);
  };

  // ---- HTTP ----
  class HttpError extends Error {
    constructor(status, body) { super((body && body.error) || `HTTP ${status}`); this.status = status; this.body = body; }
  }
  async function api(method, path, body) {
    const headers = { 'Content-Type': 'application/json' };
    if (method !== 'GET' && S.me && S.me.csrf) headers['X-Nasd-Csrf'] = S.me.csrf;
    const r = await fetch(path, {
      method, headers, credentials: 'same-origin', cache: 'no-store',
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    let data = null;
    if (r.status !== 204) {
      const text = await r.text();
      try { data = text ? JSON.parse(text) : null; } catch (_) { data = { error: text.slice(0, 300) }; }
    }
    if (r.status === 401 && S.me) { S.me = null; showLogin('Your session ended: sign in again.'); }
    if (!r.ok) throw new HttpError(r.status, data);
    return data;
  }
  const get = path => api('GET', path);
  const post = (path, body) => api('POST', path, body === undefined ? {} : body);
  const qs = obj => {
    const p = new URLSearchParams();
    for (const [k, v] of Object.entries(obj)) if (v != null && v !== '') p.set(k, v);
    return p.toString();
  };

  // ---- toasts and the confirmation dialog ----
  function toast(text, kind) {
    const t = h('div', { class: 'toast', 'data-kind': kind || 'info', test: 'toast', role: kind === 'error' ? 'alert' : 'status' }, text);
    $('#toasts').append(t);
    setTimeout(() => t.remove(), kind === 'error' ? 12000 : 6000);
  }
  const fail = e => toast(e && e.message ? e.message : String(e), 'error');
  function confirmDialog(title, text, okLabel) {
    const d = $('#confirm');
    $('#confirm-title').textContent = title;
    $('#confirm-text').textContent = text;
    $('#confirm-ok').textContent = okLabel || 'Confirm';
    d.returnValue = '';
    return new Promise(resolve => {
      d.addEventListener('close', () => resolve(d.returnValue === 'ok'), { once: true });
      d.showModal();
    });
  }

  // ---- session ----
  function showLogin(message) {
    closeLive();
    S.view = null;
    document.body.dataset.page = 'login';
    fill($('#view'));
    $('#nav').hidden = true; $('#logout').hidden = true; $('#live').hidden = true;
    fill($('#who'));
    $('#login').hidden = false;
    $('#login-error').textContent = message || '';
    $('#login-token').value = '';
    $('#login-token').focus();
  }
  async function onLogin(ev) {
    ev.preventDefault();
    const token = $('#login-token').value.trim();
    $('#login-error').textContent = '';
    try {
      S.me = await post('/ui/login', { token });
      $('#login-token').value = '';
      started();
    } catch (e) { $('#login-error').textContent = e.message; }
  }
  async function logout() {
    try { await post('/ui/logout'); } catch (_) { /* the page signs out either way */ }
    S.me = null;
    showLogin('Signed out.');
  }
  function started() {
    $('#login').hidden = true;
    $('#nav').hidden = false; $('#logout').hidden = false; $('#live').hidden = false;
    const ro = !isAdmin();
    document.body.classList.toggle('ro', ro);
    fill($('#who'), h('b', { test: 'who-name' }, S.me.name), ' · ', h('span', { test: 'who-role' }, S.me.role),
      ro ? h('span', { class: 'ro', test: 'read-only' }, 'read-only') : null);
    openLive();
    route();
  }

  // ---- live updates: one EventSource, closed while the tab is hidden ----
  function setLive(state) {
    const el = $('#live');
    el.dataset.live = state;
    el.textContent = state === 'open' ? 'live' : state;
    el.title = 'live updates: ' + state;
  }
  function openLive() {
    if (S.es || !S.me || document.visibilityState === 'hidden') return;
    const es = new EventSource('/api/v1/live');
    S.es = es;
    setLive('connecting');
    es.onopen = () => setLive('open');
    es.addEventListener('overview', ev => {
      let ov;
      try { ov = JSON.parse(ev.data); } catch (_) { return; }
      setLive('open');
      gotOverview(ov);
    });
    es.onerror = () => {
      if (es.readyState !== EventSource.CLOSED) { setLive('reconnecting'); return; }
      if (S.es === es) S.es = null;
      setLive('closed');
      // Refused (401/403) or a failed stream: ask who we are, which shows the form when the
      // session is gone; otherwise try again a little later.
      get('/api/v1/whoami').then(() => setTimeout(openLive, 5000), () => {});
    };
  }
  function closeLive() {
    if (S.es) { S.es.close(); S.es = null; }
    setLive(document.visibilityState === 'hidden' ? 'paused' : 'closed');
  }
  document.addEventListener('visibilitychange', () => {
    if (document.visibilityState === 'hidden') { if (S.es) closeLive(); return; }
    if (S.me && !S.es) { openLive(); refreshOverview(); }
  });
  function gotOverview(ov) {
    S.ov = ov; S.ovAt = Date.now();
    if (S.view && S.view.live) { try { S.view.live(ov); } catch (e) { console.error(e); } }
  }
  async function refreshOverview() {
    try { gotOverview(await get('/api/v1/overview')); } catch (e) { if (e.status !== 401) console.warn(e); }
  }
  async function overview() {
    if (!S.ov || Date.now() - S.ovAt > 5000) gotOverview(await get('/api/v1/overview'));
    return S.ov;
  }

  // ---- router ----
  function parseHash() {
    const raw = location.hash.replace(/^#\/?/, '') || 'overview';
    const i = raw.indexOf('?');
    const path = i < 0 ? raw : raw.slice(0, i);
    const parts = path.split('/').map(p => { try { return decodeURIComponent(p); } catch (_) { return p; } });
    return { page: parts[0], arg: parts[1], q: new URLSearchParams(i < 0 ? '' : raw.slice(i + 1)) };
  }
  const PAGES = { overview: pageOverview, nas: pageNas, events: pageEvents, account: pageAccount, stack: pageStack };
  function route() {
    if (!S.me) return;
    const r = parseHash();
    const page = PAGES[r.page] ? r.page : 'overview';
    const seq = ++S.seq;
    document.body.dataset.page = page;
    document.body.dataset.loaded = '0';
    for (const a of document.querySelectorAll('#nav a')) a.classList.toggle('on', a.dataset.nav === page || (page === 'nas' && a.dataset.nav === 'overview'));
    const root = $('#view');
    fill(root);
    const view = PAGES[page](root, r) || {};
    S.view = view;
    Promise.resolve(view.ready).then(() => {
      if (seq === S.seq) document.body.dataset.loaded = '1';
    }, e => {
      if (seq !== S.seq) return;
      if (e && e.status === 401) return;
      root.prepend(h('div', { class: 'panel err', test: 'page-error' }, 'Could not load this page: ' + (e && e.message)));
      document.body.dataset.loaded = 'error';
    });
  }
  window.addEventListener('hashchange', route);
  const go = hash => { if (location.hash === hash) route(); else location.hash = hash; };

  // ---- tables ----
  // cols: [{k, label, v: row => sort value, cell: row => node|text, num}]
  function table(cols, rows, opts) {
    opts = opts || {};
    const sort = opts.sort;
    const head = h('tr', null, cols.map(c => {
      const th = h('th', { class: c.num ? 'num' : null, 'data-sort': sort && c.v ? c.k : null }, c.label);
      if (sort && c.v) {
        if (sort.key === c.k) th.classList.add(sort.dir > 0 ? 'asc' : 'desc');
        th.addEventListener('click', () => opts.onSort(c.k));
      }
      return th;
    }));
    let list = rows;
    if (sort) {
      const col = cols.find(c => c.k === sort.key && c.v);
      if (col) list = rows.slice().sort((a, b) => {
        const x = col.v(a), y = col.v(b);
        const r = x == null ? (y == null ? 0 : 1) : y == null ? -1 :
          typeof x === 'number' && typeof y === 'number' ? x - y : String(x).localeCompare(String(y), 'en', { numeric: true });
        return x == null || y == null ? r : r * sort.dir;
      });
    }
    const body = h('tbody', null, list.map(row => {
      const tr = h('tr', opts.rowAttrs ? opts.rowAttrs(row) : null, cols.map(c => {
        const v = c.cell ? c.cell(row) : c.v(row);
        return h('td', { class: c.num ? 'num' : c.wrap ? 'wrap' : null }, v == null ? '–' : v);
      }));
      if (opts.onRow) tr.addEventListener('click', ev => { if (!ev.target.closest('a,input,button')) opts.onRow(row, tr); });
      return tr;
    }));
    if (!list.length && opts.empty) body.append(h('tr', null, h('td', { colspan: cols.length, class: 'mute', test: 'empty' }, opts.empty)));
    return h('div', { class: 'tablewrap' }, h('table', { test: opts.test }, h('thead', null, head), body));
  }

  // ---- charts: inline SVG lines over the last hour ----
  function niceMax(x) {
    if (!(x > 0)) return 1;
    const e = Math.pow(10, Math.floor(Math.log10(x)));
    for (const m of [1, 2, 2.5, 5, 10]) if (x <= m * e) return m * e;
    return 10 * e;
  }
  function chart(title, test, points, series) {
    const W = 560, H = 150, L = 40, R = 10, T = 10, B = 20;
    const svg = s('svg', { viewBox: `0 0 ${W} ${H}`, role: 'img', 'aria-label': title });
    const at = p => new Date(p.at).getTime();
    const end = points.length ? at(points[points.length - 1]) : serverNow();
    // The last hour; a daemon that started less than an hour ago shows what it has
    // (at least 10 minutes), so that a fresh one draws more than a dot.
    const span = Math.min(3600e3, Math.max(600e3, points.length ? end - at(points[0]) : 0));
    const start = end - span;
    const top = Math.max(0, ...points.filter(p => at(p) >= end - span).flatMap(p => series.map(c => +p[c.key] || 0)));
    const max = niceMax(top);
    const x = t => L + (t - start) / span * (W - L - R);
    const y = v => T + (1 - v / max) * (H - T - B);
    for (const f of [0, 0.5, 1]) {
      svg.append(s('line', { class: 'grid', x1: L, x2: W - R, y1: y(max * f), y2: y(max * f) }));
      svg.append(s('text', { x: L - 4, y: y(max * f) + 3, 'text-anchor': 'end' }, num(max * f, max < 10 ? 1 : 0)));
    }
    for (const f of [1, 0.75, 0.5, 0.25, 0]) {
      svg.append(s('text', { x: x(end - f * span), y: H - 5, 'text-anchor': f === 1 ? 'start' : f ? 'middle' : 'end' }, f ? `-${Math.round(f * span / 60e3)}m` : 'now'));
    }
    for (const c of series) {
      const pts = points.filter(p => at(p) >= start).map(p => `${x(at(p)).toFixed(1)},${y(+p[c.key] || 0).toFixed(1)}`);
      if (pts.length > 1) svg.append(s('polyline', { points: pts.join(' '), fill: 'none', stroke: c.color, 'stroke-width': 1.6, 'stroke-linejoin': 'round' }));
      else if (pts.length === 1) { const [px, py] = pts[0].split(','); svg.append(s('circle', { cx: px, cy: py, r: 2.5, fill: c.color })); }
    }
    if (!points.length) svg.append(s('text', { x: W / 2, y: H / 2, 'text-anchor': 'middle' }, 'no data yet'));
    return h('div', { class: 'panel chart', test, 'data-points': points.length, 'data-max': top },
      h2(title, h('small', null, series.length > 1 ? 'last hour, per minute' : 'last hour')), svg,
      h('div', { class: 'legend' }, series.map(c => h('span', null, h('i', { style: 'background:' + c.color }), c.label))));
  }
  const THROUGHPUT = [{ key: 'done', label: 'done', color: '#1e8a5a' }, { key: 'failed', label: 'failed', color: '#c23b3b' }, { key: 'retried', label: 'retried', color: '#d08a1c' }];
  const QUEUE = [{ key: 'queue_depth', label: 'queue depth', color: '#2463b0' }];
  // Two charts kept in `box`, fetched again once per step of the series (on live ticks).
  function charts(box, path) {
    let at = 0, step = 60;
    const load = async force => {
      if (!force && Date.now() - at < step * 1000) return;
      at = Date.now();
      const r = await get(path);
      step = Math.max(5, (r && r.step_seconds) || 60);
      // Points count what happened in one step; the charts show rates per minute.
      const k = 60 / step;
      const pts = ((r && r.points) || []).map(p => Object.assign({}, p, { done: p.done * k, failed: p.failed * k, retried: p.retried * k }));
      fill(box, chart('Throughput', 'chart-throughput', pts, THROUGHPUT), chart('Queue depth', 'chart-queue', pts, QUEUE));
    };
    return load;
  }

  // ---- Overview ----
  const STATE_ORDER = { down: 0, config_error: 1, unowned: 2, paused: 3, disabled: 4, up: 5 };
  function stateCell(n) {
    const bits = [badge(n.state || (n.up ? 'up' : 'down'))];
    if (n.state === 'down' || (n.down_since && n.state !== 'up')) {
      bits.push(h('span', { class: 'reason', test: 'down-reason' },
        (n.down_reason || 'down') + (n.down_since ? ` · since ${fmtTime(n.down_since)} (${fmtAge(ageOf(n.down_since))})` : '')));
    }
    return h('span', null, bits);
  }
  function pageOverview(root) {
    const o = S.ovq;
    const cards = h('div', { class: 'cards', test: 'totals' });
    const chartBox = h('div', { class: 'grid2 mb' });
    const tableBox = h('div');
    const count = h('span', { class: 'mute', test: 'nas-count' });
    const onq = e => { o.q = e.target.value; render(); };
    const filter = h('input', { type: 'search', placeholder: 'Filter by name or IP', value: o.q, test: 'nas-filter', oninput: onq, onchange: onq });
    const stateSel = h('select', { test: 'nas-state-filter', onchange: e => { o.state = e.target.value; render(); } },
      h('option', { value: '' }, 'all states'), Object.keys(STATE_ORDER).map(st => h('option', { value: st }, st)));
    stateSel.value = o.state;
    const sub = h('small', { test: 'daemon' });
    const warn = h('div', { class: 'panel err', test: 'read-error', hidden: true });
    root.append(h('h1', null, 'Overview', sub), warn, cards, chartBox,
      h('div', { class: 'row mb' }, filter, stateSel, count), tableBox);
    const loadCharts = charts(chartBox, '/api/v1/series');
    function render() {
      const ov = S.ov;
      if (!ov) return;
      const t = ov.totals || {};
      const pm = t.per_minute || {};
      sub.textContent = ov.daemon ? `daemon ${ov.daemon} · ${fmtTime(ov.now)}` : fmtTime(ov.now);
      fill(warn, ov.read_error ? `The database could not be read (${ov.read_error}); queue figures are from ${fmtTime(ov.read_at)}.` : null);
      warn.hidden = !ov.read_error;
      fill(cards, 
        card('NAS', num(t.nas, 0), 'total-nas'), card('up', num(t.up, 0), 'total-up'), card('down', num(t.down, 0), 'total-down', t.down > 0),
        card('queue depth', num(t.queue_depth, 0), 'total-queue'), card('in flight', num(t.in_flight, 0), 'total-inflight'),
        card('done / min', num(pm.done), 'total-done'), card('failed / min', num(pm.failed), 'total-failed', pm.failed > 0),
        card('retried / min', num(pm.retried), 'total-retried'));
      const all = ov.nas || [];
      const q = o.q.trim().toLowerCase();
      const rows = all.filter(n => (!q || String(n.name).toLowerCase().includes(q) || String(n.ip).includes(q)) && (!o.state || n.state === o.state));
      count.textContent = `${rows.length} of ${all.length} NAS`;
      const owners = new Set(all.map(n => n.owner).filter(Boolean));
      const cols = [
        { k: 'name', label: 'Name', v: n => n.name, cell: n => h('a', { href: '#/nas/' + n.id, test: 'nas-link' }, n.name) },
        { k: 'ip', label: 'IP', v: n => n.ip },
        { k: 'state', label: 'State', wrap: 1, v: n => STATE_ORDER[n.state] ?? 9, cell: stateCell },
        owners.size > 1 ? { k: 'owner', label: 'Owner', v: n => n.owner } : null,
        { k: 'pool', label: 'Pool', num: 1, v: n => n.pool_size },
        { k: 'inflight', label: 'In flight', num: 1, v: n => n.in_flight },
        { k: 'sessions', label: 'Sessions', num: 1, v: n => n.open_sessions },
        { k: 'queue', label: 'Queue', num: 1, v: n => n.queue_depth },
        { k: 'oldest', label: 'Oldest', num: 1, v: n => n.oldest_age_seconds, cell: n => fmtAge(n.oldest_age_seconds) },
        ...['done', 'failed', 'retried'].map(k => ({ k, label: k[0].toUpperCase() + k.slice(1) + '/m', num: 1, v: n => (n.per_minute || {})[k], cell: n => num((n.per_minute || {})[k]) })),
        ...['p50', 'p99'].map(k => ({ k, label: k, num: 1, v: n => (n.latency_ms || {})[k], cell: n => ms((n.latency_ms || {})[k]) })),
      ].filter(Boolean);
      fill(tableBox, table(cols, rows, {
        test: 'nas-table', empty: all.length ? 'No NAS matches the filter.' : 'No NAS configured.',
        sort: { key: o.sort, dir: o.dir }, onSort: k => { o.dir = o.sort === k ? -o.dir : 1; o.sort = k; render(); },
        rowAttrs: n => ({ test: 'nas-row', 'data-nas-id': n.id, 'data-state': n.state, 'data-queue': n.queue_depth, 'data-done': (n.per_minute || {}).done, 'data-p50': (n.latency_ms || {}).p50 }),
      }));
    }
    const ready = (async () => { await overview(); render(); await loadCharts(true); })();
    return { ready, live: () => { render(); loadCharts().catch(() => {}); } };
  }

  // ---- NAS ----
  function kv(pairs, test, cls) {
    return h('dl', { class: 'kv ' + (cls || ''), test }, pairs.filter(Boolean).flatMap(([k, v]) => [h('dt', null, k), h('dd', { 'data-key': k }, v == null || v === '' ? '–' : v)]));
  }
  function pageNas(root, r) {
    const id = parseInt(r.arg, 10);
    const title = h('h1', { test: 'nas-title' }, 'NAS ' + r.arg);
    const stateBox = h('span', { test: 'nas-state' });
    const settingsBox = panel(h2('Settings'));
    const figBox = panel(h2('Now'));
    const chartBox = h('div', { class: 'grid2 mb' });
    const logPre = h('pre', { class: 'log', test: 'nas-log' }, 'loading…');
    const logPath = h('small', { class: 'mono' });
    const follow = h('input', { type: 'checkbox', checked: true, test: 'log-follow' });
    const probeOut = h('span', { test: 'probe-result', class: 'mono' });
    const results = h('div', { test: 'send-results' });
    let nas = null, paused = false;
    const pauseBtn = act('Pause', { test: 'btn-pause' }, () => setPaused(true));
    const resumeBtn = act('Resume', { test: 'btn-resume' }, () => setPaused(false));
    const probeBtn = act('Probe now', { test: 'btn-probe' }, probe);
    const cmd = h('input', { list: 'cmds', value: 'user_info', test: 'send-cmd', required: true, size: 18 });
    const user = h('input', { type: 'number', min: 1, placeholder: 'user id', test: 'send-user', required: true, style: 'width:8em' });
    const sess = h('input', { placeholder: 'acct_session_id (opt.)', test: 'send-session', size: 18 });
    const dry = h('input', { type: 'checkbox', checked: true, test: 'send-dry' });
    const sendBtn = act('Send', { test: 'send-submit', type: 'submit', class: 'act primary' });
    const form = h('form', { class: 'row', test: 'send-form', onsubmit: send }, cmd, user, sess, h('label', { class: 'inline' }, dry, 'dry run (render only, send nothing)'), sendBtn);
    root.append(h('div', { class: 'row mb' }, title, stateBox), h('div', { class: 'grid2 mb' }, settingsBox, figBox),
      panel(h2('Actions'), h('div', { class: 'row mb' }, pauseBtn, resumeBtn, probeBtn, probeOut),
        h2('Test command'), form, results),
      chartBox, panel(h('div', { class: 'row' }, h2('NAS log', logPath), h('span', { class: 'grow' }),
        h('label', { class: 'inline' }, follow, 'follow'), h('button', { type: 'button', onclick: () => loadLog(true) }, 'Refresh')), logPre));

    function renderHead(row) {
      const st = row ? row.state : nas && (nas.paused ? 'paused' : nas.enabled === false ? 'disabled' : nas.down ? 'down' : 'up');
      paused = row ? row.paused || row.state === 'paused' : !!(nas && nas.paused);
      pauseBtn.hidden = paused; resumeBtn.hidden = !paused;
      stateBox.dataset.state = st || '';
      fill(stateBox, stateCell(row || { state: st, down_reason: nas && nas.down_reason, down_since: nas && nas.down_since }));
    }
    function renderFigures(row) {
      const n = row || nas || {};
      const pm = n.per_minute || {}, lat = n.latency_ms || {};
      fill(figBox, h2('Now'), kv([
        ['owner', n.owner], ['pool size', num(n.pool_size, 0)], ['in flight', num(n.in_flight, 0)],
        ['open sessions', num(n.open_sessions, 0)], ['queue depth', num(n.queue_depth, 0)],
        ['oldest event', row ? fmtAge(n.oldest_age_seconds) : fmtAge(ageOf(n.oldest_event_at))],
        ['per minute', `${num(pm.done)} done · ${num(pm.failed)} failed · ${num(pm.retried)} retried`],
        ['latency', `p50 ${ms(lat.p50)} · p99 ${ms(lat.p99)}`],
        ['last success', nas && fmtTime(nas.last_success_at)], ['last error', nas && nas.last_error],
        ['failures in a row', nas && num(nas.consecutive_failures, 0)],
      ], 'nas-figures', 'two'));
    }
    function renderSettings() {
      const st = Object.assign({ name: nas.name, ip: nas.ip }, nas.settings);
      fill(settingsBox, h2('Settings', h('small', null, 'secrets masked')),
        kv(Object.entries(st).map(([k, v]) => [k, typeof v === 'object' && v !== null ? JSON.stringify(v) : v === true ? 'yes' : v === false ? 'no' : v]), 'nas-settings', 'two'));
    }
    const ovRow = () => S.ov && (S.ov.nas || []).find(n => n.id === id);
    async function load() {
      nas = await get('/api/v1/nas/' + id);
      title.textContent = `${nas.name} `;
      title.append(h('small', { class: 'mono' }, nas.ip));
      document.title = nas.name + ' · nasd';
      renderSettings(); renderHead(ovRow()); renderFigures(ovRow());
    }
    let logAt = 0;
    async function loadLog(force) {
      if (!force && (!follow.checked || Date.now() - logAt < 4000)) return;
      logAt = Date.now();
      try {
        const l = await get(`/api/v1/nas/${id}/log?lines=200`);
        logPath.textContent = l.path || '';
        const atEnd = logPre.scrollTop + logPre.clientHeight >= logPre.scrollHeight - 4;
        logPre.textContent = (l.lines || []).join('\n') || '(empty)';
        if (atEnd || force) logPre.scrollTop = logPre.scrollHeight;
      } catch (e) { logPre.textContent = 'cannot read the log: ' + e.message; }
    }
    async function setPaused(p) {
      try {
        const res = await post(`/api/v1/nas/${id}/${p ? 'pause' : 'resume'}`);
        toast(`${nas ? nas.name : 'NAS ' + id} ${res && res.paused ? 'paused: its events wait' : 'resumed'}`);
        if (nas) nas.paused = !!(res && res.paused);
        renderHead(null); refreshOverview();
      } catch (e) { fail(e); }
    }
    async function probe() {
      probeOut.textContent = 'probing…'; probeOut.className = 'mono';
      try {
        const p = await post(`/api/v1/nas/${id}/probe`);
        probeOut.dataset.ok = p.ok ? 'true' : 'false';
        probeOut.className = 'mono ' + (p.ok ? '' : 'err');
        probeOut.textContent = p.ok ? `reachable in ${ms(p.ms)}` : `unreachable after ${ms(p.ms)}: ${p.error}`;
      } catch (e) { probeOut.textContent = ''; fail(e); }
    }
    async function send(ev) {
      ev.preventDefault();
      const body = { cmd: cmd.value.trim(), user_id: parseInt(user.value, 10), dry_run: dry.checked };
      if (sess.value.trim()) body.acct_session_id = sess.value.trim();
      if (!body.cmd || !(body.user_id > 0)) return toast('A cmd and a user id are needed.', 'error');
      if (!body.dry_run && !await confirmDialog('Send for real?', `Send ${body.cmd} for account ${body.user_id} to ${nas ? nas.name : 'NAS ' + id} now? The device is changed.`, 'Send')) return;
      const at = new Date();
      sendBtn.disabled = true;
      let res;
      try { res = await post(`/api/v1/nas/${id}/send`, body); } catch (e) { res = { outcome: 'failed', error: e.message, commands: [] }; }
      sendBtn.disabled = false;
      const out = res.outcome || 'failed';
      results.prepend(h('div', { class: 'result', test: 'send-result', 'data-outcome': out },
        h('div', { class: 'row' }, badge(out), h('b', null, body.cmd), h('span', null, `account ${body.user_id}`), mute(body.dry_run ? 'dry run' : 'sent'),
          mute(`${fmtTime(at.toISOString())} · ${ms(res.ms)}`), res.error ? h('span', { class: 'err', test: 'send-error' }, res.error) : null),
        (res.commands || []).length ? table([{ label: 'Command', wrap: 1, cell: c => h('code', null, c.command) },
          { label: 'Answer', wrap: 1, cell: c => h('code', null, c.answer == null ? '–' : c.answer) }], res.commands, { test: 'send-commands' }) : null));
      loadLog(true);
    }
    const loadCharts = charts(chartBox, `/api/v1/nas/${id}/series`);
    const ready = (async () => { await overview().catch(() => {}); await load(); await Promise.all([loadCharts(true).catch(() => {}), loadLog(true)]); })();
    return {
      ready,
      live: () => { const row = ovRow(); if (nas) { renderHead(row); renderFigures(row); } loadLog(); loadCharts().catch(() => {}); },
    };
  }

  // ---- Events ----
  const FILTER_KEYS = ['nas', 'cmd', 'error', 'since', 'until', 'user_id'];
  function pageEvents(root, r) {
    const state = STATES.includes(r.q.get('state')) ? r.q.get('state') : 'failed';
    const f = {};
    for (const k of FILTER_KEYS) if (r.q.get(k)) f[k] = r.q.get(k);
    const before = r.q.get('before');
    const sel = new Set();
    const so = { key: 'id', dir: -1 };
    let rows = [];
    const link = extra => '#/events?' + qs(Object.assign({ state }, f, extra));
    const tabs = h('div', { class: 'tabs' }, STATES.map(st =>
      h('a', { href: '#/events?' + qs(Object.assign({ state: st }, f)), class: st === state ? 'on' : null, test: 'tab-' + st }, st)));
    const input = (k, label, attrs) => h('label', null, label, h('input', Object.assign({ name: k, value: f[k] || '', test: 'filter-' + k }, attrs)));
    const nasSel = h('select', { name: 'nas', test: 'filter-nas' }, h('option', { value: '' }, 'any NAS'));
    const form = h('form', { class: 'filters', test: 'events-filter', onsubmit: ev => {
      ev.preventDefault();
      const nf = {};
      for (const el of form.querySelectorAll('input[name],select[name]')) if (el.value.trim()) nf[el.name] = el.value.trim();
      go('#/events?' + qs(Object.assign({ state }, nf)));
    } },
    h('label', null, 'NAS', nasSel), input('cmd', 'cmd', { size: 14, list: 'cmds' }),
    input('error', 'error text', { size: 16 }), input('since', 'since', { size: 12, placeholder: '1h or RFC 3339' }),
    input('until', 'until', { size: 12, placeholder: '15m or RFC 3339' }), input('user_id', 'user id', { size: 8 }),
    h('button', { type: 'submit', class: 'primary', test: 'filter-apply' }, 'Apply'),
    h('button', { type: 'button', onclick: () => go('#/events?state=' + state) }, 'Clear'));
    const selCount = h('span', { class: 'mute', test: 'sel-count' }, '0 selected');
    const canRetry = state === 'failed', canCancel = state === 'queued' || state === 'retrying';
    const bulkBar = h('div', { class: 'bulk', test: 'bulk' }, selCount,
      canRetry ? [act('Retry selected', { test: 'btn-retry-selected' }, () => bulk('retry', true)), act('Retry all matching…', { test: 'btn-retry-matching' }, () => bulk('retry', false))] : null,
      canCancel ? [act('Cancel selected', { test: 'btn-cancel-selected' }, () => bulk('cancel', true)), act('Cancel all matching…', { test: 'btn-cancel-matching', class: 'act danger' }, () => bulk('cancel', false))] : null,
      !canRetry && !canCancel ? mute('running, done and superseded events take no action') : null);
    const listBox = h('div');
    const info = h('div', { class: 'row mute', test: 'events-info' });
    const detail = h('div', { test: 'event-detail-box' });
    root.append(h('h1', null, 'Events'), tabs, form, bulkBar, listBox, info, h('div', { class: 'mb' }), detail);

    function filterBody() {
      const b = { state };
      for (const [k, v] of Object.entries(f)) b[k] = (k === 'nas' || k === 'user_id') && /^\d+$/.test(v) ? +v : v;
      return b;
    }
    function describe() {
      const parts = [`state ${state}`];
      for (const [k, v] of Object.entries(f)) parts.push(`${k === 'nas' ? 'NAS' : k} ${k === 'nas' ? nasName(+v) : v}`);
      return parts.join(', ');
    }
    function updateSel() {
      selCount.textContent = `${sel.size} selected`;
      for (const b of bulkBar.querySelectorAll('[data-test$="-selected"]')) b.disabled = !isAdmin() || !sel.size;
    }
    async function load() {
      const p = await get('/api/v1/events?' + qs(Object.assign({ state }, f, { before, limit: 50 })));
      rows = p.events || [];
      sel.clear();
      renderList();
      fill(info, h('span', { test: 'events-shown' }, `${rows.length} shown`), h('button', { type: 'button', class: 'link2', onclick: () => load().catch(fail) }, 'Refresh'),
        p.scanned_capped ? h('span', { class: 'err' }, 'the error filter looked at the newest rows only; narrow the time range') : null,
        before ? h('a', { href: link({}) }, '« newest') : null,
        p.next_before ? h('a', { href: link({ before: p.next_before }), test: 'older' }, 'older »') : null);
    }
    function renderList() {
      const all = h('input', { type: 'checkbox', test: 'check-all', 'aria-label': 'select all shown', onchange: e => {
        for (const c of listBox.querySelectorAll('[data-test=event-check]')) { c.checked = e.target.checked; c.dispatchEvent(new Event('change')); }
      } });
      const cols = [
        { k: 'sel', label: all, cell: ev => h('input', { type: 'checkbox', test: 'event-check', 'data-id': ev.id, checked: sel.has(ev.id), onchange: e => {
          e.target.checked ? sel.add(ev.id) : sel.delete(ev.id); e.target.closest('tr').classList.toggle('sel', e.target.checked); updateSel();
        } }) },
        { k: 'id', label: 'Id', num: 1, v: ev => ev.id },
        { k: 'cmd', label: 'cmd', v: ev => ev.cmd, cell: ev => h('code', null, ev.cmd) },
        { k: 'user', label: 'User', v: ev => ev.user_id, cell: ev => userLink(ev.user_id) },
        { k: 'nas', label: 'NAS', v: ev => ev.nas_id, cell: ev => ev.nas_id == null ? (ev.nas_ip || '–') : nasLink(ev.nas_id) },
        { k: 'enq', label: 'Enqueued', v: ev => ev.enqueued_at, cell: ev => fmtTime(ev.enqueued_at) },
        { k: 'tries', label: 'Tries', num: 1, v: ev => ev.try_count },
        state === 'retrying' ? { k: 'next', label: 'Next try', v: ev => ev.next_try_at, cell: ev => fmtTime(ev.next_try_at) } : null,
        state === 'failed' || state === 'done' ? { k: 'fin', label: 'Finished', v: ev => ev.finished_at, cell: ev => fmtTime(ev.finished_at) } : null,
        state === 'failed' || state === 'done' ? { k: 'took', label: 'Took', num: 1, v: ev => ev.duration_ms, cell: ev => ms(ev.duration_ms) } : null,
        { k: 'err', label: 'Error', wrap: 1, v: ev => ev.error },
      ].filter(Boolean);
      fill(listBox, table(cols, rows, {
        test: 'events-table', empty: 'No event in this state matches the filter.',
        sort: so, onSort: k => { so.dir = so.key === k ? -so.dir : 1; so.key = k; renderList(); },
        rowAttrs: ev => ({ test: 'event-row', 'data-id': ev.id, 'data-state': ev.state, class: sel.has(ev.id) ? 'sel' : null }),
        onRow: ev => openDetail(ev.id),
      }));
      updateSel();
    }
    let open = null;
    async function openDetail(id) {
      open = id;
      let ev;
      try { ev = await get('/api/v1/events/' + id); } catch (e) { return fail(e); }
      if (open !== id) return;
      for (const tr of listBox.querySelectorAll('tr[data-id]')) tr.classList.toggle('sel', +tr.dataset.id === id || sel.has(+tr.dataset.id));
      const pre = (label, text, test) => text ? [h2(label), h('pre', { class: 'box', test }, text)] : null;
      fill(detail, h('div', { class: 'panel', test: 'event-detail', 'data-id': ev.id, 'data-state': ev.state },
        h('div', { class: 'row mb' }, h2(`Event #${ev.id}`), badge(ev.state), mute(ev.stage),
          h('span', { class: 'grow' }),
          ev.state === 'failed' ? act('Retry', { test: 'btn-retry-one' }, () => one('retry', ev)) : null,
          ev.state === 'queued' || ev.state === 'retrying' ? act('Cancel', { test: 'btn-cancel-one', class: 'act danger' }, () => one('cancel', ev)) : null,
          h('button', { type: 'button', onclick: () => { open = null; fill(detail); } }, 'Close')),
        h('div', { class: 'grid2' }, h('div', null, h2('Params'), kv([
          ['cmd', h('code', null, ev.cmd)], ['user id', userLink(ev.user_id)],
          ['abonent id', ev.abonent_id], ['NAS', ev.nas_id == null ? null : nasLink(ev.nas_id)],
          ['nas ip', ev.nas_ip], ['usluga id', ev.usluga_id], ['acct session id', ev.acct_session_id],
        ], 'event-params')), h('div', null, h2('Attempts'), kv([
          ['enqueued', fmtTime(ev.enqueued_at)], ['attempts', num(ev.try_count, 0)], ['next try', ev.next_try_at && fmtTime(ev.next_try_at)],
          ['finished', ev.finished_at && fmtTime(ev.finished_at)], ['took', ev.duration_ms != null ? ms(ev.duration_ms) : null],
          ['stack id', ev.stack_id],
        ], 'event-attempts'))),
        pre('Error', ev.error, 'event-error'), pre('Commands (last attempt, as sent)', (ev.commands || []).join('\n'), 'event-commands'),
        pre('Answer', ev.answer, 'event-answer')));
    }
    async function one(action, ev) {
      try {
        const res = await post(`/api/v1/events/${ev.id}/${action}`);
        if (action === 'retry') { toast(`Event #${ev.id} retried as new event #${res.id}`); await openDetail(res.id); }
        else { toast(`Event #${ev.id} cancelled`); await openDetail(ev.id); }
        load().catch(fail);
      } catch (e) { fail(e); }
    }
    async function bulk(action, selected) {
      const body = selected ? { ids: [...sel] } : { filter: filterBody() };
      let n;
      try { n = (await post(`/api/v1/events/${action}`, Object.assign({ dry_run: true }, body))).matched; } catch (e) { return fail(e); }
      if (!n) return toast(`No event to ${action}: none matches.`);
      const verb = action === 'retry' ? 'Retry' : 'Cancel';
      const what = selected ? `${plural(n, 'selected event')}` : `${plural(n, 'event')} matching ${describe()}`;
      const effect = action === 'retry' ? 'Each is enqueued again as a new event.' : 'They move to history as failed (cancelled by operator); running ones are skipped.';
      if (!await confirmDialog(`${verb} ${plural(n, 'event')}?`, `${verb} ${what}? ${effect}`, `${verb} ${plural(n, 'event')}`)) return;
      try {
        const res = await post(`/api/v1/events/${action}`, Object.assign({ expect: n }, body));
        const done = Array.isArray(res.done) ? res.done.length : res.done;
        const skipped = (res.skipped || []).length;
        toast(`${action === 'retry' ? 'Retried' : 'Cancelled'} ${done} of ${res.matched}` + (skipped ? `; ${skipped} skipped (${res.skipped[0].why})` : ''));
      } catch (e) {
        if (e.status === 409 && e.body && e.body.matched != null) toast(`Nothing done: ${e.body.matched} events match now, not ${n}. Look again and retry.`, 'error');
        else fail(e);
      }
      await load().catch(fail);
    }
    let liveAt = 0;
    const ready = (async () => {
      const ov = await overview().catch(() => null);
      for (const n of (ov && ov.nas) || []) nasSel.append(h('option', { value: n.id }, n.name));
      if (f.nas && !nasSel.querySelector(`option[value="${CSS.escape(f.nas)}"]`)) nasSel.append(h('option', { value: f.nas }, 'NAS ' + f.nas));
      nasSel.value = f.nas || '';
      await load();
      if (r.q.get('open')) await openDetail(+r.q.get('open'));
    })();
    return {
      ready,
      // An event open in the detail and not finished is followed on live ticks.
      live: () => {
        const d = $('[data-test=event-detail]', detail);
        if (d && !FINAL.has(d.dataset.state) && Date.now() - liveAt > 1500) { liveAt = Date.now(); openDetail(+d.dataset.id); }
      },
    };
  }

  // ---- Account ----
  function pageAccount(root, r) {
    const uid = r.arg && /^\d+$/.test(r.arg) ? +r.arg : null;
    const q = h('input', { type: 'search', placeholder: 'user id, login, IP or MAC', value: r.q.get('q') || '', test: 'account-q', size: 30, autofocus: true });
    const hitsBox = h('div', { test: 'account-hits' });
    const infoBox = h('div');
    const tl = h('ol', { class: 'timeline', test: 'timeline' });
    const searchForm = h('form', { class: 'row mb', test: 'account-search', onsubmit: ev => {
      ev.preventDefault();
      if (q.value.trim()) go('#/account?' + qs({ q: q.value.trim() }));
    } }, q, h('button', { type: 'submit', class: 'primary', test: 'account-go' }, 'Search'));
    root.append(h('h1', null, 'Account'), searchForm, hitsBox, infoBox);
    const hitTable = hits => table([
      { label: 'User id', cell: a => h('a', { href: '#/account/' + a.user_id, test: 'account-hit-link' }, String(a.user_id)) },
      { label: 'Abonent', v: a => a.abonent_id }, { label: 'Login', v: a => a.login },
      { label: 'IP', v: a => a.ip }, { label: 'MAC', v: a => a.mac },
      { label: 'NAS', cell: a => a.nas_id == null ? '–' : nasLink(a.nas_id) },
    ], hits, { test: 'account-hits-table', rowAttrs: a => ({ test: 'account-hit', 'data-user-id': a.user_id }), onRow: a => go('#/account/' + a.user_id) });

    async function search(text) {
      const res = await get('/api/v1/accounts?' + qs({ q: text }));
      const hits = res.accounts || [];
      if (hits.length === 1) return go('#/account/' + hits[0].user_id);
      fill(hitsBox, hits.length ? hitTable(hits) : h('p', { class: 'mute', test: 'no-hits' }, `No account matches “${text}”.`,
        /^\d+$/.test(text) ? [' ', h('a', { href: '#/account/' + text }, `Show the events of user id ${text} anyway`)] : null));
    }
    let last = '';
    async function loadTimeline() {
      const res = await get(`/api/v1/accounts/${uid}/events?limit=200`);
      const evs = (res.events || []).slice().sort((a, b) => b.id - a.id);
      const key = JSON.stringify(evs.map(e => [e.id, e.state, e.try_count]));
      if (key === last) return evs;
      last = key;
      fill(tl, ...evs.map(ev => h('li', { test: 'timeline-item', 'data-id': ev.id, 'data-state': ev.state, 'data-cmd': ev.cmd },
        h('div', { class: 'row' }, h('span', { class: 'mono' }, fmtTime(ev.finished_at || ev.enqueued_at)), badge(ev.state),
          h('code', null, ev.cmd), mute(ev.stage), ev.nas_id != null ? nasLink(ev.nas_id) : null,
          h('a', { href: `#/events?state=${ev.state}&user_id=${ev.user_id}&open=${ev.id}` }, '#' + ev.id),
          ev.try_count ? mute(plural(ev.try_count, 'attempt')) : null,
          ev.next_try_at && ev.state === 'retrying' ? mute('next ' + fmtTime(ev.next_try_at)) : null,
          ev.duration_ms != null ? mute(ms(ev.duration_ms)) : null),
        ev.error ? h('div', { class: 'err' }, ev.error) : null,
        (ev.commands || []).length || ev.answer ? h('details', null, h('summary', null, 'commands and answer'),
          h('div', { class: 'mute' }, 'sent'), h('pre', { class: 'box', test: 'timeline-commands' }, (ev.commands || []).join('\n') || '–'),
          h('div', { class: 'mute' }, 'answer'), h('pre', { class: 'box', test: 'timeline-answer' }, ev.answer || '(empty)')) : null)));
      if (!evs.length) fill(tl, h('li', { class: 'mute', test: 'timeline-empty' }, 'No event for this account.'));
      return evs;
    }
    async function showAccount() {
      const cmd = h('input', { list: 'cmds', value: 'user_info', test: 'enqueue-cmd', required: true, size: 18 });
      const nasIp = h('input', { placeholder: 'nas_ip (optional)', test: 'enqueue-nas-ip', size: 14 });
      const usl = h('input', { placeholder: 'usluga_id (opt.)', test: 'enqueue-usluga', size: 10 });
      const enqueue = h('form', { class: 'row', test: 'enqueue-form', onsubmit: async ev => {
        ev.preventDefault();
        const body = { cmd: cmd.value.trim(), user_id: uid };
        if (nasIp.value.trim()) body.nas_ip = nasIp.value.trim();
        if (usl.value.trim()) body.usluga_id = +usl.value.trim();
        try { const res = await post('/api/v1/events', body); toast(`Enqueued ${body.cmd} for ${uid} as event #${res.id}`); loadTimeline().catch(fail); } catch (e) { fail(e); }
      } }, cmd, nasIp, usl, act('Enqueue', { test: 'enqueue-submit', type: 'submit', class: 'act primary' }));
      const about = h('div', { test: 'account-info' }, mute('looking up…'));
      fill(infoBox, panel(h('div', { class: 'row' }, h('h2', { style: 'margin:0' }, `Account ${uid}`), about)),
        panel(h2('Enqueue an event for this account'), enqueue),
        panel(h2('Timeline', h('small', null, 'not yet expanded, in the stack and history, newest first')), tl));
      const [acc] = await Promise.all([get('/api/v1/accounts?' + qs({ q: String(uid) })).catch(() => null), loadTimeline()]);
      const a = acc && (acc.accounts || []).find(x => x.user_id === uid);
      fill(about, a ? kv([['login', a.login], ['ip', a.ip], ['mac', a.mac], ['abonent', a.abonent_id],
        ['NAS', a.nas_id == null ? null : nasLink(a.nas_id)]], 'account-facts', 'inline') : mute('no row in accounts'));
      document.title = `Account ${uid} · nasd`;
    }
    let liveAt = 0;
    const ready = (async () => {
      await overview().catch(() => null);
      if (uid != null) await showAccount();
      else if (q.value.trim()) await search(q.value.trim());
    })();
    return {
      ready,
      live: () => {
        if (uid == null || Date.now() - liveAt < 3000) return;
        if (!tl.querySelector('[data-test=timeline-item]:not([data-state=done]):not([data-state=failed])')) return;
        liveAt = Date.now();
        loadTimeline().catch(() => {});
      },
    };
  }

  // ---- Stack ----
  function pageStack(root) {
    const cards = h('div', { class: 'cards', test: 'stack-totals' });
    const byCmd = h('div', { class: 'panel' });
    const byNas = h('div', { class: 'panel' });
    const auditBox = h('div');
    const more = h('div', { class: 'row' });
    root.append(h('h1', null, 'Stack'), cards, h('div', { class: 'grid2 mb' }, byCmd, byNas),
      panel(h2('Audit log', h('small', null, 'who did what, newest first')), auditBox, more));
    async function loadStack() {
      const st = await get('/api/v1/stack');
      fill(cards, card('not yet expanded', num(st.compact_total, 0), 'stack-compact'), card('in the stack', num(st.stack_total, 0), 'stack-total'),
        card('oldest waits', fmtAge(st.oldest_event_age_seconds), 'stack-oldest'));
      fill(byCmd, h2('By cmd'), table([
        { label: 'cmd', cell: x => h('a', { href: '#/events?' + qs({ state: 'queued', cmd: x.cmd }) }, x.cmd) },
        { label: 'Events', num: 1, cell: x => num(x.count, 0) }], st.by_cmd || [], { test: 'stack-by-cmd', empty: 'The stack is empty.' }));
      fill(byNas, h2('By NAS'), table([
        { label: 'NAS', cell: x => x.nas_id == null ? '–' : nasLink(x.nas_id) },
        { label: 'Events', num: 1, cell: x => h('a', { href: '#/events?' + qs({ state: 'queued', nas: x.nas_id }) }, num(x.count, 0)) }], st.by_nas || [], { test: 'stack-by-nas', empty: 'The stack is empty.' }));
    }
    const rows = [];
    async function loadAudit(beforeId) {
      const res = await get('/api/v1/audit?' + qs({ before: beforeId, limit: 50 }));
      const got = res.entries || [];
      rows.push(...got);
      fill(auditBox, table([
        { label: 'At', cell: a => fmtTime(a.at) }, { label: 'Who', cell: a => a.who },
        { label: 'Action', cell: a => h('code', null, a.action) }, { label: 'Target', cell: a => a.target, wrap: 1 },
        { label: 'Count', num: 1, cell: a => a.count ? num(a.count, 0) : '' }, { label: 'Detail', cell: a => a.detail, wrap: 1 },
      ], rows, { test: 'audit-table', empty: 'Nothing yet.', rowAttrs: a => ({ test: 'audit-row', 'data-action': a.action }) }));
      fill(more, got.length === 50 ? h('button', { type: 'button', test: 'audit-older', onclick: () => loadAudit(got[got.length - 1].id).catch(fail) }, 'Older') : '');
    }
    let at = Date.now();
    const ready = (async () => { await overview().catch(() => null); await Promise.all([loadStack(), loadAudit()]); })();
    return { ready, live: () => { if (Date.now() - at > 5000) { at = Date.now(); loadStack().catch(() => {}); } } };
  }

  // ---- start ----
  $('#login-form').addEventListener('submit', onLogin);
  $('#logout').addEventListener('click', logout);
  setLive('closed');
  document.body.append(h('datalist', { id: 'cmds' }, CMDS.map(c => h('option', { value: c }))));
  get('/api/v1/whoami').then(me => { S.me = me; started(); }, e => showLogin(e.status === 401 ? '' : 'The daemon did not answer: ' + e.message));
})();
