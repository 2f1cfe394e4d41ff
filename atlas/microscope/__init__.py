"""Microscope lenses: linkable pages for every unit of a layer (after OpenAI Microscope, reference 6).

Lenses, as Microscope has them (a lens points at one resolution):
- unit: its feature visualisations (lucid's channel objective, many units per batch; the neuron at the
  centre only; several diverse images, lucid's diversity objective) and its dataset examples: the top-k
  images by the unit's maximum over (interior) positions, found in one streaming pass for all the run's
  layers with a running top-k per unit (memory independent of the dataset's size), shown whole and as
  the patch around that maximum;
- circuit (the Circuits articles, `circuits`): the unit's strongest inputs from the next layer below in
  the run, by expanded weights where the path is affine and by attribution on its top examples, and the
  ablation of those inputs; the inputs link to their own unit pages;
- layer: DeepDream (maximise the layer's mean squared activation), caricatures of a few photos, and one
  photo dreamt at each layer of the site (the 2015 DeepDream, `dreams`);
- model: the graph of its layers (`graph`), each node linked to its layer page;
- atlas: when a layer atlas of the same model and layer exists, each unit links to the atlas cell whose
  mean activation has the highest cosine with the unit's basis vector (viewer URL `#...&cell=x,y`).

Results are kept next to the site in `microscope.h5`, keyed by model, layer, lens and a hash of the
lens's settings; unit visualisations carry a done flag per unit and are written after every batch,
so a rerun with more units or another layer computes only what is missing:

    /<model>/                         attrs: graph (JSON: layers, nodes, edges; graph.store_graph)
    /<model>/<layer>/<lens>/          attrs: latest (the key of the settings last used)
    /<model>/<layer>/<lens>/<key>/    attrs: settings (JSON)
        examples:   value [C, k] float32 (NaN: fewer than k images), row [C, k] int64 (-1), position [C, k, 2]
                    int32 (y, x in the layer's map, of size attrs map_size), paths [M] str (what rows index)
        units:      images [C, S, S, 3] uint8, objective [C] float32, done [C] bool (the channel lens)
        neurons:    the same, of the neuron lens
        diversity:  images [C, D, S, S, 3] uint8, objective [C, D] float32, done [C] bool
        circuit:    report [C] str (JSON, circuits.circuit_report), done [C] bool; settings name the layer below
        dream:      input [H, W, 3] uint8, image [H, W, 3] uint8 (dreams.dream_lens)
        deepdream:  image [S, S, 3] uint8; attrs objective
        caricature: photos [P] str, inputs [P, S, S, 3] uint8 (the photos as the model saw them),
                    images [P, S, S, 3] uint8, objective [P] float32

The package, one module per part: `results` (the results file), `examples` (dataset examples),
`lenses` (the optimised lenses), `circuits` (the circuit lens), `dreams` (the photo dreamt at each
layer), `graph` (the model graph), `links` (the atlas lens) and `site` (the pages). The run that ties
them together, `atlas run microscope`, is `pipelines.microscope`.
"""

from atlas.microscope.examples import TopK, merge_top_k, top_activating, unit_maxima
from atlas.microscope.lenses import parse_units
from atlas.microscope.links import best_cells, find_layer_atlas
from atlas.microscope.results import RESULTS

__all__ = [
    "RESULTS",
    "TopK",
    "best_cells",
    "find_layer_atlas",
    "merge_top_k",
    "parse_units",
    "top_activating",
    "unit_maxima",
]
