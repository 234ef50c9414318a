(function () {
  "use strict";
  const D = JSON.parse(document.getElementById("review-data").textContent);
  const rows = D.rows;
  const served = location.protocol.indexOf("http") === 0;
  // the served page's URL carries the server's per-run token; posting decisions needs it back
  const token = served ? new URLSearchParams(location.search).get("token") : null;
  function originalSrc(r) { return r.original ? (served ? "original/" + encodeURIComponent(r.id) : r.original) : null; }
  const PAGE = 200;
  const $ = (id) => document.getElementById(id);
  const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"})[c]);
  const fmt = (v) => (v === null || v === undefined) ? "–" : Number(v).toPrecision(4);
  rows.forEach((r, i) => { r._i = i; });
  // every scored image's score, ascending: the counts cover all images, while ``rows`` may hold
  // only the highest-scoring ones (``anomaly review --max-rows``)
  const all = (function () {
    const bin = atob(D.scores), bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    return D.scores_dtype === "f8" ? new Float64Array(bytes.buffer) : new Float32Array(bytes.buffer);
  })();
  function countAbove(t) {  // images with score > t
    let lo = 0, hi = all.length;
    while (lo < hi) { const m = (lo + hi) >> 1; if (all[m] > t) hi = m; else lo = m + 1; }
    return all.length - lo;
  }
  const maxScore = all.length ? all[all.length - 1] : 1;
  const storeKey = "anomaly-review:" + D.bundle_sha256 + ":" + D.title;
  const state = {thr: D.threshold !== null ? D.threshold : maxScore, filter: "all", shown: PAGE, sel: null};
  const decisions = new Map(Object.entries(D.decisions || {}));
  try {
    const saved = JSON.parse(localStorage.getItem(storeKey) || "{}");
    for (const k in saved) if (!decisions.has(k)) decisions.set(k, saved[k]);
  } catch (e) { /* storage unavailable: decisions live in this page only */ }

  const flagged = (r) => r.error === null && r.score !== null && r.score > state.thr;
  const FILTERS = {
    all: () => true, flagged: flagged, passed: (r) => r.error === null && !flagged(r),
    errors: (r) => r.error !== null, undecided: (r) => flagged(r) && !decisions.has(r.path),
  };

  $("meta").textContent = [
    "model " + (D.model || "?"), "bundle " + (D.bundle || "?"), "sha256 " + String(D.bundle_sha256).slice(0, 12) + "…",
    "calibrated threshold " + (D.threshold === null ? "none" : fmt(D.threshold) + " (" + (D.method || "?") + ")"),
    D.total + " images" + (rows.length < D.total ? " (" + rows.length + " listed)" : ""), "generated " + D.generated,
  ].join("  ·  ");
  if (rows.length < D.total) {
    $("listed-note").hidden = false;
    $("listed-note").textContent = "This page lists " + rows.length + " of the " + D.total + " images: the highest scores" +
      (D.n_errors ? ", failures" : "") + " and any with a saved decision. Counts and the histogram cover all of them; " +
      "every row is in results.csv, and `anomaly review --max-rows N` lists more.";
  }

  // -- threshold ---------------------------------------------------------------------------
  const slider = $("thr-slider"), input = $("thr-input");
  slider.min = D.lo; slider.max = D.hi; slider.step = (D.hi - D.lo) / 2000;
  const hist = $("histogram");
  const hx = (v) => Number(hist.dataset.left) + (v - Number(hist.dataset.lo)) / (Number(hist.dataset.hi) - Number(hist.dataset.lo)) * Number(hist.dataset.width);

  function setThreshold(v, fromSlider) {
    if (!isFinite(v)) return;
    state.thr = v;
    if (!fromSlider) slider.value = v;
    input.value = Number(v).toPrecision(6);
    const x = Math.max(Number(hist.dataset.left), Math.min(hx(v), Number(hist.dataset.left) + Number(hist.dataset.width)));
    const line = $("thr-line"), label = $("thr-label");
    line.setAttribute("x1", x); line.setAttribute("x2", x);
    label.setAttribute("x", x + 4); label.textContent = fmt(v);
    update();
  }
  slider.addEventListener("input", () => setThreshold(Number(slider.value), true));
  input.addEventListener("change", () => setThreshold(Number(input.value), false));
  $("thr-reset").addEventListener("click", () => setThreshold(D.threshold !== null ? D.threshold : maxScore, false));
  $("thr-reset").disabled = D.threshold === null;

  // -- list --------------------------------------------------------------------------------
  const tbody = document.querySelector("#rows tbody");
  function decisionButtons(r) {
    const d = decisions.get(r.path);
    if (r.error !== null || (!flagged(r) && !d)) return "";
    return '<span class="dec"><button type="button" class="d-defect' + (d === "defect" ? " on" : "") + '" data-decision="defect">defect</button>' +
      '<button type="button" class="d-fa' + (d === "false_alarm" ? " on" : "") + '" data-decision="false_alarm">false alarm</button></span>';
  }
  function verdict(r) {
    if (r.error !== null) return '<span class="badge error">error</span>';
    return flagged(r) ? '<span class="badge flagged">flagged</span>' : '<span class="badge passed">passed</span>';
  }
  function rowHTML(r, i) {
    const w = r.score === null ? 0 : Math.max(2, Math.min(100, 100 * (r.score - D.lo) / (D.hi - D.lo)));
    // an image passed under `--heatmaps flagged` has neither: the original (a small browser image) stands in
    const thumb = r.thumb || r.heatmap || originalSrc(r);
    return '<tr class="row' + (flagged(r) ? " flag" : "") + (state.sel === r ? " sel" : "") + '" data-i="' + r._i + '">' +
      "<td>" + (i + 1) + "</td>" +
      "<td>" + (thumb ? '<img class="thumb" loading="lazy" src="' + esc(thumb) + '" alt="">' : '<div class="thumb"></div>') + "</td>" +
      '<td><div class="name">' + esc(r.name) + " " + verdict(r) + '</div><div class="path">' + esc(r.path) + "</div>" +
      (r.error !== null ? '<div class="path">' + esc(r.error) + "</div>" : "") + "</td>" +
      "<td>" + fmt(r.score) + '<div class="bar"><i style="width:' + w + '%"></i></div></td>' +
      "<td>" + fmt(r.probability) + "</td>" +
      "<td>" + (r.error !== null ? "" : r.regions.length) + "</td>" +
      "<td>" + decisionButtons(r) + "</td></tr>";
  }
  function visible() { return rows.filter(FILTERS[state.filter]); }
  function renderList() {
    const v = visible();
    tbody.innerHTML = v.slice(0, state.shown).map(rowHTML).join("");
    $("more").hidden = v.length <= state.shown;
    $("more").textContent = "show more (" + (v.length - state.shown) + " left)";
  }
  function update() {
    const nFlag = countAbove(state.thr);
    const counts = {all: D.total, flagged: nFlag, passed: all.length - nFlag, errors: D.n_errors,
                    undecided: nFlag - rows.filter((r) => flagged(r) && decisions.has(r.path)).length};
    $("flagged-count").textContent = nFlag + " of " + all.length + " flagged at threshold " + fmt(state.thr);
    document.querySelectorAll("#filters button").forEach((b) => {
      b.querySelector("span").textContent = counts[b.dataset.filter];
    });
    let nd = 0, nf = 0;
    decisions.forEach((d) => { if (d === "defect") nd++; else nf++; });
    $("decision-count").textContent = nd + " defect, " + nf + " false alarm marked";
    renderList();
    if (state.sel) renderViewer();
  }
  $("filters").addEventListener("click", (e) => {
    const b = e.target.closest("button");
    if (!b) return;
    state.filter = b.dataset.filter; state.shown = PAGE;
    document.querySelectorAll("#filters button").forEach((x) => x.classList.toggle("active", x === b));
    update();
  });
  $("more").addEventListener("click", () => { state.shown += PAGE; renderList(); });
  tbody.addEventListener("click", (e) => {
    const tr = e.target.closest("tr.row");
    if (!tr) return;
    const r = rows[Number(tr.dataset.i)];
    const b = e.target.closest("button[data-decision]");
    if (b) decide(r, b.dataset.decision);
    select(r);
  });

  // -- decisions ---------------------------------------------------------------------------
  function persist() {
    try { localStorage.setItem(storeKey, JSON.stringify(Object.fromEntries(decisions))); } catch (e) { /* ignore */ }
  }
  function decide(r, d) {
    if (!r || r.error !== null) return;
    if (decisions.get(r.path) === d) decisions.delete(r.path); else decisions.set(r.path, d);
    persist(); update();
  }
  function decisionsDoc() {
    const byPath = new Map(rows.map((r) => [r.path, r]));
    const list = [];
    decisions.forEach((d, p) => { const r = byPath.get(p); if (r && r.score !== null) list.push({path: p, score: r.score, decision: d}); });
    return {bundle_sha256: D.bundle_sha256, decisions: list, threshold: state.thr, calibrated_threshold: D.threshold,
            saved: new Date().toISOString()};
  }
  function save() {
    const text = JSON.stringify(decisionsDoc(), null, 2);
    window.anomalyReview.lastSaved = text;
    const a = $("download");
    if (a.href) URL.revokeObjectURL(a.href);
    a.href = URL.createObjectURL(new Blob([text], {type: "application/json"}));
    if (!window.anomalyReview.noDownload) a.click();
    $("save-status").textContent = "downloaded decisions.json";
    if (served) {
      fetch("decisions", {method: "POST", body: text,
                          headers: {"Content-Type": "application/json", "X-Review-Token": token || ""}})
        .then((r) => r.json()).then((j) => {
          $("save-status").textContent = j.ok ? "saved " + j.n + " decision(s) to " + j.path : "server refused: " + j.error;
          window.anomalyReview.serverReply = j;
        }).catch((e) => { $("save-status").textContent = "server unreachable: " + e; });
    }
  }
  $("save").addEventListener("click", save);

  // -- viewer ------------------------------------------------------------------------------
  function select(r) { state.sel = r; renderViewer(); renderList(); }
  function renderViewer() {
    const r = state.sel;
    $("viewer-empty").hidden = !!r; $("viewer-body").hidden = !r;
    if (!r) return;
    $("v-name").textContent = r.name;
    $("v-verdict").className = "badge " + (r.error !== null ? "error" : flagged(r) ? "flagged" : "passed");
    $("v-verdict").textContent = r.error !== null ? "error" : flagged(r) ? "flagged" : "passed";
    $("v-path").textContent = r.path;
    $("v-facts").textContent = r.error !== null ? "" : "score " + fmt(r.score) + "  ·  P(defect) " + fmt(r.probability) +
      "  ·  " + r.width + "×" + r.height + " px  ·  " + r.regions.length + " region(s)";
    const d = decisions.get(r.path);
    $("v-defect").classList.toggle("on", d === "defect"); $("v-fa").classList.toggle("on", d === "false_alarm");
    $("v-error").hidden = r.error === null; $("v-error").textContent = r.error || "";
    const orig = $("v-orig"), heat = $("v-heat");
    const src = originalSrc(r) || r.thumb || r.heatmap || "";
    if (orig.dataset.src !== src) {
      orig.dataset.src = src;
      const fallback = r.thumb || r.heatmap;  // the original moved, or the browser cannot decode it
      orig.onerror = () => { if (fallback && orig.getAttribute("src") !== fallback) orig.src = fallback; };
      if (src) orig.src = src; else orig.removeAttribute("src");
    }
    if (r.heatmap) { heat.src = r.heatmap; heat.hidden = false; } else { heat.hidden = true; heat.removeAttribute("src"); }
    heat.style.opacity = $("opacity").value;
    const svg = $("v-boxes");
    svg.setAttribute("viewBox", "0 0 " + (r.width || 1) + " " + (r.height || 1));
    svg.innerHTML = r.regions.map((g) => '<rect x="' + g.x + '" y="' + g.y + '" width="' + g.w + '" height="' + g.h + '"></rect>').join("");
    svg.style.display = $("boxes").checked ? "" : "none";
    $("v-recon-fig").hidden = !r.recon;
    if (r.recon) $("v-recon").src = r.recon;
    $("v-regions").innerHTML = r.regions.length ? "<tr><th>#</th><th>x</th><th>y</th><th>w</th><th>h</th><th>area</th><th>peak</th></tr>" +
      r.regions.map((g, i) => "<tr><td>" + (i + 1) + "</td><td>" + g.x + "</td><td>" + g.y + "</td><td>" + g.w + "</td><td>" + g.h +
        "</td><td>" + g.area + "</td><td>" + fmt(g.peak) + "</td></tr>").join("") : "";
  }
  $("opacity").addEventListener("input", () => { $("v-heat").style.opacity = $("opacity").value; });
  function setZoom(z) {
    z = Math.max(1, Math.min(8, z));
    $("zoom").value = z; $("zoom-val").textContent = z + "x"; $("zoom-inner").style.width = (100 * z) + "%";
  }
  $("zoom").addEventListener("input", () => setZoom(Number($("zoom").value)));
  $("zoom-outer").addEventListener("wheel", (e) => {
    if (!e.ctrlKey && !e.altKey) return;
    e.preventDefault(); setZoom(Number($("zoom").value) * (e.deltaY < 0 ? 1.25 : 0.8));
  }, {passive: false});
  $("boxes").addEventListener("change", () => { $("v-boxes").style.display = $("boxes").checked ? "" : "none"; });
  $("v-defect").addEventListener("click", () => decide(state.sel, "defect"));
  $("v-fa").addEventListener("click", () => decide(state.sel, "false_alarm"));
  document.addEventListener("keydown", (e) => {
    if (e.target.tagName === "INPUT" || e.metaKey || e.ctrlKey) return;
    const v = visible(), i = state.sel ? v.indexOf(state.sel) : -1;
    if (e.key === "j" && i + 1 < v.length) { if (i + 1 >= state.shown) state.shown += PAGE; select(v[i + 1]); }
    else if (e.key === "k" && i > 0) select(v[i - 1]);
    else if (e.key === "d") decide(state.sel, "defect");
    else if (e.key === "f") decide(state.sel, "false_alarm");
    else if (e.key === "u" && state.sel) { decisions.delete(state.sel.path); persist(); update(); }
  });

  window.anomalyReview = {
    lastSaved: null, serverReply: null, noDownload: false,
    decisionsJSON: () => JSON.stringify(decisionsDoc()),
    setThreshold: (v) => setThreshold(v, false), decide: (path, d) => decide(rows.find((r) => r.path === path), d),
  };
  slider.value = state.thr;
  setThreshold(state.thr, false);
  if (rows.length) select(rows[0]);
})();
