/* amber-hunter map.html: draws the run described by window.AMBER (written by export/map.py).
 *
 * Everything heavy lives in files beside the page (map_files/): the popup pictures, the imagery
 * and each scene's superpixel outlines are loaded only when needed, so a run with 10,000
 * detections still opens in seconds. Scene markers are clustered at low zoom. Review marks are
 * kept in localStorage and downloaded as the GeoJSON that `amber-hunter feedback import` reads.
 */
(function () {
  'use strict';
  const A = window.AMBER;
  const S = {ID: 0, LAT: 1, LON: 2, SOUTH: 3, WEST: 4, NORTH: 5, EAST: 6, DATE: 7, PROB: 8, NPOS: 9, UPPER: 10,
             EST: 11, LICENCE: 12, UNLIC: 13, PIC: 14, PICW: 15, PICH: 16};
  const amber = window.amber = {ready: false, details: {}, markers: {}, map: null};
  const fmt = (v, d) => (v === null || v === undefined) ? 'unknown' : Number(v).toFixed(d);
  const esc = s => String(s).replace(/[&<>"']/g, c => ({'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;'}[c]));
  const stem = id => id.replace(/\//g, '_');

  const map = amber.map = L.map('map', {maxZoom: A.maxZoom, zoomControl: true, preferCanvas: false});
  L.control.scale().addTo(map);

  // --- base map ---------------------------------------------------------------------------------
  const layers = {};
  if (A.basemap) {
    const Template = L.TileLayer.extend({
      getTileUrl: function (c) {
        const z = this._getZoomForUrl(), subs = A.basemap.subdomains;
        let q = '';
        for (let i = z; i > 0; i--) {
          const mask = 1 << (i - 1);
          q += ((c.x & mask) ? 1 : 0) + ((c.y & mask) ? 2 : 0);
        }
        const v = {z: z, x: c.x, y: c.y, '-y': (1 << z) - 1 - c.y, q: q, key: A.basemap.key || '',
                   s: subs.length ? subs[(c.x + c.y) % subs.length] : '', r: L.Browser.retina ? '@2x' : ''};
        return A.basemap.url.replace(/\{([^{}]+)\}/g, (m, name) => (name in v ? v[name] : m));
      }
    });
    layers.base = new Template(A.basemap.url, {maxZoom: A.maxZoom, maxNativeZoom: A.basemap.maxNativeZoom,
                                              attribution: A.basemap.attribution}).addTo(map);
  }

  // --- area of interest, licences, coverage gaps ------------------------------------------------
  const area = L.geoJSON(A.area, {interactive: false, style: {color: '#3388ff', weight: 2, fill: false, dashArray: '6 4'}}).addTo(map);
  const overlays = {'area of interest': area};
  if (A.licensed) {
    overlays['licensed areas'] = L.geoJSON(A.licensed, {interactive: false,
      style: {color: '#1a9850', weight: 1, fillColor: '#1a9850', fillOpacity: 0.12}}).addTo(map);
  }
  const gapColours = {'failed': '#7b3294', 'no-imagery': '#9e9e9e', 'skipped': '#bdbdbd'};
  const gapRenderer = L.canvas({padding: 0.2});
  const gaps = L.layerGroup(A.gaps.map(g => L.rectangle([[g[0], g[1]], [g[2], g[3]]], {
    renderer: gapRenderer, color: gapColours[g[4]], weight: 1, fillOpacity: 0.35
  }).bindTooltip(`${esc(g[4])}${g[5] ? ': ' + esc(g[5]) : ''}`))).addTo(map);
  overlays['failed and no-imagery scenes'] = gaps;
  if (A.changes) {  // what the latest retrain or rescore changed (diff.geojson)
    const changeColours = {added: '#d7191c', removed: '#2c7bb6'};
    overlays['changes since the last model'] = L.geoJSON(A.changes, {
      style: f => ({color: changeColours[f.properties.change], weight: f.properties.kind === 'scene' ? 3 : 1.5,
                    dashArray: f.properties.change === 'removed' ? '5 4' : null, fillOpacity: 0.08}),
      onEachFeature: (f, layer) => layer.bindTooltip(`${esc(f.properties.change)} by the latest model: ` +
        (f.properties.kind === 'scene' ? `scene ${esc(f.properties.scene_id)}` : `superpixel #${f.properties.label}`))
    }).addTo(map);
  }

  // --- imagery from the run's own tiles (added for the scenes in view, from zoom 12) ------------
  if (A.imagery.length) {
    const imagery = L.layerGroup().addTo(map), shown = {};
    const refresh = () => {
      if (!map.hasLayer(imagery)) return;
      const view = map.getBounds().pad(0.2), deep = map.getZoom() >= 12;
      A.imagery.forEach(im => {
        const b = L.latLngBounds([im[0], im[1]], [im[2], im[3]]), on = deep && view.intersects(b);
        if (on && !shown[im[4]]) {
          shown[im[4]] = L.imageOverlay(`${A.files}/imagery/${im[4]}.jpg`, b, {interactive: false}).addTo(imagery);
        } else if (!on && shown[im[4]]) {
          imagery.removeLayer(shown[im[4]]);
          delete shown[im[4]];
        }
      });
    };
    map.on('moveend zoomend overlayadd', refresh);
    overlays['imagery (scanned scenes)'] = imagery;
    amber.refreshImagery = refresh;
  }

  // --- detections -------------------------------------------------------------------------------
  const superpixels = L.layerGroup().addTo(map);
  overlays['positive superpixels (of opened scenes)'] = superpixels;
  const rectangles = L.layerGroup();
  const clusters = L.markerClusterGroup({chunkedLoading: true, disableClusteringAtZoom: 16, maxClusterRadius: 50,
                                         showCoverageOnHover: false});
  const icon = L.divIcon({className: 'amber-marker', iconSize: [14, 14]});
  const byId = {};
  const markers = A.scenes.map(s => {
    byId[s[S.ID]] = s;
    const m = L.marker([s[S.LAT], s[S.LON]], {icon: icon, title: `scene flagged, p ${fmt(s[S.PROB], 2)}`});
    m.bindPopup(() => popupHtml(s), {maxWidth: A.popupMaxPx, minWidth: 300});
    amber.markers[s[S.ID]] = m;
    return m;
  });
  clusters.addLayers(markers);
  clusters.addTo(map);
  A.scenes.forEach(s => {
    L.rectangle([[s[S.SOUTH], s[S.WEST]], [s[S.NORTH], s[S.EAST]]], {color: '#ff7800', weight: 2, fillOpacity: 0.05})
      .bindPopup(() => popupHtml(s), {maxWidth: A.popupMaxPx, minWidth: 300}).addTo(rectangles);
  });
  const showRectangles = () => {
    if (map.getZoom() >= 14) { if (!map.hasLayer(rectangles)) rectangles.addTo(map); }
    else if (map.hasLayer(rectangles)) map.removeLayer(rectangles);
  };
  map.on('zoomend', showRectangles);
  overlays['flagged scenes'] = clusters;

  // Superpixel outlines of one scene, from map_files/scenes/<id>.js (a script: file:// pages may
  // not fetch(), but may load scripts beside them).
  window.amberScene = function (id, rows) {
    amber.details[id] = rows;
    (amber.waiting[id] || []).forEach(f => f(rows));
    delete amber.waiting[id];
  };
  amber.waiting = {};
  amber.loadScene = function (id) {
    return new Promise(resolve => {
      if (amber.details[id]) return resolve(amber.details[id]);
      const first = !amber.waiting[id];
      (amber.waiting[id] = amber.waiting[id] || []).push(resolve);
      if (!first) return;
      const tag = document.createElement('script');
      tag.src = `${A.files}/scenes/${stem(id)}.js`;
      tag.onerror = () => resolve(null);
      document.head.appendChild(tag);
    });
  };
  const drawn = {};
  function drawSuperpixels(id, rows) {
    if (drawn[id] || !rows) return;
    drawn[id] = L.layerGroup(rows.map(r => L.polygon(r[5].map(ring => ring.map(p => [p[1], p[0]])),
      {color: '#e00000', weight: 2, fillOpacity: 0.12, interactive: false}))).addTo(superpixels);
  }

  function popupHtml(s) {
    const id = s[S.ID], lat = s[S.LAT].toFixed(5), lon = s[S.LON].toFixed(5);
    const mark = reviews()[id];
    const licence = s[S.LICENCE] === null ? '' :
      `<tr><th>Licence</th><td>${esc(s[S.LICENCE])}${s[S.LICENCE] === 'partly licensed' ?
        `: ${fmt(s[S.UNLIC], 2)} ha of ${fmt(s[S.UPPER], 2)} ha outside` : ''}</td></tr>`;
    const pic = s[S.PIC] ? `<img class="amber-picture" src="${A.files}/pictures/${stem(id)}.png" width="${s[S.PICW]}"
        height="${s[S.PICH]}" alt="scene with its positive superpixels outlined">` : '<p><i>no picture of this scene</i></p>';
    const html = `<div class="amber-popup" data-scene="${esc(id)}">
      <h3>Scene flagged as mining</h3>
      <table>
        <tr><th>Centre</th><td><input class="amber-coords" readonly value="${lat}, ${lon}" size="20">
          <button class="amber-copy" type="button">copy</button><br>
          <a href="https://www.openstreetmap.org/?mlat=${lat}&amp;mlon=${lon}#map=17/${lat}/${lon}" target="_blank" rel="noopener">OpenStreetMap</a> ·
          <a href="https://www.google.com/maps/@?api=1&amp;map_action=map&amp;center=${lat},${lon}&amp;zoom=17&amp;basemap=satellite" target="_blank" rel="noopener">Google satellite</a> ·
          <a href="https://www.bing.com/maps?cp=${lat}~${lon}&amp;lvl=17&amp;style=a" target="_blank" rel="noopener">Bing aerial</a></td></tr>
        <tr><th>Captured</th><td class="amber-date">${esc(s[S.DATE] || 'unknown')}</td></tr>
        <tr><th>Max probability</th><td class="amber-prob">${fmt(s[S.PROB], 2)}</td></tr>
        <tr><th>Positive superpixels</th><td>${s[S.NPOS]}: <span class="amber-sp">loading…</span></td></tr>
        <tr><th>Positive superpixel area</th><td>${fmt(s[S.UPPER], 2)} ha (upper bound)</td></tr>
        <tr><th>Disturbed ground (est.)</th><td>${s[S.EST] === null ? 'not measured (no imagery)' : fmt(s[S.EST], 2) + ' ha'}</td></tr>
        ${licence}
      </table>
      ${pic}
      <div class="amber-review">Your review:
        <button type="button" data-review="confirmed">confirmed</button>
        <button type="button" data-review="false-positive">false positive</button>
        <button type="button" data-review="unsure">unsure</button>
        <input class="amber-note" placeholder="note (optional)" value="${esc(mark ? mark.note || '' : '')}">
        <div class="amber-marked">${mark ? 'marked: ' + esc(mark.review) : 'not reviewed'}</div>
      </div>
      <div class="amber-id">scene ${esc(id)}</div>
    </div>`;
    amber.loadScene(id).then(rows => {
      drawSuperpixels(id, rows);
      const el = document.querySelector(`.amber-popup[data-scene="${CSS.escape(id)}"] .amber-sp`);
      if (el) el.innerHTML = rows ? rows.map(r => `#${r[0]} p ${fmt(r[1], 2)}${r[4] === null ? '' : r[4] ? ' (licensed)' : ' (<b>unlicensed</b>)'}`).join(', ')
                                  : 'outlines not available';
    });
    return html;
  }

  // --- review marks -----------------------------------------------------------------------------
  const KEY = `amber-review:${A.runKey}`;
  function reviews() {
    try { return JSON.parse(localStorage.getItem(KEY) || '{}'); } catch (e) { return {}; }
  }
  function save(all) { localStorage.setItem(KEY, JSON.stringify(all)); updateReviewPanel(); }
  amber.reviews = reviews;
  map.on('popupopen', ev => {
    const root = ev.popup.getElement().querySelector('.amber-popup');
    if (!root) return;
    const id = root.dataset.scene;
    root.querySelector('.amber-copy').onclick = () => {
      const input = root.querySelector('.amber-coords');
      input.select();
      if (navigator.clipboard) navigator.clipboard.writeText(input.value).catch(() => document.execCommand('copy'));
      else document.execCommand('copy');
    };
    root.querySelectorAll('[data-review]').forEach(button => {
      button.onclick = () => amber.loadScene(id).then(rows => {
        const all = reviews(), s = byId[id];
        all[id] = {review: button.dataset.review, note: root.querySelector('.amber-note').value || null,
                   at: new Date().toISOString(), lat: s[S.LAT], lon: s[S.LON],
                   superpixels: rows ? rows.map(r => ({label: r[0], coordinates: r[5]})) : null};
        save(all);
        root.querySelector('.amber-marked').textContent = 'marked: ' + button.dataset.review;
      });
    });
  });

  /** The marks as the GeoJSON `feedback import` reads: one Polygon per positive superpixel of a
   *  reviewed scene (a Point at the scene's centre if its outlines could not be loaded), with
   *  `verdict` mining (confirmed) or not-mining (false positive). "unsure" stays in the browser. */
  amber.reviewGeoJSON = function () {
    const features = [];
    Object.entries(reviews()).forEach(([id, m]) => {
      if (m.review === 'unsure') return;
      const props = {verdict: m.review === 'confirmed' ? 'mining' : 'not-mining', scene_id: id,
                     review: m.review, marked_at: m.at, source: 'map.html'};
      if (m.note) props.note = m.note;
      if (m.superpixels && m.superpixels.length) {
        m.superpixels.forEach(sp => features.push({type: 'Feature', geometry: {type: 'Polygon', coordinates: sp.coordinates},
                                                   properties: Object.assign({superpixel: sp.label}, props)}));
      } else {
        features.push({type: 'Feature', geometry: {type: 'Point', coordinates: [m.lon, m.lat]}, properties: props});
      }
    });
    return {type: 'FeatureCollection', name: `${A.run} review`, features: features};
  };

  // --- title, legend, totals, review panel ------------------------------------------------------
  const panel = (position, cls, html) => {
    const c = L.control({position: position});
    c.onAdd = () => { const d = L.DomUtil.create('div', `amber-panel ${cls}`); d.innerHTML = html;
                      L.DomEvent.disableClickPropagation(d); L.DomEvent.disableScrollPropagation(d); return d; };
    return c.addTo(map);
  };
  const T = A.totals;
  panel('topleft', 'amber-title', `<h1>${esc(A.title)}</h1><div>${esc(A.subtitle)}</div>`);
  const years = Object.keys(T.positive_superpixel_ha_by_year);
  panel('topright', 'amber-totals', `<h2>Totals</h2><table>
    <tr><th>Scenes scanned</th><td>${T.scenes_scanned.toLocaleString('en')}</td></tr>
    <tr><th>Scenes flagged</th><td>${T.scenes_flagged.toLocaleString('en')}</td></tr>
    <tr><th>Positive superpixel area</th><td>${fmt(T.positive_superpixel_ha, 1)} ha <small>upper bound</small></td></tr>
    <tr><th>Disturbed ground (est.)</th><td>${fmt(T.disturbed_ha, 1)} ha <small>${T.scenes_estimated} of ${T.scenes_flagged} scenes measured</small></td></tr>
    <tr><th>Capture years</th><td>${years.length ? years.map(y => `${esc(y)}: ${fmt(T.positive_superpixel_ha_by_year[y], 1)} / ${fmt(T.disturbed_ha_by_year[y] || 0, 1)} ha`).join('<br>') : 'none'}</td></tr>
    <tr><th>Failed / no imagery</th><td>${T.scenes_failed} / ${T.scenes_no_imagery}</td></tr>
    </table>`);
  panel('bottomright', 'amber-legend', `<h2>Legend</h2>
    <div><i class="sw" style="background:#ff7800;border-radius:50%"></i>scene flagged as mining</div>
    <div><i class="sw" style="border:2px solid #e00000;background:rgba(224,0,0,.12)"></i>positive superpixel</div>
    <div><i class="sw" style="background:#9e9e9e"></i>no imagery</div>
    <div><i class="sw" style="background:#7b3294"></i>failed (not analysed)</div>
    <div><i class="sw" style="border:2px solid #1a9850;background:rgba(26,152,80,.12)"></i>licensed area</div>
    <div><i class="sw" style="border:2px dashed #3388ff"></i>area of interest</div>` + (A.changes ?
    `<div><i class="sw" style="border:2px solid #d7191c"></i>added by the latest model</div>
    <div><i class="sw" style="border:2px dashed #2c7bb6"></i>removed by the latest model</div>` : ''));
  const reviewPanel = panel('bottomleft', 'amber-reviews', '');
  function updateReviewPanel() {
    const all = Object.values(reviews()), n = k => all.filter(m => m.review === k).length;
    reviewPanel.getContainer().innerHTML = `<b>Your review</b>: ${n('confirmed')} confirmed, ${n('false-positive')} false positive,
      ${n('unsure')} unsure<br><button type="button" id="amber-download">download review (GeoJSON)</button>
      <small>for <code>amber-hunter feedback import</code></small>`;
    reviewPanel.getContainer().querySelector('#amber-download').onclick = () => {
      const blob = new Blob([JSON.stringify(amber.reviewGeoJSON(), null, 1)], {type: 'application/geo+json'});
      const a = document.createElement('a');
      a.href = URL.createObjectURL(blob);
      a.download = `${A.run}-review.geojson`;
      document.body.appendChild(a);
      a.click();
      setTimeout(() => { URL.revokeObjectURL(a.href); a.remove(); }, 1000);
    };
  }
  updateReviewPanel();

  L.control.layers(null, overlays, {collapsed: true, position: 'topright'}).addTo(map);
  const b = area.getBounds();
  map.fitBounds(b.isValid() ? b : [[A.bounds[0], A.bounds[1]], [A.bounds[2], A.bounds[3]]]);
  showRectangles();
  if (amber.refreshImagery) amber.refreshImagery();
  amber.ready = true;
})();
