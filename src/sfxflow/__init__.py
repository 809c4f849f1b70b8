"""sfxflow: serial crystallography processing from a laptop to a cluster to cloud object storage."""

from sfxflow.kernel_cache import seed_numba_cache

__version__ = "0.1.0"
__all__ = ["__version__"]

# before any module with a numba kernel is imported: numba picks its cache folder per kernel
# at import (see sfxflow.kernel_cache)
seed_numba_cache()
