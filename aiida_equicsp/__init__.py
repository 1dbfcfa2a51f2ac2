"""AiiDA plugin for EquiCSP (not implemented yet: see the README's status section)."""

__version__ = "0.1.0"
