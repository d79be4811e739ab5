"""Reading and running a model: safetensors checkpoints, the supported families as data, their
decoder layers and mixture-of-experts blocks, the built-in real models and synthetic checkpoints.
"""
