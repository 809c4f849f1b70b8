"""sfxflow.report layer (see ARCHITECTURE.md): the run report's HTML page and plots, frame
pictures, and the headless-browser check. The report's data is gathered by
:mod:`sfxflow.pipeline.report`."""
