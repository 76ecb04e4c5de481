"""The edge's stores: the vector cache over Milvus, the answer texts, the embedders (ONNX in
process or Triton) and the per-row reuse calibration. Built on velo.core and velo.runtime."""
