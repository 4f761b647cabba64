"""``localdiff probe``: what a dataset's second-order statistics imply for a denoiser, before any network
is trained (issue 24). :func:`probe` computes it; :func:`field_explorer` is the reusable interactive
field explorer of its page."""

from .explorer import field_explorer
from .levels import noise_levels
from .receptive import ReceptiveField, receptive_field
from .run import DatasetProbe, ProbeResult, probe

__all__ = ["probe", "ProbeResult", "DatasetProbe", "field_explorer", "receptive_field", "ReceptiveField",
           "noise_levels"]
