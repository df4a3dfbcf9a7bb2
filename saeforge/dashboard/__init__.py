"""Feature dashboards: one streaming pass over activations -> a static site with a page per latent.

``build_dashboard(DashboardConfig(sae=..., data=..., out=...))`` writes the site; ``serve`` / ``start_background``
show it on localhost. See docs/dashboard.md.
"""
from saeforge.dashboard.build import DashboardConfig, build_dashboard
from saeforge.dashboard.stream import LatentStats, linear_histogram, quantile_edges
from saeforge.dashboard.logits import decoder_neighbors, logit_effects, logit_effects_for_model
from saeforge.dashboard.serve import make_server, serve, start_background
from saeforge.dashboard.site import load_explanations, read_payload, shard_path

__all__ = [
    "DashboardConfig", "LatentStats", "build_dashboard", "linear_histogram", "quantile_edges", "decoder_neighbors",
    "logit_effects", "logit_effects_for_model", "make_server", "serve", "start_background", "load_explanations",
    "read_payload", "shard_path",
]
