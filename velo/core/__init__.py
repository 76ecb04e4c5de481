"""What every part of VELO agrees on, with no I/O: the QoS reward, the state a policy sees and
the policies that read it, the verifier, conversations and answer shapes, the cloud-load
features, the QA record format and where the bundled models are. Imports only velo.v1."""
