"""The scatterplot (a Bokeh figure, WebGL) and the HTML page around it: controls, legend with
counts, filters, the side panel and the labelling buttons.

The page is the same for the live app and for ``--static``. Live, BokehJS and the thumbnails come
from the local server on demand. Static, BokehJS is inlined, every thumbnail is a data URI and
the side panel reads precomputed neighbours: one file that works offline, read-only.
"""

from __future__ import annotations

import base64
import html
import json

import numpy as np

from .data import CELL_COLOURS, CELLS, CLUSTER_COLOURS, LABEL_COLOURS, Points, _viridis

#: BokehJS files the live page loads from the local server.
BOKEH_JS = ("bokeh.min.js", "bokeh-gl.min.js")
NEIGHBOURS = 8


def columns(points: Points, labels: list[str], origins: list[str], thumbs: list[str]) -> dict:
    """The ColumnDataSource's columns: coordinates, what the tooltip and filters show, and one
    precomputed colour column per colouring (the page switches between them)."""
    p = points.probability
    prob_text = ["–" if not np.isfinite(v) else f"{v:.3f}" for v in p]
    cell_colours = [CELL_COLOURS[c] for c in points.cell]
    return {
        "x": points.xy[:, 0].astype(float), "y": points.xy[:, 1].astype(float),
        "i": np.arange(len(points)),
        "prob": np.nan_to_num(p.astype(float), nan=-1.0), "prob_text": prob_text,
        "cell": points.cell, "label": labels, "origin": origins,
        "scene": points.scene, "name": points.name, "cluster": points.cluster.astype(int),
        "flagged": (points.flagged if points.flagged is not None else points.predicted.astype(bool)).astype(int),
        "thumb": thumbs,
        "c_cell": cell_colours, "c_prob": _viridis(p), "c_label": [LABEL_COLOURS[t] for t in labels],
        "c_cluster": [CLUSTER_COLOURS[c % len(CLUSTER_COLOURS)] if c >= 0 else "#bbbbbb" for c in points.cluster],
        "c_flagged": ["#d73027" if f else "#4575b4" for f in
                      (points.flagged if points.flagged is not None else points.predicted.astype(bool))],
        "color": cell_colours if points.kind == "dataset" else _viridis(p),
    }


def figure_item(points: Points, data: dict) -> dict:
    """The Bokeh figure as a ``json_item`` (embedded by ``Bokeh.embed.embed_item``)."""
    from bokeh.embed import json_item

    return json_item(build_figure(points, data), "plot")


def build_figure(points: Points, data: dict):
    """The scatterplot: WebGL dots coloured by ``data["color"]``, a thumbnail tooltip, tap, box and
    lasso selection."""
    from bokeh.models import (
        BoxSelectTool,
        CDSView,
        ColumnDataSource,
        CustomJS,
        HoverTool,
        IndexFilter,
        LassoSelectTool,
        TapTool,
    )
    from bokeh.plotting import figure

    source = ColumnDataSource(data, name="points")
    view = CDSView(filter=IndexFilter(list(range(len(points))), name="filter"))
    fig = figure(width=860, height=720, output_backend="webgl", tools="pan,wheel_zoom,reset,save",
                 active_scroll="wheel_zoom", toolbar_location="above", name="scatter",
                 title=f"{points.method.upper()} of {points.what}")
    size = 7 if len(points) < 5000 else 4
    renderer = fig.scatter("x", "y", source=source, view=view, size=size, fill_color="color", line_color=None,
                           fill_alpha=0.85, selection_line_color="black", selection_fill_alpha=1.0,
                           nonselection_fill_alpha=0.25, name="dots")
    hover = HoverTool(renderers=[renderer], tooltips="""
        <div class="amber-tip" style="width:110px">
          <img class="amber-thumb" src="@thumb" width="96" height="96" style="object-fit:contain;display:block">
          <div style="font:11px sans-serif">p = @prob_text · @label</div>
          <div style="font:10px sans-serif;color:#555">@cell</div>
        </div>""")
    fig.add_tools(hover, TapTool(renderers=[renderer]), BoxSelectTool(renderers=[renderer]),
                  LassoSelectTool(renderers=[renderer]))
    fig.xaxis.visible = fig.yaxis.visible = False
    fig.grid.visible = False
    source.selected.js_on_change("indices", CustomJS(code="if (window.amber) window.amber.selected(cb_obj.indices)"))
    return fig


