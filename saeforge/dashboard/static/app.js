/* saeforge feature dashboard: a dependency-free single-page app.
 *
 * Routes (in the URL hash, so the page works from file:// too):
 *   #/            the latent index: sortable, searchable, filterable, paginated
 *   #/latent/N    one latent: stats, histograms, logit effects, neighbours, top and quantile-band examples
 *
 * Data arrives through <script> tags calling SAEFORGE.setIndex(...) (data/index.js) and
 * SAEFORGE.addShard(...) (data/shards/NNNNN.js); a latent page loads only its own shard.
 */
(function () {
  "use strict";

  var S = (window.SAEFORGE = {
    index: null,
    shards: {},
    waiting: {},
    state: { query: "", sort: "id", dir: 1, kind: "all", dmin: "", dmax: "", page: 0 },
  });
  var PAGE = 100;

  // ------------------------------------------------------------------ small helpers
  function el(tag, attrs) {
    var e = document.createElement(tag);
    if (attrs) {
      for (var k in attrs) {
        if (attrs[k] === null || attrs[k] === undefined) continue;
        if (k === "text") e.textContent = attrs[k];
        else if (k === "cls") e.className = attrs[k];
        else if (k.slice(0, 2) === "on") e.addEventListener(k.slice(2), attrs[k]);
        else e.setAttribute(k, attrs[k]);
      }
    }
    for (var i = 2; i < arguments.length; i++) {
      var c = arguments[i];
      if (c === null || c === undefined) continue;
      if (Array.isArray(c)) c.forEach(function (x) { if (x) e.appendChild(x); });
      else e.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
    }
    return e;
  }
  var SVGNS = "http://www.w3.org/2000/svg";
  function svg(tag, attrs) {
    var e = document.createElementNS(SVGNS, tag);
    for (var k in attrs) e.setAttribute(k, attrs[k]);
    return e;
  }
  function fmt(x, digits) {
    if (x === null || x === undefined || isNaN(x)) return "–";
    if (x === 0) return "0";
    var a = Math.abs(x);
    if (a >= 1e4 || a < 1e-3) return x.toExponential(2);
    return Number(x.toPrecision(digits || 4)).toString();
  }
  function pct(x) {
    if (x === 0) return "0%";
    if (x < 1e-4) return (x * 100).toExponential(1) + "%";
    return Number((x * 100).toPrecision(3)) + "%";
  }
  function shownToken(s) {
    return s.replace(/\n/g, "↵").replace(/\t/g, "⇥");
  }
  function setView(node) {
    var app = document.getElementById("app");
    app.textContent = "";
    app.appendChild(node);
  }
  S.fail = function (msg) {
    setView(el("p", { cls: "error", text: msg }));
  };

  // ------------------------------------------------------------------ data loading
  function shardOf(id) {
    return Math.floor(id / S.index.info.shard_size);
  }
  function pad(k) {
    var s = String(k);
    while (s.length < 5) s = "0" + s;
    return s;
  }
  S.setIndex = function (d) {
    S.index = d;
    var i = d.info;
    document.getElementById("run-info").textContent =
      i.arch + " · " + i.d_sae + " latents · " + i.hook + (i.transcoder ? " → " + i.target_hook : "") +
      " · " + i.model + " · " + Number(i.n_tokens).toLocaleString() + " tokens";
    route();
  };
  S.addShard = function (d) {
    var k = shardOf(d.first);
    S.shards[k] = d;
    (S.waiting[k] || []).forEach(function (cb) { cb(d); });
    delete S.waiting[k];
  };
  function loadShard(k, done, fail) {
    if (S.shards[k]) return done(S.shards[k]);
    var first = !S.waiting[k];
    (S.waiting[k] = S.waiting[k] || []).push(done);
    if (!first) return;
    var tag = el("script", { src: "data/shards/" + pad(k) + ".js" });
    tag.onerror = function () { fail("could not load data/shards/" + pad(k) + ".js"); };
    document.body.appendChild(tag);
  }

  // ------------------------------------------------------------------ routing
  function route() {
    if (!S.index) return;
    hideTip();
    var m = /^#\/latent\/(\d+)/.exec(location.hash);
    if (m) showLatent(parseInt(m[1], 10));
    else showIndex();
    window.scrollTo(0, 0);
  }
  window.addEventListener("hashchange", route);

  // ------------------------------------------------------------------ index view
  var COLS = [
    { key: "id", label: "latent", num: true },
    { key: "density", label: "density", num: true },
    { key: "max", label: "max act", num: true },
    { key: "mean_active", label: "mean act (when firing)", num: true },
    { key: "tokens", label: "top tokens", num: false },
    { key: "logits", label: "top logits", num: false },
    { key: "expl", label: "explanation", num: false },
  ];

  function matches(i) {
    var ix = S.index, st = S.state, d = ix.density[i];
    if (st.kind === "dead" && d > 0) return false;
    if (st.kind === "alive" && d === 0) return false;
    if (st.kind === "dense" && d <= ix.info.dense_threshold) return false;
    if (st.dmin !== "" && d * 100 < parseFloat(st.dmin)) return false;
    if (st.dmax !== "" && d * 100 > parseFloat(st.dmax)) return false;
    var q = st.query.trim().toLowerCase();
    if (!q) return true;
    if (q[0] === "#") return String(ix.id[i]) === q.slice(1);
    if ((ix.expl[i] || "").toLowerCase().indexOf(q) >= 0) return true;
    var toks = ix.tokens[i].concat(ix.logits[i]);
    for (var t = 0; t < toks.length; t++) if (toks[t].toLowerCase().indexOf(q) >= 0) return true;
    return false;
  }

  function sortedRows() {
    var ix = S.index, st = S.state, rows = [];
    for (var i = 0; i < ix.id.length; i++) if (matches(i)) rows.push(i);
    var col = ix[st.sort];
    var key = function (i) {
      var v = col[i];
      if (Array.isArray(v)) return (v[0] || "").toLowerCase();
      return typeof v === "string" ? v.toLowerCase() : v;
    };
    rows.sort(function (a, b) {
      var x = key(a), y = key(b);
      if (x < y) return -st.dir;
      if (x > y) return st.dir;
      return ix.id[a] - ix.id[b];
    });
    return rows;
  }

  function chips(list, cls) {
    return el("span", { cls: "chips" }, list.map(function (t) {
      return el("span", { cls: "chip " + (cls || ""), text: shownToken(t) });
    }));
  }

  function showIndex() {
    var ix = S.index, st = S.state;
    var search = el("input", { id: "search", type: "search", placeholder: "search tokens or explanations (#12 for a latent id)",
      value: st.query, oninput: function () { st.query = search.value; st.page = 0; renderTable(); } });
    var kind = el("select", { id: "filter-kind", onchange: function () { st.kind = kind.value; st.page = 0; renderTable(); } },
      [["all", "all latents"], ["alive", "firing"], ["dead", "dead (never fired)"],
       ["dense", "dense (> " + pct(ix.info.dense_threshold) + ")"]].map(function (o) {
        return el("option", { value: o[0], text: o[1] });
      }));
    kind.value = st.kind;
    var dmin = el("input", { id: "density-min", type: "number", step: "any", min: "0", placeholder: "min %", value: st.dmin,
      oninput: function () { st.dmin = dmin.value; st.page = 0; renderTable(); } });
    var dmax = el("input", { id: "density-max", type: "number", step: "any", min: "0", placeholder: "max %", value: st.dmax,
      oninput: function () { st.dmax = dmax.value; st.page = 0; renderTable(); } });
    var count = el("span", { id: "match-count", cls: "muted" });
    var table = el("table", { id: "latent-table", cls: "latents" });
    var pager = el("div", { cls: "pager" });
    setView(el("section", { cls: "index" },
      el("div", { cls: "controls" }, search, kind, el("label", { cls: "muted" }, "density ", dmin, " – ", dmax), count),
      table, pager));
    search.focus();

    function renderTable() {
      var rows = sortedRows();
      var pages = Math.max(1, Math.ceil(rows.length / PAGE));
      if (st.page >= pages) st.page = pages - 1;
      count.textContent = rows.length.toLocaleString() + " of " + ix.id.length.toLocaleString() + " latents";
      var head = el("tr", null, COLS.map(function (c) {
        var mark = st.sort === c.key ? (st.dir > 0 ? " ▲" : " ▼") : "";
        return el("th", { "data-key": c.key, cls: st.sort === c.key ? "sorted" : null, title: "sort by " + c.label,
          onclick: function () {
            if (st.sort === c.key) st.dir = -st.dir;
            else { st.sort = c.key; st.dir = c.num && c.key !== "id" ? -1 : 1; }
            renderTable();
          } }, c.label + mark);
      }));
      var maxd = 0;
      for (var j = 0; j < ix.density.length; j++) maxd = Math.max(maxd, ix.density[j]);
      var body = el("tbody", null, rows.slice(st.page * PAGE, (st.page + 1) * PAGE).map(function (i) {
        var d = ix.density[i], link = "#/latent/" + ix.id[i];
        var bar = el("span", { cls: "dbar" }, el("span", { style: "width:" + (maxd > 0 ? (100 * Math.sqrt(d / maxd)).toFixed(1) : 0) + "%" }));
        return el("tr", { "data-id": ix.id[i], cls: d === 0 ? "dead" : null, onclick: function (ev) {
            if (ev.target.tagName !== "A") location.hash = link; } },
          el("td", { cls: "num" }, el("a", { href: link, text: String(ix.id[i]) })),
          el("td", { cls: "num", "data-value": d }, bar, pct(d)),
          el("td", { cls: "num", "data-value": ix.max[i] }, fmt(ix.max[i])),
          el("td", { cls: "num", "data-value": ix.mean_active[i] }, fmt(ix.mean_active[i])),
          el("td", null, chips(ix.tokens[i])),
          el("td", null, chips(ix.logits[i], "logit")),
          el("td", { cls: "expl" }, ix.expl[i] || "", ix.f1[i] !== null && ix.f1[i] !== undefined ?
            el("span", { cls: "muted", text: " F1 " + fmt(ix.f1[i], 2) }) : null));
      }));
      table.textContent = "";
      table.appendChild(el("thead", null, head));
      table.appendChild(body);
      pager.textContent = "";
      if (pages > 1) {
        pager.appendChild(el("button", { id: "prev-page", disabled: st.page === 0 ? "" : null,
          onclick: function () { st.page--; renderTable(); } }, "‹ prev"));
        pager.appendChild(el("span", { cls: "muted", text: " page " + (st.page + 1) + " / " + pages + " " }));
        pager.appendChild(el("button", { id: "next-page", disabled: st.page === pages - 1 ? "" : null,
          onclick: function () { st.page++; renderTable(); } }, "next ›"));
      }
    }
    renderTable();
  }

  // ------------------------------------------------------------------ latent view
  function showLatent(id) {
    var n = S.index.id.length;
    if (id < 0 || id >= n) return S.fail("latent " + id + " does not exist (0–" + (n - 1) + ")");
    setView(el("p", { cls: "loading", text: "Loading latent " + id + "…" }));
    loadShard(shardOf(id), function (shard) {
      var rec = shard.latents[id - shard.first];
      if ((location.hash.match(/^#\/latent\/(\d+)/) || [])[1] !== String(id)) return; // navigated away
      renderLatent(rec, shard.vocab);
    }, S.fail);
  }

  function histogram(counts, lo, hi, opts) {
    var W = 420, H = 120, pb = 18, w = (W - 10) / counts.length;
    var top = Math.max.apply(null, counts.concat([1e-12]));
    var root = svg("svg", { viewBox: "0 0 " + W + " " + H, width: W, height: H, "class": "hist" });
    counts.forEach(function (c, b) {
      var h = (H - pb - 6) * (opts.log ? Math.log1p(c) / Math.log1p(top) : c / top);
      var x0 = lo + (hi - lo) * b / counts.length, x1 = lo + (hi - lo) * (b + 1) / counts.length;
      var fill = opts.signed ? (x1 <= 0 ? "#d9534f" : x0 >= 0 ? "#3a7bd5" : "#999") : opts.color;
      var r = svg("rect", { x: 5 + b * w, y: H - pb - h, width: Math.max(w - 1, 1), height: h, fill: fill });
      var t = svg("title", {});
      t.textContent = fmt(x0) + " – " + fmt(x1) + ": " + fmt(c, 3);
      r.appendChild(t);
      root.appendChild(r);
    });
    [[5, lo, "start"], [W - 5, hi, "end"]].forEach(function (a) {
      var t = svg("text", { x: a[0], y: H - 4, "text-anchor": a[2], "font-size": 11, fill: "#666" });
      t.textContent = fmt(a[1]);
      root.appendChild(t);
    });
    return root;
  }

  function tokenRow(ex, vocab, vmax) {
    // ex = [value, doc, pos, centre, token ids, acts]
    var toks = ex[4], acts = ex[5];
    return el("div", { cls: "example", "data-value": ex[0] },
      el("span", { cls: "ex-val", title: "doc " + ex[1] + ", token " + ex[2], text: fmt(ex[0]) }),
      el("span", { cls: "ex-text" }, toks.map(function (t, j) {
        var a = acts[j], s = vocab[t] !== undefined ? vocab[t] : "<" + t + ">";
        var alpha = vmax > 0 ? Math.max(0, Math.min(1, a / vmax)) : 0;
        return el("span", {
          cls: "tok" + (j === ex[3] ? " centre" : "") + (a > 0 ? " on" : ""),
          "data-act": a, "data-token": s,
          title: JSON.stringify(s) + " · activation " + fmt(a),
          style: a > 0 ? "background-color: rgba(255, 110, 20, " + (0.12 + 0.88 * alpha).toFixed(3) + ")" : null,
        }, shownToken(s));
      })));
  }

  function logitTable(list, vocab, cls) {
    var big = Math.max.apply(null, list.map(function (p) { return Math.abs(p[1]); }).concat([1e-12]));
    return el("table", { cls: "logits " + cls }, el("tbody", null, list.map(function (p) {
      return el("tr", null,
        el("td", { cls: "tokcell" }, el("code", { text: shownToken(vocab[p[0]] !== undefined ? vocab[p[0]] : "<" + p[0] + ">") })),
        el("td", { cls: "num" }, fmt(p[1], 3)),
        el("td", { cls: "barcell" }, el("span", { cls: "lbar " + cls, style: "width:" + (100 * Math.abs(p[1]) / big).toFixed(1) + "%" })));
    })));
  }

  function renderLatent(rec, vocab) {
    var n = S.index.id.length, id = rec.id;
    var nav = el("div", { cls: "latent-nav" },
      el("a", { href: "#/", text: "← all latents" }),
      id > 0 ? el("a", { href: "#/latent/" + (id - 1), text: "‹ " + (id - 1) }) : null,
      id < n - 1 ? el("a", { href: "#/latent/" + (id + 1), text: (id + 1) + " ›" }) : null);
    var ex = rec.explanation;
    var stats = el("div", { cls: "cards" },
      card("density", pct(rec.density), rec.fires.toLocaleString() + " tokens"),
      card("max activation", fmt(rec.max)),
      card("mean when firing", fmt(rec.mean_active)),
      card("mean over all tokens", fmt(rec.mean)));
    var parts = [nav, el("h1", null, "Latent " + id, rec.fires === 0 ? el("span", { cls: "badge dead", text: "dead" }) : null), stats];
    if (ex) {
      parts.push(el("div", { cls: "explanation" }, el("h2", { text: "Explanation (N2G)" }),
        el("code", { id: "explanation", text: ex.pattern || "" }),
        el("div", { cls: "muted", text: ["precision", "recall", "f1"].filter(function (k) { return ex[k] !== undefined; })
          .map(function (k) { return k + " " + fmt(ex[k], 3); }).join(" · ") })));
    }
    var side = el("div", { cls: "side" });
    if (rec.hist) side.appendChild(el("div", { cls: "panel" }, el("h2", { text: "Activation histogram (non-zero)" }),
      histogram(rec.hist.counts, rec.hist.lo, rec.hist.hi, { color: "#f07f2a" })));
    if (rec.logits) {
      side.appendChild(el("div", { cls: "panel" }, el("h2", { text: "Logit effects" + (S.index.info.transcoder ? " (of the output)" : "") }),
        el("div", { cls: "two" },
          el("div", null, el("h3", { text: "promotes" }), logitTable(rec.logits.pos, vocab, "pos")),
          el("div", null, el("h3", { text: "suppresses" }), logitTable(rec.logits.neg, vocab, "neg"))),
        histogram(rec.logits.hist.counts, rec.logits.hist.lo, rec.logits.hist.hi, { signed: true, log: true })));
    }
    if (rec.decoder_norms) {
      side.appendChild(el("div", { cls: "panel" }, el("h2", { text: "Decoder norm per hook" }),
        el("ul", { cls: "neighbors" }, Object.keys(rec.decoder_norms).map(function (h) {
          return el("li", null, el("span", { text: h }), el("span", { cls: "muted", text: " " + fmt(rec.decoder_norms[h], 3) }));
        }))));
    }
    if (rec.neighbors) {
      side.appendChild(el("div", { cls: "panel" }, el("h2", { text: "Nearest latents (decoder cosine)" }),
        el("ul", { cls: "neighbors" }, rec.neighbors.map(function (p) {
          return el("li", null, el("a", { href: "#/latent/" + p[0], text: "#" + p[0] }), el("span", { cls: "muted", text: " " + fmt(p[1], 3) }));
        }))));
    }
    var mainCol = el("div", { cls: "examples" });
    mainCol.appendChild(el("h2", { text: "Top activations" + (S.index.info.transcoder ? " (input hook " + S.index.info.hook + ")" : "") }));
    var top = el("div", { id: "top-examples", cls: "example-list" }, rec.top.map(function (e) { return tokenRow(e, vocab, rec.max); }));
    if (!rec.top.length) top.appendChild(el("p", { cls: "muted", text: "This latent never fired on the data." }));
    mainCol.appendChild(top);
    (rec.bands || []).forEach(function (b, k) {
      if (!b.examples.length) return;
      mainCol.appendChild(el("h3", { cls: "band-head", text: "Quantile " + Math.round(b.q[0] * 100) + "–" + Math.round(b.q[1] * 100) +
        "%  ·  activation " + fmt(b.range[0]) + " – " + fmt(b.range[1]) }));
      mainCol.appendChild(el("div", { cls: "example-list band", "data-band": k }, b.examples.map(function (e) { return tokenRow(e, vocab, rec.max); })));
    });
    parts.push(el("div", { cls: "latent-body" }, mainCol, side));
    setView(el("section", { cls: "latent", id: "latent-" + id }, parts));
  }

  function card(label, value, sub) {
    return el("div", { cls: "card" }, el("div", { cls: "card-label", text: label }), el("div", { cls: "card-value", text: value }),
      sub ? el("div", { cls: "muted", text: sub }) : null);
  }

  // ------------------------------------------------------------------ hover tooltip
  var tip = null;
  function hideTip() { if (tip) tip.hidden = true; }
  document.addEventListener("mouseover", function (ev) {
    var t = ev.target;
    tip = tip || document.getElementById("tooltip");
    if (!t.classList || !t.classList.contains("tok")) return hideTip();
    tip.textContent = JSON.stringify(t.getAttribute("data-token")) + "  activation " + fmt(parseFloat(t.getAttribute("data-act")));
    var r = t.getBoundingClientRect();
    tip.style.left = Math.round(r.left + window.scrollX) + "px";
    tip.style.top = Math.round(r.bottom + window.scrollY + 4) + "px";
    tip.hidden = false;
  });
})();
