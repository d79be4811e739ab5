"""The mathematics: NeUQI's scale search and its compiled CPU and GPU kernels, GPTQ, the
distillation loop, bit-packing. Pure tensor code, no I/O.
"""
