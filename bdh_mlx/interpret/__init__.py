"""Look inside a BDH model: activation statistics, a neuron atlas, synapses, neuron graphs and an HTML report.

Names are imported on first use, so that a command needing only numpy runs without the optional extras
(matplotlib, scipy, networkx, powerlaw: ``pip install "bdh-mlx[interpret]"``).
"""

import importlib

from .common import InterpretError, stream_activations

_WHERE = {
    "Atlas": "atlas", "build_atlas": "atlas",
    "Moments": "stats", "activation_stats": "stats",
    "build_report": "report", "byte_activity": "report", "write_report": "report",
    "auc": "synapses", "auc_interval": "synapses", "changing_synapses": "synapses", "concept_synapses": "synapses",
    "strongest_synapses": "synapses", "synapse_series": "synapses", "synapse_state": "synapses",
    "degree_preserving_shuffle": "graphs", "degrees": "graphs", "graph_summary": "graphs", "modularity": "graphs",
    "neuron_graph": "graphs", "power_law_fit": "graphs",
}

__all__ = ["InterpretError", "stream_activations", *_WHERE]


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
