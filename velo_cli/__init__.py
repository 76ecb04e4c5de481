"""The `velo` command line: the top of the import graph (it starts daemons and the lab)."""
