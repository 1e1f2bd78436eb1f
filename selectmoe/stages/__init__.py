"""Pipeline stages: plain ``run_<stage>(cfg) -> <Stage>Result`` functions."""
