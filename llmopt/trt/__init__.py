"""TensorRT branch: profiles from the serving envelope, engine metadata and compatibility (pure), and the
one adapter module that imports ``tensorrt`` (lazily, inside its functions)."""
