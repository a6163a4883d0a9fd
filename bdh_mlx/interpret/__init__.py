"""Look inside a BDH model: activation statistics, a neuron atlas, synapses, neuron graphs and an HTML report."""

from .atlas import Atlas, build_atlas
from .common import InterpretError, stream_activations
from .graphs import degrees, graph_summary, modularity, neuron_graph, power_law_fit
from .report import build_report, byte_activity, write_report
from .stats import activation_stats
from .synapses import concept_synapses, strongest_synapses, synapse_series, synapse_state

__all__ = [
    "Atlas",
    "InterpretError",
    "activation_stats",
    "build_atlas",
    "build_report",
    "byte_activity",
    "concept_synapses",
    "degrees",
    "graph_summary",
    "modularity",
    "neuron_graph",
    "power_law_fit",
    "stream_activations",
    "strongest_synapses",
    "synapse_series",
    "synapse_state",
    "write_report",
]
