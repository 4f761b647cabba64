"""EDM's networks (Karras et al. 2022, NVlabs/edm): SongUNet (DDPM++, NCSN++), DhariwalUNet (ADM) and the
VP, VE, iDDPM and EDM preconditionings, re-implemented to load EDM's weights exactly: from its pickled
snapshots (read without running the code they embed), from a {init_kwargs, state_dict, meta} torch file,
or from localdiff's safetensors + JSON record."""

from .load import edm_network_from_parts, infer_precond, load_edm_network, network_record
from .precond import CLASS_NAMES, EDMNetwork, precond_name
from .snapshot import NetworkParts, Snapshot, read_edm_snapshot

__all__ = ["CLASS_NAMES", "EDMNetwork", "NetworkParts", "Snapshot", "edm_network_from_parts", "infer_precond",
           "load_edm_network", "network_record", "precond_name", "read_edm_snapshot"]
