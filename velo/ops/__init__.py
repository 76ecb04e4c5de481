"""Launching and operating VELO: `velo up`'s stack of daemons, a local Milvus, request replays,
diagnosis and workloads. Sits above the daemons (it starts them), below lab and the CLI."""
