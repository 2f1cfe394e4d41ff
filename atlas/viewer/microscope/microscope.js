// The microscope pages are plain HTML; this adds keyboard steps between units (left and right arrows)
// and, on a layer page, a box that filters the units by number (Enter opens the one typed).
"use strict";

(function () {
  document.addEventListener("keydown", (event) => {
    if (event.altKey || event.ctrlKey || event.metaKey || event.target.closest("input, select, textarea")) return;
    const rel = { ArrowLeft: "prev", ArrowRight: "next" }[event.key];
    const link = rel && document.querySelector(`.neighbours a[rel="${rel}"]`);
    if (link) location.href = link.href;
  });

  const jump = document.getElementById("jump");
  if (!jump) return;
  const input = jump.querySelector("input");
  const units = [...document.querySelectorAll("#units a.unit")];
  input.addEventListener("input", () => {
    const typed = input.value.trim();
    for (const unit of units) unit.hidden = typed !== "" && !unit.dataset.unit.startsWith(typed);
  });
  jump.addEventListener("submit", (event) => {
    event.preventDefault();
    const unit = units.find((candidate) => candidate.dataset.unit === input.value.trim());
    if (unit) location.href = unit.href;
  });
})();
