"""sfxflow.benchmarks layer (see ARCHITECTURE.md)."""
