"""sfxflow.io layer (see ARCHITECTURE.md)."""
