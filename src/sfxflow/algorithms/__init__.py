"""sfxflow.algorithms layer (see ARCHITECTURE.md)."""
