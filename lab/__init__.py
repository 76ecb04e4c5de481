"""The offline lab: simulator, experiments, benchmarks, figures and `velo train`.

No daemon imports it; it imports the shared core (velo) and the learner (trainerd.lrs).
"""
