"""sfxflow.cost layer (see ARCHITECTURE.md)."""
