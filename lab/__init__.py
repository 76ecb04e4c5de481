"""The offline lab: simulator, experiments, benchmarks, figures and `velo train`.

No daemon imports it; it imports the daemons and the layers of velo below it (docs/architecture.md).
"""
