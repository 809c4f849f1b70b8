"""sfxflow.report layer (see ARCHITECTURE.md): the run report's HTML page and plots
(:mod:`~sfxflow.report.html`), frame pictures (:mod:`~sfxflow.report.picture`), writing and
refreshing the pages (:mod:`~sfxflow.report.page`), and the headless-browser check
(:mod:`~sfxflow.report.headless`). The report's data is gathered by
:mod:`sfxflow.pipeline.report`; this layer computes no science of its own."""
