"""AiiDA work chains of aiida-equicsp, installed as ``aiida_equicsp.workchains`` (not implemented yet)."""
