"""The CRISPR paper's calibration baselines (docs/methods/calibration.md): Contextual Calibration (Zhao et al.,
ICML 2021) and Domain-context Calibration (Fei et al., ACL 2023), as methods through the runner and as controls
of every CRISPR run (``--baselines cc,dc``)."""
