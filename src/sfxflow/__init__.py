"""sfxflow: serial crystallography processing from a laptop to a cluster to cloud object storage."""

__version__ = "0.1.0"
__all__ = ["__version__"]
