// The skyvault map page: the tile cache's time layers and the catalog's item footprints.
// URL parameters (all optional): collection, time (a layer's time key), lat, lon, zoom.
// document.body.dataset.ready is "loading" while the layer's tiles or footprints load, "tiles"
// once both are shown, "error" when the page cannot work (the message says why);
// document.body.dataset.layer is "<collection>/<time>" of the layer shown, dataset.view the
// map's "lat,lon,zoom".
(function () {
  "use strict";

  const body = document.body;
  const api = body.dataset.api;
  const message = document.getElementById("message");
  const collectionSelect = document.getElementById("collection");
  const timeSelect = document.getElementById("time");
  const collectionInfo = document.getElementById("collection-info");
  const layerInfo = document.getElementById("layer-info");
  const fitButton = document.getElementById("fit");
  // A transparent pixel for tiles that were not rendered (no data of the layer there).
  const EMPTY_TILE =
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAAC0lEQVR4nGNgAAIAAAUAAXpeqz8AAAAASUVORK5CYII=";

  function fail(text) {
    message.textContent = text;
    message.hidden = false;
    body.dataset.ready = "error";
  }

  function note(text) {
    message.textContent = text;
    message.hidden = !text;
  }

  if (typeof window.L === "undefined") {
    fail(
      "The map library (Leaflet) did not load from " +
        body.dataset.api.replace(/api$/, "static/vendor/leaflet/") +
        ". Install it on the gateway with `make setup-python` (scripts/fetch-web-assets.sh)."
    );
    return;
  }

  const params = new URLSearchParams(window.location.search);
  const map = L.map("map", { zoomSnap: 1, maxZoom: 20, worldCopyJump: true });
  L.control.scale({ imperial: false }).addTo(map);

  let collections = [];
  let tileLayer = null;
  let footprints = null;
  let current = { collection: null, layer: null };
  let generation = 0;
  const state = { tiles: false, items: false };

  function updateReady() {
    if (body.dataset.ready === "error") return;
    body.dataset.ready = state.tiles && state.items ? "tiles" : "loading";
  }

  function number(name) {
    const value = params.get(name);
    if (value === null || value.trim() === "") return null;
    const parsed = Number(value);
    return Number.isFinite(parsed) ? parsed : null;
  }

  async function getJSON(url) {
    const response = await fetch(url, { credentials: "same-origin" });
    if (!response.ok) {
      let detail = response.statusText;
      try {
        detail = (await response.json()).detail || detail;
      } catch (e) {
        // not JSON: keep the status text
      }
      throw new Error(`${url}: ${response.status} ${detail}`);
    }
    return response.json();
  }

  function layerBounds(layer) {
    if (!layer || !layer.bounds) return null;
    const [west, south, east, north] = layer.bounds;
    return L.latLngBounds([south, west], [north, east]);
  }

  function recordView() {
    const c = map.getCenter();
    body.dataset.view = `${c.lat},${c.lng},${map.getZoom()}`;
    const query = new URLSearchParams();
    if (current.collection) query.set("collection", current.collection.id);
    if (current.layer) query.set("time", current.layer.time);
    query.set("lat", c.lat.toFixed(5));
    query.set("lon", c.lng.toFixed(5));
    query.set("zoom", String(map.getZoom()));
    window.history.replaceState(null, "", `${window.location.pathname}?${query}`);
  }

  function describeTime(layer) {
    const start = layer.start.replace("+00:00", "Z");
    const end = layer.end.replace("+00:00", "Z");
    return start === end ? start : `${start} – ${end}`;
  }

  function fillTimes(collection) {
    timeSelect.replaceChildren();
    for (const layer of collection.layers) {
      const option = document.createElement("option");
      option.value = layer.time;
      const items = `${layer.items} item${layer.items === 1 ? "" : "s"}`;
      option.textContent = `${describeTime(layer)} (${items}${layer.tiles ? "" : ", no tiles"})`;
      timeSelect.append(option);
    }
    timeSelect.disabled = collection.layers.length === 0;
    const n = collection.layers.length;
    const layers = `${n} time layer${n === 1 ? "" : "s"}`;
    collectionInfo.textContent = collection.description ? `${collection.description} · ${layers}` : layers;
  }

  function popupContent(feature) {
    const p = feature.properties;
    const root = document.createElement("div");
    root.className = "skyvault-popup";
    root.dataset.itemId = p.id;
    const title = document.createElement("h2");
    title.textContent = p.id;
    root.append(title);
    const list = document.createElement("dl");
    const rows = [["collection", p.collection], ["datetime", p.datetime]];
    for (const [key, value] of Object.entries(p.properties || {})) {
      if (key === "datetime") continue;
      rows.push([key, typeof value === "object" ? JSON.stringify(value) : String(value)]);
    }
    for (const [key, value] of rows) {
      const dt = document.createElement("dt");
      dt.textContent = key;
      const dd = document.createElement("dd");
      dd.textContent = value;
      list.append(dt, dd);
    }
    root.append(list);
    const links = document.createElement("ul");
    const entries = [
      ["cog", "COG (GeoTIFF)", p.links.cog],
      ["stac", "STAC item (JSON)", p.links.stac],
      ["run", "run in the Prefect UI", p.links.run],
    ];
    for (const [rel, text, href] of entries) {
      const li = document.createElement("li");
      if (href) {
        const a = document.createElement("a");
        a.href = href;
        a.textContent = text;
        a.dataset.rel = rel;
        a.target = "_blank";
        a.rel = "noopener";
        li.append(a);
      } else {
        li.textContent = `${text}: not known`;
      }
      links.append(li);
    }
    root.append(links);
    return root;
  }

  function showLayer(collection, layer, keepView) {
    generation += 1;
    const mine = generation;
    current = { collection, layer };
    body.dataset.layer = layer ? `${collection.id}/${layer.time}` : "";
    state.tiles = false;
    state.items = false;
    updateReady();
    if (tileLayer) map.removeLayer(tileLayer);
    if (footprints) map.removeLayer(footprints);
    tileLayer = null;
    footprints = null;
    if (!layer) {
      layerInfo.textContent = "No items in this collection yet.";
      state.tiles = state.items = true;
      updateReady();
      return;
    }
    const bounds = layerBounds(layer);
    if (!keepView) {
      if (bounds) map.fitBounds(bounds);
    } else if (bounds && !map.getBounds().intersects(bounds)) {
      map.fitBounds(bounds);
    }
    const zooms = layer.tiles ? `, tiles at zoom ${layer.minzoom}–${layer.maxzoom}` : ", not seeded";
    layerInfo.textContent = `${layer.items} item${layer.items === 1 ? "" : "s"}${zooms}.`;
    if (layer.tiles) {
      tileLayer = L.tileLayer(layer.tiles, {
        bounds: bounds || undefined,
        minNativeZoom: layer.minzoom,
        maxNativeZoom: layer.maxzoom,
        maxZoom: 20,
        errorTileUrl: EMPTY_TILE,
        className: "skyvault-tiles",
      });
      tileLayer.on("loading", () => {
        if (mine !== generation) return;
        state.tiles = false;
        updateReady();
      });
      tileLayer.on("load", () => {
        if (mine !== generation) return;
        state.tiles = true;
        updateReady();
      });
      tileLayer.addTo(map);
      if (!tileLayer.isLoading()) state.tiles = true; // nothing of the layer in view
    } else {
      state.tiles = true;
    }
    updateReady();
    recordView();
    const url = `${api}/items/${encodeURIComponent(collection.id)}?time=${encodeURIComponent(layer.time)}`;
    getJSON(url)
      .then((data) => {
        if (mine !== generation) return;
        footprints = L.geoJSON(data, {
          style: { color: "#e8590c", weight: 2, fill: true, fillOpacity: 0 },
          onEachFeature: (feature, path) => {
            path.bindPopup(() => popupContent(feature), { maxWidth: 360 });
            path.on("mouseover", () => path.setStyle({ fillOpacity: 0.12 }));
            path.on("mouseout", () => path.setStyle({ fillOpacity: 0 }));
          },
        }).addTo(map);
        state.items = true;
        updateReady();
      })
      .catch((error) => {
        if (mine === generation) fail(`Cannot read the footprints: ${error.message}`);
      });
  }

  function chooseCollection(id, time, keepView) {
    const collection = collections.find((c) => c.id === id);
    if (!collection) return;
    collectionSelect.value = collection.id;
    fillTimes(collection);
    const seeded = collection.layers.filter((l) => l.tiles);
    let layer = collection.layers.find((l) => l.time === time);
    if (time && !layer) note(`Collection ${collection.id} has no time layer ${time}.`);
    layer = layer || seeded[seeded.length - 1] || collection.layers[collection.layers.length - 1] || null;
    if (layer) timeSelect.value = layer.time;
    showLayer(collection, layer, keepView);
  }

  collectionSelect.addEventListener("change", () => {
    note("");
    chooseCollection(collectionSelect.value, null, false);
  });
  timeSelect.addEventListener("change", () => {
    note("");
    const layer = current.collection.layers.find((l) => l.time === timeSelect.value);
    showLayer(current.collection, layer || null, true);
  });
  fitButton.addEventListener("click", () => {
    const bounds = layerBounds(current.layer);
    if (bounds) map.fitBounds(bounds);
  });
  map.on("moveend", recordView);

  async function start() {
    const lat = number("lat");
    const lon = number("lon");
    const zoom = number("zoom");
    const pinned = lat !== null && lon !== null;
    map.setView(pinned ? [lat, lon] : [20, 0], zoom !== null ? zoom : pinned ? 10 : 2);
    collections = await getJSON(`${api}/collections`);
    if (collections.length === 0) {
      fail("No collections are configured on this gateway.");
      return;
    }
    for (const c of collections) {
      const option = document.createElement("option");
      option.value = c.id;
      option.textContent = `${c.title} (${c.layers.length})`;
      collectionSelect.append(option);
    }
    let id = params.get("collection");
    if (id && !collections.some((c) => c.id === id)) {
      note(`Collection ${id} is not configured on this gateway.`);
      id = null;
    }
    const fallback = collections.find((c) => c.layers.some((l) => l.tiles)) || collections[0];
    chooseCollection(id || fallback.id, params.get("time"), pinned);
  }

  start().catch((error) => fail(`Cannot read the collections: ${error.message}`));
})();
