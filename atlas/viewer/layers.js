// Layers side by side: one panel per layer atlas of a run (the atlas viewer itself, embedded), all of one store.
// Hovering a cell in one panel outlines, in every other, the cells where the same samples fall: a store's layers
// share their sample rows (atlas.store), and each grid's samples.bin gives the cell of every row. With a class
// chosen, every layer is shaded by its attribution to it and a second row shows the class atlases of each layer.
"use strict";

(function () {
  const byId = (id) => document.getElementById(id);
  const naturalOrder = new Intl.Collator(undefined, { numeric: true });
  const state = {
    atlases: [], // the layer atlases shown, in layer order
    all: [], // every entry of atlases.json
    grid: null, // the grid size every panel shows
    samples: new Map(), // samples.bin url -> Promise of Int32Array: the cell of each sample row
    frames: new Map(), // atlas id -> its panel's iframe
    names: [],
    classIndex: null,
    page: "index.html", // the atlas viewer's page (atlas.html beside a Microscope home page)
  };

  function el(tag, props, ...children) {
    const node = Object.assign(document.createElement(tag), props);
    node.append(...children);
    return node;
  }

  function fetchOk(url, options) {
    return fetch(url, options).then((response) => {
      if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
      return response;
    });
  }

  function gridOf(atlas) {
    return atlas.grids.find((grid) => grid.size === state.grid);
  }

  function samplesOf(atlas) {
    const url = gridOf(atlas).samples;
    if (!state.samples.has(url)) {
      state.samples.set(url, fetchOk(url).then((r) => r.arrayBuffer()).then((buffer) => new Int32Array(buffer)));
    }
    return state.samples.get(url);
  }

  function viewerUrl(atlas, grid) {
    const params = { atlas: atlas.id, embed: 1 };
    if (grid) params.grid = grid;
    if (state.classIndex !== null) params.class = state.classIndex;
    return `${state.page}#${new URLSearchParams(params)}`;
  }

  // The layer atlases of the collection with the most of them (a run folder normally holds one store)
  function layerAtlases(atlases) {
    const byCollection = new Map();
    for (const atlas of atlases.filter((a) => a.kind === "layer" && a.collection && a.grids.some((g) => g.samples))) {
      const key = `${atlas.collection}/${atlas.samples}`;
      byCollection.set(key, [...(byCollection.get(key) ?? []), atlas]);
    }
    const largest = [...byCollection.values()].sort((a, b) => b.length - a.length)[0] ?? [];
    return largest.sort((a, b) => naturalOrder.compare(a.layer, b.layer));
  }

  function showPanels() {
    state.frames.clear();
    const panels = state.atlases.map((atlas) => {
      const frame = el("iframe", { src: viewerUrl(atlas, state.grid), title: atlas.title });
      frame.dataset.atlas = atlas.id;
      state.frames.set(atlas.id, frame);
      const info = el("span", { className: "info" });
      const panel = el("div", { className: "panel" }, el("h2", {}, atlas.layer, info), frame);
      panel.dataset.layer = atlas.layer;
      return panel;
    });
    byId("layers").replaceChildren(...panels);
    showClassRow();
  }

  // The class atlases of the chosen class, one per layer (`make class-atlas CLASS=... LAYERS=...`)
  function showClassRow() {
    const row = byId("class-row");
    row.hidden = state.classIndex === null;
    if (row.hidden) return row.replaceChildren();
    const name = state.names[state.classIndex];
    row.replaceChildren(
      ...state.atlases.map((layerAtlas) => {
        const found = state.all.find(
          (a) => a.kind === "class" && a.layer === layerAtlas.layer && a.class_index === state.classIndex
        );
        const body = found
          ? el("iframe", { src: viewerUrl(found, null), title: found.title })
          : el("div", { className: "note" }, `No class atlas of ${name} at ${layerAtlas.layer}: make class-atlas${layerAtlas.store ? ` STORE="${layerAtlas.store}"` : ""} CLASS="${name}" LAYERS=${state.atlases.map((a) => a.layer).join(",")}`);
        const panel = el("div", { className: "panel class-panel" }, el("h2", {}, `${layerAtlas.layer}: ${name}`), body);
        panel.dataset.layer = layerAtlas.layer;
        if (found) panel.dataset.atlas = found.id;
        return panel;
      })
    );
  }

  function send(atlasId, message) {
    state.frames.get(atlasId)?.contentWindow?.postMessage(message, "*");
  }

  function setInfo(atlasId, text) {
    const frame = state.frames.get(atlasId);
    if (frame) frame.previousSibling.querySelector(".info").textContent = text;
  }

  // A cell shown in one panel: its sample rows, and for every other layer the cells those rows fall in
  let ticket = 0;
  async function linkCell(source, cell) {
    const mine = ++ticket;
    if (!cell || cell.grid !== state.grid) {
      for (const atlas of state.atlases) {
        send(atlas.id, { type: "linked", grid: state.grid, cells: [] });
        setInfo(atlas.id, "");
      }
      byId("status").textContent = "";
      return;
    }
    const all = await Promise.all(state.atlases.map(samplesOf));
    if (mine !== ticket) return;
    const sourceIndex = state.atlases.findIndex((a) => a.id === source);
    const cells = all[sourceIndex];
    const index = cell.y * state.grid + cell.x;
    const rows = [];
    for (let r = 0; r < cells.length; r++) if (cells[r] === index) rows.push(r);
    state.atlases.forEach((atlas, i) => {
      if (i === sourceIndex) {
        send(atlas.id, { type: "linked", grid: state.grid, cells: [] });
        setInfo(atlas.id, `cell (x ${cell.x}, y ${cell.y}): ${rows.length} samples`);
        return;
      }
      const counts = new Map();
      for (const r of rows) counts.set(all[i][r], (counts.get(all[i][r]) ?? 0) + 1);
      const linked = [...counts.entries()].sort((a, b) => b[1] - a[1]);
      send(atlas.id, { type: "linked", grid: state.grid, cells: linked });
      setInfo(atlas.id, rows.length ? `those samples: ${linked.length} cells` : "");
    });
    byId("status").textContent = `${state.atlases[sourceIndex].layer}: ${rows.length} samples`;
  }

  window.addEventListener("message", (event) => {
    const data = event.data;
    if (!data || data.type !== "cell" || !state.frames.has(data.atlas)) return;
    if (event.source !== state.frames.get(data.atlas).contentWindow) return;
    linkCell(data.atlas, data.cell).catch((error) => (byId("status").textContent = error.message));
  });

  function chooseClass(k) {
    state.classIndex = k;
    for (const atlas of state.atlases) send(atlas.id, { type: "class", index: k });
    showClassRow();
    writeUrl();
  }

  function writeUrl() {
    const params = { grid: state.grid, layers: state.atlases.map((a) => a.layer).join(",") };
    if (state.classIndex !== null) params.class = state.classIndex;
    history.replaceState(null, "", "#" + new URLSearchParams(params));
  }

  byId("grid").addEventListener("change", (event) => {
    state.grid = Number(event.target.value);
    showPanels();
    writeUrl();
  });
  byId("class-search").addEventListener("change", (event) => {
    const wanted = event.target.value.trim().toLowerCase();
    const k = state.names.findIndex((name) => name.toLowerCase() === wanted);
    event.target.classList.toggle("unknown", wanted !== "" && k < 0);
    if (wanted === "" || k >= 0) chooseClass(k >= 0 ? k : null);
  });

  async function start() {
    const manifest = await fetchOk("atlases.json").then((r) => r.json());
    state.page = manifest.viewer ?? "index.html";
    byId("viewer-link").href = state.page;
    state.all = manifest.atlases;
    const wanted = new URLSearchParams(location.hash.slice(1));
    let atlases = layerAtlases(state.all);
    const named = (wanted.get("layers") ?? "").split(",").filter(Boolean);
    if (named.length) atlases = atlases.filter((a) => named.includes(a.layer));
    if (atlases.length < 2) throw new Error("this run folder has fewer than two layer atlases of one store");
    state.atlases = atlases;
    const common = atlases[0].grids
      .map((g) => g.size)
      .filter((size) => atlases.every((a) => a.grids.some((g) => g.size === size && g.samples)))
      .sort((a, b) => a - b);
    if (!common.length) throw new Error("the layer atlases have no grid size in common");
    const grid = Number(wanted.get("grid"));
    state.grid = common.includes(grid) ? grid : common[0];
    byId("grid").replaceChildren(...common.map((size) => new Option(`${size} × ${size}`, size, false, size === state.grid)));
    const model = atlases[0].model;
    byId("title").textContent = `${model ? `${model} · ` : ""}layers side by side`;
    state.names = await fetchOk(atlases[0].class_names).then((r) => r.json());
    byId("class-names").replaceChildren(...state.names.map((name) => new Option(name)));
    const k = Number(wanted.get("class") ?? NaN);
    state.classIndex = Number.isInteger(k) && k >= 0 && k < state.names.length ? k : null;
    byId("class-search").value = state.classIndex === null ? "" : state.names[state.classIndex];
    showPanels();
    writeUrl();
    document.body.dataset.ready = "1";
  }

  start().catch((error) => {
    const hint = location.protocol === "file:" ? " Serve the folder: `atlas view <run folder>`." : "";
    byId("layers").replaceChildren(el("p", { className: "error" }, `Cannot show the layers: ${error.message}.${hint}`));
  });
})();
