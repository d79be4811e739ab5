"""What neuqi writes and reads back: its own output folder (writer and loader) and the exports
(compressed-tensors, GGUF).
"""