def static_extras(points: Points) -> dict:
    """What the static page's panel shows without a server: neighbours and top reasons."""
    reasons = points.explain_many(range(len(points)), 3)
    return {
        "neighbours": [points.neighbours(i, NEIGHBOURS) for i in range(len(points))],
        "reasons": [[r["words"] + f" ({r['direction']})" for r in rs] for rs in reasons],
    }


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def render(points: Points, *, scripts: str, boot: dict, static: bool) -> str:
    """The whole page. ``scripts``: BokehJS script tags; ``boot``: what the page script starts
    from (``item`` inlined for a static page, ``meta`` for both)."""
    boot_json = json.dumps(boot, separators=(",", ":")).replace("</", "<\\/")
    cells = "".join(f'<label><input type="checkbox" class="f-cell" value="{c}" checked> {c}</label>' for c in CELLS)
    return _TEMPLATE.format(
        title=html.escape(points.title), what=html.escape(points.what), scripts=scripts, boot=boot_json,
        mode="static" if static else "live", cells=cells if points.kind == "dataset" else "",
        colour_default="cell" if points.kind == "dataset" else "prob", cluster_method=points.cluster_method,
        readonly_note='<p class="note">Read-only copy: labelling needs <code>amber-hunter explore</code>.</p>'
        if static else "",
        js=_JS,
    )


