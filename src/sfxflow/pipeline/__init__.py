"""sfxflow.pipeline layer (see ARCHITECTURE.md)."""
