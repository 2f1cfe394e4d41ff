// The atlas viewer. It reads atlases.json (written by `atlas compose`) and shows one atlas at a time;
// OpenSeadragon pans, zooms and loads the Deep Zoom tiles, this file adds the atlas and grid switches and
// the cell panel. No build step: served as-is from the run folder.
"use strict";

(function () {
  const byId = (id) => document.getElementById(id);
  const state = {
    atlases: [], // entries of atlases.json
    atlas: null, // the entry shown
    grid: "auto", // "auto": the grid whose cells are large enough at this zoom (autoGrid); else a grid size
    items: new Map(), // grid size -> its OpenSeadragon TiledImage (every grid in "auto", else the fixed one)
    shown: null, // the grid size on screen
    cells: new Map(), // cells.json url -> Promise of {byKey: Map "y,x" -> cell, count: Int32Array [G * G]}
    tables: new Map(), // attribution.bin url -> Promise of {scale: Float32Array [C], values: Int8Array [C * G * G]}
    names: [], // the class names of the atlas's store (classes.json)
    classIndex: null, // the class every cell is shaded by, or null
    labels: true, // the top-class labels over the atlas
    icons: "visualisation", // the icons drawn: a grid's views (visualisation, accentuated, examples)
    pointer: null, // last pointer position over the atlas, in viewer pixels
    pinned: null, // {grid, x, y} kept by a click
  };

  const viewer = OpenSeadragon({
    id: "atlas",
    prefixUrl: "vendor/openseadragon/images/",
    showNavigator: true,
    navigatorPosition: "BOTTOM_LEFT",
    maxZoomPixelRatio: 4,
    drawer: "canvas", // plain image tiles draw as fast in 2D, and WebGL is slow where the GPU is emulated
    visibilityRatio: 0.5,
    gestureSettingsMouse: { clickToZoom: false }, // a click pins a cell instead
  });
  // embed=1: a panel of layers.html (the layers side by side), which draws the header and relays hovers
  const embedded = new URLSearchParams(location.hash.slice(1)).get("embed") === "1" && window.parent !== window;
  document.body.classList.toggle("embedded", embedded);
  window.atlasViewer = viewer; // for tests and the browser console
  window.atlasShownItem = () => state.items.get(state.shown); // the TiledImage on screen, for tests
  const CELL_PX = 64; // screen pixels a grid's cells need before zooming in shows it: its icons are legible
  const LABEL_PX = 90; // about one label per 90 screen px each way: fewer labels zoomed out, more zoomed in
  const LABEL_MIN_OPACITY = 0.5; // with a class shown, only cells at least half shown are labelled (as compose)

  const highlight = document.createElement("div");
  highlight.className = "cell-highlight";
  let highlightPlaced = false;
  // white over each cell, as opaque as the cell is not the chosen class's: the heat-map of compose's fade_cells
  const shade = Object.assign(document.createElement("canvas"), { className: "class-shade" });
  let shadePlaced = false;
  // text labels over the atlas, inside OpenSeadragon's canvas element so that pointer events over a label
  // still reach the viewer (hover, drag, click) while the label shows its full name on hover
  const labelLayer = Object.assign(document.createElement("div"), { className: "labels" });
  viewer.canvas.append(labelLayer);

  function el(tag, props, ...children) {
    const node = Object.assign(document.createElement(tag), props);
    node.append(...children);
    return node;
  }

  function number(value) {
    return value === null || value === undefined ? "–" : Number(value).toPrecision(3);
  }

  const naturalOrder = new Intl.Collator(undefined, { numeric: true });

  function fillSelect(select, options, value) {
    select.replaceChildren(...options.map(([key, text]) => new Option(text, key, false, key === value)));
  }

  function gridEntry(size) {
    return state.atlas.grids.find((grid) => grid.size === size);
  }

  function showControls() {
    // natural order: _blocks.6 before _blocks.10
    const layers = [...new Set(state.atlases.map((atlas) => atlas.layer))].sort(naturalOrder.compare);
    fillSelect(byId("layer"), layers.map((layer) => [layer, layer]), state.atlas.layer);
    // layers.html where two or more layer atlases come from one store
    const shared = state.atlases.filter(
      (atlas) => atlas.kind === "layer" && atlas.collection && atlas.collection === state.atlas.collection
    );
    byId("layers-link").hidden = embedded || new Set(shared.map((atlas) => atlas.layer)).size < 2;
    const siblings = state.atlases.filter((atlas) => atlas.layer === state.atlas.layer);
    byId("class-choice").hidden = siblings.length < 2;
    const className = (atlas) => (atlas.kind === "layer" ? "all samples" : atlas.class ?? atlas.title);
    fillSelect(byId("class"), siblings.map((atlas) => [atlas.id, className(atlas)]), state.atlas.id);
    const grids = state.atlas.grids.map((grid) => [String(grid.size), `${grid.size} × ${grid.size}`]);
    fillSelect(byId("grid"), [["auto", "by zoom"], ...grids], state.grid);
    const views = iconViews(state.atlas);
    byId("icons-choice").hidden = views.length < 2;
    fillSelect(byId("icons"), views.map((view) => [view, ICON_VIEWS[view] ?? view]), shownView(state.atlas));
  }

  const ICON_VIEWS = {
    visualisation: "feature visualisations",
    accentuated: "accentuated examples",
    examples: "dataset examples",
  };

  // the icon sets every grid of an atlas has (compose's "views"; an atlas without them has its visualisations)
  function iconViews(atlas) {
    const sets = atlas.grids.map((grid) => Object.keys(grid.views ?? { visualisation: grid.tiles }));
    return sets[0].filter((view) => sets.every((set) => set.includes(view)));
  }

  function shownView(atlas) {
    return iconViews(atlas).includes(state.icons) ? state.icons : "visualisation";
  }

  // view: {zoom, x, y} of the viewport to restore; focus: a cell {grid, x, y} to pin (and zoom to, without a view)
  function open(atlas, grid, focus = null, view = null) {
    const keepView = state.atlas && state.atlas.id === atlas.id ? viewer.viewport.getBounds() : null;
    Object.assign(state, { atlas, grid, pinned: null, items: new Map(), shown: null });
    showControls();
    document.title = `${atlas.title} · activation atlas`;
    byId("title").textContent = atlas.model ? `${atlas.model} · ${atlas.title}` : atlas.title;
    document.body.dataset.ready = "";
    loadClassNames(atlas);
    const grids = grid === "auto" ? atlas.grids : [gridEntry(Number(grid))];
    viewer.addOnceHandler("open", () => {
      highlightPlaced = shadePlaced = linkedPlaced = false; // opening clears the overlays
      delete shade.dataset.grid;
      grids.forEach((entry, index) => state.items.set(entry.size, viewer.world.getItemAt(index)));
      if (keepView) viewer.viewport.fitBounds(keepView, true);
      if (view) {
        viewer.viewport.zoomTo(view.zoom, null, true);
        viewer.viewport.panTo(new OpenSeadragon.Point(view.x, view.y), true);
      }
      updateGrid();
      drawLabels();
      if (focus) focusCell(focus, !view);
      document.body.dataset.ready = "1";
      writeUrl();
    });
    // every grid's pyramid is in the world; only the shown one is opaque, and OpenSeadragon loads no tiles
    // of a transparent image
    const icons = shownView(atlas);
    const tiles = (entry) => entry.views?.[icons] ?? entry.tiles;
    viewer.open(grids.map((entry, index) => ({ tileSource: tiles(entry), x: 0, y: 0, width: 1, index, opacity: 0 })));
    showHint();
  }

  // The view in the URL, so that a copied link opens the same view: atlas, grid, class, zoom, centre, pinned cell
  function writeUrl() {
    if (document.body.dataset.ready !== "1") return;
    const centre = viewer.viewport.getCenter();
    const params = { atlas: state.atlas.id, grid: state.grid };
    if (embedded) params.embed = 1;
    if (state.classIndex !== null) params.class = state.classIndex;
    if (!state.labels) params.labels = 0;
    if (shownView(state.atlas) !== "visualisation") params.icons = shownView(state.atlas);
    params.zoom = viewer.viewport.getZoom().toFixed(4);
    Object.assign(params, { x: centre.x.toFixed(4), y: centre.y.toFixed(4) });
    if (state.pinned) {
      params.cell = `${state.pinned.x},${state.pinned.y}`;
      if (state.grid === "auto") params.cellgrid = state.pinned.grid;
    }
    history.replaceState(null, "", "#" + new URLSearchParams(params));
  }

  // `cell=x,y` in the URL names a cell of the fixed grid (the microscope's unit pages link to cells this way),
  // or of grid `cellgrid`
  function parseCell(grid, value, cellGrid) {
    const size = Number(cellGrid ?? grid);
    if (!state.atlas.grids.some((entry) => entry.size === size)) return null;
    const [x, y] = (value ?? "").split(",").map((part) => (part.trim() === "" ? NaN : Number(part)));
    const inside = (v) => Number.isInteger(v) && v >= 0 && v < size;
    return inside(x) && inside(y) ? { grid: size, x, y } : null;
  }

  function parseView(wanted) {
    const [zoom, x, y] = ["zoom", "x", "y"].map((key) => Number(wanted.get(key) ?? NaN));
    return zoom > 0 && Number.isFinite(x) && Number.isFinite(y) ? { zoom, x, y } : null;
  }

  // All grids' images span the viewport's unit square (x and y from 0 to 1 for a square atlas)
  function cellRect(target, context = 0) {
    const bounds = viewer.world.getItemAt(0).getBounds();
    const side = bounds.width / target.grid;
    const span = (2 * context + 1) * side;
    return new OpenSeadragon.Rect(
      bounds.x + (target.x - context) * side,
      bounds.y + (target.y - context) * side,
      span,
      span
    );
  }

  function focusCell(target, zoom = true) {
    if (zoom) viewer.viewport.fitBounds(cellRect(target, 2), true); // with 2 cells on each side
    state.pinned = target;
    show(target);
  }

  // The finest grid whose cells cover CELL_PX screen pixels at the current zoom, else the coarsest. The home view
  // always shows the coarsest: where even the finest grid's cells are that large at home, a grid's cells must be
  // as large as the coarsest's are there, so zooming in walks through the grids and zooming out comes back
  function autoGrid() {
    const width = viewer.viewport.getContainerSize().x;
    const atlasPx = viewer.viewport.getZoom(true) * width;
    const sizes = state.atlas.grids.map((entry) => entry.size).sort((a, b) => a - b);
    const cellPx = Math.max(CELL_PX, (viewer.viewport.getHomeZoom() * width) / sizes[0]);
    return sizes.filter((size) => atlasPx / size >= cellPx - 1e-6).pop() ?? sizes[0];
  }

  function shownGrid() {
    return state.grid === "auto" ? autoGrid() : Number(state.grid);
  }

  // Show the grid the zoom asks for: its image opaque, the others transparent (and so not loaded)
  function updateGrid() {
    const grid = shownGrid();
    if (grid === state.shown) return;
    state.shown = grid;
    for (const [size, item] of state.items) item.setOpacity(size === grid ? 1 : 0);
    showStatus();
    drawShade();
    if (!state.pinned && state.pointer) show(cellAt(state.pointer)); // the hovered cell is one of the new grid
  }

  function cellAt(position) {
    const item = viewer.world.getItemAt(0);
    if (!item || !position) return null;
    const bounds = item.getBounds();
    const point = viewer.viewport.viewerElementToViewportCoordinates(position);
    const u = (point.x - bounds.x) / bounds.width;
    const v = (point.y - bounds.y) / bounds.height;
    if (!(u >= 0 && u < 1 && v >= 0 && v < 1)) return null;
    const grid = state.shown;
    return { grid, x: Math.floor(u * grid), y: Math.floor(v * grid) };
  }

  // One request per URL, kept in `cache`; a failed one is forgotten, so the next use (a hover) retries it
  function cachedFetch(cache, url, read, build) {
    if (!cache.has(url)) {
      const request = fetch(url)
        .then((response) => {
          if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
          return response[read]();
        })
        .then(build);
      request.catch(() => cache.delete(url));
      cache.set(url, request);
    }
    return cache.get(url);
  }

  function cellsOf(grid) {
    return cachedFetch(state.cells, gridEntry(grid).cells, "json", (data) => {
      const count = new Int32Array(grid * grid);
      for (const cell of data.cells) count[cell.y * grid + cell.x] = cell.count;
      return { byKey: new Map(data.cells.map((cell) => [`${cell.y},${cell.x}`, cell])), count };
    });
  }

  function placeHighlight(target) {
    const rect = cellRect(target);
    highlight.classList.toggle("pinned", Boolean(state.pinned));
    if (highlightPlaced) viewer.updateOverlay(highlight, rect);
    else viewer.addOverlay(highlight, rect);
    highlightPlaced = true;
  }

  function removeHighlight() {
    if (highlightPlaced) viewer.removeOverlay(highlight);
    highlightPlaced = false;
  }

  // the cell shown (null: none) to layers.html, which highlights where its samples fall in the other layers
  function tellParent(target) {
    if (!embedded) return;
    const cell = target ? { grid: target.grid, x: target.x, y: target.y } : null;
    window.parent.postMessage({ type: "cell", atlas: state.atlas.id, cell }, "*");
  }

  let ticket = 0; // answers to older hovers are dropped
  async function show(target) {
    const mine = ++ticket;
    tellParent(target);
    if (!target) {
      removeHighlight();
      showHint();
      return;
    }
    try {
      const cells = await cellsOf(target.grid);
      const shading = shadingOn() ? await classShading(target.grid, state.classIndex) : null;
      if (mine !== ticket) return;
      placeHighlight(target);
      showCell(target, cells.byKey.get(`${target.y},${target.x}`), shading);
    } catch (error) {
      showError(`Cannot read the cells of grid ${target.grid}: ${error.message}`);
    }
  }

  function showHint() {
    const info = byId("info");
    delete info.dataset.grid;
    info.replaceChildren(
      el("p", { className: "hint" }, "Scroll to zoom, drag to pan. Hover over a cell to see what it holds; click to keep it.")
    );
  }

  function showError(message) {
    byId("info").replaceChildren(el("p", { className: "error" }, message));
  }

  function showCell(target, cell, shading) {
    const info = byId("info");
    Object.assign(info.dataset, { grid: target.grid, x: target.x, y: target.y, count: cell ? cell.count : 0 });
    const parts = [el("h2", {}, `Cell (x ${target.x}, y ${target.y}) of ${target.grid} × ${target.grid}`)];
    if (!cell) {
      parts.push(el("p", { className: "note" }, "No samples fell in this cell."));
      info.replaceChildren(...parts);
      return;
    }
    parts.push(
      el(
        "dl",
        {},
        el("dt", {}, "samples"),
        el("dd", { className: "count" }, String(cell.count)),
        el("dt", {}, "icon cosine"),
        el("dd", { title: "cosine of the icon's activation with the cell's direction" }, number(cell.icon_cosine)),
        el("dt", {}, "icon objective"),
        el("dd", {}, number(cell.icon_objective)),
        ...(cell.heatmap
          ? [
              el("dt", {}, `attribution to ${cell.heatmap.class}`),
              el(
                "dd",
                { className: "heat", title: "the cell's mean attribution to the class; the heat-map shows the cell at this share" },
                `${number(cell.heatmap.attribution)} (shown at ${Math.round(100 * (cell.heatmap.opacity ?? 0))} %)`
              ),
            ]
          : []),
        ...(shading
          ? [
              el("dt", {}, `attribution to ${state.names[shading.classIndex]}`),
              el(
                "dd",
                { className: "class-attribution", title: "the cell's mean attribution to the class you chose" },
                `${number(shading.values[target.y * target.grid + target.x])} (shown at ${Math.round(
                  100 * shading.opacity[target.y * target.grid + target.x]
                )} %)`
              ),
            ]
          : [])
      )
    );
    if (cell.empty) {
      const minimum = gridEntry(target.grid).min_count;
      parts.push(el("p", { className: "note" }, `Fewer than ${minimum} samples: no icon is drawn.`));
    } else {
      // the cell's icon as `atlas run patch --patch` takes it: x first, as everywhere (atlas.patch.parse_cell)
      const spec = `store.h5:${state.atlas.layer}:${target.grid}:x=${target.x},y=${target.y}`;
      const title = "this cell's icon as a patch: atlas run patch --patch (with your store's path)";
      parts.push(el("p", { className: "note" }, "patch spec ", el("code", { className: "patch-spec", title }, spec)));
    }
    const largest = Math.max(1e-12, ...cell.top.map((top) => Math.abs(top.attribution ?? 0)));
    const classes = cell.top.map((top) => {
      const bar = el("span", { className: "bar" });
      bar.style.width = `${(100 * Math.max(0, top.attribution ?? 0)) / largest}%`;
      return el("li", {}, el("span", { className: "name" }, top.name), el("span", { className: "value" }, number(top.attribution)), bar);
    });
    if (classes.length) {
      parts.push(el("h3", {}, "Top classes (mean attribution)"), el("ol", { className: "classes" }, ...classes));
    }
    if (cell.examples.length) {
      const figures = cell.examples.map((example) => {
        const where = `${example.image} at (y ${example.position[0]}, x ${example.position[1]})`;
        const picture = example.patch
          ? el("img", { src: example.patch, alt: where, title: where })
          : el("div", { className: "missing", title: where }, "image not readable");
        // captioned with the photo's class where it is labelled, else its file name; the full path on hover
        const caption = example.class ?? example.image.split(/[\\/]/).pop();
        return el("figure", {}, picture, el("figcaption", { title: where }, caption));
      });
      parts.push(
        el("h3", {}, "Dataset examples (closest to the cell's mean, one per photo)"),
        el("div", { className: "examples" }, ...figures)
      );
    }
    info.replaceChildren(...parts);
  }

  // Any class on demand: the class names come with the atlas, each grid's attributions only once a class is chosen
  function loadClassNames(atlas) {
    state.names = [];
    byId("class-names").replaceChildren();
    if (!atlas.class_names) return; // composed before attribution tables were written
    fetch(atlas.class_names)
      .then((response) => {
        if (!response.ok) throw new Error(`${atlas.class_names}: HTTP ${response.status}`);
        return response.json();
      })
      .then((names) => {
        if (state.atlas !== atlas) return;
        state.names = names;
        byId("class-names").replaceChildren(...names.map((name) => new Option(name)));
        byId("class-search").value = state.classIndex === null ? "" : names[state.classIndex] ?? "";
        offerClassAtlas();
      })
      .catch((error) => showError(`Cannot read the class names: ${error.message}`));
  }

  // atlases composed before attribution tables were written have no class names and cannot be shaded
  function shadingOn() {
    return state.classIndex !== null && Boolean(state.atlas.class_names);
  }

  function tableOf(grid) {
    return cachedFetch(state.tables, gridEntry(grid).attribution, "arrayBuffer", (buffer) => {
      const classes = buffer.byteLength / (4 + grid * grid); // float32 scales, then int8 [C, G * G]
      return { scale: new Float32Array(buffer, 0, classes), values: new Int8Array(buffer, 4 * classes) };
    });
  }

  // Each cell's attribution to class k and its opacity, as compose's heat-map (compose.heatmap_opacity):
  // over the largest attribution among well-populated cells, 0 where empty or negative
  async function classShading(grid, k) {
    const [table, cells] = await Promise.all([tableOf(grid), cellsOf(grid)]);
    const n = grid * grid;
    const values = new Float32Array(n);
    for (let i = 0; i < n; i++) values[i] = table.values[k * n + i] * table.scale[k];
    const minCount = gridEntry(grid).min_count;
    const count = cells.count;
    const total = count.reduce((sum, c) => sum + c, 0);
    const populated = (state.atlas.heatmap_populated ?? 0) * (total / n);
    const largestWhere = (keep) => {
      let largest = -Infinity;
      for (let i = 0; i < n; i++) if (keep(i)) largest = Math.max(largest, values[i]);
      return largest;
    };
    const kept = (i) => count[i] >= minCount;
    let largest = largestWhere((i) => kept(i) && count[i] >= populated);
    if (largest === -Infinity) largest = largestWhere(kept);
    if (!(largest > 0)) largest = largestWhere(kept);
    const opacity = new Float32Array(n);
    if (largest > 0) {
      for (let i = 0; i < n; i++) opacity[i] = kept(i) ? Math.min(1, Math.max(0, values[i] / largest)) : 0;
    }
    return { classIndex: k, values, opacity };
  }

  async function drawShade() {
    const item = viewer.world.getItemAt(0);
    if (!shadingOn() || !item) {
      if (shadePlaced) viewer.removeOverlay(shade);
      shadePlaced = false;
      delete shade.dataset.grid;
      return;
    }
    const grid = state.shown;
    const k = state.classIndex;
    if (shadePlaced && shade.dataset.grid === String(grid) && shade.dataset.class === String(k)) return;
    let shading;
    try {
      shading = await classShading(grid, k);
    } catch (error) {
      showError(`Cannot read the attributions of grid ${grid}: ${error.message}`);
      return;
    }
    // the class, the grid or the atlas changed meanwhile
    if (state.classIndex !== k || state.shown !== grid || viewer.world.getItemAt(0) !== item) return;
    Object.assign(shade, { width: grid, height: grid });
    const context = shade.getContext("2d");
    const pixels = context.createImageData(grid, grid);
    for (let i = 0; i < grid * grid; i++) {
      pixels.data.set([255, 255, 255, Math.round(255 * (1 - shading.opacity[i]))], 4 * i);
    }
    context.putImageData(pixels, 0, 0);
    const rect = item.getBounds();
    if (shadePlaced) viewer.updateOverlay(shade, rect);
    else viewer.addOverlay(shade, rect);
    shadePlaced = true;
    Object.assign(shade.dataset, { grid, class: k });
  }

  // Where the samples of a cell of another layer fall in this one (sent by layers.html): each cell outlined, as
  // opaque as its share of those samples
  const linked = Object.assign(document.createElement("canvas"), { className: "linked-cells" });
  let linkedPlaced = false;
  function drawLinked(grid, cells) {
    const item = viewer.world.getItemAt(0);
    if (!item || !cells.length || grid !== state.shown) {
      if (linkedPlaced) viewer.removeOverlay(linked);
      linkedPlaced = false;
      linked.dataset.cells = "";
      return;
    }
    // canvas pixels per cell: a thin outline at any grid size (the canvas is stretched over the whole atlas), in
    // at most about 2048 x 2048 pixels
    const scale = Math.max(4, Math.min(32, Math.floor(2048 / grid)));
    const line = Math.max(1, Math.round(scale / 10));
    Object.assign(linked, { width: grid * scale, height: grid * scale });
    const context = linked.getContext("2d");
    context.clearRect(0, 0, linked.width, linked.height);
    const largest = Math.max(...cells.map(([, count]) => count));
    context.lineWidth = line;
    for (const [index, count] of cells) {
      // an outline only, as opaque as the cell's share of the samples: the icon inside stays in view
      const alpha = 0.35 + (0.65 * count) / largest;
      context.strokeStyle = `rgba(230, 90, 0, ${alpha.toFixed(3)})`;
      const [x, y] = [(index % grid) * scale, Math.floor(index / grid) * scale];
      context.strokeRect(x + line / 2, y + line / 2, scale - line, scale - line);
    }
    const rect = item.getBounds();
    if (linkedPlaced) viewer.updateOverlay(linked, rect);
    else viewer.addOverlay(linked, rect);
    linkedPlaced = true;
    Object.assign(linked.dataset, { grid, cells: cells.map(([index]) => index).join(",") });
  }

  window.addEventListener("message", (event) => {
    if (!embedded || event.source !== window.parent || !event.data) return;
    if (event.data.type === "linked") drawLinked(event.data.grid, event.data.cells);
    if (event.data.type === "class") {
      byId("class-search").value = event.data.index === null ? "" : state.names[event.data.index] ?? "";
      chooseClass(event.data.index);
    }
  });

  // A class atlas of the chosen class, where `atlas run class-atlas` made one, is a click away
  function offerClassAtlas() {
    const link = byId("class-atlas");
    const found = state.atlases.find(
      (atlas) =>
        atlas.layer === state.atlas.layer &&
        atlas.kind === "class" &&
        atlas.class_index === state.classIndex &&
        atlas.id !== state.atlas.id
    );
    link.hidden = !found;
    if (found) {
      link.textContent = `open the class atlas of ${found.class}`;
      link.dataset.atlas = found.id;
    }
  }

  function chooseClass(k) {
    state.classIndex = k;
    offerClassAtlas();
    drawShade();
    drawLabels();
    const target = state.pinned ?? cellAt(state.pointer);
    if (target) show(target);
    writeUrl();
  }

  // Per block of about LABEL_PX square on screen, aligned to the grid, the top class of one cell: the densest,
  // or with a class chosen the one most attributed to it (compose's draw_labels, at the zoom of the moment)
  let labelTicket = 0;
  async function drawLabels() {
    const mine = ++labelTicket;
    const item = viewer.world.getItemAt(0);
    if (!state.labels || !item || !state.shown) {
      labelLayer.replaceChildren();
      return;
    }
    const grid = state.shown;
    let cells, shading;
    try {
      cells = await cellsOf(grid);
      shading = shadingOn() ? await classShading(grid, state.classIndex) : null;
    } catch {
      return; // the panel says what could not be read
    }
    if (mine !== labelTicket) return;
    const bounds = item.getBounds(true);
    const side = bounds.width / grid;
    const cellPx = viewer.viewport.deltaPixelsFromPointsNoRotate(new OpenSeadragon.Point(side, 0), true).x;
    const step = Math.max(1, Math.ceil(LABEL_PX / cellPx));
    const view = viewer.viewport.getBounds(true);
    const range = (from, extent, origin) => {
      const first = Math.max(0, Math.floor((from - origin) / side));
      const last = Math.min(grid, Math.ceil((from + extent - origin) / side));
      return [first - (first % step), last];
    };
    const [x0, x1] = range(view.x, view.width, bounds.x);
    const [y0, y1] = range(view.y, view.height, bounds.y);
    const minCount = gridEntry(grid).min_count;
    const labels = [];
    for (let by = y0; by < y1; by += step) {
      for (let bx = x0; bx < x1; bx += step) {
        let best = -1;
        let bestScore = -Infinity;
        for (let y = by; y < Math.min(by + step, grid); y++) {
          for (let x = bx; x < Math.min(bx + step, grid); x++) {
            const i = y * grid + x;
            if (cells.count[i] < minCount || (shading && shading.opacity[i] < LABEL_MIN_OPACITY)) continue;
            const score = shading ? shading.values[i] : cells.count[i];
            if (score > bestScore) [best, bestScore] = [i, score];
          }
        }
        const x = best % grid;
        const y = Math.floor(best / grid);
        const name = best >= 0 ? cells.byKey.get(`${y},${x}`)?.top[0]?.name : undefined;
        if (!name) continue;
        const at = viewer.viewport.pixelFromPointNoRotate(
          new OpenSeadragon.Point(bounds.x + (x + 0.5) * side, bounds.y + (y + 1) * side),
          true
        );
        const label = el("span", { className: "label", textContent: name, title: name });
        Object.assign(label.dataset, { x, y, grid, step });
        Object.assign(label.style, { left: `${at.x}px`, top: `${at.y}px`, maxWidth: `${step * cellPx - 4}px` });
        labels.push(label);
      }
    }
    labelLayer.replaceChildren(...labels);
  }

  function showStatus() {
    const grid = state.shown;
    byId("status").textContent = grid ? `showing the ${grid} × ${grid} grid` : "";
    byId("status").dataset.grid = grid ?? "";
  }

  new OpenSeadragon.MouseTracker({
    element: viewer.canvas,
    moveHandler: (event) => {
      state.pointer = event.position;
      if (!state.pinned) show(cellAt(event.position));
    },
    leaveHandler: () => {
      state.pointer = null;
      if (!state.pinned) show(null);
    },
  });

  viewer.addHandler("canvas-click", (event) => {
    if (!event.quick) return; // a drag, not a click
    const target = cellAt(event.position);
    const same = state.pinned && target && ["grid", "x", "y"].every((key) => state.pinned[key] === target[key]);
    state.pinned = same ? null : target;
    show(target);
    writeUrl();
  });

  viewer.addHandler("viewport-change", () => {
    if (!state.items.size) return;
    updateGrid(); // every frame of a zoom: the grid switches as the icons grow
    drawLabels();
  });
  viewer.addHandler("animation-finish", writeUrl);

  byId("layer").addEventListener("change", (event) => {
    const layer = event.target.value;
    const atlases = state.atlases.filter((atlas) => atlas.layer === layer);
    open(atlases.find((atlas) => atlas.kind === "layer") ?? atlases[0], "auto");
  });
  byId("class").addEventListener("change", (event) => {
    const atlas = state.atlases.find((candidate) => candidate.id === event.target.value);
    open(atlas, atlas.grids.some((grid) => String(grid.size) === state.grid) ? state.grid : "auto");
  });
  byId("grid").addEventListener("change", (event) => open(state.atlas, event.target.value));
  byId("icons").addEventListener("change", (event) => {
    state.icons = event.target.value;
    const centre = viewer.viewport.getCenter(); // the same place, zoom and pinned cell, drawn with other icons
    open(state.atlas, state.grid, state.pinned, { zoom: viewer.viewport.getZoom(), x: centre.x, y: centre.y });
  });
  byId("class-search").addEventListener("change", (event) => {
    const wanted = event.target.value.trim().toLowerCase();
    const k = state.names.findIndex((name) => name.toLowerCase() === wanted);
    event.target.classList.toggle("unknown", wanted !== "" && k < 0);
    event.target.title = wanted !== "" && k < 0 ? `no class is named “${event.target.value}”` : "";
    if (wanted === "" || k >= 0) chooseClass(k >= 0 ? k : null);
  });
  byId("labels").addEventListener("change", (event) => {
    state.labels = event.target.checked;
    drawLabels();
    writeUrl();
  });
  byId("copy-link").addEventListener("click", () => {
    writeUrl();
    navigator.clipboard.writeText(location.href).then(
      () => (byId("status").textContent = "link copied"),
      (error) => (byId("status").textContent = `cannot copy the link: ${error.message}`)
    );
  });
  byId("class-atlas").addEventListener("click", (event) => {
    event.preventDefault();
    const atlas = state.atlases.find((candidate) => candidate.id === event.target.dataset.atlas);
    open(atlas, atlas.grids.some((grid) => String(grid.size) === state.grid) ? state.grid : "auto");
  });

  fetch("atlases.json")
    .then((response) => {
      if (!response.ok) throw new Error(`atlases.json: HTTP ${response.status}`);
      return response.json();
    })
    .then((manifest) => {
      state.atlases = manifest.atlases;
      if (!state.atlases.length) throw new Error("atlases.json lists no atlases");
      const wanted = new URLSearchParams(location.hash.slice(1));
      const atlas = state.atlases.find((candidate) => candidate.id === wanted.get("atlas")) ?? state.atlases[0];
      const grid = atlas.grids.some((entry) => String(entry.size) === wanted.get("grid")) ? wanted.get("grid") : "auto";
      const k = Number(wanted.get("class") ?? NaN);
      state.classIndex = Number.isInteger(k) && k >= 0 ? k : null;
      state.labels = wanted.get("labels") !== "0";
      state.icons = wanted.get("icons") ?? "visualisation";
      byId("labels").checked = state.labels;
      state.atlas = atlas; // parseCell reads its grids
      open(atlas, grid, parseCell(grid, wanted.get("cell"), wanted.get("cellgrid")), parseView(wanted));
    })
    .catch((error) => {
      const hint = location.protocol === "file:" ? " Browsers do not let a file:// page read its data: run `atlas view <run folder>`." : "";
      showError(`Cannot load the atlases: ${error.message}.${hint}`);
    });
})();