_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>amber-hunter explore: {title}</title>
{scripts}
<style>
body {{ font: 14px system-ui, sans-serif; margin: 0; display: flex; height: 100vh; }}
#main {{ flex: 1; overflow: auto; padding: 8px 12px; }}
#panel {{ width: 360px; border-left: 1px solid #ccc; padding: 8px 12px; overflow: auto; background: #fafafa; }}
#panel.hidden {{ display: none; }}
#controls {{ display: flex; flex-wrap: wrap; gap: 10px 18px; align-items: center; margin: 6px 0; }}
#legend span.sw {{ display: inline-block; width: 11px; height: 11px; border-radius: 6px; margin-right: 4px; }}
#legend div {{ display: inline-block; margin-right: 12px; }}
#selection {{ background: #fff3cd; padding: 6px; margin: 6px 0; display: none; }}
.thumbs img {{ width: 64px; height: 64px; object-fit: contain; margin: 2px; cursor: pointer; border: 1px solid #ddd; }}
.reasons li {{ margin-bottom: 3px; }}
.note {{ color: #666; font-size: 12px; }}
button {{ margin: 2px; }}
#clusters img {{ width: 40px; height: 40px; object-fit: contain; cursor: pointer; margin: 1px; }}
#clusters div {{ margin: 3px 0; }}
</style></head>
<body data-mode="{mode}">
<div id="main">
  <h3 style="margin:4px 0">{title}</h3>
  <div class="note">Projected: {what}. Hover a point for its picture, click it for details, drag a box or lasso to select several.</div>
  <div id="controls">
    <label>Colour by <select id="colour">
      <option value="cell">confusion cell (out-of-fold)</option><option value="prob">probability</option>
      <option value="label">label</option><option value="cluster">cluster</option><option value="flagged">flagged</option>
    </select></label>
    <span id="cellfilter">{cells}</span>
    <label>p from <input id="pmin" type="number" min="0" max="1" step="0.05" value="0" style="width:4em"></label>
    <label>to <input id="pmax" type="number" min="0" max="1" step="0.05" value="1" style="width:4em"></label>
    <label>Show <select id="labelled"><option value="all">all</option><option value="labelled">labelled</option>
      <option value="unlabelled">unlabelled</option></select></label>
    <label>Scene <input id="scene" type="text" placeholder="part of a scene id" style="width:12em"></label>
    <label>Cluster <select id="clusterfilter"><option value="all">all</option></select></label>
  </div>
  <div id="legend"></div>
  <div class="labelling"><button id="suggest">suggest 20 to label</button>
    <span class="note">unlabelled superpixels picked by <code>amber-hunter suggest</code>'s default (stratified: best in
    training/adaptation.py); they become the selection</span></div>
  <div id="selection"><span id="selcount"></span>
    <span class="labelling"><button id="sel-mining">label the selection: mining</button>
    <button id="sel-not">label the selection: not mining</button></span>
    <button id="sel-clear">clear</button></div>
  <div id="plot"></div>
  <div id="status" class="note"></div>
  <h4 style="margin:10px 0 4px">Clusters <span class="note">({cluster_method} on the classifier's features; most
    mining-like first; "select" a group, then label the selection)</span></h4>
  <div id="clusters"></div>
</div>
<div id="panel" class="hidden">
  <button id="close" style="float:right">×</button>
  <h4 id="p-name" style="word-break:break-all"></h4>
  <img id="p-context" alt="the superpixel in its context" style="max-width:320px;display:block">
  <div id="p-context-msg" class="note"></div>
  <p id="p-prob"></p>
  <p id="p-label"></p>
  <div class="labelling">
    <button id="b-mining">mining</button><button id="b-not">not mining</button><button id="b-skip">skip</button>
    <input id="note" type="text" placeholder="note (optional)" style="width:95%">
    <button id="b-near">select the 20 nearest</button>
  </div>
  {readonly_note}
  <h5>Why this score</h5><ul id="p-reasons" class="reasons"></ul>
  <div id="p-gradcam-box" class="labelling"><h5>Where the CNN looks (Grad-CAM)</h5>
    <img id="p-gradcam" alt="Grad-CAM heatmap over the crop" style="max-width:320px;display:block">
    <div id="p-gradcam-msg" class="note"></div></div>
  <h5>More like this</h5><div id="p-neighbours" class="thumbs"></div>
  <h5>History</h5><ul id="p-history" class="note"></ul>
</div>
<script>window.AMBER_BOOT = {boot};</script>
<script>window.AMBER_COLOUR_DEFAULT = "{colour_default}";</script>
<script>{js}</script>
</body></html>
"""

_JS = r"""
(function () {
  const boot = window.AMBER_BOOT, live = document.body.dataset.mode === "live";
  const $ = (id) => document.getElementById(id);
  const amber = window.amber = { ready: false, current: null };
  let source = null, filter = null;
  const colours = {cell: {TP: "#1a9850", FP: "#d73027", FN: "#fc8d59", TN: "#4575b4"},
                   label: {"mining": "#d73027", "not mining": "#4575b4", "unlabelled": "#bbbbbb"},
                   flagged: {1: "#d73027", 0: "#4575b4"}};
  if (!live) document.querySelectorAll(".labelling").forEach(e => e.style.display = "none");

  function status(text) { $("status").textContent = text; }
  function thumb(i) { return source.data.thumb[i]; }

  function visible() {
    const d = source.data, n = d.x.length;
    const cells = new Set([...document.querySelectorAll(".f-cell")].filter(c => c.checked).map(c => c.value));
    const hasCells = document.querySelectorAll(".f-cell").length > 0;
    const pmin = parseFloat($("pmin").value || "0"), pmax = parseFloat($("pmax").value || "1");
    const lab = $("labelled").value, scene = $("scene").value.trim(), cl = $("clusterfilter").value;
    const out = [];
    for (let i = 0; i < n; i++) {
      if (hasCells && !cells.has(d.cell[i])) continue;
      if (d.prob[i] >= 0 && (d.prob[i] < pmin || d.prob[i] > pmax)) continue;
      if (lab === "labelled" && d.label[i] === "unlabelled") continue;
      if (lab === "unlabelled" && d.label[i] !== "unlabelled") continue;
      if (scene && !String(d.scene[i]).includes(scene)) continue;
      if (cl !== "all" && String(d.cluster[i]) !== cl) continue;
      out.push(i);
    }
    return out;
  }

  function legend() {
    const mode = $("colour").value, d = source.data, shown = filter.indices;
    const count = {};
    let html = "";
    if (mode === "prob") {
      const bins = ["0–0.25", "0.25–0.5", "0.5–0.75", "0.75–1"], cols = ["#440154", "#3b528b", "#21918c", "#fde725"];
      const c = [0, 0, 0, 0];
      for (const i of shown) if (d.prob[i] >= 0) c[Math.min(3, Math.floor(d.prob[i] * 4))]++;
      bins.forEach((b, k) => html += `<div data-key="${b}"><span class="sw" style="background:${cols[k]}"></span>p ${b}: <b>${c[k]}</b></div>`);
    } else {
      const key = mode === "cluster" ? "cluster" : mode;
      for (const i of shown) { const k = d[key][i]; count[k] = (count[k] || 0) + 1; }
      for (const k of Object.keys(count).sort()) {
        const col = mode === "cluster" ? d.c_cluster[d.cluster.indexOf(Number(k))] : (colours[mode][k] || "#999");
        const name = mode === "cluster" ? clusterName(Number(k)) : mode === "flagged" ? (k === "1" ? "flagged" : "not flagged") : k;
        html += `<div data-key="${k}"><span class="sw" style="background:${col}"></span>${name}: <b>${count[k]}</b></div>`;
      }
    }
    $("legend").innerHTML = html + `<div class="note">${shown.length} of ${d.x.length} points shown</div>`;
  }

  function clusterName(c) { return c < 0 ? "unclustered" : "cluster " + c; }

  function clusterList() {
    const d = source.data, members = {};
    d.cluster.forEach((c, i) => (members[c] = members[c] || []).push(i));
    const mean = (m) => { const p = m.map(i => d.prob[i]).filter(v => v >= 0); return p.length ? p.reduce((a, b) => a + b, 0) / p.length : -1; };
    const rows = Object.entries(members).map(([c, m]) => ({c: Number(c), m, p: mean(m)})).sort((a, b) => b.p - a.p);
    $("clusters").innerHTML = "";
    for (const r of rows) {
      const div = document.createElement("div");
      div.className = "cluster"; div.dataset.cluster = r.c;
      const step = Math.max(1, Math.floor(r.m.length / 8));
      const sample = r.m.filter((_, k) => k % step === 0).slice(0, 8);
      div.innerHTML = `<button class="c-select">select</button> <b>${clusterName(r.c)}</b>: ${r.m.length} points` +
        (r.p >= 0 ? `, mean p ${r.p.toFixed(2)} ` : " ");
      for (const i of sample) {
        const im = document.createElement("img");
        im.src = thumb(i); im.dataset.i = i; im.title = d.name[i]; im.onclick = () => openPanel(i);
        div.appendChild(im);
      }
      div.querySelector(".c-select").onclick = () => { source.selected.indices = r.m.slice(); };
      $("clusters").appendChild(div);
    }
  }

  function recolour() {
    const mode = $("colour").value;
    source.data.color = source.data["c_" + mode].slice();
    source.change.emit();
    legend();
  }
  function refilter() { filter.indices = visible(); source.change.emit(); legend(); }

  amber.selected = function (indices) {
    if (!indices || indices.length === 0) { $("selection").style.display = "none"; return; }
    $("selection").style.display = "block";
    $("selcount").textContent = indices.length + " selected ";
    if (indices.length === 1) openPanel(indices[0]);
  };

  async function getJSON(url, options) {
    const r = await fetch(url, options);
    if (!r.ok) throw new Error(url + ": " + r.status + " " + await r.text());
    return r.json();
  }

  function setLabels(rows) {
    const d = source.data;
    for (const r of rows) {
      d.label[r.i] = r.label; d.origin[r.i] = "label store"; d.c_label[r.i] = colours.label[r.label];
    }
    recolour();
  }

  async function label(indices, value) {
    if (!live || indices.length === 0) return;
    const note = $("note").value;
    const res = await getJSON("/api/label", {method: "POST", headers: {"Content-Type": "application/json"},
                                             body: JSON.stringify({indices, label: value, note})});
    setLabels(res.labelled);
    status(`labelled ${res.labelled.length} as ${value}`);
    $("note").value = "";
    return res;
  }
  amber.label = label;

  function showContext(i) {
    const img = $("p-context"), msg = $("p-context-msg");
    msg.textContent = "";
    if (!live) { img.src = thumb(i); return; }
    img.removeAttribute("src");
    fetch(`/context/${i}.png`).then(async r => {
      if (r.ok) { img.src = URL.createObjectURL(await r.blob()); }
      else { msg.textContent = await r.text(); }
    });
  }

  function neighbourThumbs(list) {
    $("p-neighbours").innerHTML = "";
    for (const j of list) {
      const im = document.createElement("img");
      im.src = thumb(j); im.dataset.i = j; im.title = source.data.name[j] + " p=" + source.data.prob_text[j];
      im.onclick = () => openPanel(j);
      $("p-neighbours").appendChild(im);
    }
  }

  function showGradcam(i) {
    const img = $("p-gradcam"), msg = $("p-gradcam-msg");
    img.removeAttribute("src"); img.style.display = "none"; msg.textContent = "computing the heatmap…";
    getJSON(`/api/gradcam/${i}`).then(cam => {
      if (amber.current !== i) return;
      msg.textContent = cam.note + (cam.available ? ". Bright: pixels that push the score towards mining." : "");
      if (cam.available) { img.src = `/gradcam/${i}.png`; img.style.display = "block"; }
      amber.gradcamReady = i;
    });
  }

  function listItems(id, texts) {
    const ul = $(id);
    ul.replaceChildren(...texts.map(t => { const li = document.createElement("li"); li.textContent = t; return li; }));
  }

  async function openPanel(i) {
    amber.current = i;
    const d = source.data;
    $("panel").classList.remove("hidden");
    $("p-name").textContent = d.name[i];
    $("p-label").textContent = "label: " + d.label[i] + (d.origin[i] ? " (" + d.origin[i] + ")" : "") + (d.cell[i] ? " · " + d.cell[i] : "");
    showContext(i);
    if (live) {
      showGradcam(i);
      const info = await getJSON(`/api/point/${i}`);
      if (amber.current !== i) return;
      $("p-prob").textContent = info.probability_text;
      listItems("p-reasons", info.reasons.map(r =>
        `${r.words}: ${r.direction} (${r.contribution > 0 ? "+" : ""}${r.contribution.toFixed(2)}; ${r.compared} here)`));
      neighbourThumbs(info.neighbours);
      // notes come from readers' reports and imported CSVs: text, never markup
      listItems("p-history", info.history.map(h => `${h.when}: ${h.label} (${h.source})${h.note ? " — " + h.note : ""}`));
    } else {
      $("p-prob").textContent = "probability " + d.prob_text[i];
      listItems("p-reasons", boot.extras.reasons[i]);
      neighbourThumbs(boot.extras.neighbours[i]);
    }
    amber.panelReady = i;
  }
  amber.openPanel = openPanel;

  async function start() {
    const item = live ? await getJSON("/api/plot") : boot.item;
    await Bokeh.embed.embed_item(item, "plot");
    const doc = Bokeh.documents[Bokeh.documents.length - 1];
    source = doc.get_model_by_name("points");
    filter = doc.get_model_by_name("filter");
    amber.source = source; amber.doc = doc;
    const clusters = [...new Set(source.data.cluster)].sort((a, b) => a - b);
    for (const c of clusters) $("clusterfilter").insertAdjacentHTML("beforeend", `<option value="${c}">${clusterName(c)}</option>`);
    clusterList();
    $("colour").value = window.AMBER_COLOUR_DEFAULT;
    if (!document.querySelector(".f-cell")) $("colour").querySelector('option[value="cell"]').disabled = true;
    for (const id of ["pmin", "pmax", "labelled", "scene", "clusterfilter"]) $(id).addEventListener("input", refilter);
    document.querySelectorAll(".f-cell").forEach(c => c.addEventListener("change", refilter));
    $("colour").addEventListener("change", recolour);
    $("close").onclick = () => $("panel").classList.add("hidden");
    const cur = () => amber.current === null ? [] : [amber.current];
    $("b-mining").onclick = () => label(cur(), "mining");
    $("b-not").onclick = () => label(cur(), "not mining");
    $("b-skip").onclick = () => { const f = filter.indices, k = f.indexOf(amber.current); if (k >= 0 && k + 1 < f.length) openPanel(f[k + 1]); };
    $("b-near").onclick = async () => {
      const res = await getJSON(`/api/neighbours/${amber.current}?k=20`);
      source.selected.indices = [amber.current, ...res.neighbours];
    };
    $("sel-mining").onclick = () => label(source.selected.indices.slice(), "mining");
    $("sel-not").onclick = () => label(source.selected.indices.slice(), "not mining");
    $("sel-clear").onclick = () => { source.selected.indices = []; };
    $("suggest").onclick = async () => {
      const res = await getJSON("/api/suggest?n=20");
      source.selected.indices = res.suggested;
      status(res.suggested.length ? `suggested ${res.suggested.length} to label` : "nothing left to label");
    };
    recolour();
    amber.ready = true;
    status(`${source.data.x.length} points`);
  }
  start().catch(e => { console.error(e); status("failed: " + e); });
})();
"""
